"""Training and evaluation: run configs, tasks, metrics, the loop, checkpoints, HF Trainer and TRL hooks.

The loop and the Trainer integration import transformers (and ``LeanLoraSFTTrainer`` TRL); they load
on first use.
"""

from leanlora.train.runconfig import (DataConfig, ModelConfig, RunConfig, TrainConfig, load_run_config,
                                      to_commented_yaml)

# name -> the module that defines it, imported on first use
_LAZY = {
    **dict.fromkeys(("train", "TrainResult", "TrainingDiverged"), "leanlora.train.loop"),
    **dict.fromkeys(("LeanLoraCallback", "LeanLoraTrainer", "LeanLoraMixin"), "leanlora.train.callbacks"),
    "LeanLoraSFTTrainer": "leanlora.train.sft",
    "add_regularizer": "leanlora.train.callbacks",
    "leanlora_optimizer": "leanlora.train.trainer_optim",
    "StepGraph": "leanlora.train.step_graph",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'leanlora.train' has no attribute {name!r}")


__all__ = ["DataConfig", "ModelConfig", "RunConfig", "TrainConfig", "load_run_config", "to_commented_yaml", *_LAZY]
