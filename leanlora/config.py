"""Adapter configuration: the three axes (factors, ranks, precision) over a base.

Every field is validated in ``__post_init__`` and a bad value raises :class:`ConfigError`
naming the field, the value and what is allowed. Config objects never reach into layer
classes: :mod:`leanlora.build` turns them into flat constructor arguments.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

FactorKind = Literal["dense", "bank"]
RankKind = Literal["fixed", "nested", "gated"]
PrecisionKind = Literal["float", "fixed", "learned"]
BaseKind = Literal["dense", "nf4"]

ALLOWED_BITS = (2, 4, 8, 16, 32)


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and what is allowed."""


def _require(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r} is invalid: {allowed}")


@dataclass(frozen=True)
class BankConfig:
    """VB-LoRA vector bank (used when ``factors="bank"``)."""

    num_vectors: int = 256
    """h: vectors in the one bank shared by every adapted module (paper GLUE: 90)."""
    vector_length: int = 64
    """b: length of each bank vector; must divide every adapted in/out dimension (paper: 256)."""
    topk: int = 2
    """k: bank vectors mixed per sub-vector (paper: 2)."""
    logits_init_std: float = 0.01
    """std of the N(0, std) logit initialisation (paper and NLU code: 0.01; PEFT: 0.1)."""
    bank_init_range: float = 0.02
    """bank vectors start U(-range, range) (paper: 0.02)."""
    bank_lr: float = 1e-2
    """learning rate of the bank parameter group (no weight decay; the paper's 1e-3 was tuned for runs
    of many epochs). Both factors are made of bank vectors, so the update B·A is quadratic in a
    bank that starts at +-bank_init_range: at 1e-3 it grows so slowly that a run of a few hundred
    steps ends before the model moves, and the classifier learns the majority class alone."""
    logits_lr: float = 1e-2
    """learning rate of the logits parameter group (paper: 1e-2, no weight decay)."""
    scaled: bool = False
    """apply the LoRA scale alpha / r (alpha / sqrt(r) with rslora) to the bank update; False
    (VB-LoRA) makes the full-rank update plain B·A, see :mod:`leanlora.factors.bank`."""

    def __post_init__(self) -> None:
        _require(self.num_vectors >= 1, "bank.num_vectors", self.num_vectors, "must be >= 1")
        _require(self.vector_length >= 1, "bank.vector_length", self.vector_length, "must be >= 1")
        _require(1 <= self.topk <= self.num_vectors, "bank.topk", self.topk,
                 f"must be in [1, bank.num_vectors={self.num_vectors}]")
        _require(self.logits_init_std > 0, "bank.logits_init_std", self.logits_init_std, "must be > 0")
        _require(self.bank_init_range > 0, "bank.bank_init_range", self.bank_init_range, "must be > 0")
        _require(self.bank_lr > 0, "bank.bank_lr", self.bank_lr, "must be > 0")
        _require(self.logits_lr > 0, "bank.logits_lr", self.logits_lr, "must be > 0")


@dataclass(frozen=True)
class NestedConfig:
    """DyLoRA / QDyLoRA nested ranks (used when ``ranks="nested"``)."""

    r_min: int = 1
    """smallest rank sampled in training."""
    distribution: Literal["uniform", "geometric"] = "uniform"
    """p_B over [r_min, r]: uniform (DyLoRA code) or geometric favouring small ranks."""
    frozen: bool = False
    """DyLoRA "frozen" mode: only component b learns in a step (the released DyLoRA callback)."""
    eval_rank: int | None = None
    """rank used in eval mode; None means the full rank r."""
    decay: float = 0.8
    """geometric only: p(b) ∝ decay^(b - r_min), so rank r_min is drawn most often."""
    seed: int = 0
    """seed of the rank draws: b at step t depends only on (seed, t), the same in every process."""
    scale: Literal["sampled", "max"] = "sampled"
    """the update's scale at rank b: alpha / b at the sampled b ("sampled", DyLoRA) or alpha / r at
    every b ("max"). alpha / b stays the default: with alpha / r the small ranks, which are the point
    of nested ranks, get an update r/b times smaller than the steps that trained them and a short
    run leaves rank 1 near chance, while alpha / b keeps every rank close to the full one."""

    def __post_init__(self) -> None:
        _require(self.scale in ("max", "sampled"), "nested.scale", self.scale, "allowed: 'max', 'sampled'")
        _require(self.r_min >= 1, "nested.r_min", self.r_min, "must be >= 1")
        _require(self.distribution in ("uniform", "geometric"), "nested.distribution",
                 self.distribution, "allowed: 'uniform', 'geometric'")
        _require(self.eval_rank is None or self.eval_rank >= 1, "nested.eval_rank", self.eval_rank,
                 "must be None or >= 1")
        _require(0.0 < self.decay < 1.0, "nested.decay", self.decay, "must be in (0, 1)")


