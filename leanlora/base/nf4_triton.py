"""The NF4 → e4m3 rebuild as two Triton kernels, one a layout, for ``nf4.gemm: fp8`` on CUDA.

Each 4-bit weight is rebuilt into float8 codes twice a step (the forward's layout and the
backward's transposed one), and that rebuild is pure bandwidth: half a byte read and one byte
written a weight, a 256-entry table and one fp32 factor a block of 64 that stay in cache. The
compiled torch operators of :func:`~leanlora.base.nf4_linear.nf4_to_fp8` index one output a thread
and reread each byte twice; these kernels read each byte once, make its two codes, and store them
side by side (forward) or through a tile transposed in shared memory (backward).

The arithmetic is the torch path's, operation for operation: the pair table's fp32 values, one
fp32 product with the block factor, a clamp to ±448 and one round-to-nearest-even to e4m3, so the
codes are equal bit for bit (tested on CUDA against :func:`nf4_to_fp8`).

Registered as ``torch.library.triton_op``s: ``torch.compile`` traces through them (no graph break)
and a captured CUDA graph replays them like any kernel.
"""

from __future__ import annotations

import torch

from leanlora.base.fp8_linear import E4M3, E4M3_MAX

try:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
except Exception:  # no Triton (CPU builds of torch), or one that fails to load
    triton = None

# read as a plain flag inside compiled regions: dynamo must not trace an import
TRITON_REBUILD = triton is not None and hasattr(tl, "float8e4nv") and hasattr(tl, "interleave")

if TRITON_REBUILD:
    @triton.jit
    def _byte_codes(codes, factors, pairs, at, inside, bytes_per_block: tl.constexpr, LIMIT: tl.constexpr):
        """The two e4m3 codes of each byte at ``at``, interleaved along the last dim (high first)."""
        byte = tl.load(codes + at, mask=inside, other=0).to(tl.int32)
        factor = tl.load(factors + at // bytes_per_block, mask=inside, other=0.0)
        high = tl.clamp(tl.load(pairs + 2 * byte) * factor, -LIMIT, LIMIT).to(tl.float8e4nv)
        low = tl.clamp(tl.load(pairs + 2 * byte + 1) * factor, -LIMIT, LIMIT).to(tl.float8e4nv)
        return tl.interleave(high, low)

    @triton.jit
    def _rows_kernel(codes, factors, pairs, out, n_bytes, bytes_per_block: tl.constexpr, LIMIT: tl.constexpr,
                     BYTES: tl.constexpr):
        start = tl.program_id(0).to(tl.int64) * BYTES
        offs = start + tl.arange(0, BYTES)
        pair = _byte_codes(codes, factors, pairs, offs, offs < n_bytes, bytes_per_block, LIMIT)
        out_offs = 2 * start + tl.arange(0, 2 * BYTES)
        tl.store(out + out_offs, pair, mask=out_offs < 2 * n_bytes)

    @triton.jit
    def _columns_kernel(codes, factors, pairs, out, rows, cols, bytes_per_block: tl.constexpr,
                        LIMIT: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
        """One ROWS × COLS tile of W (out, in) written as its transpose into out (in, out)."""
        r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        b = tl.program_id(1).to(tl.int64) * (COLS // 2) + tl.arange(0, COLS // 2)  # byte column
        half = cols // 2
        inside = (r[:, None] < rows) & (b[None, :] < half)
        tile = tl.trans(_byte_codes(codes, factors, pairs, r[:, None] * half + b[None, :], inside,
                                    bytes_per_block, LIMIT))  # (COLS, ROWS)
        c = tl.program_id(1).to(tl.int64) * COLS + tl.arange(0, COLS)
        tl.store(out + c[:, None] * rows + r[None, :], tile, mask=(c[:, None] < cols) & (r[None, :] < rows))

    @triton_op("leanlora::nf4_fp8_rows", mutates_args={})
    def nf4_fp8_rows(codes: torch.Tensor, factors: torch.Tensor, pairs: torch.Tensor, out_features: int,
                     in_features: int, block_size: int) -> torch.Tensor:
        out = torch.empty(out_features, in_features, dtype=E4M3, device=codes.device)
        n_bytes, per_program = codes.numel(), 2048
        wrap_triton(_rows_kernel)[(triton.cdiv(n_bytes, per_program),)](
            codes, factors, pairs, out, n_bytes, block_size // 2, E4M3_MAX, per_program, num_warps=4)
        return out

    @triton_op("leanlora::nf4_fp8_columns", mutates_args={})
    def nf4_fp8_columns(codes: torch.Tensor, factors: torch.Tensor, pairs: torch.Tensor, out_features: int,
                        in_features: int, block_size: int) -> torch.Tensor:
        out = torch.empty(in_features, out_features, dtype=E4M3, device=codes.device)
        tile_rows, tile_cols = 128, 64
        grid = (triton.cdiv(out_features, tile_rows), triton.cdiv(in_features, tile_cols))
        wrap_triton(_columns_kernel)[grid](codes, factors, pairs, out, out_features, in_features,
                                           block_size // 2, E4M3_MAX, tile_rows, tile_cols, num_warps=8)
        return out


def nf4_fp8_codes(codes: torch.Tensor, block_factor: torch.Tensor, pairs: torch.Tensor,
                  shape: tuple[int, int], block_size: int, transposed: bool) -> torch.Tensor:
    """The e4m3 codes of an NF4 weight of ``shape`` (out, in), or (in, out) contiguous when
    ``transposed``; ``block_factor`` and ``pairs`` as :class:`~leanlora.base.nf4_linear.FP8Rebuild`
    keeps them. CUDA tensors; ``in`` and ``block_size`` even, as NF4 packs two codes a byte."""
    op = nf4_fp8_columns if transposed else nf4_fp8_rows
    return op(codes.reshape(-1), block_factor, pairs.reshape(-1), shape[0], shape[1], block_size)
