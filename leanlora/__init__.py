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
from leanlora.schedule import advance, regularizer

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
    "inject",
    "load",
    "merge",
    "merge_and_unload",
    "regularizer",
    "save",
    "trainable_parameters",
    "unload",
    "unmerge",
]
