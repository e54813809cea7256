"""Resumable checkpoints: adapter, optimizer, scheduler, RNG states and loop state, never pickle.

Layout of a run folder::

    checkpoints/latest.json          {"step": 40, "dir": "step-00000040"}  (written last)
    checkpoints/step-00000040/       adapter.safetensors, optimizer.safetensors, rng.safetensors,
                                     state.json (optimizer structure, scheduler, python/numpy RNG,
                                     loop state, the budget controller's state)

Every file is written to a temporary name and renamed (``leanlora.artifact.io`` atomic writes), and
``latest.json`` moves to a new step folder only once that folder is complete, so a run killed
at any instant resumes from the last complete checkpoint. Older step folders are removed after
``latest.json`` has moved.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from leanlora import budget
from leanlora.distributed import (barrier, full_adapter_state, full_optimizer_state, is_main_process,
                                  load_adapter_state, load_full_optimizer_state)
from leanlora.artifact.checksum import read_verified
from leanlora.artifact.io import adapter_state_dict, atomic_save_tensors, atomic_write_bytes

CKPT_DIR = "checkpoints"
LATEST = "latest.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing or does not fit the model / optimizer it is loaded into."""


# --- RNG -------------------------------------------------------------------------------------


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    tensors = {"torch": torch.get_rng_state(), **{f"cuda.{i}": s for i, s in enumerate(cuda)}}
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
    per_param = state["state"].items()
    tensors = {f"{idx}.{key}": value for idx, values in per_param for key, value in values.items()
               if isinstance(value, torch.Tensor)}
    plain = {str(idx): {key: value for key, value in values.items() if not isinstance(value, torch.Tensor)}
             for idx, values in per_param}
    return tensors, {"state": plain, "param_groups": state["param_groups"]}


def _join_optimizer(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in plain["state"].items()}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": plain["param_groups"]}


# --- save / load ------------------------------------------------------------------------------


def _damaged(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: {why}; the checkpoint is damaged (was the file edited or cut short "
                           "outside leanlora?). Restore the file, or start the run again into a new --out folder")


def _read_json(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """A checkpoint's JSON file, which must be an object holding ``keys``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _damaged(path, "file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _damaged(path, f"not valid JSON ({err})") from None
    if missing := [k for k in keys if not isinstance(data, dict) or k not in data]:
        raise _damaged(path, f"key(s) {missing} missing")
    return data


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's safetensors file, its tensors checked against the sha256 it carries."""
    return read_verified(path, lambda why: _damaged(path, why), missing="file not found",
                         unreadable="not a readable safetensors file ({})",
                         changed="its tensors do not match the sha256 stored in the file")[0]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The folder named by ``checkpoints/latest.json``, or None when the run has none."""
    pointer = Path(run_dir) / CKPT_DIR / LATEST
    if not pointer.is_file():
        return None
    info = _read_json(pointer, ("dir",))
    if not isinstance(info["dir"], str) or not re.fullmatch(r"step-\d+", info["dir"]):
        raise _damaged(pointer, f"'dir' is {info['dir']!r}, not the name of a step-NNNNNNNN folder")
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
    (opt_tensors, opt_plain), (rng_tensors, rng_plain) = _split_optimizer(optim), rng_state()
    for name, tensors in (("adapter", adapter), ("optimizer", opt_tensors), ("rng", rng_tensors)):
        atomic_save_tensors(tensors, folder / f"{name}.safetensors")
    state = {"step": step, "loop": loop_state, "optimizer": opt_plain, "scheduler": scheduler.state_dict(),
             "rng": rng_plain}
    # the budget's λ, the schedule's C_0, the freeze and its pins: the run continues as it stood
    if (ctl := budget.controller(model)) is not None:
        state["budget"] = ctl.state_dict()
    # one-element tensors as numbers: a captured training step (leanlora.train.step_graph) keeps
    # learning rates as device tensors, and the scheduler copies them
    atomic_write_bytes(folder / "state.json", json.dumps(state, default=torch.Tensor.item).encode())
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
    state = _read_json(folder / "state.json", ("step", "loop", "optimizer", "scheduler", "rng"))
    if type(state["step"]) is not int or state["step"] < 0 or not isinstance(state["loop"], dict):
        raise _damaged(folder / "state.json", "'step' must be a count of steps and 'loop' a mapping")
    saved = _read_tensors(folder / "adapter.safetensors")
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
                   for k, v in _read_tensors(folder / "optimizer.safetensors").items()}
    rng = _read_tensors(folder / "rng.safetensors")
    _check_layout(folder, state["optimizer"], optimizer)
    try:
        load_full_optimizer_state(optimizer, _join_optimizer(opt_tensors, state["optimizer"]))
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(rng, state["rng"])
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError, AttributeError) as err:
        # the JSON and tensors parsed but do not describe this run's optimizer, scheduler or RNG
        raise _damaged(folder, f"its optimizer, scheduler or RNG state does not fit this run "
                               f"({type(err).__name__}: {err})") from None
    if (ctl := budget.controller(model)) is not None:
        if "budget" not in state:
            raise CheckpointError(f"{folder}: this run has adapter.budget but the checkpoint holds no budget state")
        ctl.load_state_dict(state["budget"])
    return {"step": state["step"], "loop": state["loop"]}


def _check_layout(folder: Path, saved: Any, optimizer: torch.optim.Optimizer) -> None:
    """Refuse, by name, optimizer state of a per-layer parameter layout (one tensor per layer and name).

    Adapters are trained as one stacked tensor per group of layers (:mod:`leanlora.groups.stacking`);
    a checkpoint of a version that trained every layer's tensors apart holds moments for many more
    tensors, which cannot be mapped onto the stacks without the order they were saved in.
    """
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not isinstance(groups, list):
        return  # _damaged reports a malformed state below
    have = sum(len(g.get("params", ())) for g in groups if isinstance(g, dict))
    want = sum(len(g["params"]) for g in optimizer.param_groups)
    if have > want:
        raise CheckpointError(
            f"{folder}: its optimizer state holds {have} tensors, this run trains {want}: it was written by a "
            "leanlora that kept every adapted layer's parameters apart, and adapters now train as one stacked "
            "tensor per group of layers. Its adapter loads as it is (leanlora.load, or leanlora.restore on a "
            "model of the same config); resuming its optimizer state is not supported: start the run again")


def clean_leftovers(run_dir: str | Path) -> list[Path]:
    """Remove what a killed write leaves in a run folder: temporary files and folders (``.NAME.*.tmp``,
    the names :mod:`leanlora.artifact.io` writes under) and step folders that ``latest.json`` does not name
    (a checkpoint cut short). Returns what was removed."""
    run_dir = Path(run_dir)
    removed = [p for pattern in (".*.tmp", "*/.*.tmp", "*/*/.*.tmp") for p in sorted(run_dir.glob(pattern))]
    latest = latest_checkpoint(run_dir)
    removed += [p for p in sorted((run_dir / CKPT_DIR).glob("step-*")) if p.is_dir() and p != latest]
    for path in removed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return removed
