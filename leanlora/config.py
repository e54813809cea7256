"""Adapter configuration: the three axes (factors, ranks, precision) over a base.

Every field is validated in ``__post_init__`` and a bad value raises :class:`ConfigError`
naming the field, the value and what is allowed. Config objects never reach into layer
classes: :mod:`leanlora.build` turns them into flat constructor arguments.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import types
import typing
import re
import warnings
from dataclasses import InitVar, dataclass, field
from typing import Any, ClassVar, Literal

ALLOWED_BITS = (2, 4, 8, 16, 32)

ALL_LINEAR = "all-linear"
DEFAULT_TARGET_MODULES = ("q_proj", "v_proj", "query", "value", "c_attn")
"""target_modules=None: the attention query and value projections (Llama/Mistral/Qwen/OPT name
them q_proj/v_proj, BERT/RoBERTa query/value, GPT-2 fuses them in c_attn); entries a model lacks
are skipped."""

PEFT_ALIASES = {"lora_alpha": "alpha", "lora_dropout": "dropout", "use_rslora": "rslora"}
"""PEFT's names of AdapterConfig fields, accepted in Python, YAML and adapter files."""

PEFT_CARRIED = {name: PEFT_ALIASES.get(name, name) for name in (
    "r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules", "exclude_modules", "modules_to_save",
    "task_type", "bias")}
"""PEFT LoraConfig field -> AdapterConfig keyword, for :meth:`AdapterConfig.from_peft`."""
PEFT_UNUSED = ("peft_type", "peft_version", "auto_mapping", "base_model_name_or_path", "revision", "inference_mode",
               "fan_in_fan_out")
"""LoraConfig fields that change no adapter here: bookkeeping, and fan_in_fan_out, which leanlora
reads off each layer (GPT-2's Conv1D) instead of taking it from the config."""

TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
              "QUESTION_ANS": ("qa_outputs",), "CAUSAL_LM": (), "SEQ_2_SEQ_LM": (), "FEATURE_EXTRACTION": ()}
"""PEFT's task types, and the head modules each trains in full (as PEFT's task models add them to
modules_to_save): the entries the model has."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and what is allowed."""


def _require(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r} is invalid: {allowed}")


# torch's optimizers compute with the learning rate as a float32 scalar: a larger one overflows
MAX_LR = 3.0e38


def require_minimums(config: Any, prefix: str, minimums: dict[str, int]) -> None:
    """Each named field of ``config`` must be at least its minimum; the error names the key."""
    for name, least in minimums.items():
        _require(getattr(config, name) >= least, prefix + name, getattr(config, name), f"must be >= {least}")


def require_lr(name: str, value: float) -> None:
    """A learning rate: > 0 and within float32's range."""
    _require(0 < value <= MAX_LR, name, value, f"must be > 0 and at most {MAX_LR:g} (optimizers use float32)")


@functools.cache
def _field_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _choices(hint: Any) -> tuple | None:
    """The values a Literal field (or one of Literals and bool) allows; None for other hints."""
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        parts = [_choices(a) if a is not bool else (True, False) for a in typing.get_args(hint)]
        return None if None in parts else sum(parts, ())
    return None


def _shown(choices: tuple) -> tuple:
    """The choices a message lists: False is allowed beside 'off' only as YAML's reading of a bare
    `off`, so it is not offered as a value of its own."""
    return tuple(c for c in choices if not (c is False and "off" in choices))


def check_field_types(obj: Any, prefix: str) -> None:
    """Refuse a value of the wrong kind in a config built directly (the API; YAML and dicts go
    through :func:`from_plain`), naming the field: a string where a number belongs would otherwise
    fail later as a TypeError, or pass as truthy. Numbers must be finite: no setting means
    anything at NaN or infinity (a learning rate or alpha of inf trains NaN weights)."""
    for f in dataclasses.fields(obj):
        hint, value, name = _field_hints(type(obj))[f.name], getattr(obj, f.name), prefix + f.name
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
            if value is None:
                continue
            hint = args[0]  # an optional field: its type when set
        if choices := _choices(hint):
            _require(value in choices, name, value, "allowed: " + ", ".join(
                str(c).lower() if isinstance(c, bool) else repr(c) for c in _shown(choices)))
        elif hint is float:
            real = isinstance(value, numbers.Real) and not isinstance(value, bool)
            _require(real and math.isfinite(value), name, value,
                     "must be a finite number" if real else f"must be a number, not a {type(value).__name__}")
        elif hint is int:
            _require(_is_int(value), name, value, f"must be an integer, not a {type(value).__name__}")
        elif hint is bool:
            _require(isinstance(value, bool), name, value, "must be true or false")
        elif typing.get_origin(hint) is tuple and typing.get_args(hint)[:1] == (int,):
            _require(isinstance(value, (tuple, list)) and all(_is_int(v) for v in value), name, value,
                     "must be a list of integers")
        elif dataclasses.is_dataclass(hint):
            _require(isinstance(value, hint), name, value,
                     f"must be a {hint.__name__}; build it as {hint.__name__}(...), or the whole config "
                     "from plain dicts with AdapterConfig.from_dict")


