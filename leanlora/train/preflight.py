"""Check a run's adapter against its model before any weight or data is read.

Loading a model (and above all dequantizing a GGUF file) and tokenizing a data set take
minutes on a CPU; a misspelt ``target_modules`` or ``modules_to_save`` should not cost them.
The model is built from its config alone on the ``meta`` device (no storage, no weights) and
the same name matching as :func:`leanlora.inject` runs on it, so a pattern that matches nothing
fails here with inject's own message and the names the model does have.
"""

from __future__ import annotations

import torch
from torch import nn

from leanlora.config import ConfigError
from leanlora.inject import InjectError, _check_shape
from leanlora.targets import find_modules_to_save, find_targets
from leanlora.train.models import model_config, transformers_errors_only
from leanlora.train.runconfig import RunConfig


class PreflightError(ConfigError):
    """The adapter does not fit the model; found on the model's skeleton, before loading it."""


def skeleton(run: RunConfig, num_labels: int = 2) -> nn.Module:
    """The run's model with its task head, built from its config on the meta device (no weights)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = model_config(run.model)
    with transformers_errors_only(), torch.device("meta"):
        if run.data.task == "causal_lm":
            return AutoModelForCausalLM.from_config(config)
        head_config = type(config).from_dict({**config.to_dict(), "num_labels": max(1, num_labels)})
        return AutoModelForSequenceClassification.from_config(head_config)


def task_head(model: nn.Module) -> list[str]:
    """The top-level modules with weights outside the pretrained body: a classifier's new head."""
    body = getattr(model, "base_model_prefix", "")
    return [name for name, child in model.named_children() if name != body and any(True for _ in child.parameters())]


def check_adapter(run: RunConfig, model: nn.Module | None = None) -> None:
    """Raise PreflightError when ``run.adapter`` would fail :func:`leanlora.inject` on the run's model."""
    model = skeleton(run) if model is None else model
    adapter = run.adapter
    try:
        modules = dict(model.named_modules())
        for name in find_targets(model, adapter):
            _check_shape(name, modules[name], adapter)
        find_modules_to_save(model, adapter)
    except (InjectError, ConfigError) as err:
        message, head = str(err), task_head(model)
        where = f"model.path={run.model.path!r} ({type(model).__name__}), checked before loading its weights"
        hint = ""
        if "modules_to_save" in message and run.data.task == "causal_lm":
            hint = "; a causal LM needs none (adapter.modules_to_save=[] is the default for data.task=causal_lm)"
        elif "modules_to_save" in message and head:
            hint = f"; this model's {run.data.task} head is {head}: set adapter.modules_to_save={head}"
        keyed = message.split(" ", 1)[0].split("=", 1)[0].split(".", 1)[0] in _ADAPTER_KEYS
        raise PreflightError(f"adapter{'.' if keyed else ': '}{message} [{where}]{hint}") from None


_ADAPTER_KEYS = {"target_modules", "exclude_modules", "modules_to_save", "r", "bank", "nf4"}


# the names transformers gives a learned table of positions (BERT, RoBERTa, ALBERT, DistilBERT: the
# first; GPT-2: the second; OPT, BART: the third); models that compute positions (RoPE, ALiBi,
# relative biases) have none and place any length
_POSITION_TABLES = ("position_embeddings", "wpe", "embed_positions")


def position_limit(model: nn.Module) -> int | None:
    """The tokens one sequence may hold in ``model``: the usable rows of its learned position table
    (RoBERTa's start after its padding index, OPT's after an offset of 2); None when it has none."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in _POSITION_TABLES:
            skipped = max(getattr(module, "offset", 0), 0 if module.padding_idx is None else module.padding_idx + 1)
            return module.num_embeddings - skipped
    return None


def check_max_length(run: RunConfig, model: nn.Module) -> None:
    """Refuse a ``data.max_length`` longer than ``model``'s table of positions: the first longer
    example would otherwise stop the run with a shape error (an index error on a GPU) mid-training."""
    limit = position_limit(model)
    if limit is not None and run.data.max_length > limit:
        raise PreflightError(f"data.max_length={run.data.max_length} is longer than the {limit} positions "
                             f"{type(model).__name__} at model.path={run.model.path!r} has (its learned position "
                             f"table); set data.max_length to at most {limit}")
