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

With ``nf4.gemm: fp8`` the 4-bit codes are turned into float8 e4m3 codes with one scale per output
row (the FP8 base's weight format, :mod:`leanlora.base.fp8_linear`), and both GEMMs run in float8:
storage stays 4-bit, the arithmetic is the FP8 base's. Inside a compiled region the lookup, the
product and the cast fuse into the kernel that reads the 4-bit codes; no bf16 W0 is written.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from leanlora.base.fp8_linear import E4M3, E4M3_MAX, EPS, fp8_forward, fp8_input_grad
from leanlora.base.nf4_triton import TRITON_REBUILD, nf4_fp8_codes

REBUILD_KERNEL = "torch"  # the e4m3 rebuild on CUDA: "torch" (the compiled operators) or "triton"


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


def _block_scales(block_scales: torch.Tensor, group_factors: torch.Tensor, scale_mean: torch.Tensor,
                  dtype: torch.dtype, scaler_group: int) -> torch.Tensor:
    """s_j (n / block_size,) in ``dtype``, undoing the double quantization as torchao does."""
    scales = (block_scales.view(-1, scaler_group) / group_factors.unsqueeze(-1)).flatten()
    return scales.to(dtype) + scale_mean


def dequantize_nf4(codes: torch.Tensor, block_scales: torch.Tensor, group_factors: torch.Tensor,
                   scale_mean: torch.Tensor, codebook: torch.Tensor, shape: tuple[int, ...],
                   block_size: int, scaler_group: int) -> torch.Tensor:
    """The dense weight (``shape``, codebook dtype): the operators of ``NF4Tensor.get_original_weight``.

    Kept operator for operator (the same divisions, casts and products in the same order), so the
    result equals torchao's bit for bit on every device; tested against it.
    """
    high = codebook[(codes >> 4).to(torch.long)]              # (n/2,) even positions
    low = codebook[(codes & 0b1111).to(torch.long)]           # (n/2,) odd positions
    scales = _block_scales(block_scales, group_factors, scale_mean, codebook.dtype, scaler_group)
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


def byte_pair_table(codebook: torch.Tensor) -> torch.Tensor:
    """(256, 2): the codebook values of a byte's high and low code, so one lookup yields both."""
    return torch.stack([codebook.repeat_interleave(16), codebook.repeat(16)], dim=-1)


class FP8Rebuild(NamedTuple):
    """What turning an NF4 weight's codes into float8 codes takes besides the codes themselves;
    fixed while the weight is, so a base whose parts are plain keeps it (:func:`fp8_rebuild_state`)."""

    row_scale: torch.Tensor     # (out,) fp32: the row's largest |W0| over 448, the GEMM's weight scale
    block_factor: torch.Tensor  # (blocks,) fp32: s_j over its row's scale
    pairs: torch.Tensor         # (256, 2) fp32: the codebook values of a byte's high and low code


def fp8_rebuild_state(block_scales: torch.Tensor, group_factors: torch.Tensor, scale_mean: torch.Tensor,
                      codebook: torch.Tensor, rows: int, scaler_group: int) -> FP8Rebuild:
    """:class:`FP8Rebuild` of an NF4 weight from its parts (blocks, rows and 256 values: no pass over
    the weight).

    The row scale is the FP8 base's: the row maximum over 448. A row's largest |W0| is its largest
    block scale: every block holds a code of ±1 (its absmax element, which NF4 maps to the
    codebook's ends) and no code exceeds 1 in size. For a weight that torchao quantized this is the
    same maximum, so the scales equal ``quantize_weight``'s of the dequantized weight (tested).
    """
    scales = _block_scales(block_scales, group_factors, scale_mean, codebook.dtype, scaler_group)  # (blocks,)
    amax = scales.view(rows, -1).abs().amax(dim=1).float() * codebook.abs().amax().float()
    row_scale = amax.clamp(min=EPS) / E4M3_MAX
    factor = (scales.float().view(rows, -1) / row_scale[:, None]).flatten()
    return FP8Rebuild(row_scale, factor, byte_pair_table(codebook.float()))


def nf4_to_fp8(codes: torch.Tensor, block_scales: torch.Tensor, group_factors: torch.Tensor,
               scale_mean: torch.Tensor, codebook: torch.Tensor, shape: tuple[int, ...],
               block_size: int, scaler_group: int, rebuild: FP8Rebuild | None = None,
               transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The NF4 weight as e4m3 codes (out, in), or (in, out) when ``transposed`` (both contiguous),
    and its fp32 row scales (out,), for ``nf4.gemm: fp8``. ``rebuild``: the weight's
    :func:`fp8_rebuild_state`, where the caller keeps it.

    code = e4m3(codebook[c] · (s_j / row scale)): one fp32 product and one rounding to e4m3 a
    weight. Each byte holds two codes, so one lookup in a 256-entry table of code pairs yields both
    values in place. The float8 code is the one nearest the NF4 value that the block scale and the
    codebook define (a float64 reference agrees but at exact ties); it is not rounded to the weight's
    dtype first, as ``dequantize_nf4`` would, which is a second rounding, a division a weight and
    costs the GPU more than the bytes it moves. Compiled, the lookup, the product and the cast fuse
    into one kernel per layout. With :data:`REBUILD_KERNEL` ``"triton"`` the same arithmetic runs on
    CUDA as one Triton kernel a layout (:mod:`leanlora.base.nf4_triton`: each byte read once, its two
    codes stored together).
    """
    state = rebuild if rebuild is not None else fp8_rebuild_state(block_scales, group_factors, scale_mean, codebook,
                                                                    shape[0], scaler_group)
    if REBUILD_KERNEL == "triton" and codes.is_cuda and len(shape) == 2 and TRITON_REBUILD:
        return nf4_fp8_codes(codes, state.block_factor, state.pairs, shape, block_size, transposed), state.row_scale
    return fp8_codes_by_operators(codes, state, shape, block_size, transposed), state.row_scale


def fp8_codes_by_operators(codes: torch.Tensor, state: FP8Rebuild, shape: tuple[int, ...], block_size: int,
                           transposed: bool = False) -> torch.Tensor:
    """:func:`nf4_to_fp8`'s codes in torch operators (any device; inductor fuses them)."""
    w = (state.pairs[codes.to(torch.long)].view(-1, block_size) * state.block_factor[:, None]).view(shape)  # fp32
    w8 = w.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return w8.t().contiguous() if transposed else w8


class _FrozenNF4FP8Linear(torch.autograd.Function):
    """y = x W0^T with W0 rebuilt from its 4-bit parts as float8 codes and row scales, forward and
    backward alike (:func:`~leanlora.base.fp8_linear.fp8_forward`, ``fp8_input_grad``); the backward
    rebuilds the codes transposed, as ``torch._scaled_mm`` takes them. Saves the 4-bit codes and the
    rebuild's per-block and per-row state only, never a rebuilt weight."""

    @staticmethod
    def forward(ctx, x, codes, block_scales, group_factors, scale_mean, codebook, rebuild, sizes, fast):
        if rebuild is None:
            rebuild = fp8_rebuild_state(block_scales, group_factors, scale_mean, codebook, sizes[0][0], sizes[2])
        w8, scale = nf4_to_fp8(codes, block_scales, group_factors, scale_mean, codebook, *sizes, rebuild)
        ctx.save_for_backward(codes, *rebuild)
        ctx.sizes, ctx.fast, ctx.x_dtype = sizes, fast, x.dtype
        return fp8_forward(x, w8, scale, fast)

    @staticmethod
    def backward(ctx, grad_y):
        codes, *state = ctx.saved_tensors
        rebuild = FP8Rebuild(*state)
        w8, _ = nf4_to_fp8(codes, None, None, None, None, *ctx.sizes, rebuild, transposed=ctx.fast)
        if ctx.fast:  # (in, out) contiguous: the column-major operand _scaled_mm wants, as it is
            dx = fp8_input_grad(grad_y, w8.t(), rebuild.row_scale, True, ctx.x_dtype, codes_t=w8)
        else:
            dx = fp8_input_grad(grad_y, w8, rebuild.row_scale, False, ctx.x_dtype)
        return (dx,) + (None,) * 8


def linear_nf4_fp8(x: torch.Tensor, parts: NF4Parts, fast: bool, rebuild: FP8Rebuild | None = None) -> torch.Tensor:
    """``x W0^T`` (no bias) in ``x``'s dtype with float8 GEMMs; ``fast``: ``torch._scaled_mm``
    (:func:`~leanlora.base.fp8_linear.fp8_gemm_available`), else the same codes multiplied in fp32.
    ``rebuild``: :func:`fp8_rebuild_state` of ``parts``, where the caller keeps it."""
    return _FrozenNF4FP8Linear.apply(x, *parts[:5], rebuild, (parts.shape, parts.block_size, parts.scaler_group),
                                     fast)
