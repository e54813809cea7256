"""Bit-packing of integer codes, and the stored tensors of a finalized adapter.

A code c of a symmetric b-bit grid satisfies |c| <= 2^(b-1) - 1; it is stored as the unsigned
u = c + 2^(b-1) in exactly b bits, little-end first: 4 codes per byte at 2 bits, 2 at 4 bits,
1 at 8 bits, and 2 bytes per code at 16 bits. A tensor of n codes takes ceil(n·b/8) bytes
plus one fp32 scale (4 bytes); a float tensor takes n · element size. These are the numbers
:mod:`leanlora.reports.cost` counts and what ``leanlora_adapter.safetensors`` holds after :func:`leanlora.finalize`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

PACK_BITS = (2, 4, 8, 16)
SCALE_BYTES = 4  # one fp32 scale per quantized tensor


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes of ``numel`` codes packed at ``bits``: ceil(numel · bits / 8)."""
    return math.ceil(numel * bits / 8)


def stored_nbytes(numel: int, bits: int, quantized: bool, elem_size: int) -> int:
    """Bytes a stored tensor takes: packed codes + fp32 scale, or the float values as they are."""
    return packed_nbytes(numel, bits) + SCALE_BYTES if quantized else numel * elem_size


def _check(bits: int) -> None:
    if bits not in PACK_BITS:
        raise ValueError(f"packing: bits={bits!r} is invalid: allowed {PACK_BITS}")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed integer codes (any shape) -> uint8 (ceil(n·bits/8),), little-end first."""
    _check(bits)
    lim = 2 ** (bits - 1)
    u = codes.detach().reshape(-1).to(torch.int64) + lim
    if u.numel() and (int(u.min()) < 0 or int(u.max()) >= 2 * lim):
        raise ValueError(f"packing: codes outside the signed {bits}-bit range [-{lim}, {lim - 1}]")
    if bits == 16:
        return torch.stack([u & 0xFF, u >> 8], dim=-1).reshape(-1).to(torch.uint8)
    per = 8 // bits
    pad = (-u.numel()) % per
    u = torch.cat([u, u.new_zeros(pad)]).reshape(-1, per)
    shifts = torch.arange(per, device=u.device) * bits
    return (u << shifts).sum(dim=1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 -> int32 codes (numel,)."""
    _check(bits)
    lim = 2 ** (bits - 1)
    p = packed.to(torch.int64)
    if bits == 16:
        u = p[0::2] | (p[1::2] << 8)
    else:
        per = 8 // bits
        shifts = torch.arange(per, device=p.device) * bits
        u = ((p.unsqueeze(1) >> shifts) & (2 ** bits - 1)).reshape(-1)
    return (u[:numel] - lim).to(torch.int32)


class StoredTensor(nn.Module):
    """One factor as stored: packed codes + scale (quantized) or the float values; ``forward()`` dequantizes."""

    def __init__(self, shape: tuple[int, ...], bits: int, quantized: bool,
                 dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> None:
        super().__init__()
        self.shape, self.bits, self.quantized, self.dtype = tuple(shape), bits, quantized, dtype
        numel = math.prod(self.shape)
        if quantized:
            _check(bits)
            self.register_buffer("packed", torch.zeros(packed_nbytes(numel, bits), dtype=torch.uint8, device=device))
            self.register_buffer("scale", torch.ones((), dtype=torch.float32, device=device))
        else:
            self.register_buffer("value", torch.zeros(self.shape, dtype=dtype, device=device))

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype) -> "StoredTensor":
        st = cls(tuple(codes.shape), bits, True, dtype=dtype, device=codes.device)
        st.packed = pack_codes(codes, bits)
        st.scale = scale.detach().float().reshape(()).clone().to(codes.device)
        return st

    @classmethod
    def from_float(cls, w: torch.Tensor, bits: int) -> "StoredTensor":
        st = cls(tuple(w.shape), bits, False, dtype=w.dtype, device=w.device)
        st.value = w.detach().clone()
        return st

    def forward(self) -> torch.Tensor:
        if not self.quantized:
            return self.value
        return (self.codes().float() * self.scale).to(self.dtype)

    def codes(self) -> torch.Tensor:
        return unpack_codes(self.packed, self.bits, math.prod(self.shape)).reshape(self.shape)

    def nbytes(self) -> int:
        return stored_nbytes(math.prod(self.shape), self.bits, self.quantized, self.dtype.itemsize)

    @torch.no_grad()
    def select_(self, index: torch.Tensor, dim: int = 0) -> None:
        """Keep the entries ``index`` along ``dim`` (pruning), repacking the codes."""
        if self.quantized:
            kept = self.codes().index_select(dim, index.to(self.packed.device))
            self.packed = pack_codes(kept, self.bits)
        else:
            kept = self.value = self.value.index_select(dim, index.to(self.value.device)).clone()
        self.shape = tuple(kept.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, bits={self.bits}, {'packed' if self.quantized else 'float'}"


class PackedFactors(nn.Module):
    """Finalized dense factors: A (k, in) and B (out, k) held as :class:`StoredTensor`."""

    stores_rows = True

    def __init__(self, a: StoredTensor, b: StoredTensor) -> None:
        super().__init__()
        self.a, self.b = a, b
        self.rank, self.in_features = a.shape
        self.out_features = b.shape[0]

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(), self.b()  # (k, in), (out, k)

    def compact_nbytes(self, rank: int, elem: int) -> None:
        return None  # the rows themselves: their bytes follow from the quantizers' bits

    @torch.no_grad()
    def prune_(self, keep: int) -> None:
        self.a.select_(torch.arange(keep), 0)
        self.b.select_(torch.arange(keep), 1)
        self.rank = keep

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.rank}"
