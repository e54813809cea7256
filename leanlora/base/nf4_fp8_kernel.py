"""One Triton kernel from an NF4 weight's parts to float8 e4m3 codes, laid out as either GEMM wants them.

``nf4.gemm: fp8`` rebuilds every 4-bit weight twice a step: row-major for the forward, transposed
for the input gradient (``torch._scaled_mm`` takes its second operand column-major). Written as
torch operators, inductor makes that rebuild a gather through a table of code pairs, a reduction
for the row scale and, in the backward, a transposing copy; ``benchmarks/nf4_rebuild.py`` times it
against the bytes it moves. This kernel reads the parts once and writes the codes once, in either
layout, a tile at a time:

    byte (r, p)  ->  W[r, 2p] = codebook[byte >> 4] · s_b,  W[r, 2p + 1] = codebook[byte & 15] · s_b
    s_b          =   bf16(q_b / f_{b // g}) + mean           (b: the block of (r, 2p); torchao's double quantization)
    code         =   e4m3(clamp(fp32(bf16(W)) / scale_r, ±448))

with the same roundings, in the same order, as :func:`leanlora.base.nf4_linear.nf4_to_fp8` in
eager PyTorch: the codes are equal bit for bit (tested on the GPU). The row scales (``scale_r``,
one fp32 a row) come from the caller; the weight is frozen, so the base computes them once.

Triton is optional: without it, or off CUDA, :data:`AVAILABLE` is False and the caller keeps the
torch operators.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the torch operators rebuild the weight
    triton = None

AVAILABLE = triton is not None and hasattr(torch.library, "triton_op")
TILE_ROWS, TILE_COLS = 64, 64  # one tile: 64 rows x 64 weights (32 code bytes a row)

if AVAILABLE:
    from torch.library import triton_op, wrap_triton

    @triton.jit
    def _nf4_to_e4m3(codes_ptr, qscale_ptr, factor_ptr, mean_ptr, codebook_ptr, row_scale_ptr, out_ptr,
                     n_rows, n_cols, BLOCK: tl.constexpr, GROUP: tl.constexpr, TRANSPOSE: tl.constexpr,
                     BR: tl.constexpr, BC: tl.constexpr):
        rows = tl.program_id(0) * BR + tl.arange(0, BR)                     # (BR,)
        pairs = tl.program_id(1) * (BC // 2) + tl.arange(0, BC // 2)         # code bytes of the tile's row
        mask = (rows[:, None] < n_rows) & (pairs[None, :] < n_cols // 2)
        first = rows[:, None].to(tl.int64) * n_cols + 2 * pairs[None, :]    # flat index of each byte's first weight
        byte = tl.load(codes_ptr + first // 2, mask=mask, other=0)
        hi = tl.load(codebook_ptr + (byte >> 4).to(tl.int32), mask=mask, other=0.0)
        lo = tl.load(codebook_ptr + (byte & 15).to(tl.int32), mask=mask, other=0.0)
        block = first // BLOCK                                               # both weights of a byte share it
        q = tl.load(qscale_ptr + block, mask=mask, other=0).to(tl.float32)
        f = tl.load(factor_ptr + block // GROUP, mask=mask, other=1.0).to(tl.float32)
        # each step rounded to bf16 where eager bf16 arithmetic rounds; divisions IEEE-rounded, as eager's
        s = tl.math.div_rn(q, f).to(tl.bfloat16).to(tl.float32)
        s = (s + tl.load(mean_ptr).to(tl.float32)).to(tl.bfloat16).to(tl.float32)
        scale = tl.load(row_scale_ptr + rows, mask=rows < n_rows, other=1.0)[:, None]
        w_hi = tl.math.div_rn((hi.to(tl.float32) * s).to(tl.bfloat16).to(tl.float32), scale)
        w_lo = tl.math.div_rn((lo.to(tl.float32) * s).to(tl.bfloat16).to(tl.float32), scale)
        w = tl.reshape(tl.join(w_hi, w_lo), (BR, BC))                        # interleaved back: (BR, BC)
        codes = tl.minimum(tl.maximum(w, -448.0), 448.0).to(tl.float8e4nv)
        cols = tl.program_id(1) * BC + tl.arange(0, BC)
        keep = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        if TRANSPOSE:  # (n_cols, n_rows) row-major: W column-major, the input gradient's operand
            dest = cols[None, :].to(tl.int64) * n_rows + rows[:, None]
        else:
            dest = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
        tl.store(out_ptr + dest, codes, mask=keep)

    @triton_op("leanlora::nf4_to_e4m3", mutates_args={})
    def nf4_to_e4m3(codes: torch.Tensor, block_scales: torch.Tensor, group_factors: torch.Tensor,
                    scale_mean: torch.Tensor, codebook: torch.Tensor, row_scale: torch.Tensor,
                    n_rows: int, n_cols: int, block_size: int, scaler_group: int,
                    transpose: bool) -> torch.Tensor:
        """The e4m3 codes of an NF4 weight of shape (n_rows, n_cols): that shape row-major, or
        (n_cols, n_rows) row-major when ``transpose``."""
        out = torch.empty((n_cols, n_rows) if transpose else (n_rows, n_cols), dtype=torch.float8_e4m3fn,
                          device=codes.device)
        grid = (triton.cdiv(n_rows, TILE_ROWS), triton.cdiv(n_cols, TILE_COLS))
        wrap_triton(_nf4_to_e4m3)[grid](codes, block_scales, group_factors, scale_mean, codebook, row_scale, out,
                                        n_rows, n_cols, BLOCK=block_size, GROUP=scaler_group, TRANSPOSE=transpose,
                                        BR=TILE_ROWS, BC=TILE_COLS)
        return out


def usable(codes: torch.Tensor, codebook: torch.Tensor, block_size: int) -> bool:
    """Whether :func:`nf4_to_e4m3` rebuilds this weight: Triton present, a CUDA tensor, blocks of an
    even size, a bf16 weight (the roundings above are bf16's; other dtypes keep the torch operators)."""
    return AVAILABLE and codes.is_cuda and codebook.dtype == torch.bfloat16 and block_size % 2 == 0
