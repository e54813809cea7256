"""Export any leanlora adapter as a standard PEFT LoRA adapter.

Whatever produced A and B (dense, bank), whichever components are on (fixed, nested at the
chosen rank, surviving gates) and at whatever precision, the deployed update of each module is
``scale · B A`` with a module-specific rank. PEFT expresses exactly that with ``rank_pattern``
and ``alpha_pattern`` (``lora_alpha / r`` = scale), so every LoRA serving stack can load it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leanlora.adapter_errors import AdapterSaveError
from leanlora.atomic import atomic_folder, atomic_save_tensors, atomic_write_bytes
from leanlora.finite import first_nonfinite
from leanlora.inject import adapted_layers, shared_state
from leanlora.io import base_identity

PEFT_PREFIX = "base_model.model."
# PEFT's file names (what PeftModel.from_pretrained looks for): change them here only.
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"


def peft_lora_state(model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config dict, tensors) of the PEFT LoRA adapter equivalent to ``model``'s adapter."""
    shared = shared_state(model)
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    targets: list[str] = []
    fan_in_fan_out = set()
    for name, layer in adapted_layers(model):
        a, b, scale = layer.export_factors()     # (r_i, in), (out, r_i), float
        r_i = a.shape[0]
        targets.append(name)
        rank_pattern[name] = r_i
        alpha_pattern[name] = scale * r_i         # PEFT: scaling = lora_alpha / r
        fan_in_fan_out.add(bool(getattr(layer.base, "transposed", False)))
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.contiguous()
    if len(fan_in_fan_out) > 1:
        raise ValueError("PEFT's fan_in_fan_out is one flag per adapter; this model mixes Conv1D and Linear targets")
    modules = dict(model.named_modules())
    for name in shared.modules_to_save_names:
        for key, value in modules[name].state_dict().items():
            tensors[f"{PEFT_PREFIX}{name}.{key}"] = value
    max_r = max(rank_pattern.values())
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_identity(model)["name_or_path"],
        "r": max_r,
        "lora_alpha": alpha_pattern[targets[0]] * max_r / rank_pattern[targets[0]],
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "target_modules": targets,
        "modules_to_save": list(shared.modules_to_save_names) or None,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out.pop(),
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    return config, tensors


def export_peft(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` that ``PeftModel.from_pretrained`` loads.

    Refuses an adapter holding NaN/inf (nothing is written); the folder appears whole or not at all.
    """
    directory = Path(directory)
    config, tensors = peft_lora_state(model)
    bad = first_nonfinite(tensors.items())
    if bad is not None:
        raise AdapterSaveError(f"{directory}: not exported: tensor {bad[0]!r} of the PEFT adapter holds {bad[1]} "
                               "(the adapter's factors are not finite)")
    with atomic_folder(directory, owned=(PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME)) as tmp:
        atomic_save_tensors(tensors, tmp / PEFT_WEIGHTS_NAME, metadata={"format": "pt"})
        atomic_write_bytes(tmp / PEFT_CONFIG_NAME, json.dumps(config, indent=2).encode())
    return directory
