"""leanlora: self-sizing low-rank adapters (LoRA, VB-LoRA, QDyLoRA, B-LoRA) for PyTorch models.

The public names below are imported on first use (PEP 562), so that `import leanlora` and the
command line's `--help` do not pay for torch, transformers and torchao until something needs them.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# module -> the public names it defines
_PUBLIC = {
    "leanlora.layer": ("AdaptedLinear", "MergeError"),
    "leanlora.config": ("AdapterConfig", "DEFAULT_TARGET_MODULES", "BankConfig", "ConfigError", "FP8Config",
                        "GatedConfig", "GatesConfig", "MovedKeyWarning", "NestedConfig", "NF4Config", "PriorConfig",
                        "QuantConfig"),
    "leanlora.reports.cost": ("CostReport", "cost_report"),
    "leanlora.inject": ("InjectError", "adapted_layers", "disable_adapters", "get_model", "inject", "merge",
                        "merge_and_unload", "trainable_parameters", "unload", "unmerge"),
    "leanlora.base.nf4": ("quantize_bases",),
    "leanlora.artifact.errors": ("ExportError",),
    "leanlora.artifact.export": ("export", "export_peft"),
    "leanlora.artifact.export_merged": ("export_merged",),
    "leanlora.artifact.finalize": ("finalize",),
    "leanlora.factors.bank_storage": ("topk_stored_bytes",),
    "leanlora.artifact.io": ("AdapterError", "AdapterLoadError", "AdapterSaveError", "BaseMismatchError", "load",
                             "save"),
    "leanlora.optim": ("param_groups",),
    "leanlora.reports.report": ("write_report",),
    "leanlora.gates.schedule": ("advance", "regularizer"),
    "leanlora.reports.summary": ("gate_summary",),
    "leanlora.reports.sweep": ("SweepResult", "export_rank", "plot_sweep", "set_rank", "sweep_ranks"),
    "leanlora.reports.budget_sweep": ("export_budget", "sweep_budgets"),
}
# public name -> module that defines it
_EXPORTS = {name: module for module, names in _PUBLIC.items() for name in names}
# distributed: torchrun / accelerate launch, DDP and FSDP2 (leanlora.distributed.wrap);
# budget: the BOPs budget controller of adapter.budget (leanlora.budget.start);
# optim: fused AdamW over param_groups' role groups (leanlora.optim.adamw)
_SUBMODULES = {"budget", "distributed", "optim"}

__all__ = sorted([*_EXPORTS, *_SUBMODULES])


class _Package(types.ModuleType):
    """Keeps a public function bound when its submodule of the same name is imported.

    Importing ``leanlora.inject`` makes Python set the package attribute ``inject`` to that
    submodule; with eager imports the function rebound it afterwards. Here the function takes the
    place of the module as soon as the module is set.
    """

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == f"leanlora.{name}":
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"leanlora.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'leanlora' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # static type checkers and IDEs see the eager imports
    from leanlora import budget, distributed, optim
    from leanlora.reports.budget_sweep import export_budget, sweep_budgets
    from leanlora.base.nf4 import quantize_bases
    from leanlora.config import (DEFAULT_TARGET_MODULES, AdapterConfig, BankConfig, ConfigError, FP8Config, GatedConfig,
                                 GatesConfig, MovedKeyWarning, NestedConfig, NF4Config, PriorConfig, QuantConfig)
    from leanlora.reports.cost import CostReport, cost_report
    from leanlora.artifact.errors import ExportError
    from leanlora.artifact.export import export, export_peft
    from leanlora.artifact.export_merged import export_merged
    from leanlora.factors.bank_storage import topk_stored_bytes
    from leanlora.artifact.finalize import finalize
    from leanlora.inject import (InjectError, adapted_layers, disable_adapters, get_model, inject, merge, merge_and_unload,
                                 trainable_parameters, unload, unmerge)
    from leanlora.artifact.io import AdapterError, AdapterLoadError, AdapterSaveError, BaseMismatchError, load, save
    from leanlora.layer import AdaptedLinear, MergeError
    from leanlora.optim import param_groups
    from leanlora.reports.report import write_report
    from leanlora.gates.schedule import advance, regularizer
    from leanlora.reports.summary import gate_summary
    from leanlora.reports.sweep import SweepResult, export_rank, plot_sweep, set_rank, sweep_ranks
