"""leanlora inside Hugging Face ``Trainer``: schedules, the prior term of the loss, parameter groups.

Two pieces, because a ``TrainerCallback`` can observe training but cannot change the loss:

* :class:`LeanLoraCallback` — ``leanlora.advance(model, step)`` before every optimizer step
  (nested-rank sampling, gate schedules, the budget controller) and the expected rank / bits
  (and cost against the budget's target) in every log line;
* :class:`LeanLoraTrainer` — a ``Trainer`` whose loss is ``task loss + leanlora.regularizer(model)``,
  whose AdamW uses ``leanlora.param_groups`` (bank, logits and gates at their own learning
  rates, no decay), and which installs the callback. Users with their own Trainer subclass call
  :func:`add_regularizer` and pass ``optimizers=(leanlora_optimizer(model, args), None)`` instead.

    trainer = LeanLoraTrainer(model=model, args=args, train_dataset=ds)   # model holds an adapter
    trainer.train()
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState

from leanlora import budget

from leanlora.optim import adamw, param_groups
from leanlora.schedule import advance, regularizer
from leanlora.summary import gate_summary


def _unwrap(model: nn.Module) -> nn.Module:
    """The model that holds ``leanlora_shared`` (DDP / accelerate wrap it in ``.module``)."""
    while not hasattr(model, "leanlora_shared") and hasattr(model, "module"):
        model = model.module
    return model


class LeanLoraCallback(TrainerCallback, ExportableState):
    """Advance the adapter's schedules each step and log its expected rank and bits.

    With ``adapter.budget`` it tells the controller the run's length at the start, and carries the
    controller's state in the Trainer's checkpoints (``trainer_state.json``), so a run resumed
    with ``resume_from_checkpoint`` continues the budget schedule where it stood.
    """

    def __init__(self) -> None:
        self.budget_state: dict | None = None   # restored by Trainer from a checkpoint
        self._model: nn.Module | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        self._model = _unwrap(model)
        budget.start(self._model, state.max_steps)
        ctl = budget.controller(self._model)
        saved = self.budget_state or _saved_budget_state(state)
        if ctl is not None and saved is not None:
            ctl.load_state_dict(saved)

    def state(self) -> dict:
        ctl = budget.controller(self._model) if self._model is not None else None
        return {"args": {}, "attributes": {"budget_state": None if ctl is None else ctl.state_dict()}}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            advance(_unwrap(model), state.global_step)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if model is None or logs is None:
            return
        summary = {f"leanlora/{k}": round(v, 4) for k, v in gate_summary(_unwrap(model)).items()}
        logs.update(summary)
        # Trainer appended this record to log_history before calling us; keep the two in step.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(summary)


def _saved_budget_state(state) -> dict | None:
    """The controller's state in a resumed checkpoint's trainer_state.json (Trainer reads it back into
    ``state`` whether or not ``restore_callback_states_from_checkpoint`` is set)."""
    saved = (state.stateful_callbacks or {}).get(LeanLoraCallback.__name__)
    if isinstance(saved, list):
        saved = saved[0] if saved else None
    return saved.get("attributes", {}).get("budget_state") if isinstance(saved, dict) else None


def _loss_scaled_for_accumulation(trainer: Trainer, num_items_in_batch: Any) -> bool:
    """Whether Trainer will skip dividing this micro-batch's loss by the accumulation steps."""
    flag = getattr(trainer, "loss_is_scaled_for_ga", None)
    if flag is not None:
        return bool(flag)
    return bool((getattr(trainer, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
                or getattr(trainer, "compute_loss_func", None) is not None)


def regularized_compute_loss(trainer: Trainer, compute_loss):
    """``compute_loss`` plus the adapter prior, counted once per optimizer step in training."""

    def wrapped(model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        out = compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch,
                           **kwargs)
        if not model.training:
            return out  # eval loss stays the task loss
        loss, outputs = out if return_outputs else (out, None)
        reg = regularizer(_unwrap(model)).to(loss.device)
        if _loss_scaled_for_accumulation(trainer, num_items_in_batch):
            # Trainer will not divide by the accumulation steps: do it here so λ·R counts once a step.
            steps = getattr(trainer, "current_gradient_accumulation_steps", trainer.args.gradient_accumulation_steps)
            reg = reg / steps
        loss = loss + reg
        return (loss, outputs) if return_outputs else loss

    return wrapped


def add_regularizer(trainer: Trainer) -> Trainer:
    """Make an existing Trainer add ``leanlora.regularizer(model)`` to its training loss."""
    trainer.compute_loss = regularized_compute_loss(trainer, trainer.compute_loss)
    if not any(isinstance(cb, LeanLoraCallback) for cb in trainer.callback_handler.callbacks):
        trainer.add_callback(LeanLoraCallback())
    return trainer


def leanlora_optimizer(model: nn.Module, args) -> torch.optim.Optimizer:
    """AdamW over ``leanlora.param_groups`` with the TrainingArguments' lr, decay, betas and eps."""
    groups = param_groups(_unwrap(model), args.learning_rate, args.weight_decay)
    return adamw(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)


class LeanLoraTrainer(Trainer):
    """``Trainer`` with the adapter prior in the loss, leanlora's parameter groups and the callback."""

    def __init__(self, *args, **kwargs) -> None:
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if not any(isinstance(cb, LeanLoraCallback) for cb in callbacks):
            callbacks.append(LeanLoraCallback())
        super().__init__(*args, callbacks=callbacks, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        base = types.MethodType(Trainer.compute_loss, self)
        return regularized_compute_loss(self, base)(model, inputs, return_outputs=return_outputs,
                                                    num_items_in_batch=num_items_in_batch, **kwargs)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer = leanlora_optimizer(model or self.model, self.args)
        return self.optimizer
