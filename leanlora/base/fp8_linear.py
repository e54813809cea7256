"""``x W0^T`` with W0 stored in float8 e4m3 and the GEMMs run in float8: the arithmetic of the FP8 base.

Formats (all scales fp32, all codes ``torch.float8_e4m3fn``, largest finite value 448):

    W0[n, :]  ≈ s_n · Wq[n, :]         s_n = max_k |W0[n, k]| / 448        per output channel
    x[m, :]   ≈ t_m · xq[m, :]         t_m = 2^ceil(log2(max_k |x[m, k]| / 448))   per row (token)
    g'[m, :]  ≈ u_m · gq[m, :]         g' = g · diag(s), u_m as t_m            per row of grad_output

Forward:   y = (xq Wq^T) · t ⊗ s                        (M, N)
Backward:  dx = g W0 = (g diag(s)) Wq ≈ (gq Wq) · u        (M, K); no weight gradient (W0 is frozen)

Decisions:
  * Activations and gradients follow torchao's float8 "rowwise" training recipe: e4m3 for
    both (not e5m2), one scale per row, scales rounded to a power of two so that scaling is
    exact and only the cast to e4m3 rounds.
  * The weight keeps one exact (not power-of-two) scale per output channel, amax / 448, so
    each row uses the whole e4m3 range. In the backward that scale runs along the contracted
    dimension, where a rowwise GEMM cannot apply it; it is folded into grad_output before that
    is quantized (``g · diag(s)``), which is exact algebra and costs no extra pass.
  * The GEMM is ``torch._scaled_mm`` (bf16 output) on a CUDA device of compute capability 8.9
    or newer; as in torchao's recipe the forward uses the tensor cores' fast accumulation and
    the input gradient the fully promoted one. Elsewhere the same codes are multiplied in fp32 and
    scaled in the same order; the quantization, and so the error, is the same.
  * ``_scaled_mm`` wants its second operand column-major and both its dimensions, and the
    first operand's inner one, multiples of 16: in_features and out_features must be
    multiples of 16 (checked when the base is built). The forward's second operand is Wq^T,
    which the row-major codes are; the backward's is Wq, which needs the codes transposed. The
    weight is frozen, so the base may hold that transposed copy once (``codes_t``) instead of
    making it in every backward (1 byte a weight either way).

Error bound: e4m3 keeps 3 mantissa bits, so a round-to-nearest cast of a normal value has
relative error at most 2^-4. Each product xq·Wq then carries at most (1 + 2^-4)^2 - 1 < 0.13 of
its own size in error, so |y - x W0^T| <= 0.13 · (|x| |W0|^T) element-wise, plus the bf16
rounding of the output (values below e4m3's normal range round to an absolute 2^-10 of the
row's scale instead).
"""

from __future__ import annotations

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
EPS = 1e-12  # amax of an all-zero row: any scale works, this one keeps it finite


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W0 (out, in) -> (codes (out, in) e4m3, scales (out,) fp32) with s = amax_row / 448."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=EPS) / E4M3_MAX          # (out,)
    codes = (w / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return codes, scale


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """s_n · Wq[n, :] as fp32 (out, in)."""
    return codes.float() * scale[:, None]


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> (codes (M, K) e4m3, scales (M, 1) fp32), each row's scale a power of two >= amax / 448.

    Rounding the scale up to a power of two (torchao's ``round_scales_to_power_of_2`` rounds the
    reciprocal down) makes ``x / t`` exact, so the cast to e4m3 is the only rounding.
    """
    x = x.float()
    amax = x.abs().amax(dim=1, keepdim=True).clamp(min=EPS)          # (M, 1)
    scale = torch.exp2(torch.ceil(torch.log2(amax / E4M3_MAX)))
    codes = (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return codes, scale


def scaled_matmul(a: torch.Tensor, scale_a: torch.Tensor, b: torch.Tensor, scale_b: torch.Tensor,
                  fast: bool, fast_accum: bool = False) -> torch.Tensor:
    """(a @ b) · scale_a · scale_b in fp32 accumulation: a (M, K) e4m3, scale_a (M, 1), b (K, N) e4m3,
    scale_b (1, N). ``fast``: ``torch._scaled_mm`` (b column-major, bf16 out; ``fast_accum``: the
    tensor cores' faster, less often promoted accumulation); else fp32 matmul (fp32 out)."""
    if fast:
        return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16,
                                use_fast_accum=fast_accum)
    with torch.autocast(a.device.type, enabled=False):  # fp32 even inside the training loop's autocast
        return (a.float() @ b.float()) * scale_a * scale_b


def fp8_forward(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, fast: bool) -> torch.Tensor:
    """``x W0^T`` in ``x``'s dtype for W0 = diag(scale) · codes: x quantized per row, one float8 GEMM."""
    x2 = x.reshape(-1, x.shape[-1])                                    # (M, K)
    xq, t = quantize_rows(x2)
    y = scaled_matmul(xq, t, codes.t(), scale[None, :], fast, fast_accum=True)  # (M, N)
    return y.to(x.dtype).reshape(*x.shape[:-1], codes.shape[0])


def fp8_input_grad(grad_y: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, fast: bool,
                   dtype: torch.dtype, codes_t: torch.Tensor | None = None) -> torch.Tensor:
    """``grad_y W0`` in ``dtype``: ``g · diag(scale)`` quantized per row against the codes, one float8 GEMM.
    ``codes_t``: the codes already transposed, (K, N) contiguous, which spares the transposed copy."""
    g = grad_y.reshape(-1, grad_y.shape[-1]).float() * scale          # (M, N): g · diag(s)
    gq, u = quantize_rows(g)
    if not fast:
        b = codes
    else:                                                             # (N, K), column-major for _scaled_mm
        b = codes_t.t() if codes_t is not None else codes.t().contiguous().t()
    ones = torch.ones(1, codes.shape[1], device=codes.device)
    dx = scaled_matmul(gq, u, b, ones, fast)                          # (M, K)
    return dx.to(dtype).reshape(*grad_y.shape[:-1], codes.shape[1])


class _FrozenFP8Linear(torch.autograd.Function):
    """y = x W0^T with W0 as e4m3 codes and per-channel scales; dx only, from the same codes.

    Saves the codes, scales and any transposed codes (all already held by the base), never x."""

    @staticmethod
    def forward(ctx, x, codes, scale, fast, codes_t):
        ctx.save_for_backward(codes, scale, codes_t)
        ctx.fast, ctx.x_dtype = fast, x.dtype
        return fp8_forward(x, codes, scale, fast)

    @staticmethod
    def backward(ctx, grad_y):
        codes, scale, codes_t = ctx.saved_tensors
        return fp8_input_grad(grad_y, codes, scale, ctx.fast, ctx.x_dtype, codes_t), None, None, None, None


def linear_fp8(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, fast: bool,
               codes_t: torch.Tensor | None = None) -> torch.Tensor:
    """``x W0^T`` (no bias) in ``x``'s dtype; ``fast`` selects ``torch._scaled_mm`` (see :func:`fp8_gemm_available`).
    ``codes_t``: ``codes.t().contiguous()``, held by the caller, for the backward's GEMM."""
    return _FrozenFP8Linear.apply(x, codes, scale, fast, codes_t)


def fp8_gemm_available(device: torch.device) -> bool:
    """True where ``torch._scaled_mm`` runs e4m3 GEMMs in hardware: CUDA, compute capability >= 8.9."""
    if device.type != "cuda" or not torch.cuda.is_available() or torch.version.hip is not None:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)
