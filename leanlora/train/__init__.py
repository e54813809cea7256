"""Training and evaluation: run configs, tasks, metrics, the loop, checkpoints, HF Trainer and TRL hooks.

The loop and the Trainer integration import transformers (and ``LeanLoraSFTTrainer`` TRL); they load
on first use.
"""

from leanlora.train.runconfig import (
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    load_run_config,
    to_commented_yaml,
)

_LAZY = {
    "train": ("leanlora.train.loop", "train"),
    "TrainResult": ("leanlora.train.loop", "TrainResult"),
    "TrainingDiverged": ("leanlora.train.loop", "TrainingDiverged"),
    "LeanLoraCallback": ("leanlora.train.callbacks", "LeanLoraCallback"),
    "LeanLoraTrainer": ("leanlora.train.callbacks", "LeanLoraTrainer"),
    "LeanLoraMixin": ("leanlora.train.callbacks", "LeanLoraMixin"),
    "LeanLoraSFTTrainer": ("leanlora.train.sft", "LeanLoraSFTTrainer"),
    "add_regularizer": ("leanlora.train.callbacks", "add_regularizer"),
    "leanlora_optimizer": ("leanlora.train.trainer_optim", "leanlora_optimizer"),
    "StepGraph": ("leanlora.train.step_graph", "StepGraph"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'leanlora.train' has no attribute {name!r}")


__all__ = ["DataConfig", "ModelConfig", "RunConfig", "TrainConfig", "load_run_config", "to_commented_yaml",
           *_LAZY]