@dataclass(frozen=True)
class BankConfig:
    """VB-LoRA vector bank (used when ``factors="bank"``)."""

    num_vectors: int = 90
    """h: vectors in the one bank shared by every adapted module. 90 is VB-LoRA's GLUE setting
    (arXiv:2405.15179), which keeps a small encoder's stored adapter near 5 % of LoRA's bytes; the
    paper's Llama 2 runs used 2048, the size to start from on billion-parameter models."""
    vector_length: int | Literal["auto"] = "auto"
    """b: length of each bank vector; must divide every adapted in/out dimension. "auto": the
    longest of 256, 128, 64, 32, 16, 8 that divides them all, found at injection (each sub-vector
    stores k indices and weights, so longer vectors mean fewer stored entries; paper: 256)."""
    topk: int = 2
    """k: bank vectors mixed per sub-vector (paper: 2)."""
    logits_init_std: float = 0.01
    """std of the N(0, std) logit initialisation (paper and NLU code: 0.01; PEFT: 0.1)."""
    bank_init_range: float = 0.02
    """bank vectors start U(-range, range) (paper: 0.02)."""
    bank_lr: float = 3e-3
    """learning rate of the bank parameter group (no weight decay). Both factors are made of bank
    vectors, so the update B·A is quadratic in a bank that starts at +-bank_init_range, and Adam
    moves every entry by about the learning rate a step. At the paper's 1e-3 (tuned for runs of many
    epochs) the bank grows so slowly that a run of a few hundred steps ends before the model moves;
    at 1e-2 a step changes entries by half their initial size, and on sentence-pair and regression
    tasks the update overshoots and training collapses to a constant prediction. 3e-3 sits between."""
    logits_lr: float = 1e-2
    """learning rate of the logits parameter group (paper: 1e-2, no weight decay)."""
    scaled: bool = False
    """apply the LoRA scale alpha / r (alpha / sqrt(r) with rslora) to the bank update; False
    (VB-LoRA) makes the full-rank update plain B·A, see :mod:`leanlora.factors.bank`."""

    def __post_init__(self) -> None:
        check_field_types(self, "bank.")
        _require(self.num_vectors >= 1, "bank.num_vectors", self.num_vectors, "must be >= 1")
        _require(self.vector_length == "auto" or (_is_int(self.vector_length) and self.vector_length >= 1),
                 "bank.vector_length", self.vector_length, "must be an integer >= 1 or 'auto'")
        _require(1 <= self.topk <= self.num_vectors, "bank.topk", self.topk,
                 f"must be in [1, bank.num_vectors={self.num_vectors}]")
        _require(self.logits_init_std > 0, "bank.logits_init_std", self.logits_init_std, "must be > 0")
        _require(self.bank_init_range > 0, "bank.bank_init_range", self.bank_init_range, "must be > 0")
        require_lr("bank.bank_lr", self.bank_lr)
        require_lr("bank.logits_lr", self.logits_lr)


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
    full_share: float = 0.5
    """share of the training steps drawn at the full rank r before the distribution above shares out
    the rest (0: the distribution alone, as DyLoRA). Component i learns in the steps that draw b > i,
    so under DyLoRA's uniform draw the last component learns in 1 / (r - r_min + 1) of the steps, and
    every earlier one is fitted mostly at scales alpha / b larger than the full rank's. In a run of a
    few hundred steps that leaves the full rank, the adapter a user gets by default, behind LoRA and
    in some seeds at the majority class. Half the steps at r give the full rank about a LoRA's run;
    the other half still train every smaller rank, and the smallest one pays for it. A quarter helps
    some tasks' best rank and costs others theirs; what remains of the full rank's gap on an NF4
    base is mostly the base (:class:`NF4Config`)."""
    seed: int = 0
    """seed of the rank draws: b at step t depends only on (seed, t), the same in every process."""
    scale: Literal["sampled", "max", "sqrt"] = "sampled"
    """the update's scale at rank b: alpha / b at the sampled b ("sampled", DyLoRA) or alpha / r at
    every b ("max"). alpha / b stays the default: with alpha / r the small ranks, which are the point
    of nested ranks, get an update r/b times smaller than the steps that trained them and a short
    run leaves rank 1 near chance, while alpha / b keeps every rank close to the full one."""

    def __post_init__(self) -> None:
        check_field_types(self, "nested.")
        _require(self.r_min >= 1, "nested.r_min", self.r_min, "must be >= 1")
        _require(self.eval_rank is None or self.eval_rank >= 1, "nested.eval_rank", self.eval_rank,
                 "must be None or >= 1")
        _require(0.0 < self.decay < 1.0, "nested.decay", self.decay, "must be in (0, 1)")
        _require(0.0 <= self.full_share < 1.0, "nested.full_share", self.full_share,
                 "must be in [0, 1) (every step at the full rank is ranks: fixed)")


