"""Multi-process training on PyTorch's own engine: torchrun / accelerate launch, DDP and FSDP2.

    torchrun --nproc_per_node N -m leanlora train run.yaml train.distributed=ddp
    accelerate launch --num_processes N -m leanlora train run.yaml train.distributed=fsdp2

One namespace over three files: the process group and its collectives
(:mod:`~leanlora.distributed.process`), handing the model to DDP or FSDP2
(:mod:`~leanlora.distributed.wrapping`), and whole tensors for saving, finalizing and resuming
(:mod:`~leanlora.distributed.state`).
"""

from __future__ import annotations

from leanlora.distributed.process import (MODES, DistributedError, all_reduce_mean, barrier, broadcast_object,
                                          data_sampler, end_process, init, init_run, is_distributed, is_main_process,
                                          launched, local_rank, main_process_only, rank, rank_seed, shard, shutdown,
                                          sync_seed, world_size)
from leanlora.distributed.state import (full_adapter_state, full_optimizer_state, full_params, load_adapter_state,
                                        load_full_optimizer_state, save_adapter)
from leanlora.distributed.wrapping import decoder_layers, mode_of, regularizer, sync_rank_sampler, unwrap, wrap

__all__ = [
    "MODES", "DistributedError", "all_reduce_mean", "barrier", "broadcast_object", "data_sampler",
    "decoder_layers", "full_adapter_state", "full_optimizer_state", "full_params", "init", "init_run",
    "is_distributed", "is_main_process", "launched", "load_adapter_state", "load_full_optimizer_state",
    "end_process", "local_rank", "main_process_only", "mode_of", "rank", "rank_seed", "regularizer", "save_adapter",
    "shard", "shutdown", "sync_rank_sampler", "sync_seed", "unwrap", "world_size", "wrap",
]
