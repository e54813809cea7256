"""Gate priors as data, so that the whole model's prior is a few kernels instead of hundreds.

Every prior in leanlora has one shape: ``R = Σ_k w_k f(log_alpha)_k`` with ``f`` either the open
chain q_1, q_1 q_2, ... (nested gates, learned bits) or the single open probabilities q_k
(independent gates), and ``w`` constants fixed at build time (1, or a BOP price). A strategy
states its prior as :class:`PriorTerms`, one gate vector or, for a group of layers
(:mod:`leanlora.groups.stacking`), the stacked rows of all of them; :func:`total` joins the rows of
every term that shares (f, length, device) into one matrix and evaluates them at once.

Why: a B-LoRA Llama layer has 7 adapted modules with 4 gate vectors each. Evaluated one by one,
the prior of a 16-layer model is 448 tiny chains, each a few kernels forward and backward and
its own nodes in a compiled graph; as one matrix it is about ten kernels forward and backward,
whatever the model's size.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from leanlora.gates import hardconcrete as hc


@dataclass(frozen=True)
class PriorTerms:
    """R = Σ_k weights_k · f(log_alpha)_k; f = open chain when ``chain`` else the open probabilities."""

    log_alpha: torch.Tensor          # (K,) gate locations, with gradient, or (G, K): a group's stack
    weights: tuple[float, ...]       # (K,) constant prices, the same for every row
    chain: bool


def open_probs(log_alpha: torch.Tensor, chain: bool) -> torch.Tensor:
    """f along the last dimension: prefix products of q (chain) or q itself."""
    return hc.open_chain(log_alpha, -1) if chain else hc.prob_open(log_alpha)


# Device copies of the price matrices, shared by every model: entries are keyed by value, not by owner.
# One entry per distinct price row set: a module's own (FSDP2 evaluates per module) or a stacked
# group's; a few hundred for a large model, so the bound only stops leaks.
@functools.lru_cache(maxsize=4096)
def _device_prices(rows: tuple[tuple[float, ...], ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=dtype, device=device)


def _prices(rows: tuple[tuple[float, ...], ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The constant price matrix ``rows`` on ``device``, reused across steps.

    Building it each step would copy host memory to the GPU every step, and a copy from
    pageable memory waits for the stream: the prior would stall the launch queue. Keyed by the
    prices themselves, so a changed price (a pruned model, a new scale) makes a new entry.
    """
    if torch.compiler.is_compiling():  # a traced graph keeps its constants; no cache writes in a trace
        return torch.tensor(rows, dtype=dtype, device=device)
    return _device_prices(rows, dtype, device)


def evaluate(terms: PriorTerms) -> torch.Tensor:
    """One module's prior, a scalar (the reference :func:`total` must agree with)."""
    probs = open_probs(terms.log_alpha, terms.chain)
    return (probs * _prices((terms.weights,), probs.dtype, probs.device)[0]).sum()


def total(all_terms: list[PriorTerms]) -> torch.Tensor | None:
    """Σ over modules of their priors, evaluated per group of equal (f, K, dtype, device); None if empty."""
    groups: dict[tuple, list[PriorTerms]] = {}
    for t in all_terms:
        groups.setdefault((t.chain, t.log_alpha.shape[-1], t.log_alpha.dtype, t.log_alpha.device), []).append(t)
    sums = []
    for (chain, width, dtype, device), members in groups.items():
        rows = [t.log_alpha.reshape(-1, width) for t in members]
        log_alpha = rows[0] if len(rows) == 1 else torch.cat(rows)                # (rows, K)
        prices = tuple(t.weights for t, r in zip(members, rows) for _ in range(r.shape[0]))
        weights = _prices(prices, dtype, device)                                  # (rows, K)
        sums.append((open_probs(log_alpha, chain) * weights).sum())
    if not sums:
        return None
    return sums[0] if len(sums) == 1 else torch.stack([s.to(sums[0].device) for s in sums]).sum()
