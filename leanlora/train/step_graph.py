"""A whole training step (forward, backward, optimizer) captured as one CUDA graph and replayed.

Why: on a GPU that outruns its host, a step is paced by Python issuing kernels, and a compiled
B-LoRA step issues thousands of small ones. ``torch.compile``'s own CUDA graphs
("reduce-overhead") cover each compiled region separately, and cannot hold the adapter pieces
that leanlora computes for a group of layers before the layers run (:mod:`leanlora.groups.stacking`).
One graph around the whole step holds all of it: a replay is one launch.

This is PyTorch's documented whole-network capture (``torch.cuda.graph``), with what a training
loop needs around it:

* the first ``warmup`` calls run the step normally, on a side stream, as the CUDA-graph notes ask
  (compilation, lazy initialisation and the optimizer's state all happen there);
* the next call captures the step with that call's batch, then replays it once (capturing runs
  nothing); later batches are copied into the captured inputs and the graph is replayed;
* each batch shape (padded lengths, a smaller last batch) has its own warm-up and graph, up to
  ``max_shapes`` of them; further shapes run uncaptured. The graphs share one memory pool, so
  they hold the activations of one step, not one step's each: a replay may reuse what another
  graph's output occupied, which is why a returned output must be read before the next call;
* everything after the trained tensors were replaced (pruning, loading, ``.data =``) runs
  uncaptured: a graph would write to the old storage. :meth:`StepGraph.reset` drops the graphs;
  the next calls capture again.

What changes between steps must live in tensors changed in place, because a replay runs no Python:
the learning rate (:func:`capturable_optimizer` makes each group's ``lr`` a 0-dim device tensor,
which torch's LR schedulers ``fill_``), the sampled nested rank (``leanlora.advance`` fills a
buffer), random numbers (the graph draws new ones each replay). A Python float read inside the
step is frozen at its captured value. The step must not read values back to the host
(``.item()``, printing a loss): do that with the tensor the call returns, after it.

The last warm-up step runs with torch's synchronisation check on. A step that waits for the GPU
cannot be captured, and a capture that fails halfway can leave torch's CUDA random generator
unusable, so such a step is found there and trained on uncaptured, with a warning. One common
source is not the user's code: Hugging Face transformers' mask creation reads tensors back
outside a capture and takes another branch inside one (a causal LM called without a cache and
without an attention mask checks its position ids for packed sequences; a padding mask is
checked for being all ones). The check declines such a step; capturing it anyway would, on a
compiled model, mean compiling the other branch inside the capture, which fails. Graphed
training equals plain training for LoRA, B-LoRA, DyLoRA and the bank with gates and learned
bits (tests/test_step_graph.py).
"""

from __future__ import annotations

import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from leanlora.train.compile_errors import root_cause

Batch = Mapping[str, torch.Tensor]


def capturable_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Check that ``optimizer`` updates on the device, and make its learning rates device tensors.

    A captured update must not read anything from the host: torch's optimizers do so unless built
    with ``fused=True`` or ``capturable=True`` (their step counters live on the CPU otherwise);
    :func:`leanlora.optim.adamw` builds it fused on CUDA. A float learning rate
    would be frozen into the graph; as a tensor, a scheduler's update reaches every replay.
    """
    for i, group in enumerate(optimizer.param_groups):
        if (device := next((p.device for p in group["params"]), None)) is None:
            continue
        if device.type != "cuda":
            raise ValueError(f"StepGraph: param group {i} of {type(optimizer).__name__} is on {device}; "
                             "a CUDA graph needs the trained tensors on a CUDA device")
        if not (group.get("fused") or group.get("capturable")):
            raise ValueError(f"StepGraph: param group {i} of {type(optimizer).__name__} steps with host-side "
                             "counters; build it with fused=True or capturable=True (or use leanlora.optim.adamw)")
        if group.get("fused") and group.get("capturable") is False:
            # torch's capture health check asks for the flag; its fused kernels ignore it, their
            # step counters are on the device already
            group["capturable"] = True
        if not isinstance(group["lr"], torch.Tensor):
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
    return optimizer


def batch_signature(batch: Batch) -> tuple:
    """What a captured graph is specific to: each input's name, shape, dtype and device."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"StepGraph: a batch must be a mapping of names to tensors, got {type(batch).__name__}")
    for name, value in batch.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"StepGraph: batch entry {name!r} is of type {type(value).__name__}; a captured step "
                            "takes tensors only (anything else would be frozen at its captured value)")
    first: dict[int, str] = {}
    # which entries are one tensor (input_ids passed as labels): a graph captured with one buffer
    # for both cannot take two different tensors
    return tuple((k, tuple(v.shape), v.dtype, v.device, first.setdefault(id(v), k)) for k, v in sorted(batch.items()))


