"""Trainer checkpoints that hold the adapter, not the model.

``Trainer`` saves ``save_pretrained`` of the whole model in every ``checkpoint-N`` folder. With a
leanlora adapter that is the frozen base under renamed keys (``...q_proj.base.weight``), which
``from_pretrained`` reads as a model with its adapted weights missing and initialises them at random.
These overrides of ``Trainer``'s model hooks write and read the adapter instead:

* ``_save``: :func:`leanlora.save` (adapted layers, shared state, ``modules_to_save``), the tokenizer
  and the training arguments; no ``config.json`` and no model weights, so no loader takes the folder
  for a full model.
* ``_load_from_checkpoint`` (``resume_from_checkpoint``) and ``_load_best_model``
  (``load_best_model_at_end``): :func:`leanlora.artifact.io.restore` copies the tensors into the live
  adapter, so the optimizer's state keeps pointing at the same parameters.

Optimizer, scheduler, scaler and RNG state stay ``Trainer``'s own files (``optimizer.pt``,
``scheduler.pt``, ``rng_state.pth``); together with the adapter a resumed run continues the same run.
Checkpoints of earlier leanlora versions, which hold the whole model, still resume through
``Trainer``'s own loader.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from leanlora.artifact.io import AdapterLoadError, read_adapter_config, restore, save

TRAINING_ARGS_NAME = "training_args.bin"
# the model files Trainer writes and loads itself (transformers.utils names)
TRAINER_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                        "pytorch_model.bin.index.json")


def unwrap(model: nn.Module) -> nn.Module:
    """The model that holds ``leanlora_shared`` (DDP / accelerate wrap it in ``.module``)."""
    while not hasattr(model, "leanlora_shared") and hasattr(model, "module"):
        model = model.module
    return model


def holds_adapter(folder: str | os.PathLike) -> bool:
    try:
        read_adapter_config(folder)
    except AdapterLoadError:
        return False
    return True


def holds_whole_model(folder: str | os.PathLike) -> bool:
    """A checkpoint an earlier leanlora (or plain Trainer) wrote: the model's full state dict."""
    return any((Path(folder) / name).is_file() for name in TRAINER_WEIGHT_FILES) and not holds_adapter(folder)


class AdapterCheckpoints:
    """``Trainer`` overrides: a checkpoint's model part is the leanlora adapter (mix in before ``Trainer``)."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        save(unwrap(self.model), output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if holds_whole_model(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        restore(unwrap(model if model is not None else self.model), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        folder = self.state.best_model_checkpoint
        if holds_whole_model(folder):
            return super()._load_best_model()
        restore(unwrap(self.model), folder)
