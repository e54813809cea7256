"""leanlora inside Hugging Face ``Trainer`` and TRL: schedules, the prior in the loss, logs, optimizer, checkpoints.

A ``TrainerCallback`` can observe training but cannot change the loss, the optimizer or the files
a checkpoint holds, so the pieces are:

* :class:`LeanLoraCallback` — ``leanlora.advance(model, step)`` before every optimizer step
  (nested-rank sampling, gate schedules, the budget controller, whose state rides in the Trainer's
  checkpoints), and in every log record the adapter's rank, bits, BOPs
  against LoRA-16 and the budget, and the prior. It runs before every other callback, so each
  ``report_to`` integration (TensorBoard, trackio, W&B, ...) writes these keys too.
* :class:`LeanLoraMixin` — put it before any ``Trainer`` subclass (``Trainer``, TRL's ``SFTTrainer``):
  the loss is ``task loss + leanlora.regularizer(model)``; the optimizer is the one ``args.optim``
  names over ``leanlora.param_groups`` (:mod:`leanlora.train.trainer_optim`); checkpoints hold the
  adapter only (:mod:`leanlora.train.trainer_checkpoint`); the callback is installed.
* :class:`LeanLoraTrainer` = ``LeanLoraMixin`` + ``Trainer``; ``leanlora.train.sft.LeanLoraSFTTrainer``
  = ``LeanLoraMixin`` + TRL's ``SFTTrainer``.

    trainer = LeanLoraTrainer(model=model, args=args, train_dataset=ds)   # model holds an adapter
    trainer = LeanLoraTrainer(model=model, args=args, train_dataset=ds,    # or is given one here,
                              peft_config=leanlora.AdapterConfig(...))     # as with TRL's peft_config
    trainer.train()

A Trainer subclass that cannot take the mixin calls :func:`add_regularizer` and passes
``optimizers=(leanlora_optimizer(model, args), None)``; its checkpoints then hold the whole model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState

from leanlora import budget
from leanlora.config import AdapterConfig
from leanlora.gates.schedule import advance, regularizer
from leanlora.inject import SHARED_ATTR, inject
from leanlora.targets import InjectError
from leanlora.train.step_log import adapter_values
from leanlora.train.trainer_checkpoint import AdapterCheckpoints, unwrap
from leanlora.train.trainer_optim import leanlora_optimizer

__all__ = ["LeanLoraCallback", "LeanLoraMixin", "LeanLoraTrainer", "add_regularizer", "leanlora_optimizer"]


class LeanLoraCallback(TrainerCallback, ExportableState):
    """Advance the adapter's schedules each step; put its rank, bits, BOPs, budget and prior in every log.

    With ``adapter.budget`` it tells the controller the run's length at the start, and carries the
    controller's state in the Trainer's checkpoints (``trainer_state.json``), so a run resumed
    with ``resume_from_checkpoint`` continues the budget schedule where it stood.
    """

    def __init__(self) -> None:
        self._prior_sum: torch.Tensor | None = None
        self._prior_count = 0
        self.budget_state: dict | None = None   # restored by Trainer from a checkpoint
        self._model: nn.Module | None = None

    def record_prior(self, value: torch.Tensor) -> None:
        """One micro-batch's λ·R (no host sync: summed on the device until the next log)."""
        value = value.detach().float()
        self._prior_sum = value if self._prior_sum is None else self._prior_sum + value
        self._prior_count += 1

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        self._model = unwrap(model)
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
            advance(unwrap(model), state.global_step)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if model is None or logs is None or any(k.startswith(("eval_", "test_")) for k in logs):
            return  # evaluation records: the adapter is the one the last training record described
        values = adapter_values(unwrap(model))  # under leanlora/, as the CLI loop logs them (train.step_log)
        if self._prior_count:  # mean λ·R over the micro-batches since the last training log
            values["leanlora/prior"] = (self._prior_sum / self._prior_count).item()
            self._prior_sum, self._prior_count = None, 0
        logs.update(values)  # the same dict reaches the report_to callbacks after this one
        # Trainer appended a copy of this record to log_history before calling us; keep the two in step.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)


def install_callback(trainer: Trainer) -> LeanLoraCallback:
    """The trainer's :class:`LeanLoraCallback`, first in its list so every integration sees its log keys."""
    callbacks = trainer.callback_handler.callbacks
    ours = next((cb for cb in callbacks if isinstance(cb, LeanLoraCallback)), None) or LeanLoraCallback()
    callbacks[:] = [ours, *(cb for cb in callbacks if cb is not ours)]  # in place: the handler keeps its list
    return ours


