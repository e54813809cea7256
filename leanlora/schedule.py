"""Model-wide training hooks: the prior term of the loss and the per-step schedules.

Strategies opt in through two small protocols instead of being probed by name:
  * :class:`HasPrior` — a module whose gates carry a prior (``prior()`` returns its unscaled cost);
  * :class:`Steppable` — a module with a schedule advanced once per optimizer step.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

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


def regularizer(model: nn.Module) -> torch.Tensor:
    """lambda · Σ priors over every gated strategy of the model (0 when nothing is gated).

    Add it to the task loss: ``loss = task_loss + leanlora.regularizer(model)``.
    """
    config = shared_state(model).config
    terms = [m.prior() for m in model.modules() if isinstance(m, HasPrior)]
    if not terms:
        return torch.zeros(())
    return config.quant.lmbda * torch.stack([t.reshape(()) for t in terms]).sum()


def advance(model: nn.Module, step: int) -> None:
    """Advance every schedule of the adapter (call once per optimizer step, before the forward)."""
    shared_state(model)
    seen: set[int] = set()
    for m in model.modules():
        if isinstance(m, Steppable) and id(m) not in seen and m is not model:
            seen.add(id(m))
            m.advance(step)
