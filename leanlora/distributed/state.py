"""Whole tensors out of (and back into) a model wrapped by :func:`leanlora.distributed.wrapping`.

Saving, summaries, finalize and resume need every adapter tensor whole, while FSDP2 keeps each
rank's shard as a DTensor. These helpers gather what is needed on every rank (collectives: every
rank calls them, in the same order), let rank 0 alone write, and place whole tensors read back
from rank 0's files onto each rank's shard. For a DDP or unwrapped model they reduce to the
plain state dicts. The names are re-exported by :mod:`leanlora.distributed`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from leanlora.artifact.io import adapter_state_dict, save
from leanlora.distributed.process import DistributedError, main_process_only
from leanlora.distributed.wrapping import mode_of, unwrap


@contextlib.contextmanager
def full_params(model: nn.Module, write_back: bool = False) -> Iterator[nn.Module]:
    """Inside the block the adapter's parameters are whole on every rank; yields the plain model.

    For saving (``leanlora.save``), summaries, reports and loading. Collective: every rank must
    enter. Under FSDP2 each sharded adapter parameter (the groups' stacks among them) is swapped
    for a whole copy and swapped back on exit; with ``write_back`` each rank first copies its
    shard of the whole tensor back (every rank must have written the same values). The frozen
    base stays sharded (nothing here needs it: the base digests are recorded before sharding).
    Not FSDP's ``unshard()``: a ``state_dict()`` call reshards what that gathered.
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, distribute_tensor

    inner = unwrap(model)
    if mode_of(model) != "fsdp2":
        yield inner
        return
    for m in inner.modules():
        if isinstance(m, FSDPModule):
            m.reshard()  # e.g. the root after an eval forward: every parameter is a sharded DTensor now
    wanted = set(adapter_state_dict(inner))
    swapped = []
    for fqn, p in list(inner.named_parameters()):
        if (fqn in wanted or fqn.startswith("leanlora_shared.")) and isinstance(p, DTensor):
            owner, _, leaf = fqn.rpartition(".")
            module = inner.get_submodule(owner)
            module._parameters[leaf] = nn.Parameter(p.full_tensor().detach(), requires_grad=p.requires_grad)
            swapped.append((module, leaf, p))
    try:
        yield inner
    finally:
        for module, leaf, p in swapped:
            if write_back:
                whole = module._parameters[leaf].detach()
                with torch.no_grad():
                    p.to_local().copy_(distribute_tensor(whole, p.device_mesh, p.placements).to_local())
            module._parameters[leaf] = p


def save_adapter(model: nn.Module, directory) -> None:
    """``leanlora.save`` of a model wrapped in any mode: whole tensors, written by rank 0 alone."""
    with full_params(model) as plain:
        main_process_only(save)(plain, directory)


def full_adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``leanlora.artifact.io.adapter_state_dict`` with whole tensors on every rank (collective under FSDP2)."""
    from torch.distributed.tensor import DTensor

    state = adapter_state_dict(unwrap(model))
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach() for k, v in state.items()}


@torch.no_grad()
def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy whole adapter tensors (every rank read rank 0's checkpoint) into a wrapped model."""
    with full_params(model, write_back=True) as inner:
        current = adapter_state_dict(inner)
        missing = sorted(set(current) - set(state))
        if missing:
            raise DistributedError(f"the adapter state lacks {missing[:4]} ({len(missing)} tensors)")
        for key, dst in current.items():
            dst.copy_(state[key].to(dst.device, dst.dtype))


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with whole tensors on every rank (collective under FSDP2).

    Same layout as the plain state dict (parameters by index), so a checkpoint written by one
    process loads into N and back.
    """
    from torch.distributed.tensor import DTensor

    sd = optimizer.state_dict()
    state = {i: {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in s.items()}
             for i, s in sd["state"].items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def load_full_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a :func:`full_optimizer_state` (read by every rank) into an optimizer of sharded params."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for g in optimizer.param_groups for p in g["params"]]
    placed = {}
    for i, s in state["state"].items():
        p = params[int(i)]
        placed[i] = {k: (distribute_tensor(v.to(p.device_mesh.device_type), p.device_mesh, p.placements)
                         if isinstance(p, DTensor) and isinstance(v, torch.Tensor) and v.shape == p.shape
                         else v) for k, v in s.items()}
    optimizer.load_state_dict({"state": placed, "param_groups": state["param_groups"]})
