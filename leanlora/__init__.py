"""leanlora: self-sizing low-rank adapters (LoRA, VB-LoRA, QDyLoRA, B-LoRA) for PyTorch models."""

from leanlora.base.nf4 import quantize_bases
from leanlora.config import (
    AdapterConfig,
    BankConfig,
    ConfigError,
    GatedConfig,
    NestedConfig,
    NF4Config,
    QuantConfig,
)
from leanlora.cost import CostReport, cost_report
from leanlora import budget  # adapter.budget: the BOPs budget controller (leanlora.budget.start)
from leanlora import distributed  # torchrun / accelerate launch: DDP and FSDP2 (leanlora.distributed.wrap)
from leanlora.budget_sweep import export_budget, sweep_budgets
from leanlora.export import export_peft
from leanlora.finalize import finalize
from leanlora.factors.bank_storage import topk_stored_bytes
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
from leanlora.report import write_report  # matplotlib is imported only when plotting
from leanlora.schedule import advance, regularizer
from leanlora.summary import gate_summary
from leanlora.sweep import SweepResult, export_rank, plot_sweep, set_rank, sweep_ranks

__version__ = "0.1.0"

__all__ = [
    "AdaptedLinear",
    "CostReport",
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
    "SweepResult",
    "adapted_layers",
    "cost_report",
    "advance",
    "budget",
    "disable_adapters",
    "distributed",
    "export_budget",
    "export_peft",
    "finalize",
    "export_rank",
    "gate_summary",
    "inject",
    "load",
    "merge",
    "merge_and_unload",
    "param_groups",
    "plot_sweep",
    "quantize_bases",
    "regularizer",
    "write_report",
    "save",
    "set_rank",
    "sweep_budgets",
    "sweep_ranks",
    "topk_stored_bytes",
    "trainable_parameters",
    "unload",
    "unmerge",
]
