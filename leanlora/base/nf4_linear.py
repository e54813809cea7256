"""``x W0^T`` for an NF4 weight, computed from its plain parts instead of through the tensor subclass.

torchao's ``NF4Tensor`` is a tensor subclass: a compiled region that takes one as an input
flattens it into its five inner tensors, checks their metadata and rebuilds it on every call,
forward and backward. That is host time per adapted layer per step, in a training step that is
already paced by the host. Handing the compiled code the parts (plain tensors) and dequantizing them with the same
operators as ``NF4Tensor.get_original_weight`` gives the same weight bit for bit and the same
kernels on the GPU; only the subclass's wrapping at each call is gone.

The storage stays torchao's (quantization, device moves, FSDP2 sharding): only the arithmetic of
the frozen linear is here. Equations (QLoRA's double quantization, torchao's layout):

    s_j   = q_j / f_{j // g} + mean                  block scales (int8 q, group factor f, g blocks a group)
    W[i]  = codebook[code_i] · s_{i // block_size}   codes two per byte: high nibble first
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class NF4Parts(NamedTuple):
    """The plain tensors and sizes of one torchao ``NF4Tensor`` (shapes for a weight of n elements)."""

    codes: torch.Tensor          # (n / 2,) uint8, two 4-bit codebook indices per byte
    block_scales: torch.Tensor   # (n / block_size,) int8, double-quantized absmax per block
    group_factors: torch.Tensor  # (blocks / scaler_group,) float, the scales' quantization factor
    scale_mean: torch.Tensor     # () float, the scales' mean
    codebook: torch.Tensor       # (16,) float, the NF4 values in the weight's dtype
    shape: tuple[int, ...]       # the dense weight's shape
    block_size: int
    scaler_group: int            # blocks per group factor

    @classmethod
    def of(cls, weight) -> "NF4Parts":
        """The parts of an ``NF4Tensor`` (views of its own storage: nothing is copied)."""
        return cls(weight.quantized_data, weight.quantized_scalers, weight.quantization_factor,
                   weight.scaler_mean, weight.nf4, tuple(weight.shape), weight.block_size,
                   weight.scaler_block_size)


def dequantize_nf4(codes: torch.Tensor, block_scales: torch.Tensor, group_factors: torch.Tensor,
                   scale_mean: torch.Tensor, codebook: torch.Tensor, shape: tuple[int, ...],
                   block_size: int, scaler_group: int) -> torch.Tensor:
    """The dense weight (``shape``, codebook dtype): the operators of ``NF4Tensor.get_original_weight``.

    Kept operator for operator (the same divisions, casts and products in the same order), so the
    result equals torchao's bit for bit on every device; tested against it.
    """
    high = codebook[(codes >> 4).to(torch.long)]              # (n/2,) even positions
    low = codebook[(codes & 0b1111).to(torch.long)]           # (n/2,) odd positions
    scales = (block_scales.view(-1, scaler_group) / group_factors.unsqueeze(-1)).flatten()
    scales = scales.to(codebook.dtype) + scale_mean          # (n / block_size,)
    per_pair = scales.unsqueeze(-1).expand(scales.size(0), block_size // 2).flatten()  # (n/2,)
    high = (high * per_pair).unsqueeze(-1).transpose(0, 1)    # (1, n/2)
    low = (low * per_pair).unsqueeze(-1).transpose(0, 1)
    return torch.stack([high, low], dim=-1).reshape(shape)   # interleaved back to (out, in)


class _FrozenNF4Linear(torch.autograd.Function):
    """y = x W0^T with W0 rebuilt from its parts; the backward rebuilds it again for dx and makes
    no weight gradient. Only the parts are saved (0.5 bytes a weight), never the dense W0."""

    @staticmethod
    def forward(ctx, x, codes, block_scales, group_factors, scale_mean, codebook, sizes):
        ctx.save_for_backward(codes, block_scales, group_factors, scale_mean, codebook)
        ctx.sizes = sizes
        return F.linear(x, dequantize_nf4(codes, block_scales, group_factors, scale_mean, codebook, *sizes).to(x.dtype))

    @staticmethod
    def backward(ctx, grad_y):
        w = dequantize_nf4(*ctx.saved_tensors, *ctx.sizes).to(grad_y.dtype)
        return (grad_y @ w,) + (None,) * 6


def linear_nf4_parts(x: torch.Tensor, parts: NF4Parts) -> torch.Tensor:
    """``x W0^T`` (no bias) in ``x``'s dtype, as torchao's ``linear_nf4`` computes it."""
    return _FrozenNF4Linear.apply(x, *parts[:5], (parts.shape, parts.block_size, parts.scaler_group))
