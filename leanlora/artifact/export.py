"""Export any leanlora adapter as a LoRA adapter other runtimes load, or as a merged model.

Whatever produced A and B (dense, bank), whichever components are on (fixed, nested at the
chosen rank, surviving gates) and at whatever precision, the deployed update of each module is
``scale_i · B_i A_i`` with a module-specific rank r_i. Two ways to write that down:

* ``peft``: each module keeps its own rank; PEFT's ``rank_pattern`` and ``alpha_pattern`` carry
  r_i and ``lora_alpha_i = scale_i · r_i`` (PEFT's scaling is ``lora_alpha / r``). Exact in PEFT;
  runtimes that ignore the patterns apply the wrong scale to every module whose rank or scale
  differs from the top-level ``r`` / ``lora_alpha``.
* ``peft-uniform``: A is padded with zero rows and B with zero columns to one rank R = max r_i,
  ``scale_i`` is folded into B, and ``lora_alpha = r = R`` makes every runtime's scale 1
  whether it divides alpha by the config's r or by each tensor's own rank (both are R). The
  padded components add zero to the update. No patterns; ``modules_to_save`` are refused unless
  asked for, since a LoRA runtime has nowhere to put a full replacement module.

The merged model is written by :mod:`leanlora.artifact.export_merged`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leanlora.artifact.errors import AdapterSaveError, ExportError
from leanlora.artifact.atomic import atomic_folder, atomic_save_tensors, atomic_write_bytes
from leanlora.artifact.export_merged import export_merged
from leanlora.artifact.finite import first_nonfinite
from leanlora.inject import adapted_layers, shared_state
from leanlora.artifact.identity import base_identity

PEFT_PREFIX = "base_model.model."
# PEFT's file names (what PeftModel.from_pretrained looks for): change them here only.
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
FORMATS = ("peft", "peft-uniform", "merged")


def _module_factors(model: nn.Module) -> tuple[list[tuple[str, torch.Tensor, torch.Tensor, float]], bool]:
    """[(name, A (r_i, in), B (out, r_i), scale_i)] in model order, and PEFT's fan_in_fan_out flag."""
    factors = [(name, *layer.export_factors()) for name, layer in adapted_layers(model)]
    transposed = {bool(getattr(layer.base, "transposed", False)) for _, layer in adapted_layers(model)}
    if len(transposed) > 1:
        raise ExportError("PEFT's fan_in_fan_out is one flag per adapter; this model mixes Conv1D and Linear targets")
    return factors, transposed.pop()


def peft_lora_state(model: nn.Module, *, uniform: bool = False,
                    modules_to_save: bool | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config dict, tensors) of the PEFT LoRA adapter equivalent to ``model``'s adapter.

    ``uniform`` writes the ``peft-uniform`` layout (module docstring). ``modules_to_save``: write
    the fully trained modules too; None means yes for ``peft`` and refuse for ``peft-uniform``.
    """
    shared = shared_state(model)
    factors, fan_in_fan_out = _module_factors(model)
    saved = list(shared.modules_to_save_names)
    if saved and modules_to_save is None and uniform:
        raise ExportError(f"modules_to_save {saved} are trained in full and a LoRA runtime (vLLM, llama.cpp) "
                          "cannot carry them; export with --format merged (the full model), or pass "
                          "--with-modules-to-save (modules_to_save=True) for a PEFT-only adapter")
    keep_saved = saved if (modules_to_save is None or modules_to_save) else []
    top_rank = max(max(a.shape[0] for _, a, _, _ in factors), 1)
    # the uniform layout needs no patterns; PEFT's scaling is lora_alpha / r
    rank_pattern = {} if uniform else {name: a.shape[0] for name, a, _, _ in factors}
    alpha_pattern = {} if uniform else {name: scale * a.shape[0] for name, a, _, scale in factors}
    tensors: dict[str, torch.Tensor] = {}
    for name, a, b, scale in factors:
        if uniform:  # A padded with zero rows and B with zero columns to top_rank, scale folded into B
            pad = top_rank - a.shape[0]
            a = torch.cat([a, a.new_zeros(pad, a.shape[1])])
            b = torch.cat([b * scale, b.new_zeros(b.shape[0], pad)], dim=1)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.contiguous()
    tensors.update({f"{PEFT_PREFIX}{name}.{key}": value for name in keep_saved
                    for key, value in model.get_submodule(name).state_dict().items()})
    first = factors[0][0]
    config = {
        "peft_type": "LORA",
        "task_type": shared.config.task_type,  # PEFT's AutoPeftModelFor* classes choose by it
        "base_model_name_or_path": base_identity(model)["name_or_path"],
        "r": top_rank,
        "lora_alpha": top_rank if uniform else alpha_pattern[first] * top_rank / rank_pattern[first],
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "target_modules": [name for name, *_ in factors],
        "modules_to_save": keep_saved or None,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
    }
    return config, tensors


def export_peft(model: nn.Module, directory: str | os.PathLike, *, uniform: bool = False,
                modules_to_save: bool | None = None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` that ``PeftModel.from_pretrained``
    loads; ``uniform=True`` writes the ``peft-uniform`` layout every LoRA runtime reads alike.

    Refuses an adapter holding NaN/inf (nothing is written); the folder appears whole or not at all.
    """
    directory = Path(directory)
    config, tensors = peft_lora_state(model, uniform=uniform, modules_to_save=modules_to_save)
    if (bad := first_nonfinite(tensors.items())) is not None:
        raise AdapterSaveError(f"{directory}: not exported: tensor {bad[0]!r} of the PEFT adapter holds {bad[1]} "
                               "(the adapter's factors are not finite)")
    with atomic_folder(directory, owned=(PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME)) as tmp:
        atomic_save_tensors(tensors, tmp / PEFT_WEIGHTS_NAME, metadata={"format": "pt"})
        atomic_write_bytes(tmp / PEFT_CONFIG_NAME, json.dumps(config, indent=2).encode())
    return directory


def export(model: nn.Module, directory: str | os.PathLike, format: str = "peft", *,
           modules_to_save: bool | None = None, tokenizer: Any = None, in_place: bool = False) -> Path:
    """Write ``model``'s adapter to ``directory`` as ``peft``, ``peft-uniform`` or ``merged``.

    ``merged`` saves the whole model with every update folded in (:func:`leanlora.export_merged`;
    ``in_place=True`` folds into ``model`` itself instead of a copy, ``tokenizer`` is saved beside it).
    """
    if format not in FORMATS:
        raise ExportError(f"format={format!r} is invalid: allowed {list(FORMATS)}")
    if format == "merged":
        return export_merged(model, directory, tokenizer=tokenizer, in_place=in_place)
    return export_peft(model, directory, uniform=format == "peft-uniform", modules_to_save=modules_to_save)
