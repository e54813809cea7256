"""The compiled training path: ``torch.compile`` per decoder layer, with an eager fallback.

Regional compilation (each repeated block compiled once and reused by its siblings) compiles
one block's graph instead of the whole model's, so compile time does not grow with depth, and it
composes with DDP and FSDP2 (each ``fully_shard``-ed layer is one compiled region). A
model without a known repeated block is compiled whole.

Inductor can still fail on a graph (a Triton pass crashing on one fused kernel, say). A run must
not die for a speed option, so :class:`CompiledRegions` runs the first step under a guard: if
compiling raises, it restores the eager forward of every region, drops the half-made gradients,
warns once with the compiler's message, and the step is run again eagerly.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import nn
from torch._functorch import config as functorch_config

from leanlora.train.compile_errors import is_compile_error, root_cause
from leanlora.groups.stacking import compile_pieces
from leanlora.targets import repeated_blocks


def wants_compile(mode: bool | str, device: torch.device) -> bool:
    """``"auto"``: on CUDA only (CPU inductor builds C++ for minutes, for little gain); True: anywhere."""
    if mode not in ("auto", True, False):
        raise ValueError(f"train.compile={mode!r} is invalid: allowed 'auto', true, false")
    return mode is True or (mode == "auto" and device.type == "cuda")


def shape_advice(compile_mode: str, pad_to_multiple_of: int, max_length: int) -> str | None:
    """A note for CUDA-graph training whose batches may take many lengths, or None."""
    if compile_mode != "reduce-overhead" or pad_to_multiple_of > 1:
        return None
    return (f"note: train.compile_mode=reduce-overhead records one CUDA graph per batch shape, and batches are "
            f"padded to their longest example (up to {max_length} lengths); data.pad_to_multiple_of=32 leaves "
            f"{-(-max_length // 32)} shapes")


class CompiledRegions:
    """Compile ``model``'s repeated blocks in place; :meth:`run_step` falls back to eager once."""

    def __init__(self, model: nn.Module, backend: str | Callable = "inductor", log=print,
                 mode: str = "default", activation_budget: float = 1.0) -> None:
        """``mode`` is torch.compile's (inductor only); "reduce-overhead" records CUDA graphs.
        ``activation_budget`` (0, 1] is the share of the activations each compiled layer may keep
        for its backward; the min-cut partitioner recomputes the cheapest of the rest there."""
        if mode != "default" and backend != "inductor":
            raise ValueError(f"compile mode {mode!r} needs the inductor backend, not {backend!r}")
        if not 0.0 < activation_budget <= 1.0:
            raise ValueError(f"activation_budget={activation_budget!r} is invalid: allowed (0, 1]")
        self.log, self.model, self.mode, self.activation_budget = log, model, mode, activation_budget
        self.regions = repeated_blocks(model) or [model]
        for region in self.regions:  # torch.compile's mode=None is its "default"
            region.compile(backend=backend, mode=None if mode == "default" else mode)
        compile_pieces(model, mode, backend)  # the grouped adapter pieces (leanlora.groups.stacking) too
        self.compiled, self._proven = True, False

    def begin_step(self) -> None:
        """Call before each optimizer step's forward: with CUDA graphs, the outputs of the last
        step's graphs may then be overwritten (nothing is kept from them past the step)."""
        if self.compiled and self.mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()

    def eager(self) -> None:
        """Back to the plain forward of every region (``nn.Module.compile`` is undone this way)."""
        for region in self.regions:
            region._compiled_call_impl = None
        compile_pieces(self.model, None)
        self.compiled = False

    def run_step(self, step: Callable[[], object], zero_grad: Callable[[], None]) -> object:
        """``step()`` (forward + backward of one optimizer step); on a compile failure in the first
        one, warn, go eager, clear gradients and run it again."""
        # the partitioner reads the budget when a layer's graph is compiled, which is inside a step
        # (the first, or a recompile for a new shape); patched here, it never leaks into user code
        with functorch_config.patch(activation_memory_budget=self.activation_budget):
            return self._run_step(step, zero_grad)

    def _run_step(self, step: Callable[[], object], zero_grad: Callable[[], None]) -> object:
        if self._proven or not self.compiled:
            return step()
        rng = torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        try:
            out = step()
        except Exception as err:  # the compiler's own exception types differ across torch versions
            if not is_compile_error(err):
                raise
            message = f"torch.compile failed ({root_cause(err)}); training continues eagerly " \
                      "(set train.compile=false to skip compiling)"
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            self.log(f"warning: {message}")
            self.eager()
            zero_grad()
            torch.set_rng_state(rng[0])  # the retry draws the same gate noise a plain eager step would
            if rng[1] is not None:
                torch.cuda.set_rng_state_all(rng[1])
            out = step()
        self._proven = True
        return out
