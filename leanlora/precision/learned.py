"""Learned bit-width: the Bayesian Bits nested residual quantizer (arXiv:2005.07093), as B-LoRA.

For a bit set b_0 = 2 < b_1 < ... (a subset of {2, 4, 8, 16, 32}; 32 means float) and a range
x_max, the grids s_b = 2 x_max / (2^b - 1) nest (2^a - 1 divides 2^b - 1 when a divides b), so a
b_k-bit value is the b_{k-1}-bit value plus a rounded residual (Bayesian Bits eq. for x_q):

    x_c = clip(w, ±x_max (1 - 1e-7))                     (PACT clip; 1e-7 keeps 1.5 from rounding up)
    r_0 = s_{b_0} ⌊x_c / s_{b_0}⌉,   r_k = s_{b_k} ⌊(x_c - r_0 - ... - r_{k-1}) / s_{b_k}⌉
    w~ = r_0 + z_1 (r_1 + z_2 (r_2 + ... + z_K r_float))

with one hard-concrete gate z_k per step above 2 bits (:mod:`leanlora.gates.hardconcrete`), stochastic in
training and thresholded in eval (and in training once a budget's freeze pins them:
:func:`leanlora.budget.mark_pinned`); ⌊·⌉ is straight-through in training.

**Computed in closed form, all levels at once.** Because r_0 + ... + r_{k-1} lies on the
b_{k-1} grid, which is a sub-grid of the b_k grid, the partial sums are plain roundings:
q_k = r_0 + ... + r_k = s_{b_k} ⌊x_c / s_{b_k}⌉ (and q_float = w). Summing by parts,

    w~ = Σ_k π_k q_k,   π_k = c_k - c_{k+1},   c_0 = 1, c_k = z_1 ··· z_k, c_{K+1} = 0

so the quantizer is one (levels × numel) stack of roundings and one weighted sum over levels:
the same function and the same straight-through gradients as the residual recursion, in a
dozen kernels instead of one chain per level. In eval the gates are 0/1, π is one-hot, and the
sum returns the chosen level exactly (the float level is ``w`` bit for bit). The width in use is
b_k for the last open gate of the chain; its codes fit a signed b-bit integer
(|code| <= 2^(b-1) - 1, clamped so that fp32 rounding of x_c / s at 16 bits cannot step past the
grid), which is what :mod:`leanlora.artifact.packing` stores.

**Range (fixes the B-LoRA port's gap).** The port fixes x_max from the tensor's max at its first
forward, with no clipping and no learned scale. Here x_max = exp(log_scale) · max|w| with the
max taken from the tensor at every call (detached) and ``log_scale`` learned (role "scales",
init 0: no clipping at the start). A first-use snapshot cannot work for LoRA's B, which is
exactly zero at initialisation; a range that follows the tensor needs no first-use state, so the
training forward has no data-dependent branch, no ``.item()`` and nothing to calibrate under
``torch.compile``. The learned factor still lets training clip outliers (PACT/LSQ gradient).
The range is symmetric around 0 from max|w| (the port uses only the positive end, which would
clip the negative tail of a signed factor).

**Prior** (Bayesian-LoRA, arXiv:2406.13046): with q_k = P(z_k != 0),
``R = Σ_k c_k q_1 ··· q_k``; ``c_k = 1`` ("const") or ``c_k = (MACs / max MACs) · b_k`` ("bop"),
where MACs is what consumes this factor (in·r for A, r·out for B, r for E) and max MACs is the
largest full-rank adapter layer of the model (a :class:`PriorScale` shared by all quantizers).
The always-on 2-bit base has no gate and contributes a constant, left out.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from leanlora.gates import hardconcrete as hc
from leanlora.gates import priors
from leanlora.groups.rows import StackedRows
from leanlora.precision.fixed import FLOAT_BITS, member_peak, quant_codes

ALLOWED = (2, 4, 8, 16, 32)
_CLIP = 1.0 - 1e-7


@dataclasses.dataclass(eq=False)
class PriorScale:
    """Model-wide normaliser of BOP-aware prior weights: the largest full-rank adapter MACs/token.

    A plain object (not a module) shared by reference; :mod:`leanlora.build` raises ``value`` as
    it builds each layer, before any forward or prior is computed.
    """

    value: float = 1.0

    def update(self, macs: float) -> None:
        self.value = max(self.value, float(macs))


def grid_scale(x_max: torch.Tensor, bits: int) -> torch.Tensor:
    """s_b = 2 x_max / (2^b - 1): the step of the symmetric b-bit Bayesian Bits grid."""
    return 2.0 * x_max / (2 ** bits - 1)


def level_values(w: torch.Tensor, x_max: torch.Tensor, steps: torch.Tensor, qmax: torch.Tensor,
                 has_float: bool, straight_through: bool = True) -> torch.Tensor:
    """q_k = s_k clamp(⌊x_c / s_k⌉, ±qmax_k) for every quantized width, then ``w`` for float.

    ``steps`` (K',) holds 2 / (2^b - 1) per quantized width (s_k = x_max · steps_k), ``qmax``
    (K',) holds 2^(b-1) - 1. Returns fp32 of shape (K' + has_float, *w.shape).
    """
    wf = w.float()
    view = (-1,) + (1,) * w.dim()                                         # steps over a leading level dim
    q = _level(wf.unsqueeze(0), x_max.unsqueeze(0), steps.view(view), qmax.view(view), straight_through)
    return torch.cat([q, wf.unsqueeze(0)]) if has_float else q            # (K' + has_float, *shape)


def _level(wf: torch.Tensor, x_max: torch.Tensor, steps: torch.Tensor, qmax: torch.Tensor,
           straight_through: bool) -> torch.Tensor:
    """s clamp(⌊x_c / s⌉, ±qmax) with s = x_max · steps and x_c = w clipped to ±x_max (all broadcast);
    the rounding has an identity gradient when ``straight_through``."""
    lim = x_max * _CLIP
    xc = torch.minimum(torch.maximum(wf, -lim), lim)
    s = x_max * steps
    y = xc / s
    codes = torch.minimum(torch.maximum(torch.round(y), -qmax), qmax)
    return s * (y + (codes - y).detach() if straight_through else codes)


def level_weights(gates: torch.Tensor) -> torch.Tensor:
    """π_k = c_k - c_{k+1} with c = [1, z_1, z_1 z_2, ..., z_1···z_K, 0]: (..., K + 1) from z (..., K)."""
    one = gates.new_ones(gates.shape[:-1] + (1,))
    chain = torch.cat([one, hc.prefix_product(gates)], -1)                 # (..., K + 1) c_0..c_K
    return chain - torch.cat([chain[..., 1:], torch.zeros_like(one)], -1)


def mix_levels(levels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_k weights_k levels_k: (L, *shape), (L,) or (G, L) with shape (G, ...) -> shape."""
    # a broadcast product and a sum over the few levels, not tensordot: tensordot is a GEMM, which
    # inductor cannot fuse, so the (L, *shape) stack would be written out and read back, and
    # its backward would be two more GEMMs; this way the levels never leave the fused kernel
    w = weights.to(levels.dtype).movedim(-1, 0)
    w = w.reshape(w.shape + (1,) * (levels.dim() - w.dim()))
    return (w * levels).sum(0)


class LearnedBits(StackedRows, nn.Module):
    """Bayesian Bits quantizer of one factor over ``bit_set``; see the module docstring."""

    PARAM_ROLES = {"log_alpha": "gates", "log_scale": "scales"}
    pinned = False  # gates pinned by a budget's freeze: training computes the chosen level alone

    def __init__(self, bit_set: tuple[int, ...] = ALLOWED, init_log_alpha: float = 6.0,
                 threshold: float = hc.THRESHOLD, reg_type: str = "const", macs: float = 1.0,
                 prior_scale: PriorScale | None = None, device: torch.device | None = None) -> None:
        super().__init__()
        bit_set = tuple(sorted(set(bit_set)))
        if not bit_set or not set(bit_set) <= set(ALLOWED) or bit_set[0] != 2:
            raise ValueError(f"LearnedBits: bit_set={bit_set!r} is invalid: must be a subset of {ALLOWED} containing 2")
        self.bit_set, self.threshold, self.reg_type, self.macs = bit_set, threshold, reg_type, float(macs)
        self.prior_scale = prior_scale or PriorScale()
        self.log_alpha = nn.Parameter(torch.full((len(bit_set) - 1,), float(init_log_alpha), device=device))
        self.log_scale = nn.Parameter(torch.zeros((), device=device))
        widths = [b for b in bit_set if b != FLOAT_BITS]
        self.has_float = bit_set[-1] == FLOAT_BITS
        # grid constants as buffers: built once, moved with the module, never copied in per call
        self.register_buffer("_steps", torch.tensor([2.0 / (2 ** b - 1) for b in widths], device=device),
                             persistent=False)
        self.register_buffer("_qmax", torch.tensor([float(2 ** (b - 1) - 1) for b in widths], device=device),
                             persistent=False)

    # --- forward -------------------------------------------------------------------------------

    def x_max(self, w: torch.Tensor) -> torch.Tensor:
        """exp(log_scale) · max|w| (max detached): the clipping range, fp32, one per member."""
        peak = member_peak(w, self.member_dims(w))
        return self.per_member(self.log_scale.exp(), peak) * peak

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self._quantize(w, self.training).to(w.dtype)

    def _quantize(self, w: torch.Tensor, training: bool) -> torch.Tensor:
        """Σ_k π_k q_k in fp32: sampled gates z_1..z_K and straight-through rounding when ``training``,
        else gates thresholded to 0/1."""
        if training and self.pinned:
            return self._pinned_level(w)
        levels = level_values(w, self.x_max(w), self._steps, self._qmax, self.has_float, training)
        gates = hc.sample(self.log_alpha) if training else hc.deterministic(self.log_alpha, self.threshold)
        return mix_levels(levels, level_weights(gates))

    def _pinned_level(self, w: torch.Tensor) -> torch.Tensor:
        """Σ_k π_k q_k when every gate is pinned to 0 or 1: π is one-hot, so the sum is the chosen
        level q_k (w itself for float), with the same straight-through gradients to ``w`` and the
        range. Computed alone, per member, without the other levels and without gate noise."""
        wf, x_max = w.float(), self.x_max(w)
        # the gates' zero gradient, as a pinned sample gives it (DDP expects one for every parameter)
        x_max = x_max + 0.0 * self.per_member(self.log_alpha.sum(-1), x_max)
        k = hc.prefix_product(hc.deterministic(self.log_alpha, self.threshold)).sum(-1).long()  # () or (G,)
        width = k.clamp(max=self._steps.numel() - 1)
        q = _level(wf, x_max, self.per_member(self._steps[width], x_max), self.per_member(self._qmax[width], x_max),
                   True)
        return torch.where(self.per_member(k == self._steps.numel(), x_max), wf, q) if self.has_float else q

    # --- what it chose -------------------------------------------------------------------------

    def bits(self) -> int:
        """Eval bit-width: b_k for the last open gate of the chain (from b_0 = 2)."""
        open_ = hc.deterministic(self.log_alpha.detach(), self.threshold)
        k = int(torch.cumprod(open_, 0).sum().item()) if open_.numel() else 0
        return self.bit_set[k]

    def expected_bits(self) -> float:
        """E[b] = b_0 + Σ_k q_1···q_k (b_k - b_{k-1}) under the current gate probabilities."""
        with torch.no_grad():
            chain = hc.open_chain(self.log_alpha)
            steps = torch.tensor([b - a for a, b in zip(self.bit_set, self.bit_set[1:])],
                                 dtype=chain.dtype, device=chain.device)
            return float(self.bit_set[0] + (chain * steps).sum())

    def quantized(self) -> bool:
        return self.bits() < FLOAT_BITS

    def prior(self) -> torch.Tensor:
        """R = Σ_k c_k q_1 ··· q_k (scalar with gradient to ``log_alpha``); see the module docstring."""
        return priors.evaluate(self.prior_terms())

    def prior_terms(self) -> priors.PriorTerms:
        """R as data (:mod:`leanlora.gates.priors`): the open chain of the gates, priced per step."""
        weights = ((1.0,) * self.log_alpha.shape[-1] if self.reg_type == "const"
                   else tuple(b * self.macs / self.prior_scale.value for b in self.bit_set[1:]))
        return priors.PriorTerms(self.log_alpha, weights, chain=True)

    @torch.no_grad()
    def encode(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(int32 codes, fp32 scale) with scale · codes = the eval-mode output; None for float.

        Codes are read back from the eval composite itself (not recomputed on the b-bit grid),
        so a finalized factor reproduces exactly what the eval-mode model used.
        """
        b = self.bits()
        if b == FLOAT_BITS:
            return None
        scale = grid_scale(self.x_max(w), b)
        return quant_codes(self._quantize(w, False), scale, b), scale.reshape(())

    def extra_repr(self) -> str:
        return f"bit_set={self.bit_set}, reg={self.reg_type}"
