"""Mixed precision of the training loop (``train.precision``) and the optimizer step around it.

* ``bf16`` / ``fp16``: the forward runs under ``torch.autocast`` in that dtype on the run's device
  (CUDA, and CPU too, where torch's autocast takes both); the trained weights, their gradients and
  AdamW's state stay in the adapter's own dtype (float32 by default).
* ``fp16`` adds a ``torch.amp.GradScaler``: fp16 has 5 exponent bits, so small gradients underflow
  to zero unless the loss is scaled up before the backward. A step whose gradients hold inf/NaN
  is skipped and the scale halved; the scale grows again after 2,000 clean steps. Its state goes
  into the checkpoint (the loop state), so a resumed run continues with the same scale.
* ``fp32``: no autocast.
* ``auto``: bf16 on a CUDA device that supports it, fp16 on one that does not, fp32 elsewhere
  (a CPU run then stays bit-reproducible).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from leanlora.config import ConfigError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """The resolved ``train.precision`` of a run on ``device``: ``name`` is bf16, fp16 or fp32."""

    name: str
    device: torch.device

    def autocast(self) -> contextlib.AbstractContextManager:
        """A reusable context for the forward: autocast in bf16/fp16, nothing in fp32."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_DTYPES[self.name])

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A GradScaler for fp16, None otherwise."""
        return torch.amp.GradScaler(self.device.type) if self.name == "fp16" else None


def resolve_precision(tc, device: torch.device, log: Callable[[str], None] = print) -> Precision:
    """``tc.precision`` on ``device``, refusing combinations that cannot work (naming the key)."""
    name = tc.precision
    if name == "auto":
        if device.type != "cuda":
            return Precision("fp32", device)
        name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if name == "fp16":
            log(f"train.precision=auto: {torch.cuda.get_device_name(device)} has no bf16; training in fp16 "
                "autocast with a gradient scaler")
    elif name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"train.precision=bf16: {torch.cuda.get_device_name(device)} does not support bfloat16; "
                          "use fp16 (with a gradient scaler) or fp32")
    if name == "fp16" and tc.distributed == "fsdp2":
        raise ConfigError("train.precision=fp16 with train.distributed=fsdp2 is not supported (the gradient scaler "
                          "is not wired for sharded gradients here); use bf16, or distributed=ddp")
    return Precision(name, device)


def check_trainable_dtype(precision: Precision, groups: list[dict]) -> None:
    """fp16 scaling unscales the gradients in place; gradients held in fp16 cannot take that
    (torch refuses), so the trained weights of the optimizer ``groups`` must be float32 or bfloat16."""
    from leanlora.optim import float16_role

    if precision.name == "fp16" and float16_role(groups) is not None:
        raise ConfigError("train.precision=fp16 needs trained weights in float32 (the gradient scaler "
                          "unscales their gradients); set adapter.adapter_dtype=float32 and keep "
                          "modules_to_save out of an fp16 base (model.dtype)")


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                   max_grad_norm: float, want_norm: bool,
                   after_update: Callable[[], None] | None = None) -> torch.Tensor | None:
    """Clip, step and clear the gradients; returns the gradient norm (before clipping) when it was
    computed: always when clipping, else only if ``want_norm`` (it costs a reduction).

    With a scaler the gradients are unscaled first, so clipping and the norm see true values, and
    ``scaler.step`` skips the update when they hold inf/NaN. ``after_update`` runs right after the
    weights changed (the loop's finite-weight check).
    """
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if scaler is not None and (max_grad_norm > 0 or want_norm):
        scaler.unscale_(optimizer)
    norm = None
    if max_grad_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    elif want_norm:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    if after_update is not None:
        after_update()
    optimizer.zero_grad(set_to_none=True)
    return norm
