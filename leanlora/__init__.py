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

# public name -> module that defines it
_EXPORTS = {
    "AdaptedLinear": "leanlora.layer",
    "MergeError": "leanlora.layer",
    "AdapterConfig": "leanlora.config",
    "DEFAULT_TARGET_MODULES": "leanlora.config",
    "BankConfig": "leanlora.config",
    "ConfigError": "leanlora.config",
    "GatedConfig": "leanlora.config",
    "GatesConfig": "leanlora.config",
    "MovedKeyWarning": "leanlora.config",
    "NestedConfig": "leanlora.config",
    "NF4Config": "leanlora.config",
    "PriorConfig": "leanlora.config",
    "QuantConfig": "leanlora.config",
    "CostReport": "leanlora.reports.cost",
    "cost_report": "leanlora.reports.cost",
    "InjectError": "leanlora.inject",
    "adapted_layers": "leanlora.inject",
    "disable_adapters": "leanlora.inject",
    "get_model": "leanlora.inject",
    "inject": "leanlora.inject",
    "merge": "leanlora.inject",
    "merge_and_unload": "leanlora.inject",
    "trainable_parameters": "leanlora.inject",
    "unload": "leanlora.inject",
    "unmerge": "leanlora.inject",
    "quantize_bases": "leanlora.base.nf4",
    "ExportError": "leanlora.artifact.errors",
    "export": "leanlora.artifact.export",
    "export_peft": "leanlora.artifact.export",
    "export_merged": "leanlora.artifact.export_merged",
    "finalize": "leanlora.artifact.finalize",
    "topk_stored_bytes": "leanlora.factors.bank_storage",
    "AdapterError": "leanlora.artifact.io",
    "AdapterLoadError": "leanlora.artifact.io",
    "AdapterSaveError": "leanlora.artifact.io",
    "BaseMismatchError": "leanlora.artifact.io",
    "load": "leanlora.artifact.io",
    "save": "leanlora.artifact.io",
    "param_groups": "leanlora.optim",
    "write_report": "leanlora.reports.report",
    "advance": "leanlora.gates.schedule",
    "regularizer": "leanlora.gates.schedule",
    "gate_summary": "leanlora.reports.summary",
    "SweepResult": "leanlora.reports.sweep",
    "export_rank": "leanlora.reports.sweep",
    "plot_sweep": "leanlora.reports.sweep",
    "set_rank": "leanlora.reports.sweep",
    "sweep_ranks": "leanlora.reports.sweep",
    "export_budget": "leanlora.reports.budget_sweep",
    "sweep_budgets": "leanlora.reports.budget_sweep",
}
# distributed: torchrun / accelerate launch, DDP and FSDP2 (leanlora.distributed.wrap);
# budget: the BOPs budget controller of adapter.budget (leanlora.budget.start)
_SUBMODULES = {"budget", "distributed"}

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
    from leanlora import budget, distributed
    from leanlora.reports.budget_sweep import export_budget, sweep_budgets
    from leanlora.base.nf4 import quantize_bases
    from leanlora.config import (DEFAULT_TARGET_MODULES, AdapterConfig, BankConfig, ConfigError, GatedConfig, GatesConfig,
                                 MovedKeyWarning, NestedConfig, NF4Config, PriorConfig, QuantConfig)
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
