"""Resumable checkpoints: adapter, optimizer, scheduler, RNG states and loop state, never pickle.

Layout of a run folder::

    checkpoints/latest.json          {"step": 40, "dir": "step-00000040"}  (written last)
    checkpoints/step-00000040/       adapter.safetensors, optimizer.safetensors, rng.safetensors,
                                     state.json (optimizer structure, scheduler, python/numpy RNG,
                                     loop state, the budget controller's state)

Every file is written to a temporary name and renamed (``leanlora.io`` atomic writes), and
``latest.json`` moves to a new step folder only once that folder is complete, so a run killed
at any instant resumes from the last complete checkpoint. Older step folders are removed after
``latest.json`` has moved.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from leanlora import budget
from leanlora.distributed import (barrier, full_adapter_state, full_optimizer_state, is_main_process,
                                  load_adapter_state, load_full_optimizer_state)
from leanlora.io import adapter_state_dict, atomic_save_tensors, atomic_write_bytes

CKPT_DIR = "checkpoints"
LATEST = "latest.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing or does not fit the model / optimizer it is loaded into."""


# --- RNG -------------------------------------------------------------------------------------


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    plain = {"python": [version, list(state), gauss],
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, plain


def set_rng_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    version, state, gauss = plain["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# --- optimizer: tensors to safetensors, structure to JSON ----------------------------------------


def _split_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    plain_state: dict[str, dict[str, Any]] = {}
    for idx, per_param in state["state"].items():
        plain_state[str(idx)] = {}
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value
            else:
                plain_state[str(idx)][key] = value
    return tensors, {"state": plain_state, "param_groups": state["param_groups"]}


def _join_optimizer(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in plain["state"].items()}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def _plain(value: Any) -> Any:
    """``value`` with its one-element tensors as numbers: a captured training step
    (leanlora.train.step_graph) keeps learning rates as device tensors, and the scheduler copies them."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


# --- save / load ------------------------------------------------------------------------------


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The folder named by ``checkpoints/latest.json``, or None when the run has none."""
    pointer = Path(run_dir) / CKPT_DIR / LATEST
    if not pointer.is_file():
        return None
    info = json.loads(pointer.read_text())
    path = pointer.parent / info["dir"]
    if not path.is_dir():
        raise CheckpointError(f"{pointer} names {info['dir']}, which does not exist")
    return path


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, loop_state: dict[str, Any]) -> Path:
    """Write a complete checkpoint of optimizer step ``step``, then point latest.json at it."""
    root = Path(run_dir) / CKPT_DIR
    folder = root / f"step-{step:08d}"
    # Whole tensors on every rank (a collective under FSDP2); then rank 0 alone writes.
    adapter, optim = full_adapter_state(model), full_optimizer_state(optimizer)
    if not is_main_process():
        barrier()
        return folder
    if folder.exists():  # a half-written folder of a killed run, never pointed at
        shutil.rmtree(folder)
    atomic_save_tensors(adapter, folder / "adapter.safetensors")
    opt_tensors, opt_plain = _split_optimizer(optim)
    atomic_save_tensors(opt_tensors, folder / "optimizer.safetensors")
    rng_tensors, rng_plain = rng_state()
    atomic_save_tensors(rng_tensors, folder / "rng.safetensors")
    state = {"step": step, "loop": loop_state, "optimizer": _plain(opt_plain),
             "scheduler": _plain(scheduler.state_dict()), "rng": rng_plain}
    ctl = budget.controller(model)
    if ctl is not None:  # λ, the schedule's C_0, the freeze and its pins: the run continues as it stood
        state["budget"] = ctl.state_dict()
    atomic_write_bytes(folder / "state.json", json.dumps(state).encode())
    atomic_write_bytes(root / LATEST, json.dumps({"step": step, "dir": folder.name}).encode())
    for old in root.glob("step-*"):
        if old != folder and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return folder


def load_checkpoint(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler) -> dict[str, Any]:
    """Restore everything saved by :func:`save_checkpoint`; returns ``{"step", "loop"}``."""
    folder = Path(folder)
    state = json.loads((folder / "state.json").read_text())
    saved = load_file(str(folder / "adapter.safetensors"))
    expected = adapter_state_dict(model)
    if set(saved) != set(expected):
        missing, extra = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
        raise CheckpointError(f"{folder}: the adapter does not match this run's config "
                              f"(missing {missing[:4]}, unexpected {extra[:4]})")
    for key, tensor in expected.items():
        if tensor.shape != saved[key].shape:
            raise CheckpointError(f"{folder}: {key} has shape {tuple(saved[key].shape)}, "
                                  f"the model {tuple(tensor.shape)}")
    load_adapter_state(model, saved)  # every rank reads rank 0's files; FSDP2 keeps its shard
    device = next(p.device for p in model.parameters())
    opt_tensors = {k: v.to(device) if not k.endswith(".step") else v
                   for k, v in load_file(str(folder / "optimizer.safetensors")).items()}
    load_full_optimizer_state(optimizer, _join_optimizer(opt_tensors, state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(load_file(str(folder / "rng.safetensors")), state["rng"])
    ctl = budget.controller(model)
    if ctl is not None:
        if "budget" not in state:
            raise CheckpointError(f"{folder}: this run has adapter.budget but the checkpoint holds no budget state")
        ctl.load_state_dict(state["budget"])
    return {"step": state["step"], "loop": state["loop"]}