@dataclass
class _Shape:
    """One batch signature's graph: its input tensors, warm-up count, graph and output."""

    inputs: dict[str, torch.Tensor]
    warm: int = 0
    graph: Any = None                # torch.cuda.CUDAGraph once captured
    output: Any = None
    storage: list[int] = field(default_factory=list)  # the trained tensors' addresses at capture


class StepGraph:
    """Run ``step(batch)`` (forward, backward, optimizer step, gradients set to None) as one CUDA graph
    per batch shape.

    ``step`` returns what the caller wants back each step (the loss, detached); the returned tensor
    lives in the graphs' memory and is overwritten by the next replay (of any shape's graph), so read
    or clone it first. The trained tensors are the optimizer's parameters: when one of them is
    replaced or moved, the graphs are dropped and the step runs uncaptured until :meth:`reset`.
    ``warmup`` steps of each shape run before its capture; a compiled model may compile again in its
    first calls of a shape, which a capture cannot hold. At most ``max_shapes`` shapes are captured.
    """

    def __init__(self, step: Callable[[Batch], Any], optimizer: torch.optim.Optimizer, warmup: int = 3,
                 log: Callable[[str], None] | None = None, max_shapes: int = 8) -> None:
        if not _count(warmup):
            raise ValueError(f"StepGraph: warmup={warmup!r} is invalid: an integer >= 1; at least 1 step must run "
                             "uncaptured before capture (compilation and the optimizer's state happen there)")
        if not _count(max_shapes):
            raise ValueError(f"StepGraph: max_shapes={max_shapes!r} is invalid: an integer >= 1 (shapes captured)")
        if not torch.cuda.is_available():
            raise RuntimeError("StepGraph needs CUDA; on this machine torch.cuda.is_available() is False")
        self.step, self.optimizer, self.warmup, self.log = step, capturable_optimizer(optimizer), warmup, log
        self.max_shapes = max_shapes
        # calls that ran the step without a graph (warm-up, shapes past max_shapes), and replays
        self.uncaptured_calls, self.replays = 0, 0
        # why capturing failed, if it did, and where (the traceback's end)
        self.failure: str | None = None
        self.failure_trace: str | None = None
        self._stream = torch.cuda.Stream()
        self.reset()  # no graphs yet

    # the shape called last: what a single-shape caller reads
    @property
    def graph(self) -> Any:
        return None if self._current is None else self._current.graph

    @property
    def inputs(self) -> dict[str, torch.Tensor]:
        return {} if self._current is None else self._current.inputs

    @property
    def output(self) -> Any:
        return None if self._current is None else self._current.output

    @property
    def graphs(self) -> int:
        """How many shapes are captured now."""
        return sum(s.graph is not None for s in self._shapes.values())

    def _storage_now(self) -> list[int]:
        return [p.data_ptr() for g in self.optimizer.param_groups for p in g["params"]]

    def reset(self, stale: bool = False) -> None:
        """Drop every captured graph (their memory is freed); the next calls warm up and capture again.
        ``stale=True`` (capture failed, or the trained tensors moved): the step runs uncaptured instead,
        until a plain ``reset()``."""
        self._shapes: dict[tuple, _Shape] = {}
        self._current: _Shape | None = None
        self._pool = None  # one memory pool for all shapes' graphs, made at the first capture
        self.stale = stale

    def __call__(self, batch: Batch) -> Any:
        key = batch_signature(batch)
        if self.stale:
            return self._uncaptured(batch)
        shape = self._shapes.get(key)
        if shape is None:
            if len(self._shapes) >= self.max_shapes:
                return self._uncaptured(batch)
            shape = self._shapes[key] = _Shape(inputs=_input_tensors(batch))
        self._current = shape
        if shape.graph is not None:
            if self._storage_now() == shape.storage:
                _fill(shape.inputs, batch, key)
                shape.graph.replay()
                self.replays += 1
                return shape.output
            warnings.warn("StepGraph: the trained tensors changed storage since the step was captured; "
                          "it runs uncaptured from now on (StepGraph.reset() captures again)",
                          RuntimeWarning, stacklevel=2)
            self.reset(stale=True)
            return self._uncaptured(batch)
        # warm-up and capture run on the very tensors that replays will read, as PyTorch's recipe
        # does: a compiled model then sees the same inputs when it is captured as when it compiled
        _fill(shape.inputs, batch, key)
        if shape.warm < self.warmup:
            shape.warm += 1
            if shape.warm == self.warmup > 1:  # compiled by now: the last warm-up step is checked
                return self._checked(shape.inputs)
            return self._uncaptured(shape.inputs, side_stream=True)
        return self._capture(shape, key)

    def _checked(self, batch: Batch) -> Any:
        """An uncaptured step that fails on any operation waiting for the GPU (``.item()``, a shape
        that depends on data, a blocking copy): such a step cannot be captured, and a capture that
        fails leaves torch's CUDA random generator unusable, so it is found out here instead."""
        rng = torch.get_rng_state(), torch.cuda.get_rng_state()
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return self._uncaptured(batch, side_stream=True)
        except RuntimeError as err:
            if "synchronizing" not in str(err):
                raise
            waited = err
        finally:
            torch.cuda.set_sync_debug_mode(previous)
        self._give_up(waited, rng, "the step waits for the GPU inside (a synchronizing operation; run it under "
                                   "torch.cuda.set_sync_debug_mode('error') to see where)")
        return self._uncaptured(batch)  # this batch's step again, from the same random state

    def _give_up(self, err: Exception, rng: tuple, why: str | None = None) -> None:
        """Stop capturing after a failed check or capture. Nothing of the failed step should count:
        drop the gradients it assigned (after a capture they point into the abandoned graph's
        memory) and its draws from the random generators."""
        self.failure = why or root_cause(err)
        self.failure_trace = "".join(traceback.format_exception(err))[-6000:]
        self.reset(stale=True)
        self.optimizer.zero_grad(set_to_none=True)
        try:
            torch.set_rng_state(rng[0])
            torch.cuda.set_rng_state(rng[1])
        except RuntimeError as again:  # torch leaves its generator in capture mode after some failures
            raise RuntimeError(f"StepGraph: capturing the training step failed ({self.failure}), and torch's CUDA "
                               f"random generator is unusable after it ({again}); train without StepGraph") from err
        warnings.warn(f"StepGraph: the training step cannot be captured as a CUDA graph: {self.failure}; "
                      "training continues without it", RuntimeWarning, stacklevel=3)

    def _uncaptured(self, batch: Batch, side_stream: bool = False) -> Any:
        self.uncaptured_calls += 1
        if not side_stream:
            return self.step(batch)
        # the CUDA-graph notes: warm up on a side stream, so that nothing the first steps set up
        # (autograd's streams, lazily created handles) is tied to the stream that will be captured
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            out = self.step(batch)
        torch.cuda.current_stream().wait_stream(self._stream)
        return out

    def _capture(self, shape: _Shape, key: tuple) -> Any:
        if any(p.grad is not None for g in self.optimizer.param_groups for p in g["params"]):
            raise RuntimeError("StepGraph: gradients are present before capture; the step must end with "
                               "optimizer.zero_grad(set_to_none=True), so that each replay's backward writes "
                               "them afresh instead of adding to the last step's")
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        rng = torch.get_rng_state(), torch.cuda.get_rng_state()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        try:
            with torch.cuda.graph(graph, pool=self._pool, stream=self._stream):
                output = self.step(shape.inputs)
        except Exception as err:  # a run must not die for a speed option: this step, and the rest, uncaptured
            inputs = shape.inputs
            self._give_up(err, rng)
            return self._uncaptured(inputs, side_stream=True)
        shape.graph, shape.output, shape.storage = graph, output, self._storage_now()
        graph.replay()  # capturing recorded this step's work; replaying it does it
        self.replays += 1
        if self.log is not None:
            self.log(f"StepGraph: captured the training step as one CUDA graph (inputs {_describe(key)}"
                     + (f"; {self.graphs} shapes captured" if self.graphs > 1 else "") + ")")
        return output


def _count(value) -> bool:
    """An integer of at least 1 (a bool is not one)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _input_tensors(batch: Batch) -> dict[str, torch.Tensor]:
    """The graph's own input tensors for ``batch``'s signature (ordinary allocations, kept for the
    graph's life). One tensor passed under two names (input_ids as labels) stays one tensor: a
    compiled model guards on that aliasing."""
    copies: dict[int, torch.Tensor] = {}
    return {name: copies.setdefault(id(value), torch.empty_like(value)) for name, value in batch.items()}


def _fill(inputs: dict[str, torch.Tensor], batch: Batch, key: tuple) -> None:
    """Copy ``batch`` into the graph's input tensors (an aliased entry shares its owner's tensor)."""
    for name, *_, owner in key:
        if owner == name:
            inputs[name].copy_(batch[name], non_blocking=True)


def _describe(key: tuple) -> str:
    return ", ".join(f"{name} {'x'.join(map(str, shape))} {str(dtype).removeprefix('torch.')}"
                     + ("" if owner == name else f" (= {owner})") for name, shape, dtype, _, owner in key)
