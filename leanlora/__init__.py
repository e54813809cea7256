"""leanlora: self-sizing low-rank adapters (LoRA, VB-LoRA, QDyLoRA, B-LoRA) for PyTorch models."""

from leanlora.config import (
    AdapterConfig,
    BankConfig,
    ConfigError,
    GatedConfig,
    NestedConfig,
    NF4Config,
    QuantConfig,
)
from leanlora.export import export_peft
from leanlora.inject import (
    InjectError,
    adapted_layers,
    disable_adapters,
    inject,
    merge,
    merge_and_unload,
    trainable_parameters,
    unload,
    unmerge,
)
from leanlora.io import AdapterLoadError, load, save
from leanlora.layer import AdaptedLinear, MergeError
from leanlora.optim import param_groups
from leanlora.schedule import advance, regularizer
from leanlora.summary import gate_summary

__version__ = "0.1.0"

__all__ = [
    "AdaptedLinear",
    "AdapterConfig",
    "AdapterLoadError",
    "BankConfig",
    "ConfigError",
    "GatedConfig",
    "InjectError",
    "MergeError",
    "NF4Config",
    "NestedConfig",
    "QuantConfig",
    "adapted_layers",
    "advance",
    "disable_adapters",
    "export_peft",
    "gate_summary",
    "inject",
    "load",
    "merge",
    "merge_and_unload",
    "param_groups",
    "regularizer",
    "save",
    "trainable_parameters",
    "unload",
    "unmerge",
]
