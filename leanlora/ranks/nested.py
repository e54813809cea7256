"""Nested ranks (DyLoRA, QDyLoRA): train every rank 1..r at once by truncating at a sampled b.

    training step t:  b_t ~ p_B over {r_min..r_max}, one draw shared by every layer
                      p_B = full_share · [b = r_max] + (1 - full_share) · uniform (or geometric)
    forward:          h = W0 x + s · B[:, :b] A[:b] x
    eval:             the same at b = the rank set by ``set_rank`` (default ``eval_rank`` or r)

The scale s is ``alpha / b`` at the sampled b (``scale="sampled"``, DyLoRA's rule and the
default) or ``alpha / r`` at every b (``scale="max"``; alpha / sqrt of either with rsLoRA). With
alpha / b each truncation is a LoRA of rank b at the same alpha, so a small rank carries as much
update as the full one. With alpha / r truncating just drops components b..r-1 and every
component moves as a LoRA component does, but a rank-b adapter then holds only b/r of the
full-rank update, and in short runs the smallest ranks stay near chance.

In training the truncation is a mask, not a slice: h = W0 x + B diag(m_b · alpha / b) A x with
m_b = [1]*b + [0]*(r - b), and b read from a device tensor that ``advance`` fills. The shapes are
then the same at every b, so ``torch.compile`` builds one graph for the whole run instead of one
per sampled rank (a slice at a Python int b specialises the graph on b). The cost is the two thin
GEMMs at r instead of b columns, r (in + out) MACs per token. Eval slices (exact truncation, and
the cheapest forward at a chosen rank).

Train with the global gradient norm clipped (``train.max_grad_norm``, 1.0 by default here and in
the HF Trainer). A step that draws a small b scales the update by alpha / b, r times the full
rank's at b = 1, and on a regression loss those steps throw gradient spikes far above a LoRA's;
unclipped, they can hold the loss on a plateau for most of a short run.

Components are ordered: component i is trained whenever b > i, so the first ones learn the most
and any prefix is a usable adapter. Under DyLoRA's uniform draw the full rank, the adapter used
unless a sweep picks another, trains in only 1/r of the steps, and in short runs it ends below the
middle ranks and, in some seeds, at the majority class; so by default half the steps draw it
(``nested.full_share``, see :class:`leanlora.config.NestedConfig`). One trained adapter therefore
yields an adapter at every rank, picked after training by a sweep (:mod:`leanlora.reports.sweep`).

"Frozen" mode (``frozen=True``) is what the released DyLoRA training callback runs: in a step at
rank b only component b-1 (row b-1 of A, column b-1 of B) receives a gradient; components
0..b-2 enter the forward through ``detach()``. Caveat, as in the DyLoRA code: detach stops the
gradient, not the optimizer. AdamW still moves a frozen component through its momentum from
earlier steps and its weight decay; only a momentum-free optimizer (plain SGD without weight
decay) leaves it exactly unchanged. Non-frozen mode (the default) trains components 0..b-1.
"""

from __future__ import annotations

import torch
from torch import nn

from leanlora.groups.rows import StackedRows
from leanlora.ranks.fixed import PrefixRanks, lora_scale

DISTRIBUTIONS = ("uniform", "geometric")


def rank_probabilities(r_min: int, r_max: int, distribution: str = "uniform", decay: float = 0.8,
                       full_share: float = 0.0) -> torch.Tensor:
    """p_B over ranks r_min..r_max, shape (r_max - r_min + 1,), summing to 1.

    uniform:   p(b) = 1 / (r_max - r_min + 1)            (the DyLoRA code)
    geometric: p(b) ∝ decay^(b - r_min)                   (small ranks more often)
    then:      p ← (1 - full_share) p + full_share [b = r_max]
    """
    n = r_max - r_min + 1
    if distribution == "uniform":
        p = torch.full((n,), 1.0 / n, dtype=torch.float64)
    elif distribution == "geometric":
        p = torch.tensor([decay ** k for k in range(n)], dtype=torch.float64)
        p = p / p.sum()
    else:
        raise ValueError(f"nested rank distribution={distribution!r} is unknown; allowed: {DISTRIBUTIONS}")
    p = p * (1.0 - full_share)
    p[-1] += full_share
    return p


