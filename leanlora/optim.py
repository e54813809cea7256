"""Optimizer parameter groups by role, for our loop and for HF ``Trainer`` alike.

A strategy module declares the role of each of its parameters in a class attribute
``PARAM_ROLES = {"attr_name": "role"}``; parameters it does not name are plain "adapter"
weights, and trainable parameters outside adapted layers (``modules_to_save``) are "head".
Roles and their defaults (learning rate, weight decay):

    adapter  lr,               weight_decay     LoRA factors, B-LoRA's E
    head     lr,               weight_decay     a classifier trained in full
    bank     bank.bank_lr,     0                VB-LoRA vector bank (default 1e-2; paper 1e-3; no decay)
    logits   bank.logits_lr,   0                VB-LoRA top-k logits (paper: 1e-2, no decay)
    gates    gates.lr,         0                hard-concrete rank / bit gates
    scales   lr,               0                learned quantizer ranges
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from leanlora.config import ConfigError
from leanlora.inject import shared_state

NO_DECAY_ROLES = ("bank", "logits", "gates", "scales")


def parameter_roles(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> role, for every parameter declared by a strategy's PARAM_ROLES."""
    roles: dict[int, str] = {}
    for module in model.modules():
        for attr, role in getattr(type(module), "PARAM_ROLES", {}).items():
            value = getattr(module, attr, None)
            if isinstance(value, nn.Parameter):  # a member's row of a stack is not: its template declares it
                roles[id(value)] = role
    return roles


def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0,
                 role_lr: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """AdamW-ready groups; each group carries ``role`` so schedulers and logs can tell them apart."""
    from leanlora.layer import AdaptedLinear

    shared = shared_state(model)
    config = shared.config
    lrs = {"adapter": lr, "head": lr, "scales": lr, "bank": config.bank.bank_lr,
           "logits": config.bank.logits_lr, "gates": config.gates.lr, **(role_lr or {})}
    roles = parameter_roles(model)
    adapter_ids = {id(p) for m in model.modules() if isinstance(m, AdaptedLinear)
                   for _, p in m.adapter_parameters()}
    adapter_ids |= {id(p) for p in shared.groups.parameters()}  # the stacked rows of the layers
    grouped: dict[str, list[nn.Parameter]] = {}
    for p in model.parameters():  # each parameter once, however many modules share it
        if not p.requires_grad:
            continue
        role = roles.get(id(p)) or ("adapter" if id(p) in adapter_ids else "head")
        grouped.setdefault(role, []).append(p)
    return [{"params": params, "lr": lrs.get(role, lr), "role": role,
             "weight_decay": 0.0 if role in NO_DECAY_ROLES else weight_decay}
            for role, params in grouped.items()]


def float16_role(groups: list[dict[str, Any]]) -> str | None:
    """The role of the first optimizer group holding a float16 parameter, or None."""
    return next((g.get("role", "?") for g in groups for p in g["params"] if p.dtype == torch.float16), None)


def adamw(groups: list[dict[str, Any]], **kwargs) -> torch.optim.Optimizer:
    """torch's AdamW over ``groups``, fused when every parameter is a plain CUDA tensor.

    The adapter's parameters are a few stacked tensors per group of layers
    (:mod:`leanlora.groups.stacking`), so torch's per-tensor host work stays small.
    """
    params = [p for g in groups for p in g["params"]]
    half = float16_role(groups)
    if half is not None:
        # AdamW keeps its moments in the parameter's dtype: fp16 rounds eps (1e-8) to 0, and a
        # gradient of 0 (LoRA's A while B is still 0) then makes the first update 0 / 0
        raise ConfigError(f"AdamW cannot train float16 weights (the {half!r} group holds some): its second moment "
                          "and eps underflow in float16 and the first update turns them NaN; train them in float32 "
                          "or bfloat16 (adapter.adapter_dtype, and a float32 model.dtype for trained heads)")
    if "fused" not in kwargs and params and all(type(p) in (torch.Tensor, nn.Parameter) and p.is_cuda for p in params):
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)
