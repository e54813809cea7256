"""Gated ranks (B-LoRA): one hard-concrete gate per rank component, nested, with a prior.

    ΔW x = scale · B diag(m ⊙ E~) A x        (diag=True, AdaLoRA's SVD form as in the B-LoRA code)
    ΔW x = scale · B diag(m) A x             (diag=False)

``m ∈ {0,1}^r`` is the rank mask. Component 0 is always on; components 1..r-1 have gates z_i with
learnable ``log_alpha`` (role "gates"). With ``nested=True`` (B-LoRA) the mask is the rounded
cumulative product m_i = ⌊z_1···z_i⌉ (straight-through), so component i lives only if every
component before it lives and the effective rank is 1 + the number of leading open gates. In
training z is sampled (one draw per gate per forward); in eval it is thresholded (open when
P(z = 0) < ``threshold``). ``E~`` is E through its own quantizer (``quant_e``: float, fixed or
learned bits). E starts at 1 so that, with LoRA's B = 0 init, the update starts at 0 and the
first steps are LoRA's (the B-LoRA code draws E ~ N(0, 1) with a non-zero B instead).
The scale stays ``alpha / r`` of the full rank r through gating and pruning.

**Prior** (``prior()``; λ is applied by :func:`leanlora.regularizer`), with q_i = P(z_i != 0):

    "nested"     R = c · Σ_i q_1 q_2 ··· q_i        (the expected number of gated components on)
    "individual" R = c · Σ_i q_i                    (each gate priced alone, as the B-LoRA code does)

Default "nested": the forward pass keeps component i only when all gates before it are open, so
Σ_i q_1···q_i is exactly the expected rank (minus the free component) of the model actually
used; it is the L0 penalty of that model. "individual" also charges a component that a closed
gate in front of it already removed, and lets no gate feel the cost of the components behind
it, so pressure does not propagate down the chain. With ``nested=False`` the two coincide
(independent gates: the expected rank is Σ_i q_i). ``c`` is 1 ("const") or, for "bop", the
component's MACs/token (in + out + 1) over the model's largest adapter MACs, priced at the
nominal 16-bit width (on the scale of :class:`~leanlora.precision.learned.LearnedBits`' weights).
Unlike the B-LoRA code, R is not divided by r - 1: each component costs the same at any r.
"""

from __future__ import annotations

import torch
from torch import nn

from leanlora.gates import hardconcrete as hc
from leanlora.gates import priors
from leanlora.gates.hardconcrete import round_ste
from leanlora.groups.rows import StackedRows
from leanlora.precision.full import FullPrecision
from leanlora.precision.learned import PriorScale
from leanlora.ranks.fixed import lora_scale

NOMINAL_BITS = 16