class RankSampler(nn.Module):
    """The one model-wide schedule of nested ranks; lives in ``model.leanlora_shared``.

    ``advance(step)`` (called by ``leanlora.advance(model, step)`` once per optimizer step, before
    the forward) draws b from a generator seeded by (seed, step) alone, so every process of a
    data-parallel run draws the same b, and a resumed run draws the same sequence.
    """

    def __init__(self, r_min: int, r_max: int, distribution: str = "uniform", decay: float = 0.8,
                 seed: int = 0, device: torch.device | None = None, full_share: float = 0.0) -> None:
        super().__init__()
        if not 1 <= r_min <= r_max:
            raise ValueError(f"nested ranks need 1 <= r_min <= r_max, got r_min={r_min}, r_max={r_max}")
        self.r_min, self.r_max, self.distribution, self.decay, self.seed = r_min, r_max, distribution, decay, seed
        self.full_share = full_share
        self.probs = rank_probabilities(r_min, r_max, distribution, decay, full_share)  # validates distribution
        self.current: int | None = None
        self.step: int | None = None
        # b on the device for the masked training forward; 0 until the first advance (a forward
        # before it divides by 0 and turns the loss NaN, which the loop reports, when compiled;
        # eager forwards raise first, naming the missing call)
        self.register_buffer("current_rank", torch.zeros((), dtype=torch.long, device=device), persistent=False)

    def draw(self, step: int) -> int:
        """b for optimizer step ``step`` (pure: the same (seed, step) always gives the same b)."""
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + int(step)) % (2 ** 63))
        return self.r_min + int(torch.multinomial(self.probs, 1, generator=g))

    def advance(self, step: int) -> None:
        self.step, self.current = int(step), self.draw(step)
        self.current_rank.fill_(self.current)

    def rank(self) -> int:
        """The rank of the current training step."""
        if self.current is None:
            raise RuntimeError("nested ranks: no rank has been drawn yet; call leanlora.advance(model, step) "
                               "at the start of every training step (the HF Trainer callback does this)")
        return self.current

    def mean(self) -> float:
        ranks = torch.arange(self.r_min, self.r_max + 1, dtype=torch.float64)
        return float((self.probs * ranks).sum())

    def extra_repr(self) -> str:
        return (f"b in [{self.r_min}, {self.r_max}], {self.distribution}"
                f"{f' decay={self.decay:g}' if self.distribution == 'geometric' else ''}"
                f"{f' full_share={self.full_share:g}' if self.full_share else ''}, seed={self.seed}, "
                f"step={self.step}, b={self.current}")


class NestedRanks(PrefixRanks, StackedRows, nn.Module):
    """Truncate A (r, in) to its first b rows and B (out, r) to its first b columns; scale alpha / b
    (``scale="sampled"``) or alpha / r (``scale="max"``)."""

    def __init__(self, rank: int, alpha: float, sampler: RankSampler, frozen: bool = False,
                 eval_rank: int | None = None, rslora: bool = False, name: str = "",
                 device: torch.device | None = None, scale: str = "sampled") -> None:
        super().__init__()
        self.rank, self.alpha, self.frozen, self.rslora, self.name = rank, alpha, frozen, rslora, name
        # the rank of the scale alpha / r: the built r, kept when prune_ drops components
        self.scale_mode, self.max_rank = scale, rank
        # A plain attribute, not a submodule: the sampler is shared and registered once, on the model.
        object.__setattr__(self, "sampler", sampler)
        self.register_buffer("_index", torch.arange(rank, device=device), persistent=False)  # component numbers
        self.set_rank(eval_rank)  # sets ``chosen``: None is the full rank

    def _check(self, b: int, what: str) -> int:
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= self.rank:
            raise ValueError(f"module {self.name!r}: {what} b={b!r} is outside this layer's ranks 1..{self.rank}")
        return b

    def set_rank(self, b: int | None) -> None:
        """Rank used in eval mode (and by merge/export); None goes back to the full rank r."""
        self.chosen = None if b is None else self._check(b, "rank")

    def eval_rank(self) -> int:
        return self.rank if self.chosen is None else self.chosen

    active_rank = eval_rank  # components in use now (eval semantics): the eval rank

    def select(self, a: torch.Tensor, b_mat: torch.Tensor):
        """Training: (A, B, m_b · scale_b, 1) masked at the sampled b. Eval: (A[:b], B[:, :b], None, scale_b)."""
        if self.training:
            if not torch.compiler.is_compiling():  # reading the Python int would specialise the graph
                self._check(self.sampler.rank(), "sampled rank")
            rank = self.sampler.current_rank
            on = self._index < rank                                          # (r,) bool, components 0..b-1
            scale = self.scale_at(rank.to(torch.float32))                    # a float or a 0-dim tensor
            if self.frozen:
                # Only component b-1 learns this step; the earlier ones pass through detached.
                learns = self._index == rank - 1
                a = torch.where(learns[:, None], a, a.detach())       # over (..., r, in)
                b_mat = torch.where(learns, b_mat, b_mat.detach())    # over (..., out, r)
            return a, b_mat, on.to(torch.float32) * scale, 1.0
        b = self.eval_rank()
        return a[..., :b, :], b_mat[..., :b], None, self.scale_at(b)  # (..., b, in), (..., out, b)

    def scale_at(self, b: int | torch.Tensor) -> float | torch.Tensor:
        """The update's scale at rank b: alpha / b, alpha / r with ``scale="max"``, or their geometric
        mean alpha / sqrt(b r) with ``scale="sqrt"``."""
        if self.scale_mode == "sqrt":
            return (lora_scale(self.alpha, b, self.rslora) * lora_scale(self.alpha, self.max_rank, self.rslora)) ** 0.5
        return lora_scale(self.alpha, b if self.scale_mode == "sampled" else self.max_rank, self.rslora)

    def expected_rank(self) -> float:
        return min(self.sampler.mean(), float(self.rank)) if self.training else float(self.eval_rank())

    def prune_(self, keep: int) -> None:
        """Keep components 0..keep-1; the eval rank becomes min(eval rank, keep).

        The scale depends on b or on the built r, never on ``keep``, so the update at any b <= keep
        is unchanged.
        """
        self._check(keep, "prune rank")
        self.chosen = min(self.eval_rank(), keep)
        self.rank = keep
        self._index = self._index[:keep].clone()

    def extra_repr(self) -> str:
        return (f"r={self.rank}, eval b={self.eval_rank()}, alpha={self.alpha:g}, scale={self.scale_mode}"
                f"{', frozen' if self.frozen else ''}{', rslora' if self.rslora else ''}")