@dataclass(frozen=True)
class GatedConfig:
    """B-LoRA hard-concrete rank gates (used when ``ranks="gated"``)."""

    diag: bool = True
    """AdaLoRA-style B·diag(E)·A (True, the B-LoRA port's default) or plain B·A (False)."""
    init_log_alpha: float = 6.0
    """initial gate location log(alpha); 6.0 gives P(on) ~ 0.9995 (B-LoRA config default)."""
    threshold: float = 0.34
    """eval: a gate is on when P(z = 0) < threshold (Bayesian Bits' deterministic rule)."""
    nested: bool = True
    """gates nest through a cumulative product: component i lives only if all before it live."""
    prior: Literal["nested", "individual"] = "nested"
    """rank prior prices the nested (cumulative-product) probabilities or each gate alone."""
    gate_lr: float = 1e-2
    """learning rate of the gate parameter group."""

    def __post_init__(self) -> None:
        _require(0.0 < self.threshold < 1.0, "gated.threshold", self.threshold, "must be in (0, 1)")
        _require(self.prior in ("nested", "individual"), "gated.prior", self.prior,
                 "allowed: 'nested', 'individual'")
        _require(self.gate_lr > 0, "gated.gate_lr", self.gate_lr, "must be > 0")


@dataclass(frozen=True)
class QuantConfig:
    """Precision of the low-rank factors (used when ``precision`` is "fixed" or "learned")."""

    bits: int = 8
    """bit-width of the "fixed" precision strategy."""
    bit_set: tuple[int, ...] = (2, 4, 8, 16, 32)
    """bit-widths the "learned" quantizer chooses from; 32 means float (no quantization)."""
    init_log_alpha: float = 6.0
    """initial location of every bit gate (6.0: starts at the widest width)."""
    threshold: float = 0.34
    """eval: a bit gate is on when P(z = 0) < threshold."""
    lmbda: float = 1e-3
    """lambda: weight of the gate prior in the loss (B-LoRA default 1e-3)."""
    reg_type: Literal["const", "bop"] = "const"
    """prior cost weights: 1 per gate ("const") or MACs-and-bits aware ("bop")."""

    def __post_init__(self) -> None:
        _require(self.bits in ALLOWED_BITS, "quant.bits", self.bits, f"allowed: {ALLOWED_BITS}")
        bit_set = tuple(self.bit_set)
        _require(len(bit_set) > 0 and set(bit_set) <= set(ALLOWED_BITS) and 2 in bit_set,
                 "quant.bit_set", self.bit_set,
                 f"must be a non-empty subset of {ALLOWED_BITS} that contains 2")
        object.__setattr__(self, "bit_set", tuple(sorted(set(bit_set))))
        _require(0.0 < self.threshold < 1.0, "quant.threshold", self.threshold, "must be in (0, 1)")
        _require(self.lmbda >= 0, "quant.lmbda", self.lmbda, "must be >= 0")
        _require(self.reg_type in ("const", "bop"), "quant.reg_type", self.reg_type,
                 "allowed: 'const', 'bop'")


@dataclass(frozen=True)
class NF4Config:
    """4-bit NormalFloat base (used when ``base="nf4"``)."""

    block_size: int = 64
    """weights per absmax block (QLoRA: 64)."""
    scaler_block_size: int = 256
    """absmax constants per double-quantization block (QLoRA: 256)."""

    def __post_init__(self) -> None:
        _require(self.block_size >= 1, "nf4.block_size", self.block_size, "must be >= 1")
        _require(self.scaler_block_size >= 1, "nf4.scaler_block_size", self.scaler_block_size,
                 "must be >= 1")


