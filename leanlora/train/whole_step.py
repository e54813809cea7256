"""The training loop's optimizer step as one CUDA graph (``train.cuda_graph``).

The loop's own step reads the loss back before the optimizer runs (to stop on NaN without
touching the weights), and its batches carry a 2D padding mask that transformers checks on the
host; either would stop a capture. Here the mask is made 4D on the device
(:mod:`leanlora.train.padded_attention`) and the loss is read after the replay, so forward,
prior, backward, clipping and AdamW all run inside one graph (:class:`StepGraph`).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from leanlora.train.padded_attention import attends_causally, attention_mask_4d, require_sdpa
from leanlora.train.precision import optimizer_step
from leanlora.train.step_graph import StepGraph


def graphed_training_step(model: nn.Module, task, optimizer: torch.optim.Optimizer,
                          regularizer: Callable[[nn.Module], torch.Tensor],
                          autocast: contextlib.AbstractContextManager, max_grad_norm: float,
                          log: Callable[[str], None] | None = None,
                          after_update: Callable[[], None] | None = None) -> StepGraph:
    """A :class:`StepGraph` whose ``run(batch)`` trains one step of ``task`` on ``batch`` (a dict of
    device tensors from ``task.collate``) and returns ``[task loss, prior, gradient norm before
    clipping]``, detached, in float32; the task loss is NaN when the prior is, so that a check of
    the loss alone sees either. ``after_update`` runs inside the graph after the optimizer step (the
    loop's finite-weight check); it must not read anything back to the host."""
    require_sdpa(model, "train.cuda_graph")
    causal = attends_causally(model)

    def step(batch):
        if "attention_mask" in batch:
            batch = {**batch, "attention_mask": attention_mask_4d(batch["attention_mask"], causal)}
        with autocast:
            loss = task.loss(model, batch)
            prior = regularizer(model).to(loss.device)
        (loss + prior).backward()
        # the norm always, for the log records: a reduction inside the graph costs no host read
        norm = optimizer_step(optimizer, None, max_grad_norm, want_norm=True, after_update=after_update)
        loss, prior = loss.detach().float(), prior.detach().float().reshape(())
        return torch.stack([loss + prior * 0, prior, norm.detach().float().to(loss.device)])

    return StepGraph(step, optimizer, log=log)