def _saved_budget_state(state) -> dict | None:
    """The controller's state in a resumed checkpoint's trainer_state.json (Trainer reads it back into
    ``state`` whether or not ``restore_callback_states_from_checkpoint`` is set)."""
    saved = (state.stateful_callbacks or {}).get(LeanLoraCallback.__name__)
    if isinstance(saved, list):
        saved = saved[0] if saved else None
    return saved.get("attributes", {}).get("budget_state") if isinstance(saved, dict) else None


def _loss_scaled_for_accumulation(trainer: Trainer, num_items_in_batch: Any) -> bool:
    """Whether Trainer will skip dividing this micro-batch's loss by the accumulation steps."""
    if (flag := getattr(trainer, "loss_is_scaled_for_ga", None)) is not None:
        return bool(flag)
    return bool((getattr(trainer, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
                or getattr(trainer, "compute_loss_func", None) is not None)


def regularized_compute_loss(trainer: Trainer, compute_loss, meter: LeanLoraCallback):
    """``compute_loss`` plus the adapter prior, counted once per optimizer step in training."""

    def wrapped(model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        out = compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch,
                           **kwargs)
        if not model.training:
            return out  # eval loss stays the task loss
        loss, outputs = out if return_outputs else (out, None)
        reg = regularizer(unwrap(model)).to(loss.device)
        meter.record_prior(reg)
        if _loss_scaled_for_accumulation(trainer, num_items_in_batch):
            # Trainer will not divide by the accumulation steps: do it here so λ·R counts once a step.
            steps = getattr(trainer, "current_gradient_accumulation_steps", trainer.args.gradient_accumulation_steps)
            reg = reg / steps
        loss = loss + reg
        return (loss, outputs) if return_outputs else loss

    return wrapped


def add_regularizer(trainer: Trainer) -> Trainer:
    """Make an existing Trainer add ``leanlora.regularizer(model)`` to its training loss, and log the adapter."""
    meter = install_callback(trainer)
    trainer.compute_loss = regularized_compute_loss(trainer, trainer.compute_loss, meter)
    return trainer


class LeanLoraMixin(AdapterCheckpoints):
    """Put before a ``Trainer`` subclass: prior in the loss, ``args.optim`` over leanlora's groups,
    adapter-only checkpoints that resume exactly, and :class:`LeanLoraCallback` first among callbacks."""

    def __init__(self, *args, peft_config: AdapterConfig | None = None, **kwargs) -> None:
        """``peft_config``: a :class:`leanlora.AdapterConfig` injected into the model once the trainer has
        it (also a model TRL loads from a name), as TRL's ``peft_config`` is; or ``None`` for a model
        that already holds its adapter."""
        if peft_config is not None and not isinstance(peft_config, AdapterConfig):
            raise TypeError(f"{type(self).__name__}(peft_config=...) takes a leanlora.AdapterConfig, got "
                            f"{type(peft_config).__name__}; convert PEFT's LoraConfig with "
                            "leanlora.AdapterConfig.from_peft(config)")
        if peft_config is not None and kwargs.get("model_init") is not None:
            raise TypeError(f"{type(self).__name__}: with model_init, inject the adapter inside model_init "
                            "(leanlora.inject(model, config)); peft_config would reach the first model only")
        super().__init__(*args, **kwargs)
        if self.model_init is None:  # model_init builds a model per trial; it injects its own adapter
            model = unwrap(self.model)
            if peft_config is not None:
                inject(model, peft_config)
            elif not hasattr(model, SHARED_ATTR):
                raise InjectError(f"{type(self).__name__}: {type(model).__name__} holds no leanlora adapter; pass "
                                  "peft_config=leanlora.AdapterConfig(...) or call leanlora.inject(model, config) "
                                  "first")
        self._leanlora_callback = install_callback(self)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        return regularized_compute_loss(self, super().compute_loss, self._leanlora_callback)(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch, **kwargs)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer = leanlora_optimizer(unwrap(model if model is not None else self.model), self.args,
                                                getattr(self, "optimizer_cls_and_kwargs", None))
        return self.optimizer


class LeanLoraTrainer(LeanLoraMixin, Trainer):
    """``Trainer`` with the adapter prior in the loss, ``args.optim`` over leanlora's parameter groups,
    adapter-only checkpoints and the callback (see :class:`LeanLoraMixin`)."""
