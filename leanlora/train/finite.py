"""Stop training before a non-finite weight is kept.

The loss is checked once per step, but it is computed before the optimizer's update: an update
that overflows (a learning rate far too large, fp16 factors) leaves NaN/inf weights behind a
finite loss, and those would be evaluated, saved as ``best/`` and checkpointed.

:class:`FiniteGuard` checks the trained tensors after every update with one reduction on the
device: ``_foreach_norm`` with ord inf (max |x|, a single multi-tensor kernel on CUDA; NaN
propagates through max, inf is its own maximum, and unlike the 2-norm it cannot overflow on
large finite weights), then ``isfinite(...).all()`` OR-ed into a device flag. Nothing is read
back to the host there, so the check runs inside a captured CUDA graph (train.cuda_graph) as
well. The loop reads the flag with the loss it already reads once per step (:meth:`fold` turns
the loss NaN when the flag is up, so that one read carries both): in the plain step that is the
next step's loss, which stops its update (:meth:`hold`); in the graphed step, the loss of the same
replay. Before anything is evaluated or written the flag is read on its own
(:meth:`raise_if_tripped`), so a non-finite update is never saved. Only once the flag is up are the
tensors searched, in order, for the first non-finite one, to name it.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Iterable

import torch


class TrainingDiverged(RuntimeError):
    """The loss or the trained weights became NaN/inf; the message names the step, what went
    non-finite, and how to continue."""


def _local(p: torch.Tensor) -> torch.Tensor:
    """This process's values of ``p`` (its shard, for an FSDP2 DTensor)."""
    return p.to_local() if hasattr(p, "to_local") else p


def _by_device(tensors: Iterable[torch.Tensor]) -> list[list[torch.Tensor]]:
    """The non-empty tensors grouped by device: one fused reduction each."""
    groups: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        if t.numel() > 0:
            groups.setdefault(t.device, []).append(t)
    return list(groups.values())


class FiniteGuard:
    """A device flag raised when any trained tensor holds NaN/inf after an optimizer step."""

    def __init__(self, named_params: Iterable[tuple[str, torch.Tensor]], device: torch.device,
                 rows: dict[int, list[str | None]] | None = None) -> None:
        """``rows``: for a stacked parameter (by id), the names of its rows, so that a message names the
        layer's tensor (:func:`leanlora.groups.stacking.row_names`)."""
        named = [(n, p) for n, p in named_params if p.requires_grad]
        self.rows = rows or {}
        self.names, self.params = [n for n, _ in named], [p for _, p in named]
        self.tripped = torch.zeros((), dtype=torch.bool, device=device)
        self.skip: torch.Tensor | None = None  # 1.0 once a loss was non-finite (see hold)
        # plain parameters are grouped by device once (their values change in place); a DTensor's
        # shard is taken per step
        self._groups = None if any(hasattr(p, "to_local") for p in self.params) else _by_device(self.params)

    @torch.no_grad()
    def update(self) -> None:
        """Call after each optimizer step: no host read, so it can be captured in a CUDA graph."""
        groups = self._groups if self._groups is not None else _by_device(_local(p) for p in self.params)
        for group in groups:
            peaks = torch.stack(torch._foreach_norm(group, float("inf")))
            self.tripped.logical_or_(~peaks.isfinite().all().to(self.tripped.device))

    def fold(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss as a float32 scalar, NaN once the flag has tripped: the loop's one host read of the
        loss per step then also reports the weights; a non-finite value is told apart afterwards."""
        loss = loss.detach().float().reshape(())
        return torch.where(self.tripped.to(loss.device), torch.full_like(loss, float("nan")), loss)

    def hold(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> bool:
        """Have ``optimizer`` skip this update and every later one, on the device, once a loss has been
        non-finite, so that the loop may read ``loss`` a step later; False (nothing set) where it cannot.

        torch's fused optimizers take a ``found_inf`` flag, GradScaler's protocol: when it is 1 the
        kernel leaves weights, moments and step count as they were. The flag stays up, so the update
        issued before the late read finds the NaN is skipped too.
        """
        if not getattr(optimizer, "_step_supports_amp_scaling", False):
            return False
        bad = (~torch.isfinite(loss)).float().reshape(())
        self.skip = bad if self.skip is None else torch.maximum(self.skip, bad)
        optimizer.found_inf = self.skip
        return True

    def first_nonfinite(self) -> str | None:
        """The name of the first trained tensor holding NaN/inf on this process (searched only after
        the flag tripped: one host read per tensor)."""
        for name, p in zip(self.names, self.params):
            t = _local(p).detach()
            if t.numel() and not bool(torch.isfinite(t).all()):
                rows = zip(self.rows.get(id(p), ()), t)  # a stack's first broken row names its layer
                return next((n for n, row in rows if n is not None and not bool(torch.isfinite(row).all())), name)
        return None

    def raise_if_tripped(self, step: int, run_dir: Path, lr: float) -> None:
        """Stop with :class:`TrainingDiverged` when the update of optimizer step ``step`` (1-based) or
        an earlier one left a non-finite weight (one host read of the flag)."""
        from leanlora import distributed as dist

        if dist.all_reduce_mean(float(bool(self.tripped))) == 0.0:  # every rank stops together
            return
        name = self.first_nonfinite() or "a tensor held by another process"
        raise TrainingDiverged(f"the update of step {step} made trained weights non-finite (first: {name}); "
                               "training stopped and nothing of it was saved. " + advice(run_dir, lr))


def advice(run_dir: Path, lr: float) -> str:
    """How to go on after a divergence: a command that runs as printed."""
    from leanlora.train.checkpoint import latest_checkpoint

    lower, run = f"{lr / 10:g}", shlex.quote(str(run_dir))
    if (last := latest_checkpoint(run_dir)) is not None:
        return (f"The last good checkpoint is {last}; continue from it with a lower learning rate: "
                f"`leanlora train --resume {run} train.lr={lower}`")
    return ("No checkpoint was written before it; start again with a lower learning rate: "
            f"`leanlora train {shlex.quote(str(Path(run_dir) / 'run.yaml'))} train.lr={lower} --out {run}`")