@dataclass(frozen=True)
class GatedConfig:
    """B-LoRA hard-concrete rank gates (used when ``ranks="gated"``); the gates' own settings are
    in :class:`GatesConfig`, their prior's in :class:`PriorConfig`."""

    diag: bool = False
    """AdaLoRA-style B·diag(E)·A (True, the B-LoRA authors' code) or plain B·A (False, the default).
    E is one more learned factor per component, with bit gates of its own. In short GLUE runs on a
    small encoder it left B-LoRA further under LoRA on a small-data task than plain B·A did, at the
    same training loss (a generalization cost, not a fit one); plain B·A also stores fewer bytes."""
    init_log_alpha: InitVar[float | None] = None  # the moved keys keep their places for positional calls
    """moved to ``gates.rank_init_log_alpha``."""
    threshold: InitVar[float | None] = None
    """moved to ``gates.threshold``."""
    nested: bool = True
    """gates nest through a cumulative product: component i lives only if all before it live."""
    prior: Literal["nested", "individual"] = "nested"
    """rank prior prices the nested (cumulative-product) probabilities or each gate alone."""
    gate_lr: InitVar[float | None] = None
    """moved to ``gates.lr``."""
    MOVED: ClassVar[tuple[str, ...]] = ("init_log_alpha", "threshold", "gate_lr")

    def __post_init__(self, *moved: float | None) -> None:  # the InitVars, in the order of MOVED
        check_field_types(self, "gated.")
        _keep_moved(self, "gated", **dict(zip(self.MOVED, moved)))


@dataclass(frozen=True)
class QuantConfig:
    """Precision of the low-rank factors (used when ``precision`` is "fixed" or "learned"); the
    bit gates' own settings are in :class:`GatesConfig`, their prior's in :class:`PriorConfig`."""

    bits: int = 8
    """bit-width of the "fixed" precision strategy."""
    bit_set: tuple[int, ...] = (2, 4, 8, 16, 32)
    """bit-widths the "learned" quantizer chooses from; 32 means float (no quantization)."""
    init_log_alpha: InitVar[float | None] = None
    """moved to ``gates.bit_init_log_alpha``."""
    threshold: InitVar[float | None] = None
    """moved to ``gates.threshold``."""
    lmbda: InitVar[float | None] = None
    """moved to ``prior.lmbda``."""
    reg_type: InitVar[str | None] = None
    """moved to ``prior.reg_type``."""
    MOVED: ClassVar[tuple[str, ...]] = ("init_log_alpha", "threshold", "lmbda", "reg_type")

    def __post_init__(self, *moved: float | str | None) -> None:  # the InitVars, in the order of MOVED
        check_field_types(self, "quant.")
        _require(self.bits in ALLOWED_BITS, "quant.bits", self.bits, f"allowed: {ALLOWED_BITS}")
        bits = set(self.bit_set)
        _require(2 in bits and bits <= set(ALLOWED_BITS), "quant.bit_set", self.bit_set,
                 f"must be a non-empty subset of {ALLOWED_BITS} that contains 2")
        object.__setattr__(self, "bit_set", tuple(sorted(bits)))
        _keep_moved(self, "quant", **dict(zip(self.MOVED, moved)))


