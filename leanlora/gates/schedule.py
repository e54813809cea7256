"""Model-wide training hooks: the prior term of the loss and the per-step schedules.

Strategies opt in through two small protocols instead of being probed by name:
  * :class:`HasPrior` — a module whose gates carry a prior (``prior()`` returns its unscaled cost);
  * :class:`Steppable` — a module with a schedule advanced once per optimizer step.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from leanlora import budget

from leanlora.gates import priors
from leanlora.inject import shared_state


@runtime_checkable
class HasPrior(Protocol):
    def prior(self) -> torch.Tensor:
        """The gate prior of this module (before lambda), a scalar tensor with gradient."""
        ...


@runtime_checkable
class Steppable(Protocol):
    def advance(self, step: int) -> None:
        """Move the schedule to optimizer step ``step`` (sample a rank, anneal a temperature)."""
        ...


_IMPLEMENTS: dict[tuple[type, type], bool] = {}


def implements(module: object, protocol: type) -> bool:
    """``isinstance(module, protocol)``, decided once per class.

    A runtime-checkable protocol's isinstance inspects the instance's attributes on every call,
    and :func:`advance` and :func:`regularizer` ask it of every module at every step, host time
    during which the GPU waits. The protocols here are about methods, which live on the class, so
    the answer per class never changes.
    """
    key = (type(module), protocol)
    hit = _IMPLEMENTS.get(key)
    if hit is None:
        hit = _IMPLEMENTS[key] = isinstance(module, protocol)
    return hit


def regularizer(model: nn.Module) -> torch.Tensor:
    """lambda · Σ priors over every gated strategy of the model (0 when nothing is gated).

    Add it to the task loss: ``loss = task_loss + leanlora.regularizer(model)``. Priors stated as
    data (``prior_terms()``) are evaluated together, a few kernels for the whole model
    (:mod:`leanlora.gates.priors`); any other ``HasPrior`` module adds its own ``prior()``. Layers whose
    pieces were computed in groups (:mod:`leanlora.speed.vectorize`) had their priors evaluated with them
    in the model's forward; those are used until the backward reaches their gates.

    With ``adapter.budget`` the term is the budget controller's λ_t · E[cost] instead
    (:mod:`leanlora.budget`).
    """
    shared = shared_state(model)
    ctl = budget.controller(model)
    if ctl is not None:
        return ctl.penalty(model)
    stated: list[priors.PriorTerms] = []
    # the grouped layers' priors, evaluated with their pieces in this forward (leanlora.speed.vectorize)
    vectorizer = getattr(shared, "vectorizer", None)
    grouped, covered = vectorizer.prior_for(model) if vectorizer is not None else ([], frozenset())
    others: list[torch.Tensor] = list(grouped)
    for m in shared.module_index.select(model, "priors", lambda m: implements(m, HasPrior)):
        if id(m) in covered:
            continue
        if hasattr(m, "prior_terms"):
            terms = m.prior_terms()
            if terms is not None:
                stated.append(terms)
        else:
            others.append(m.prior().reshape(()))
    together = priors.total(stated)
    if together is not None:
        others.append(together)
    if not others:  # on the model's device: a CPU zero added to a GPU loss is a blocking copy per step
        return torch.zeros((), device=next((p.device for p in model.parameters()), None))
    summed = others[0] if len(others) == 1 else torch.stack([o.to(others[0].device) for o in others]).sum()
    return prior_weight(model) * summed


def prior_weight(model: nn.Module) -> float:
    """λ of the gate prior (``adapter.prior.lmbda``), for every caller that weighs summed priors."""
    return shared_state(model).config.prior.lmbda


def advance(model: nn.Module, step: int) -> None:
    """Advance every schedule of the adapter (call once per optimizer step, before the forward)."""
    steppable = shared_state(model).module_index.select(
        model, "steppable", lambda m: m is not model and implements(m, Steppable))
    for m in steppable:  # each module once: the index holds no duplicates
        m.advance(step)
    ctl = budget.controller(model)
    if ctl is not None:
        ctl.advance(model, step)
