"""Whether a run captures its training step as CUDA graphs (``train.cuda_graph``), and how its
batches are padded for them.

A captured step costs only its GPU time: the host no longer issues its kernels one by one, which
is what paces a compiled step on a GPU that outruns its host. ``auto`` (the default) captures
wherever the captured step trains what the plain loop trains and nothing the run asked for is
lost: a CUDA device, one process, one micro-batch a step, no packed sequences, no fp16 gradient
scaler, and the default per-layer compile mode. Elsewhere it says, once, why it does not.

A graph replays one batch shape. Rather than pad every batch to ``data.max_length`` (a sentence
task whose examples are a quarter of it long would compute four times what it needs), batches
are padded up to a multiple of a quarter of ``max_length``: at most four lengths, each with its
own graph, all in one memory pool (:class:`leanlora.train.step_graph.StepGraph`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch

from leanlora.config import ConfigError

LENGTHS = 4  # padded lengths a graphed run's batches take at most (one graph each)


def padding_for_graphs(max_length: int) -> int:
    """The padding multiple that leaves at most :data:`LENGTHS` batch lengths: a quarter of
    ``max_length``, rounded up to a multiple of 8 (tensor-core friendly)."""
    quarter = -(-max_length // LENGTHS)
    return -(-quarter // 8) * 8


def why_not_captured(run, device: torch.device, precision: str) -> str | None:
    """What keeps ``run`` from a captured step on ``device`` with autocast ``precision``, or None."""
    tc = run.train
    if device.type != "cuda":
        return f"the run is on {device.type}; CUDA graphs need a CUDA device"
    reasons = []
    if tc.distributed != "none":
        reasons.append(f"train.distributed={tc.distributed!r} (a captured step runs in one process)")
    if tc.grad_accum != 1:
        reasons.append(f"train.grad_accum={tc.grad_accum} (a captured step holds one micro-batch)")
    if tc.compile_mode == "reduce-overhead":
        reasons.append("train.compile_mode='reduce-overhead' (its per-layer graphs cannot sit inside one)")
    if run.data.packing:
        reasons.append("data.packing=true (packed batches vary in length)")
    if precision == "fp16":
        reasons.append("fp16's gradient scaler reads on the host whether a step overflowed")
    return "; ".join(reasons) or None


def plan_step_graph(run, device: torch.device, precision: str, log: Callable[[str], None]):
    """(the run, its batches padded for graphs where they will be captured; whether they will be).
    ``train.cuda_graph=true`` where it cannot run is a ConfigError; ``auto`` logs why it does not."""
    mode = run.train.cuda_graph
    if mode is False:
        return run, False
    why = why_not_captured(run, device, precision)
    if why is not None:
        if mode is True:
            raise ConfigError(f"train.cuda_graph=true cannot run here: {why}; set train.cuda_graph=false or 'auto'")
        if device.type == "cuda":
            log(f"train.cuda_graph=auto: the step is not captured ({why})")
        return run, False
    if run.data.pad_to_multiple_of == 0:
        multiple = padding_for_graphs(run.data.max_length)
        run = run.replace(data=replace(run.data, pad_to_multiple_of=multiple))
        log(f"train.cuda_graph: the training step runs as CUDA graphs, one per padded length; batches are padded "
            f"to multiples of {multiple} (data.pad_to_multiple_of), at most "
            f"{-(-run.data.max_length // multiple)} lengths up to data.max_length={run.data.max_length}")
    return run, True