@dataclass(frozen=True)
class GatesConfig:
    """Hard-concrete gates of gated ranks and of learned bits (:mod:`leanlora.gates.hardconcrete`).

    Both kinds are the same gate with one eval rule, trained in one optimizer group; the budget
    controller orders them on one scale. Only where they start differs: a rank gate decides
    whether a component exists, a bit gate whether a residual refines it."""

    lr: float = 1e-2
    """learning rate of the gate parameter group (rank and bit gates; no weight decay)."""
    threshold: float = 0.34
    """eval: a gate is on when P(z = 0) < threshold (Bayesian Bits' deterministic rule,
    arXiv:2005.07093), for rank and bit gates alike."""
    rank_init_log_alpha: float = 6.0
    """initial location log(alpha) of every rank gate; 6.0 gives P(on) ~ 0.9995: all components start on."""
    bit_init_log_alpha: float = 6.0
    """initial location of every bit gate; 6.0: every residual starts on, the widest width of quant.bit_set."""

    def __post_init__(self) -> None:
        check_field_types(self, "gates.")
        require_lr("gates.lr", self.lr)
        _require(0.0 < self.threshold < 1.0, "gates.threshold", self.threshold, "must be in (0, 1)")


@dataclass(frozen=True)
class PriorConfig:
    """The gate prior that :func:`leanlora.regularizer` adds to the loss (Bayesian-LoRA,
    arXiv:2406.13046); with ``budget`` the budget controller's term replaces it."""

    lmbda: float = 1e-3
    """lambda: weight of the prior of rank and bit gates in the loss (B-LoRA default 1e-3)."""
    reg_type: Literal["const", "bop"] = "const"
    """what closing a gate saves: 1 per gate ("const") or its MACs times bits ("bop"), for rank and bit gates."""

    def __post_init__(self) -> None:
        check_field_types(self, "prior.")
        _require(self.lmbda >= 0, "prior.lmbda", self.lmbda, "must be >= 0")


@dataclass(frozen=True)
class NF4Config:
    """4-bit NormalFloat base (used when ``base="nf4"``)."""

    block_size: int = 64
    """weights per absmax block (QLoRA: 64). On a small encoder the 4-bit base itself costs accuracy
    on some sentence-pair tasks, more than nested ranks do, and finer blocks (16, 32) do not recover it:
    where the model fits in memory unquantized, ``base: dense`` is the better choice there."""
    scaler_block_size: int = 256
    """absmax constants per double-quantization block (QLoRA: 256)."""
    gemm: Literal["auto", "dequant", "fp8"] = "auto"
    """how the frozen GEMMs run: "dequant" rebuilds W0 in the activations' dtype (QLoRA, torchao);
    "fp8" casts the rebuilt W0 to float8 e4m3 with one scale per output row and runs the forward and
    input-gradient GEMMs in float8 as ``base: fp8`` does (faster on GPUs of compute capability 8.9+,
    storage still 4-bit; the cast adds e4m3's rounding to NF4's, and activations and gradients are
    quantized per row; needs in_features and out_features that are multiples of 16). "auto" (the
    default): "fp8" where float8 GEMMs pay (a GPU with float8 tensor cores and layers at least 2048
    wide, leanlora.base.choice), else "dequant"."""

    def __post_init__(self) -> None:
        check_field_types(self, "nf4.")
        require_minimums(self, "nf4.", {"block_size": 1, "scaler_block_size": 1})


@dataclass(frozen=True)
class FP8Config:
    """Float8 frozen base (used when ``base="fp8"``)."""

    transposed_copy: bool = True
    """keep the e4m3 codes a second time in the input-gradient GEMM's layout (``torch._scaled_mm``
    wants its second operand column-major, the forward's codes are row-major), so no backward
    transposes W0: 2 bytes a weight in all, as a bf16 base holds. false: 1 byte a weight, and each
    backward makes a transposed copy per layer. Only where float8 GEMMs run in hardware; under
    FSDP2 the sharded codes are gathered per layer and the backward transposes them."""

    def __post_init__(self) -> None:
        check_field_types(self, "fp8.")


