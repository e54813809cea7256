"""A bitsandbytes ``Linear4bit`` that the user already loaded, used as the frozen base as it is.

``AutoModelForCausalLM.from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True))``
gives ``bnb.nn.Linear4bit`` layers whose weight is a packed ``Params4bit`` plus a ``QuantState``
(absmax per block, optionally double-quantized). We keep the module and its forward untouched;
only merge needs bitsandbytes' own dequantize/quantize pair.
"""

from __future__ import annotations

import torch
from torch import nn

from leanlora.base.dense import HeldLayer, Requantized


def is_linear4bit(module: nn.Module) -> bool:
    """True for ``bitsandbytes.nn.Linear4bit`` (checked without importing bitsandbytes)."""
    return any(c.__name__ == "Linear4bit" and c.__module__.startswith("bitsandbytes")
               for c in type(module).__mro__)


def _bnb_functional():
    try:
        import bitsandbytes.functional as bnbF
    except ImportError:
        raise ImportError("this base is a bitsandbytes Linear4bit; merging into it needs bitsandbytes") from None
    return bnbF


def _quant_state_bytes(state) -> int:
    """Bytes of a bitsandbytes QuantState: absmax and code table, and for double quantization the
    absmax, code table (256 floats) and offset of the second level."""
    parts = [state.absmax, getattr(state, "code", None)]
    if getattr(state, "nested", False) and state.state2 is not None:
        parts += [state.state2.absmax, state.state2.code, state.offset]
    return sum(t.nbytes for t in parts if t is not None)


def _keep_standard_layout(layer: nn.Module) -> None:
    """Turn off bitsandbytes' CPU inference repacking for this layer, and undo it if it happened.

    On CPUs with AVX512-BF16, an eval-mode no-grad forward rewrites the weight into a kernel
    layout and its QuantState in place (absmax rounded to bf16). We need a weight that stays put
    to dequantize, merge and snapshot, so a wrapped layer keeps the standard layout.
    """
    if getattr(layer, "support_avx512bf16_for_cpu", False):
        layer.support_avx512bf16_for_cpu = False
    state = layer.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu_inverse(layer.weight.data, state)


class Bnb4Base(Requantized, HeldLayer):
    """Frozen base held by a ``bnb.nn.Linear4bit``; forward is the module's own."""

    KIND = "4-bit"

    def __init__(self, layer: nn.Module, name: str = "") -> None:
        if not is_linear4bit(layer):
            raise TypeError(f"{name}: Bnb4Base wraps bitsandbytes.nn.Linear4bit, got {type(layer).__name__}")
        if getattr(layer.weight, "quant_state", None) is None:
            raise ValueError(f"{name}: this Linear4bit is not quantized yet (bitsandbytes quantizes when the "
                             "module is moved to a device: call .to(device) before inject)")
        super().__init__(layer)
        self.name = name
        _keep_standard_layout(layer)

    def dense_weight(self) -> torch.Tensor:
        w = self.layer.weight
        return _bnb_functional().dequantize_4bit(w.data, w.quant_state)  # (out, in)

    def _requantize(self, target: torch.Tensor) -> None:
        """W0 <- Q4(target) with the same block size, type and nesting."""
        w = self.layer.weight
        state = w.quant_state
        data, new_state = _bnb_functional().quantize_4bit(target.to(state.dtype), blocksize=state.blocksize,
                                                          compress_statistics=state.nested,
                                                          quant_type=state.quant_type, quant_storage=w.data.dtype)
        # Rebind, not write in place, so a snapshot of the old (data, state) stays exact.
        w.data, w.quant_state = data, new_state

    def snapshot(self) -> tuple[torch.Tensor, object]:
        return self.layer.weight.data, self.layer.weight.quant_state

    def restore_(self, snapshot: tuple[torch.Tensor, object]) -> None:
        self.layer.weight.data, self.layer.weight.quant_state = snapshot

    def nbytes(self) -> int:
        w = self.layer.weight
        return w.data.nbytes + _quant_state_bytes(w.quant_state)

    def extra_repr(self) -> str:
        state = self.layer.weight.quant_state
        return f"bitsandbytes {state.quant_type}, block={state.blocksize}, nested={state.nested}"
