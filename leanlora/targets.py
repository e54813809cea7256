"""Which modules a config names: PEFT's matching rules, so that a PEFT config's lists carry over.

* A list (``["q_proj", "attn.v_proj"]``) names modules: an entry matches a module whose full
  dotted name equals it or ends with ``"." + entry``.
* A single string is a regular expression matched against the whole dotted name
  (``r".*layers\\.[0-3]\\..*proj"``); modules it matches that are not linear layers are skipped.
* ``"all-linear"`` (any case) is every linear layer except the output layer (the model's output
  embeddings, e.g. ``lm_head``) and a classifier head (``classifier`` or ``score``).
* ``None`` (the default, in Python and in the CLI) is :data:`DEFAULT_TARGET_MODULES`: the query
  and value projections under the names the common families give them, as in LoRA (arXiv
  2106.09685) and PEFT's default.

Globs and ``re:`` prefixes are not PEFT's and are refused with the way to write them.
"""

from __future__ import annotations

import difflib
import re
import warnings
from typing import Callable

from torch import nn

from leanlora.base.dense import supported_linear
from leanlora.config import ALL_LINEAR, DEFAULT_TARGET_MODULES, TASK_HEADS, AdapterConfig


class InjectError(ValueError):
    """The model cannot be adapted as asked; the message names the module and the reason."""


FilterFn = Callable[[nn.Module, str], bool]
CLASSIFIER_HEADS = ("classifier", "score")   # attribute names of sequence-classification heads


def module_matches(spec: str | tuple[str, ...] | list[str], name: str) -> bool:
    """PEFT's rule: a string is a full-match regex; a list entry is the name or a dotted suffix of it."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in spec)


def _did_you_mean(entry: str, names: list[str]) -> str:
    """"; did you mean one of [...]?" with the module leaf names closest to ``entry``, or ""."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names if n})
    hint = difflib.get_close_matches(entry.rsplit(".", 1)[-1].strip("*.^$"), leaves, n=5, cutoff=0.5)
    return f"; did you mean one of {hint}?" if hint else ""


def all_linear_names(model: nn.Module) -> list[str]:
    """PEFT's ``all-linear``: every linear layer but the output layer and a classifier head."""
    get_output = getattr(model, "get_output_embeddings", None)
    # identity against the modules: a missing head (None) or a non-module attribute matches nothing
    heads = [get_output() if callable(get_output) else None]
    heads += [getattr(model, attr, None) for attr in CLASSIFIER_HEADS]
    skip = {n for n, m in model.named_modules() if any(m is h for h in heads)}
    return [n for n, m in model.named_modules()
            if n and supported_linear(m) and not any(n == s or n.startswith(s + ".") for s in skip)]


def resolved_targets(model: nn.Module, config: AdapterConfig) -> str | tuple[str, ...]:
    """The config's target_modules with ``None`` and ``"all-linear"`` spelled out for this model."""
    spec = config.target_modules
    names = [n for n, _ in model.named_modules() if n]
    if spec is None:
        present = tuple(e for e in DEFAULT_TARGET_MODULES if any(module_matches((e,), n) for n in names))
        if not present:
            raise InjectError(f"target_modules was not given and {type(model).__name__} has none of the default "
                              f"targets {list(DEFAULT_TARGET_MODULES)}; name them (linear layers present: "
                              f"{_linear_leaves(model)}), or pass target_modules='all-linear'")
        return present
    if spec == ALL_LINEAR:
        found = tuple(all_linear_names(model))
        if not found:
            raise InjectError(f"target_modules='all-linear': {type(model).__name__} has no linear layer besides "
                              "its output layer and classifier head")
        return found
    return spec


def _linear_leaves(model: nn.Module) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and supported_linear(m)})[:20]


