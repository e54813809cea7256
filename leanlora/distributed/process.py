"""Multi-process training on PyTorch's own engine: torchrun / accelerate launch, DDP and FSDP2.

    torchrun --nproc_per_node N -m leanlora train run.yaml train.distributed=ddp
    accelerate launch --num_processes N -m leanlora train run.yaml train.distributed=fsdp2

Both launchers export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; :func:`init`
reads them (gloo on CPU, nccl on CUDA). This file holds the process group and its small
collectives; :mod:`leanlora.distributed.wrapping` hands the model to DDP or FSDP2.
"""

from __future__ import annotations

import functools
import itertools
import os
import sys
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from leanlora.config import ConfigError

MODES = ("none", "ddp", "fsdp2")


class DistributedError(ConfigError):
    """The run cannot be distributed as asked; the message names the setting and the fix."""


# --- process group --------------------------------------------------------------------------


def launched() -> bool:
    """True when a launcher (torchrun, accelerate launch) started this process."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init(device: str | torch.device = "auto", timeout_s: float = 1800.0) -> torch.device:
    """Join the process group the launcher describes and return this process's device.

    No launcher: no group; the device is ``device`` ("auto": CUDA when present). Under a
    launcher: gloo on CPU, nccl on CUDA with ``cuda:LOCAL_RANK``. Idempotent.
    """
    device = torch.device("cuda" if str(device) == "auto" and torch.cuda.is_available()
                          else "cpu" if str(device) == "auto" else device)
    if not launched():
        return device
    if not dist.is_available():
        raise DistributedError("a launcher set WORLD_SIZE but this torch build has no torch.distributed")
    if device.type == "cuda" and device.index is not None and int(os.environ["WORLD_SIZE"]) > 1:
        raise DistributedError(f"train.device={str(device)!r} would put every process on one GPU; use "
                               "'auto' or 'cuda': each process takes cuda:LOCAL_RANK")
    if device.type == "cuda":
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "gloo" and not dist.is_gloo_available():
            raise DistributedError("a CPU run with WORLD_SIZE > 1 needs the gloo backend, which this torch lacks")
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s),
                                **({"device_id": device} if device.type == "cuda" else {}))
    return device


def init_run(mode: str, device: str | torch.device = "auto") -> torch.device:
    """:func:`init` for a run with ``train.distributed=mode``, refusing launcher/mode mismatches."""
    if mode not in MODES:
        raise DistributedError(f"train.distributed={mode!r} is invalid: allowed {list(MODES)}")
    n = int(os.environ.get("WORLD_SIZE", "1"))
    if mode == "none" and n > 1:
        raise DistributedError(f"{n} processes were launched but train.distributed='none', so each would train "
                               "and write the same run; set train.distributed=ddp or fsdp2")
    if mode != "none" and not launched():
        raise DistributedError(f"train.distributed={mode!r} needs a launcher: `torchrun --nproc_per_node N -m "
                               "leanlora train ...` or `accelerate launch --num_processes N -m leanlora train ...`")
    return init(device)


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()


def end_process(code: int) -> None:
    """Leave a launched process once its run is complete: barrier, destroy the group, exit.

    The hard exit (after flushing) skips interpreter teardown, where gloo's worker threads can
    still abort the process ("terminate called without an active exception", SIGABRT) after a
    run that finished and wrote everything, turning a complete run's exit code into a failure.
    Only for entry points: a library call never ends the caller's process.
    """
    if not is_distributed():
        return
    barrier()
    shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank; the launcher's RANK before :func:`init` has run."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0")) if launched() else 0


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1")) if launched() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """Rank 0 (or the only process): the one that writes checkpoints, reports and plots."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def main_process_only(fn: Callable) -> Callable:
    """Run ``fn`` on rank 0 only (None elsewhere), then wait until every rank got here.

    The barrier makes "rank 0 writes, every rank reads" safe: no rank reads a file early.
    """
    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        result = fn(*args, **kwargs) if is_main_process() else None
        barrier()
        return result
    return guarded


# --- small collectives ------------------------------------------------------------------------


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_mean(value: float | torch.Tensor) -> float | torch.Tensor:
    """Mean of ``value`` over ranks (a metric: loss, accuracy); a float stays a float."""
    if not is_distributed():
        return value
    t = torch.as_tensor(value, dtype=torch.float64).to(_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t = t / world_size()
    return float(t) if not isinstance(value, torch.Tensor) else t.to(value.device, value.dtype)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (any picklable object; small things only)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


def sync_seed(seed: int | None = None) -> int:
    """Rank 0's seed on every rank; ``None`` lets rank 0 draw one. Returns the common seed."""
    if seed is None and is_main_process():
        seed = int(torch.randint(0, 2 ** 31 - 1, ()).item())
    return int(broadcast_object(seed))


def rank_seed(seed: int) -> int:
    """A per-rank seed for noise (gate samples, dropout) after the common init: ranks differ."""
    return (int(seed) + 1_000_003 * rank()) % (2 ** 63)


def shard(indices: Sequence[int]) -> list[int]:
    """This rank's share of one global micro-batch: every world_size-th index from ``rank``.

    A batch whose length N does not divide is padded by wrapping around (DistributedSampler's
    rule), so every rank gets ceil(len / N) examples and no rank is left without data.
    """
    n = world_size()
    per_rank = -(-len(indices) // n)  # ceil(len / n)
    return list(itertools.islice(itertools.cycle(indices), n * per_rank))[rank()::n]


def data_sampler(dataset, shuffle: bool = True, seed: int = 0, drop_last: bool = False):
    """A ``DistributedSampler`` over ``dataset`` when distributed, else a plain one (DataLoader users)."""
    from torch.utils.data import DistributedSampler, RandomSampler, SequentialSampler

    if is_distributed():
        return DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    if shuffle:
        return RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    return SequentialSampler(dataset)
