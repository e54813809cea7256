"""The optimizer a Hugging Face ``Trainer`` user asked for (``args.optim``), over leanlora's groups.

leanlora trains its adapter with per-role parameter groups (:func:`leanlora.param_groups`: the
VB-LoRA bank and logits and the hard-concrete gates at their own learning rates, without weight
decay). Any optimizer that takes parameter groups gets them: the class and keyword arguments are
the ones ``Trainer.get_optimizer_cls_and_kwargs`` returns for ``args.optim`` (and ``args.optim_args``),
or the user's ``optimizer_cls_and_kwargs``. torch's AdamW (``adamw_torch``, ``adamw_torch_fused``)
runs as :func:`leanlora.optim.adamw` (fused on CUDA).

Optimizers that build their own groups from the model's layers (GaLore, APOLLO, LOMO, the
layer-wise variants, optimizer factories such as Muon's) would drop those roles, and are refused
with a message that names ``args.optim``; nothing is replaced silently.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from leanlora.optim import adamw, param_groups

# args.optim names whose optimizer is built from the model's layers, not from parameter groups
MODEL_BOUND_PREFIXES = ("galore", "apollo", "lomo", "adalomo")
MODEL_BOUND_KWARGS = ("params", "model", "optimizer_dict")
SUPPORTED = ("adamw_torch (default), adamw_torch_fused, adafactor, sgd, adagrad, rmsprop, the bitsandbytes ones "
             "(adamw_8bit, paged_adamw_8bit, lion_8bit, ...), the torchao ones (adamw_torch_4bit, adamw_torch_8bit), "
             "schedule_free_*, stable_adamw, grokadamw: any optim whose optimizer takes parameter groups")
# keyword arguments leanlora.optim.adamw passes on to torch's AdamW
ADAMW_KWARGS = frozenset({"lr", "betas", "eps", "weight_decay", "fused"})
# (optimizer class, keyword arguments): what Trainer.get_optimizer_cls_and_kwargs returns
OptimizerSpec = tuple[Any, dict[str, Any]]


class UnsupportedOptimizer(ValueError):
    """``args.optim`` names an optimizer that cannot take leanlora's parameter groups."""


def refusal(name: str, why: str) -> UnsupportedOptimizer:
    return UnsupportedOptimizer(f"args.optim={name!r} is not supported with a leanlora adapter: {why}; leanlora "
                                f"trains with per-role parameter groups (gates, bank, logits at their own learning "
                                f"rates). Supported: {SUPPORTED}")


def optimizer_class_and_kwargs(args, model: nn.Module, cls_and_kwargs: OptimizerSpec | None = None) -> OptimizerSpec:
    """(optimizer class, keyword arguments) for ``args.optim``, or the user's pair; refuses model-bound ones."""
    optim = getattr(args, "optim", "adamw_torch")
    name = str(getattr(optim, "value", optim))  # an OptimizerNames member or a plain string
    if cls_and_kwargs is None:
        if name.startswith(MODEL_BOUND_PREFIXES):
            raise refusal(name, "it builds its own optimizer from the model's linear layers")
        from transformers import Trainer

        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    else:
        cls, kwargs = cls_and_kwargs
        name = f"{name}' with optimizer_cls_and_kwargs={getattr(cls, '__name__', cls)!r}"
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise refusal(name, f"it is an optimizer factory ({getattr(cls, '__name__', cls)!r}) that groups the "
                            "model's parameters itself")
    if bound := [k for k in MODEL_BOUND_KWARGS if k in kwargs]:
        raise refusal(name, f"its keyword arguments carry their own {bound}")
    return cls, dict(kwargs)


def leanlora_optimizer(model: nn.Module, args, cls_and_kwargs: OptimizerSpec | None = None) -> torch.optim.Optimizer:
    """``args.optim``'s optimizer over ``leanlora.param_groups(model, args.learning_rate, args.weight_decay)``.

    ``model`` is the bare model that holds the adapter (not a DDP wrapper). Raises
    :class:`UnsupportedOptimizer` for an optimizer that cannot take parameter groups.
    """
    cls, kwargs = optimizer_class_and_kwargs(args, model, cls_and_kwargs)
    groups = param_groups(model, kwargs.get("lr", args.learning_rate), args.weight_decay)
    if cls is torch.optim.AdamW and set(kwargs) <= ADAMW_KWARGS:
        return adamw(groups, **kwargs)
    return cls(groups, **kwargs)