@dataclass(frozen=True)
class AdapterConfig:
    """One adapter over a model: which modules, which rank, and the three axes."""

    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    """module-name patterns: a leaf name ("q_proj"), a dotted suffix, a glob ("*.attn.*"),
    or a regex prefixed "re:"; a module is adapted when any pattern matches."""
    exclude_modules: tuple[str, ...] = ()
    """patterns (same syntax) of modules never adapted, e.g. ("lm_head",)."""
    modules_to_save: tuple[str, ...] = ()
    """modules trained in full and saved with the adapter, e.g. ("classifier",)."""
    r: int = 8
    """rank (the maximum rank for nested and gated ranks)."""
    alpha: float = 16.0
    """scaling numerator: the update is (alpha / r) · B·A (alpha / sqrt(r) with rslora)."""
    dropout: float = 0.0
    """dropout on the adapter input, in [0, 1)."""
    rslora: bool = False
    """rank-stabilised scaling alpha / sqrt(r)."""
    factors: FactorKind = "dense"
    """where A and B come from: "dense" matrices (LoRA) or the shared "bank" (VB-LoRA)."""
    ranks: RankKind = "fixed"
    """which components are on: "fixed" (all), "nested" (DyLoRA), "gated" (B-LoRA)."""
    precision: PrecisionKind = "float"
    """factor precision: "float", "fixed" bits, or "learned" bits (Bayesian Bits)."""
    base: BaseKind = "dense"
    """frozen base weight: "dense" (as loaded) or "nf4" (quantized on injection)."""
    adapter_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype of the adapter parameters (fp32 keeps small updates from rounding away)."""
    bank: BankConfig = field(default_factory=BankConfig)
    nested: NestedConfig = field(default_factory=NestedConfig)
    gated: GatedConfig = field(default_factory=GatedConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    nf4: NF4Config = field(default_factory=NF4Config)
    vectorize: Literal["auto", "always", "never"] = "auto"
    """compute the adapter pieces (gated, quantized or bank-composed A and B) of all layers of the
    same shape together, once per training forward (:mod:`leanlora.vectorize`): "auto" where
    they take work of their own, "always", or "never" (each layer computes its own)."""

    def __post_init__(self) -> None:
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            _require(isinstance(value, (tuple, list)) and all(isinstance(v, str) and v for v in value),
                     name, value, "must be a list of non-empty strings")
            object.__setattr__(self, name, tuple(value))
        _require(len(self.target_modules) > 0, "target_modules", self.target_modules,
                 "name at least one module pattern")
        _require(isinstance(self.r, int) and self.r > 0, "r", self.r, "must be an integer > 0")
        _require(self.alpha > 0, "alpha", self.alpha, "must be > 0")
        _require(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "must be in [0, 1)")
        _require(self.factors in ("dense", "bank"), "factors", self.factors, "allowed: 'dense', 'bank'")
        _require(self.ranks in ("fixed", "nested", "gated"), "ranks", self.ranks,
                 "allowed: 'fixed', 'nested', 'gated'")
        _require(self.precision in ("float", "fixed", "learned"), "precision", self.precision,
                 "allowed: 'float', 'fixed', 'learned'")
        _require(self.base in ("dense", "nf4"), "base", self.base, "allowed: 'dense', 'nf4'")
        _require(self.vectorize in ("auto", "always", "never"), "vectorize", self.vectorize,
                 "allowed: 'auto', 'always', 'never'")
        _require(self.adapter_dtype in ("float32", "bfloat16", "float16"), "adapter_dtype",
                 self.adapter_dtype, "allowed: 'float32', 'bfloat16', 'float16'")
        if self.factors == "bank" and not self.bank.scaled:
            _require(not self.rslora, "rslora", self.rslora,
                     "has no effect with factors='bank' unless bank.scaled=True (VB-LoRA has no alpha/r scale)")
        if self.ranks == "nested":
            _require(self.nested.r_min <= self.r, "nested.r_min", self.nested.r_min,
                     f"must be <= r={self.r}")
            _require(self.nested.eval_rank is None or self.nested.eval_rank <= self.r,
                     "nested.eval_rank", self.nested.eval_rank, f"must be <= r={self.r}")

    @property
    def scaling(self) -> float:
        """alpha / r, or alpha / sqrt(r) with rslora (at the full rank r); 1 for an unscaled bank."""
        if self.factors == "bank" and not self.bank.scaled:
            return 1.0
        return self.alpha / (self.r ** 0.5 if self.rslora else self.r)

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        return from_plain(cls, data, "adapter")


# --- dict <-> dataclass, shared with the run config of the CLI -------------------------------


def to_plain(obj: Any) -> Any:
    """A dataclass tree as JSON/YAML-ready dicts, lists and scalars."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [to_plain(v) for v in obj]
    return obj


def from_plain(cls: type, data: Any, path: str) -> Any:
    """Build dataclass ``cls`` from nested dicts; unknown keys and wrong types name the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    kwargs = {name: _coerce(hints[name], value, f"{path}.{name}") for name, value in data.items()}
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_plain(hint, value, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, path)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError("; or ".join(errors) if errors else f"{path}: cannot be {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}={value!r} is invalid: allowed {list(args)}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        item = args[0] if args else Any
        return tuple(_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {type(value).__name__} {value!r}")
        return value
    return value