@dataclass(frozen=True)
class AdapterConfig:
    """One adapter over a model: which modules, which rank, and the three axes."""

    target_modules: str | tuple[str, ...] | None = None
    """which modules to adapt, by PEFT's rules (:mod:`leanlora.targets`): a list of names, each
    matching a module named so or ending in "." + name; one string, a regular expression matched
    against the whole dotted name; "all-linear" (every linear layer but the output layer and a
    classifier head); None: :data:`DEFAULT_TARGET_MODULES`, the query and value projections."""
    exclude_modules: str | tuple[str, ...] = ()
    """modules never adapted, by the same rules (a list of names or one regex), e.g. ["lm_head"]."""
    modules_to_save: tuple[str, ...] = ()
    """modules trained in full and saved with the adapter (names, as in a target list), e.g. ["classifier"]."""
    r: int = 8
    """rank (the maximum rank for nested and gated ranks)."""
    alpha: float = 16.0
    """scaling numerator: the update is (alpha / r) · B·A (alpha / sqrt(r) with rslora); PEFT's
    name ``lora_alpha`` is accepted too."""
    dropout: float = 0.0
    """dropout on the adapter input, in [0, 1); PEFT's name ``lora_dropout`` is accepted too."""
    rslora: bool = False
    """rank-stabilised scaling alpha / sqrt(r)."""
    factors: Literal["dense", "bank"] = "dense"
    """where A and B come from: "dense" matrices (LoRA) or the shared "bank" (VB-LoRA)."""
    ranks: Literal["fixed", "nested", "gated"] = "fixed"
    """which components are on: "fixed" (all), "nested" (DyLoRA), "gated" (B-LoRA)."""
    precision: Literal["float", "fixed", "learned"] = "float"
    """factor precision: "float", "fixed" bits, or "learned" bits (Bayesian Bits)."""
    base: Literal["auto", "dense", "nf4", "fp8"] = "auto"
    """frozen base weight: "dense" (as loaded), "nf4" (4-bit NormalFloat) or "fp8" (float8 e4m3 with
    per-channel scales, float8 GEMMs on GPUs of compute capability 8.9+), quantized on injection.
    "auto" (the default): "fp8" where its GEMMs pay, that is on a GPU with float8 tensor cores for
    layers at least 2048 wide, and "dense" everywhere else (the CPU, older GPUs, smaller models;
    leanlora.base.choice). The saved adapter records the choice."""
    adapter_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype of the adapter parameters (fp32 keeps small updates from rounding away). float16 is for
    inference and export only: AdamW refuses to train it (its moments underflow in float16)."""
    bank: BankConfig = field(default_factory=BankConfig)
    nested: NestedConfig = field(default_factory=NestedConfig)
    gated: GatedConfig = field(default_factory=GatedConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    gates: GatesConfig = field(default_factory=GatesConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    nf4: NF4Config = field(default_factory=NF4Config)
    fp8: FP8Config = field(default_factory=FP8Config)
    task_type: str | None = None
    """PEFT's task type: "CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "SEQ_2_SEQ_LM" or
    "FEATURE_EXTRACTION" (or PEFT's ``TaskType`` member). As in PEFT, "SEQ_CLS" and "TOKEN_CLS" add
    the model's "classifier" or "score" head to modules_to_save and "QUESTION_ANS" its
    "qa_outputs"; the others change nothing. None: nothing is added."""
    vectorize: Literal["auto", "always", "never"] = "auto"
    """compute the adapter pieces (gated, quantized or bank-composed A and B) of each group of
    layers that share stacked parameters together, once per training forward
    (:mod:`leanlora.groups.stacking`): "auto" and "always" do, "never" has each layer compute its
    own from its rows (the same values; for debugging a strategy)."""
    lora_alpha: InitVar[float | None] = None
    """PEFT's name of ``alpha`` (not stored: it sets alpha)."""
    lora_dropout: InitVar[float | None] = None
    """PEFT's name of ``dropout`` (not stored: it sets dropout)."""
    use_rslora: InitVar[bool | None] = None
    """PEFT's name of ``rslora`` (not stored: it sets rslora)."""
    bias: InitVar[str | None] = None
    """PEFT's ``bias``: only "none" (PEFT's default) is accepted; adapted layers' biases stay frozen,
    and a bias is trained by naming its module in ``modules_to_save``."""
    ALIASES: ClassVar[dict[str, str]] = PEFT_ALIASES
    budget: float | Literal["auto", "off", False] | None = "auto"
    """target BOPs of the finalized adapter as a fraction of a plain LoRA of the same modules and r
    with 16-bit factors, in (0, 1]; needs ranks="gated" or precision="learned". A controller
    drives the gates there and replaces the λ-weighted prior (:mod:`leanlora.budget`).
    "auto" (the default): ``DEFAULT_BUDGET`` in every loop that knows the run's length and tells
    the controller (``leanlora train``, ``LeanLoraTrainer``, a loop that calls
    ``leanlora.budget.start``) when something is gated; otherwise no budget. "off" or None: no
    budget, the gates follow the λ-weighted prior alone (B-LoRA as published). (YAML's bare `off`
    reads as false, which means "off" here.)"""
    budget_schedule: tuple[float, float, float] = (0.05, 0.2, 0.25)
    """fractions of the run where the budget's target starts to fall, reaches the budget, and
    where the gates are frozen to the final structure (the rest fine-tunes the factors). The
    freeze comes early because in runs of a few hundred steps the gates hardly change the removal
    order, so the projection at the freeze sets the structure (often float factors to 4 bits in
    one step), and what the score depends on is how long the factors then train at that
    structure."""

    def __post_init__(self, lora_alpha: float | None = None, lora_dropout: float | None = None,
                      use_rslora: bool | None = None, bias: str | None = None) -> None:
        # alpha / dropout / rslora at their defaults count as not given, so the PEFT spelling alone sets them.
        for alias, value in (("lora_alpha", lora_alpha), ("lora_dropout", lora_dropout), ("use_rslora", use_rslora)):
            if value is not None:
                name = PEFT_ALIASES[alias]
                _require(getattr(self, name) in (self.__dataclass_fields__[name].default, value), alias, value,
                         f"{name}={getattr(self, name)!r} is also given; name one of {name} and {alias}")
                object.__setattr__(self, name, value)
        _require(bias in (None, "none"), "bias", bias,
                 "only 'none' (PEFT's default): leanlora trains no bias of an adapted layer; name a module in "
                 "modules_to_save to train it whole")
        task = getattr(self.task_type, "value", self.task_type)  # PEFT's TaskType is a str enum
        _require(task is None or task in TASK_HEADS, "task_type", self.task_type, f"allowed: {sorted(TASK_HEADS)}")
        object.__setattr__(self, "task_type", None if task is None else str(task))
        check_field_types(self, "")
        _apply_moved(self)
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            object.__setattr__(self, name, _module_spec(name, getattr(self, name)))
        _require(self.r > 0, "r", self.r, "must be an integer > 0")  # check_field_types saw an integer
        _require(self.alpha > 0, "alpha", self.alpha, "must be > 0")
        _require(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "must be in [0, 1)")
        if self.factors == "bank" and not self.bank.scaled:
            _require(not self.rslora, "rslora", self.rslora,
                     "has no effect with factors='bank' unless bank.scaled=True (VB-LoRA has no alpha/r scale)")
        _check_budget(self)
        if self.ranks == "nested":
            _require(self.nested.r_min <= self.r, "nested.r_min", self.nested.r_min, f"must be <= r={self.r}")
            _require(self.nested.eval_rank is None or self.nested.eval_rank <= self.r,
                     "nested.eval_rank", self.nested.eval_rank, f"must be <= r={self.r}")

    @property
    def is_gated(self) -> bool:
        """Whether anything is gated (ranks or bit-widths): what a budget or a gate prior acts on."""
        return self.ranks == "gated" or self.precision == "learned"

    @property
    def scaling(self) -> float:
        """alpha / r, or alpha / sqrt(r) with rslora (at the full rank r); 1 for an unscaled bank."""
        if self.factors == "bank" and not self.bank.scaled:
            return 1.0
        return self.alpha / (self.r ** 0.5 if self.rslora else self.r)

    @classmethod
    def from_peft(cls, peft_config: Any, **overrides: Any) -> "AdapterConfig":
        """A PEFT ``LoraConfig`` as an AdapterConfig: the same LoRA (dense factors, fixed ranks, float
        precision) with its r, lora_alpha, lora_dropout, use_rslora, target, exclude and save lists,
        bias and task_type; ``overrides`` then set anything else (``ranks="gated"``, ``base="nf4"``).
        A LoraConfig that sets what has no counterpart here (DoRA, rank_pattern, layers_to_transform,
        an init other than the default, ...) is refused, naming those fields."""
        kind = getattr(peft_config, "peft_type", None)
        kind = getattr(kind, "value", kind)
        if kind != "LORA" or not dataclasses.is_dataclass(peft_config):
            raise ConfigError(f"AdapterConfig.from_peft takes a peft.LoraConfig, got {type(peft_config).__name__} "
                              f"(peft_type={kind!r})")
        default = type(peft_config)()
        values = {f.name: getattr(peft_config, f.name) for f in dataclasses.fields(peft_config)}
        unmatched = sorted(name for name, value in values.items() if name not in PEFT_CARRIED
                           and name not in PEFT_UNUSED and value != getattr(default, name))
        if unmatched:
            raise ConfigError(f"the LoraConfig sets {unmatched}, which leanlora has no counterpart for; "
                              f"from_peft carries {sorted(PEFT_CARRIED)}")
        kwargs = {ours: values[theirs] for theirs, ours in PEFT_CARRIED.items() if values[theirs] is not None}
        for name in ("target_modules", "exclude_modules", "modules_to_save"):  # PEFT keeps name lists as sets
            if isinstance(kwargs.get(name), (set, frozenset)):
                kwargs[name] = tuple(sorted(kwargs[name]))
        return cls(**{**kwargs, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        return from_plain(cls, data, "adapter")


# --- keys that moved: the gates and their prior have sections of their own -------------------

MOVED_KEYS = {
    "gated.init_log_alpha": "gates.rank_init_log_alpha",
    "gated.threshold": "gates.threshold",
    "gated.gate_lr": "gates.lr",
    "quant.init_log_alpha": "gates.bit_init_log_alpha",
    "quant.threshold": "gates.threshold",
    "quant.lmbda": "prior.lmbda",
    "quant.reg_type": "prior.reg_type",
}
"""old adapter key -> its key now. Each old key still sets its new one, with a MovedKeyWarning."""


class MovedKeyWarning(FutureWarning):
    """An adapter config key that moved: it still works, under its new name. A FutureWarning, so
    that the command line shows it (Python hides DeprecationWarning outside ``__main__``)."""


def _keep_moved(cfg: Any, section: str, **given: Any) -> None:
    """Hold the moved keys a section was given until :func:`_apply_moved` sets their new keys."""
    moved = {f"{section}.{name}": value for name, value in given.items() if value is not None}
    for old, value in moved.items():
        new = MOVED_KEYS[old]
        warnings.warn(f"adapter.{old} is deprecated: it is adapter.{new} now", MovedKeyWarning, stacklevel=5)
        target, key = new.split(".")
        try:  # a bad value is named as given, at once
            _SECTION_CLASSES[target](**{key: value})
        except ConfigError as err:  # "gates.threshold=2 is invalid: ..." names the value given, as every check does
            detail = str(err).removeprefix(f"{new}={value!r} is invalid")
            raise ConfigError(f"{old}={value!r} is invalid (it is {new} now){detail}") from None
    object.__setattr__(cfg, "_moved", moved)


def _apply_moved(c: "AdapterConfig") -> None:
    """Set ``gates`` and ``prior`` from the moved keys of ``gated`` and ``quant``; an old key that
    contradicts its new key, or two old keys that became one with different values, is refused."""
    by_new: dict[str, dict[str, Any]] = {}
    for sub in (c.gated, c.quant):
        for old, value in getattr(sub, "_moved", {}).items():
            by_new.setdefault(MOVED_KEYS[old], {})[old] = value
    if not by_new:
        return
    # gated and quant are rebuilt without their moved keys
    updates: dict[str, dict[str, Any]] = {"gates": {}, "prior": {}, "gated": {}, "quant": {}}
    for new, olds in by_new.items():
        old, value = _one_value(c, new, olds)
        section, key = new.split(".")
        current, default = getattr(getattr(c, section), key), getattr(_SECTION_CLASSES[section](), key)
        _require(current in (default, value), f"adapter.{old}", value,
                 f"adapter.{new}={current!r} is also given, and adapter.{old} is its old name: keep only adapter.{new}")
        updates[section][key] = value
    for section, values in updates.items():
        object.__setattr__(c, section, dataclasses.replace(getattr(c, section), **values))


def _one_value(c: "AdapterConfig", new: str, olds: dict[str, Any]) -> tuple[str, Any]:
    """The one value of ``new`` among old keys (two for gates.threshold): those of gates this
    adapter has decide; when they differ, which one was meant is unknown and nothing is guessed.
    An adapter without gates uses neither, and keeps the first."""
    present = {"gated": c.ranks == "gated", "quant": c.precision == "learned"}
    relevant = {old: v for old, v in olds.items() if present[old.split(".")[0]]}
    if len(set(relevant.values())) > 1:
        given = " and ".join(f"adapter.{old}={v!r}" for old, v in relevant.items())
        raise ConfigError(f"{given} differ, and one adapter.{new} now serves rank and bit gates: "
                          f"set adapter.{new} instead")
    return next(iter((relevant or olds).items()))


_SECTION_CLASSES = {"gates": GatesConfig, "prior": PriorConfig}


def _module_spec(name: str, value: Any) -> Any:
    """A module list as a tuple, or (but for modules_to_save) one regex string; PEFT's forms only."""
    regex_ok = name != "modules_to_save"
    if value is None and name == "target_modules":
        return None
    if isinstance(value, str) and regex_ok:
        if name == "target_modules" and value.lower() == ALL_LINEAR:
            return ALL_LINEAR
        _require(value != "", name, value, "must be a non-empty regex or a list of module names")
        try:
            re.compile(value)
        except re.error as err:
            raise ConfigError(f"{name}={value!r} is not a valid regular expression ({err}); a single string is "
                              "matched as a regex against whole module names, a list names modules") from None
        return value
    if isinstance(value, str):
        value = (value,)
    _require(isinstance(value, (tuple, list)) and all(isinstance(v, str) and v for v in value),
             name, value, "must be a list of non-empty module names" + (" or one regex string" if regex_ok else ""))
    _require(len(value) > 0 or name != "target_modules", name, value,
             "name at least one module, give a regex, 'all-linear', or leave it unset for the default")
    for entry in value:
        if entry.startswith("re:") or any(c in entry for c in "*?[]()|^$\\"):
            raise ConfigError(
                f"{name}: entry {entry!r} is a pattern, but a list entry names a module (the name or a dotted "
                "suffix of it, PEFT's rule)" + (f"; to match by pattern give one regex string instead of a "
                f"list, e.g. {name}={_as_regex(entry)!r}" if regex_ok else ""))
    return tuple(value)


def _as_regex(entry: str) -> str:
    """What a glob or ``re:`` entry most likely meant, as a full-name regex."""
    if entry.startswith("re:"):
        return entry[3:]
    return "(.*\\.)?" + re.escape(entry).replace("\\*", "[^.]*").replace("\\?", "[^.]")


def _check_budget(c: "AdapterConfig") -> None:
    s = tuple(c.budget_schedule)
    _require(len(s) == 3 and all(isinstance(v, (int, float)) for v in s) and 0 <= s[0] < s[1] <= s[2] <= 1,
             "adapter.budget_schedule", c.budget_schedule, "must be three fractions start < reach <= freeze in [0, 1]")
    object.__setattr__(c, "budget_schedule", tuple(float(v) for v in s))
    if c.budget == "off" or c.budget is False:  # False: YAML's bare `off`
        object.__setattr__(c, "budget", None)
    if c.budget is None or c.budget == "auto":
        return
    _require(isinstance(c.budget, (int, float)) and not isinstance(c.budget, bool) and 0 < c.budget <= 1,
             "adapter.budget", c.budget, "must be a fraction of LoRA-16 BOPs in (0, 1], 'auto' or 'off'")
    _require(c.is_gated, "adapter.budget", c.budget,
             f"needs something to gate: adapter.ranks='gated' or adapter.precision='learned' "
             f"(this adapter has ranks={c.ranks!r}, precision={c.precision!r})")


# --- dict <-> dataclass, shared with the run config of the CLI -------------------------------


def to_plain(obj: Any) -> Any:
    """A dataclass tree as JSON/YAML-ready dicts, lists and scalars."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [to_plain(v) for v in obj]
    return obj


def canonical_keys(cls: type, data: dict[str, Any], path: str) -> dict[str, Any]:
    """``data`` with the class's alias keys (``lora_alpha``) renamed to its fields (``alpha``);
    both spellings with different values is an error."""
    data = dict(data)
    for alias, name in getattr(cls, "ALIASES", {}).items():
        if alias in data:
            value = data.pop(alias)
            if name in data and data[name] != value:
                raise ConfigError(f"{path}.{alias}={value!r} is invalid: {path}.{name}={data[name]!r} is also "
                                  f"given; {alias} is PEFT's name of {name}, give one of them")
            data[name] = value
    return data


def from_plain(cls: type, data: Any, path: str) -> Any:
    """Build dataclass ``cls`` from nested dicts; unknown keys and wrong types name the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping, got {type(data).__name__} {data!r}")
    data = canonical_keys(cls, data, path)
    fields = [f.name for f in dataclasses.fields(cls)]
    if unknown := sorted(set(data) - set(fields) - set(getattr(cls, "MOVED", ()))):
        raise ConfigError(f"{path}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    return cls(**{name: _coerce(_field_hints(cls)[name], value, f"{path}.{name}") for name, value in data.items()})


def _coerce(hint: Any, value: Any, path: str) -> Any:
    if isinstance(hint, dataclasses.InitVar):  # a moved key (MOVED_KEYS), read as its type
        hint = hint.type
    origin, args = typing.get_origin(hint), typing.get_args(hint)
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
        raise ConfigError("; or ".join(errors))
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}={value!r} is invalid: allowed {list(_shown(args))}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        return tuple(_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
    if hint in _SCALARS:
        kinds, what = _SCALARS[hint]
        if not isinstance(value, kinds) or (isinstance(value, bool) and hint is not bool):
            raise ConfigError(f"{path}: expected {what}, got {type(value).__name__} {value!r}")
    return float(value) if hint is float else value


# the scalar field types of the configs: the values each accepts (never a bool for a number), named
_SCALARS = {bool: (bool, "true/false"), int: (int, "an integer"), float: ((int, float), "a number"),
            str: (str, "a string")}
