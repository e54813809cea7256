"""Export the adapted model as one plain ``transformers`` checkpoint with every update folded in.

``W = W0 + scale · B A`` for each adapted module, then ``save_pretrained`` (safetensors). Any
runtime that loads the base architecture loads the result; nothing of leanlora or PEFT is needed.

* An NF4 base is dequantized: W0 is the NF4-rounded weight the adapter was trained against, in
  the base dtype, and the file holds dense weights (as large as the unquantized base). Quantize
  the merged model again with the serving runtime's own tools if a smaller file is wanted.
* A model loaded from a GGUF file carries transformers' GGUF quantization marker although its
  weights are already dequantized, and ``save_pretrained`` refuses such a model; its weights are
  moved into a fresh model of the same class and config without that marker first.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from torch import nn

from leanlora.artifact.errors import ExportError
from leanlora.inject import merge_and_unload, shared_state


def _quant_method(model: nn.Module) -> str | None:
    quantizer = getattr(model, "hf_quantizer", None)
    config = getattr(quantizer, "quantization_config", None) or getattr(
        getattr(model, "config", None), "quantization_config", None)
    if config is None:
        return None
    method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)
    return str(getattr(method, "value", method))


def _without_gguf_marker(model: nn.Module) -> nn.Module:
    """The same weights in a fresh model whose config has no quantization_config."""
    import torch

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    with torch.device("meta"):
        fresh = type(model)(config)
    fresh.load_state_dict(model.state_dict(), assign=True)
    # Non-persistent buffers (rotary frequencies) are not in the state dict: share the original ones.
    for name, buffer in model.named_buffers():
        parent, _, leaf = name.rpartition(".")
        fresh.get_submodule(parent)._buffers[leaf] = buffer
    if getattr(model, "generation_config", None) is not None:
        fresh.generation_config = copy.deepcopy(model.generation_config)
    fresh.tie_weights()
    left = [n for n, t in list(fresh.named_parameters()) + list(fresh.named_buffers()) if t.is_meta]
    if left:
        raise ExportError(f"copying the GGUF-loaded model left {left[:4]} without values")
    return fresh.eval()


def export_merged(model: nn.Module, directory: str | os.PathLike, *, tokenizer: Any = None,
                  in_place: bool = False) -> Path:
    """Fold the adapter into a copy of ``model`` (or into ``model`` itself with ``in_place=True``,
    which needs no second copy in memory) and ``save_pretrained`` it to ``directory``."""
    shared_state(model)
    if not hasattr(model, "save_pretrained"):
        raise ExportError(f"{type(model).__name__} is not a transformers model (no save_pretrained); "
                          "merge with leanlora.merge_and_unload and save its state_dict yourself")
    method = _quant_method(model)
    if method not in (None, "gguf"):
        raise ExportError(f"the base model is quantized with {method} outside leanlora; a merged export needs "
                          "dense weights (load the base unquantized, or use base='nf4' in the adapter config)")
    merged = merge_and_unload(model if in_place else copy.deepcopy(model))
    if method == "gguf":
        merged = _without_gguf_marker(merged)
    directory = Path(directory)
    merged.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory
