"""``base: auto`` and ``nf4.gemm: auto``: float8 GEMMs for the frozen base where they pay.

A float8 base (``base: fp8``, or ``nf4.gemm: fp8`` over a 4-bit one) runs the frozen forward and
input-gradient GEMMs in e4m3 at twice bf16's tensor-core rate, and quantizes each activation and
output-gradient row on the way in. That is a speed option with a small numerical cost (the
weight rounded to e4m3 with a scale per output row; ``leanlora.base.fp8_linear`` bounds it), and
it pays only where both hold:

* the GPU has float8 tensor cores (CUDA compute capability 8.9 or newer), and
* the layers are wide: the per-row quantization is elementwise work proportional to the
  activations, which a narrow GEMM's saving does not repay (``benchmarks/fp8_layer_speed.py``
  measures the crossing; the whole step of a model of hidden size ``FP8_MIN_WIDTH`` gains).

``auto`` picks float8 exactly there and the exact base everywhere else: on the CPU, on older
GPUs, on small models, and where a target is already a bitsandbytes 4-bit layer. The choice is
made at injection from the weights' device and shapes, and the adapter's saved config records
the choice, not ``auto``.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from torch import nn

from leanlora.base.bnb4 import is_linear4bit
from leanlora.base.dense import linear_shape
from leanlora.base.fp8 import FP8_MULTIPLE
from leanlora.base.fp8_linear import fp8_gemm_available
from leanlora.config import AdapterConfig

FP8_MIN_WIDTH = 2048  # the widest adapted input at and above which float8 GEMMs are chosen


def float8_pays(targets: Mapping[str, nn.Module]) -> bool:
    """Whether the frozen GEMMs of ``targets`` (name -> linear layer) are worth running in float8."""
    if not targets or any(is_linear4bit(m) for m in targets.values()):
        return False
    weights = [m.weight for m in targets.values()]
    if len({w.device for w in weights}) != 1 or not fp8_gemm_available(weights[0].device):
        return False
    shapes = [linear_shape(m) for m in targets.values()]
    if any(d % FP8_MULTIPLE for shape in shapes for d in shape):
        return False
    return max(in_f for in_f, _ in shapes) >= FP8_MIN_WIDTH


def resolve_auto_base(config: AdapterConfig, targets: Mapping[str, nn.Module]) -> AdapterConfig:
    """``config`` with ``base: auto`` and ``nf4.gemm: auto`` made concrete for ``targets``."""
    if config.base != "auto" and config.nf4.gemm != "auto":
        return config
    fp8 = float8_pays(targets)
    if config.base == "auto":
        config = dataclasses.replace(config, base="fp8" if fp8 else "dense")
    if config.nf4.gemm == "auto":
        config = dataclasses.replace(config, nf4=dataclasses.replace(config.nf4, gemm="fp8" if fp8 else "dequant"))
    return config


def float8_note(asked: AdapterConfig, chosen: AdapterConfig) -> str | None:
    """A line for the run's log when ``auto`` chose float8 GEMMs, or None."""
    if asked.base == "auto" and chosen.base == "fp8":
        return ("adapter.base=auto: the frozen base is float8 e4m3 with a scale per output row, its GEMMs in float8 "
                "(base: fp8); adapter.base=dense keeps the weights as loaded")
    if chosen.base == "nf4" and asked.nf4.gemm == "auto" and chosen.nf4.gemm == "fp8":
        return ("adapter.nf4.gemm=auto: the 4-bit base runs its GEMMs in float8 (nf4.gemm: fp8); "
                "adapter.nf4.gemm=dequant runs them in the activations' dtype")
    return None