class GatedRanks(StackedRows, nn.Module):
    PARAM_ROLES = {"log_alpha": "gates"}
    # set by a budget's freeze (leanlora.budget): the gates sit far past saturation, where a sample
    # is exactly the 0/1 threshold and has no gradient, so training reads the threshold and draws no noise
    pinned = False

    def __init__(self, rank: int, alpha: float, *, diag: bool = False, init_log_alpha: float = 6.0,
                 threshold: float = hc.THRESHOLD, nested: bool = True, prior: str = "nested",
                 rslora: bool = False, quant_e: nn.Module | None = None, reg_type: str = "const",
                 component_macs: float = 1.0, prior_scale: PriorScale | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> None:
        super().__init__()
        self.rank, self.max_rank = rank, rank
        self.diag, self.nested, self.prior_kind, self.threshold = diag, nested, prior, threshold
        self.reg_type, self.component_macs = reg_type, float(component_macs)
        self.prior_scale = prior_scale or PriorScale()
        self.scale = lora_scale(alpha, rank, rslora)
        self.finalized = False
        # the finalized layout (finalize_): a mask of closed stored components and the stored E
        self.register_buffer("keep_mask", None)
        self.e_store = None
        # follows .to(device) without entering the state dict: a device for gate-free results
        self.register_buffer("_anchor", torch.zeros((), device=device), persistent=False)
        self.log_alpha = nn.Parameter(torch.full((rank - 1,), float(init_log_alpha), device=device))
        if diag:
            self.E = nn.Parameter(torch.ones(rank, dtype=dtype, device=device))
            self.quant_e = quant_e if quant_e is not None else FullPrecision(torch.finfo(dtype).bits)
        else:
            self.E, self.quant_e = None, None

    # --- the mask ------------------------------------------------------------------------------

    def gates(self) -> torch.Tensor:
        """z_1..z_{r-1}: sampled in training, 0/1 in eval and once pinned; nested through the cumulative product."""
        if self.training and not self.pinned:
            z = hc.sample(self.log_alpha)
        else:
            z = hc.deterministic(self.log_alpha, self.threshold)
            if self.training:  # the zero gradient a pinned sample has (DDP expects one for every parameter)
                z = z + 0.0 * self.log_alpha
        return hc.prefix_product(z) if self.nested else z

    def mask(self) -> torch.Tensor:
        """m = [1, ⌊z~_1⌉, ..., ⌊z~_{r-1}⌉] (..., r), straight-through rounding; fp32."""
        z = round_ste(self.gates())
        return torch.cat([z.new_ones(z.shape[:-1] + (1,)), z], -1)

    def select(self, a: torch.Tensor, b: torch.Tensor):
        """(A (r, in), B (out, r), d (r,), scale): all components, closed ones weighted 0.

        Eval keeps the full shape too (a mask, not a slice), so the forward stays shape-static;
        :func:`leanlora.finalize` is what removes closed components for real.
        """
        if self.finalized:  # kept components only; E as stored; closed-but-stored ones masked
            d = self.e_store() if self.diag else None
            if self.keep_mask is not None:
                d = self.keep_mask if d is None else d * self.keep_mask.to(d.dtype)
            return a, b, (None if d is None else d.to(a.dtype)), self.scale
        d = self.mask().to(a.dtype)
        if self.diag:
            d = d * self.quant_e(self.E).to(a.dtype)
        return a, b, d, self.scale

    # --- what it chose -------------------------------------------------------------------------

    @torch.no_grad()
    def keep_indices(self) -> torch.Tensor:
        """Indices (long) of the components open in eval; a prefix 0..k-1 when nested."""
        if self.finalized:
            if self.keep_mask is None:
                return torch.arange(self.rank)
            return torch.nonzero(self.keep_mask > 0).flatten().cpu()
        z = hc.deterministic(self.log_alpha.detach(), self.threshold)
        z = torch.cumprod(z, 0) if self.nested else z
        return torch.nonzero(torch.cat([torch.ones(1, device=z.device), z]) > 0).flatten().cpu()

    def active_rank(self) -> int:
        return int(self.keep_indices().numel())

    def expected_rank(self) -> float:
        """1 + Σ_i P(component i on): nested products when nested, single gates otherwise."""
        if self.finalized:
            return float(self.active_rank())
        with torch.no_grad():
            on = hc.open_chain(self.log_alpha) if self.nested else hc.prob_open(self.log_alpha)
            return float(1.0 + on.sum())

    def prior(self) -> torch.Tensor:
        """The rank prior R (scalar with gradient); see the module docstring."""
        terms = self.prior_terms()
        return torch.zeros((), device=self._anchor.device) if terms is None else priors.evaluate(terms)

    def prior_terms(self) -> priors.PriorTerms | None:
        """R as data (:mod:`leanlora.gates.priors`), None once finalized (the gates are gone)."""
        if self.finalized:
            return None
        cost = self.component_macs * NOMINAL_BITS / self.prior_scale.value if self.reg_type == "bop" else 1.0
        return priors.PriorTerms(self.log_alpha, (cost,) * self.log_alpha.shape[-1],
                                 chain=self.prior_kind == "nested" and self.nested)

    def diagonal(self) -> tuple[torch.Tensor, nn.Module] | None:
        """(E, its quantizer) while training with a diagonal; None without one or once finalized."""
        return (self.E, self.quant_e) if self.diag and not self.finalized else None

    def diag_quantizer(self) -> nn.Module | None:
        """The quantizer of E (None without diag): cost accounting reads its bits from here."""
        return self.quant_e if self.diag else None

    # --- finalize ------------------------------------------------------------------------------

    @torch.no_grad()
    def prune_(self, keep: int) -> None:
        """Keep components 0..keep-1 (their update unchanged); gates of the dropped ones go too.
        ``keep`` is checked by :meth:`AdaptedLinear.prune_`, the one caller (this rank equals the factors')."""
        if self.finalized:
            if self.diag:
                self.e_store.select_(torch.arange(keep))
            if self.keep_mask is not None:
                self.keep_mask = self.keep_mask[:keep].clone()
        else:
            self.log_alpha = nn.Parameter(self.log_alpha[: keep - 1].clone(), requires_grad=self.log_alpha.requires_grad)
            if self.diag:
                self.E = nn.Parameter(self.E[:keep].clone(), requires_grad=self.E.requires_grad)
        self.rank = keep

    def finalize_(self, keep: int, e_store: nn.Module | None, e_bits: int, e_quantized: bool,
                  keep_mask: torch.Tensor | None) -> None:
        """Become gate-free: ``keep`` components, E held as ``e_store`` (a stored tensor module).

        ``keep_mask`` (keep,) zeros components that stay stored but are closed (only for
        non-nested gates over factors that cannot drop arbitrary rows); None when all are on.
        """
        from leanlora.precision.fixed import FrozenBits

        self.finalized = True
        self.rank = keep
        self.log_alpha = None
        if self.diag:
            self.E = None
            self.e_store = e_store
            self.quant_e = FrozenBits(e_bits, None, quantized=e_quantized)
        mask = None if keep_mask is None else keep_mask.float().clone().to(self._anchor.device)
        self.register_buffer("keep_mask", mask)

    def extra_repr(self) -> str:
        return (f"r={self.rank}/{self.max_rank}, diag={self.diag}, nested={self.nested}, "
                f"prior={self.prior_kind}{', finalized' if self.finalized else ''}")