def check_spec_matches(model: nn.Module, spec: str | tuple[str, ...]) -> None:
    """Every list entry, or the regex, names at least one module; else say what is near."""
    names = [n for n, _ in model.named_modules() if n]
    if isinstance(spec, str):
        if not any(module_matches(spec, n) for n in names):
            as_suffix = [n for n in names if re.search(rf"(^|\.)(?:{spec})$", n)]
            words = [w.strip() for w in spec.split(",")]
            if not as_suffix and len(words) > 1 and all(re.fullmatch(r"[\w.]+", w) for w in words):
                # `target_modules: query, value` in YAML is one string, not a list
                as_list = "[" + ", ".join(words) + "]"
                raise InjectError(f"target_modules {spec!r} is one string, which is read as a regular expression, and "
                                  f"it matches no module of {type(model).__name__}; for several names give a list: "
                                  f"{as_list} (linear layer names present: {_linear_leaves(model)})")
            raise InjectError(
                f"target_modules regex {spec!r} matches no module of {type(model).__name__}: a single string "
                "is a regular expression matched against the whole dotted name (PEFT's rule)"
                + (f"; it matches the end of {as_suffix[0]!r}, so to match by name give a list: [{spec!r}]"
                   if as_suffix else f" (linear layer names present: {_linear_leaves(model)})"))
        return
    for entry in spec:
        if not any(module_matches((entry,), n) for n in names):
            raise InjectError(
                f"target_modules entry {entry!r} matches no module of {type(model).__name__}"
                + _did_you_mean(entry, names) + f" (linear layer names present: {_linear_leaves(model)})")


def find_targets(model: nn.Module, config: AdapterConfig, filter_fn: FilterFn | None = None) -> list[str]:
    """Names of the modules the config adapts, in model order; raises InjectError with reasons."""
    spec = resolved_targets(model, config)
    check_spec_matches(model, spec)
    targets: list[str] = []
    for name, module in model.named_modules():
        if not name or not module_matches(spec, name) or module_matches(config.exclude_modules, name):
            continue
        if any(re.match(rf"(^|.*\.){re.escape(s)}($|\..*)", name) for s in config.modules_to_save):
            continue  # never adapt inside a module trained in full (PEFT's rule)
        if not supported_linear(module):
            if not isinstance(spec, str):  # a module named outright must be adaptable
                raise InjectError(
                    f"module {name!r} ({type(module).__name__}) is named by target_modules but is not a supported "
                    "layer type; leanlora adapts torch.nn.Linear and transformers Conv1D")
            continue
        if filter_fn is not None and not filter_fn(module, name):
            continue
        targets.append(name)
    if not targets:
        raise InjectError(f"target_modules {spec!r} leaves no linear layer to adapt after exclude_modules / "
                          "modules_to_save / filter_fn")
    return targets


def find_modules_to_save(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Outermost modules named by modules_to_save (name or dotted suffix, as in target_modules lists),
    and the heads of ``config.task_type`` that the model has (:data:`leanlora.config.TASK_HEADS`)."""
    names = [n for n, _ in model.named_modules() if n]
    found: list[str] = []
    for entry in config.modules_to_save:
        hits = [n for n in names if module_matches((entry,), n)]
        if not hits:
            raise InjectError(f"modules_to_save entry {entry!r} matches no module" + _did_you_mean(entry, names))
        found.extend(_outermost(hits))
    heads = TASK_HEADS.get(config.task_type or "", ())
    task_hits = [n for n in names if module_matches(heads, n)]
    if heads and not task_hits and not config.modules_to_save:
        warnings.warn(f"task_type={config.task_type!r} trains the model's head in full, but {type(model).__name__} "
                      f"has no module named {' or '.join(map(repr, heads))}; name its head in modules_to_save",
                      UserWarning, stacklevel=3)
    found.extend(_outermost(task_hits))
    return sorted(set(found))


def _outermost(hits: list[str]) -> list[str]:
    # saving "classifier" already saves "classifier.dense"
    return [h for h in hits if not any(h.startswith(f + ".") for f in hits if f != h)]


def repeated_blocks(model: nn.Module, layer_classes=None) -> list[nn.Module]:
    """The model's repeated blocks (transformer layers), outermost first, in model order.

    One rule for every caller (regional ``torch.compile``, one FSDP2 group per block): the blocks
    are the modules whose class is named in ``layer_classes``, else in any module's
    ``_no_split_modules`` (transformers' list of blocks never to split, e.g. LlamaDecoderLayer,
    BertLayer); else the members of the largest ``nn.ModuleList`` whose members share one class
    (``layers``, ``layer``, ``h`` in Llama, BERT, GPT-2). A block inside another is part of it.
    Empty when the model has none.
    """
    if layer_classes is not None:
        names = {n if isinstance(n, str) else n.__name__ for n in layer_classes}
    else:
        names = {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or ())}
    if not names:
        lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0
                 and len({type(c) for c in m}) == 1]
        if lists:
            names = {type(max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))[0]).__name__}
    found: list[nn.Module] = []
    inside: set[int] = set()  # ids of every module within a block already found
    for module in model.modules():
        if id(module) in inside or type(module).__name__ not in names:
            continue
        found.append(module)
        inside.update(id(m) for m in module.modules())
    return found
