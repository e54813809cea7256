"""Fixed bit-width: symmetric per-tensor fake-quantization with straight-through gradients.

    s = max|w| / (2^(b-1) - 1),   w~ = s · clamp(round(w / s), -(2^(b-1) - 1), 2^(b-1) - 1)

The grid is symmetric (no zero point) with 2^b - 1 levels, so the integer codes fit a signed b-bit
integer and 0 is exact. The scale follows the tensor (no state, nothing to calibrate), which keeps
the forward free of first-use branches under ``torch.compile``. 32 bits means float: identity.

Also here: :class:`FrozenBits`, what a quantizer becomes after :func:`leanlora.finalize` — one
bit-width and a scale frozen from the full-rank tensor, so that pruning rows does not move the grid.
"""

from __future__ import annotations

import torch

from leanlora.gates.hardconcrete import round_ste
from leanlora.precision.full import FixedWidth

FLOAT_BITS = 32
_TINY = 1e-12  # an all-zero tensor (LoRA's B at init) gets a tiny positive scale, not 0/0


def qmax(bits: int) -> int:
    """Largest code of the symmetric b-bit grid: 2^(b-1) - 1 (1 for 2 bits, 127 for 8)."""
    return 2 ** (bits - 1) - 1


def member_peak(w: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """max|w| over ``dims`` (kept: one per group member), detached fp32, never 0. No dims (a member
    is one number) reduces nothing: torch's ``amax`` over ``()`` would reduce over every dim."""
    peak = w.detach().abs()
    return (peak.amax(dims, keepdim=True) if dims else peak).float().clamp_min(_TINY)


def absmax_scale(w: torch.Tensor, bits: int, dims: tuple[int, ...]) -> torch.Tensor:
    """Scale max|w| / qmax(bits) over ``dims`` (kept: one per group member), detached fp32."""
    return member_peak(w, dims) / qmax(bits)


def fake_quant(w: torch.Tensor, scale: torch.Tensor, bits: int, round_fn=round_ste) -> torch.Tensor:
    """scale · clamp(round(w / scale), ±qmax(bits)), rounding straight-through; dtype of ``w``."""
    n = qmax(bits)
    codes = round_fn(w.float() / scale).clamp(-n, n)
    return (codes * scale).to(w.dtype)


def quant_codes(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """The integer codes of :func:`fake_quant` (int32, same shape as ``w``)."""
    n = qmax(bits)
    return torch.round(w.detach().float() / scale).clamp(-n, n).to(torch.int32)


class FixedBits(FixedWidth):
    """Fake-quantizer at one bit-width in {2, 4, 8, 16, 32}; 32 is float (identity)."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.nbits == FLOAT_BITS:
            return w
        round_fn = round_ste if self.training else torch.round
        return fake_quant(w, absmax_scale(w, self.nbits, self.member_dims(w)), self.nbits, round_fn)

    def quantized(self) -> bool:
        """True when the stored form is integer codes plus a scale (not float)."""
        return self.nbits < FLOAT_BITS

    @torch.no_grad()
    def encode(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(int32 codes, fp32 scale) with forward(w) = scale · codes; None at 32 bits (float)."""
        if not self.quantized():
            return None
        scale = absmax_scale(w, self.nbits, self.member_dims(w)).reshape(())  # one member: a scalar scale
        return quant_codes(w, scale, self.nbits), scale


class FrozenBits(FixedWidth):
    """A finalized quantizer: fixed bits and, when the factor is not stored packed, a frozen scale.

    ``scale=None`` makes it an identity that only reports its width (the factor it follows is
    already stored as dequantized codes). With a scale it fake-quantizes on the fixed grid, which
    is what factors composed at run time (the VB-LoRA bank) need.
    """

    def __init__(self, bits: int, scale: torch.Tensor | None = None, quantized: bool | None = None) -> None:
        super().__init__(bits)
        self._quantized = bits < FLOAT_BITS if quantized is None else quantized
        # a None buffer is no state-dict entry, as a plain None attribute was
        self.register_buffer("scale", None if scale is None else scale.detach().float().reshape(()).clone())

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w if self.scale is None else fake_quant(w, self.scale, self.nbits, torch.round)

    def quantized(self) -> bool:
        return self._quantized

    @torch.no_grad()
    def encode(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.scale is None or not self._quantized:
            return None
        return quant_codes(w, self.scale, self.nbits), self.scale.clone()

    def extra_repr(self) -> str:
        return f"bits={self.nbits}, frozen{'' if self.scale is None else ', scale'}"
