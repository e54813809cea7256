"""Model-wide training hooks: the prior term of the loss and the per-step schedules.

Strategies opt in instead of being probed by name:
  * :class:`HasPrior` — a module whose gates carry a prior (``prior()`` returns its unscaled cost);
  * a model-wide module with a schedule (the nested-rank sampler) defines ``advance(step)``, called
    once per optimizer step.
"""

from __future__ import annotations

import numbers
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


def regularizer(model: nn.Module) -> torch.Tensor:
    """lambda · Σ priors over every gated strategy of the model (0 when nothing is gated).

    Add it to the task loss: ``loss = task_loss + leanlora.regularizer(model)``. This is the one
    place the prior is summed: each group states the priors of all its members as stacked rows
    (:meth:`leanlora.groups.stacking.AdapterGroup.prior_terms`), a layer on parameters of its own
    states its own, and :func:`leanlora.gates.priors.total` evaluates them all in a few kernels.

    With ``adapter.budget`` the term is the budget controller's λ_t · E[cost] instead
    (:mod:`leanlora.budget`).
    """
    shared = shared_state(model)
    ctl = budget.controller(model)
    if ctl is not None:
        return ctl.penalty(model)
    stated: list[priors.PriorTerms] = [terms for group in shared.groups for terms in group.prior_terms()]
    others: list[torch.Tensor] = []
    for layer in shared.__dict__.get("layers", ()):
        if layer.group is not None:  # a group's members: stated by the group
            continue
        for m in layer.modules():
            if m is layer or not isinstance(m, HasPrior):
                continue
            if not hasattr(m, "prior_terms"):
                others.append(m.prior().reshape(()))
            elif (terms := m.prior_terms()) is not None:
                stated.append(terms)
    together = priors.total(stated)
    if together is not None:
        others.append(together)
    if not others:  # on the model's device: a CPU zero added to a GPU loss is a blocking copy per step
        return torch.zeros((), device=next((p.device for p in model.parameters()), None))
    summed = others[0] if len(others) == 1 else torch.stack([o.to(others[0].device) for o in others]).sum()
    return shared.config.prior.lmbda * summed  # λ of the gate prior


def advance(model: nn.Module, step: int) -> None:
    """Advance every schedule of the adapter to 0-based optimizer ``step`` (call once per step, before
    the forward)."""
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ValueError(f"leanlora.advance: step={step!r} is invalid: must be the 0-based optimizer step, an integer >= 0")
    for m in shared_state(model).modules():  # the schedules are model-wide: the nested-rank sampler
        if callable(getattr(type(m), "advance", None)):  # asked of the class: a protocol check per module is slow
            m.advance(step)
    ctl = budget.controller(model)
    if ctl is not None:
        ctl.advance(model, step)
