"""Save and load adapters: ``leanlora_config.json`` + ``leanlora_adapter.safetensors``, never pickle.

The names are leanlora's own so that no PEFT loader takes a leanlora folder for a PEFT adapter
(PEFT reads ``adapter_config.json``; :mod:`leanlora.export` writes that for PEFT). Folders
written under the earlier names (``adapter_config.json`` in leanlora's schema +
``adapter.safetensors``) still load.

A load is checked before anything is changed: the JSON parses, has a known format version and
every key it needs with a valid value (:mod:`leanlora.artifact.schema`); the tensor file opens
and matches the sha256 it carries, and the JSON matches the config checksum the tensor file
carries (:mod:`leanlora.artifact.checksum`); the base model is the one the adapter was saved with
(:mod:`leanlora.artifact.identity`); and every tensor has the shape and kind the model expects and
finite values. Only then is the model injected; any later failure unloads it again, so a failed
load leaves the model as it was. Files written before checksums existed still load.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leanlora.artifact.errors import AdapterError, AdapterLoadError, AdapterSaveError, BaseMismatchError
from leanlora.artifact.schema import check_adapter_meta
from leanlora.artifact.atomic import atomic_folder, atomic_save_tensors, atomic_write_bytes
from leanlora.artifact.identity import (base_identity, check_architecture, check_module_shapes, keep_verified_digests,
                                        record_base_digests, verify_base)
from leanlora.artifact.checksum import CONFIG_CHECKSUM_KEY, config_sha256, read_verified
from leanlora.artifact.finalize import layer_spec, rebuild_finalized_
from leanlora.config import AdapterConfig, ConfigError, MovedKeyWarning
from leanlora.artifact.finite import first_nonfinite
from leanlora.factors.bank_storage import pack_state, unpack_state
from leanlora.inject import SHARED_ATTR, InjectError, adapted_layers, adapter_state_dict, inject, shared_state, unload

FORMAT = "leanlora-adapter"
FORMAT_VERSION = 1
# The adapter folder's file names: change them here only.
CONFIG_NAME = "leanlora_config.json"
WEIGHTS_NAME = "leanlora_adapter.safetensors"
LEGACY_CONFIG_NAME = "adapter_config.json"   # leanlora's earlier names, still read
LEGACY_WEIGHTS_NAME = "adapter.safetensors"

__all__ = ["AdapterError", "AdapterLoadError", "AdapterSaveError", "BaseMismatchError", "atomic_save_tensors",
           "atomic_write_bytes", "load", "save", "read_adapter_config", "read_adapter_tensors"]


# --- what an adapter consists of ------------------------------------------------------------


def save(model: nn.Module, directory: str | os.PathLike, *, topk_only: bool = False) -> Path:
    """Write the adapter of ``model`` to ``directory`` atomically and return the folder.

    The folder is built next to ``directory`` and renamed into place, so a kill leaves the old
    folder or the new one, never half of one. A NaN/inf tensor is refused (nothing is written).
    ``topk_only`` (VB-LoRA only) stores the bank plus top-k indices and k-1 weights per sub-vector
    instead of the logits (:mod:`leanlora.factors.bank_storage`); such an adapter reloads with the
    same outputs, for inference, or for training with ``load(..., trainable=True)``.
    """
    directory = Path(directory)
    state = adapter_state_dict(model)
    if topk_only:
        state = pack_state(model, state)
    if (bad := first_nonfinite(state.items())) is not None:
        raise AdapterSaveError(f"{directory}: not written: adapter tensor {bad[0]!r} holds {bad[1]} "
                               "(the training diverged; save an earlier, finite state)")
    meta = adapter_meta(model, topk_only)
    metadata = {"format": FORMAT, CONFIG_CHECKSUM_KEY: config_sha256(meta)}
    with atomic_folder(directory, owned=(CONFIG_NAME, WEIGHTS_NAME)) as tmp:
        atomic_save_tensors(state, tmp / WEIGHTS_NAME, metadata=metadata)
        atomic_write_bytes(tmp / CONFIG_NAME, json.dumps(meta, indent=2).encode())
    return directory


def adapter_meta(model: nn.Module, topk_only: bool = False) -> dict[str, Any]:
    """What ``adapter_config.json`` records: config, modules (shapes, ranks, base digests), layout."""
    shared = shared_state(model)
    layer_digests, other_digests = record_base_digests(model)
    # a finalized adapter also records each layer's packed layout and bits, to rebuild it on load
    modules = {name: {"in_features": layer.in_features, "out_features": layer.out_features,
                      "rank": layer.factors.rank, "digest": layer_digests[name],
                      **({"finalized": layer_spec(layer)} if shared.finalized else {})}
               for name, layer in adapted_layers(model)}
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "adapter": shared.config.to_dict(),
            "base_model": {**base_identity(model), "digests": other_digests}, "modules": modules,
            "modules_to_save": list(shared.modules_to_save_names), "finalized": bool(shared.finalized)}
    if shared.config.factors == "bank":
        meta["bank_storage"] = "topk" if topk_only else "logits"
    return meta


RUN_ADAPTER = "adapter"  # the adapter folder inside a run folder of ``leanlora train --out``


def adapter_files(directory: str | os.PathLike) -> tuple[Path, Path]:
    """(config, tensors) paths of the leanlora adapter in ``directory``: today's names, else the
    earlier ones when ``adapter_config.json`` is in leanlora's schema. A PEFT adapter is named as such.
    A run folder of ``leanlora train`` (no adapter files, an ``adapter/`` folder with them) means its
    adapter, as the command line reads it."""
    directory = Path(directory)
    names = (CONFIG_NAME, LEGACY_CONFIG_NAME)
    if not any((directory / n).is_file() for n in names) and any((directory / RUN_ADAPTER / n).is_file() for n in names):
        directory = directory / RUN_ADAPTER
    if (directory / CONFIG_NAME).is_file() or not (directory / LEGACY_CONFIG_NAME).is_file():
        return directory / CONFIG_NAME, directory / WEIGHTS_NAME
    legacy = directory / LEGACY_CONFIG_NAME
    try:
        peft_type = json.loads(legacy.read_text()).get("peft_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        peft_type = None  # not readable as a PEFT config: read_adapter_config says what is wrong
    if peft_type is not None:
        raise AdapterLoadError(f"{legacy}: a PEFT {peft_type} adapter, not a leanlora one (it has no {CONFIG_NAME}); "
                               "load it with peft.PeftModel.from_pretrained")
    return legacy, directory / LEGACY_WEIGHTS_NAME


def read_adapter_config(directory: str | os.PathLike) -> tuple[AdapterConfig, dict[str, Any]]:
    """(config, the whole JSON) of an adapter folder, every key checked (:mod:`leanlora.artifact.schema`)."""
    path, _ = adapter_files(directory)
    if not path.is_file():
        raise AdapterLoadError(f"{path}: not found (an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise AdapterLoadError(f"{path}: not valid JSON ({err}); the file is truncated or corrupted") from None
    if not isinstance(meta, dict):
        raise AdapterLoadError(f"{path}: not a mapping")
    if meta.get("format") != FORMAT:
        raise AdapterLoadError(f"{path}: not a leanlora adapter config (format={meta.get('format')!r} "
                               f"where {FORMAT!r} was expected)")
    if meta.get("version") != FORMAT_VERSION or isinstance(meta.get("version"), bool):
        raise AdapterLoadError(f"{path}: format version {meta.get('version')!r} is not supported by this leanlora "
                               f"(supports {FORMAT_VERSION})")
    if "adapter" not in meta:
        raise AdapterLoadError(f"{path}: adapter: missing (the file is incomplete or was edited)")
    try:
        # a file of an earlier version spells moved keys the old way
        with warnings.catch_warnings(action="ignore", category=MovedKeyWarning):
            config = AdapterConfig.from_dict(meta["adapter"])
    except (ConfigError, KeyError, TypeError, ValueError, AttributeError, RecursionError) as err:
        raise AdapterLoadError(f"{path}: invalid adapter section: {err}") from None
    check_adapter_meta(meta, config, str(path))
    return config, meta


def read_adapter_tensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of an adapter folder, their sha256 checked when the file carries one."""
    return read_checked_tensors(adapter_files(directory)[1])[0]


def read_checked_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; refuses it when its stored sha256 does not match."""
    return read_verified(path, lambda why: AdapterLoadError(f"{path}: {why}"), missing="not found",
                         unreadable="cannot be read ({}); the file is truncated or corrupted",
                         changed="the tensors do not match the sha256 stored in the file; the file was changed "
                                 "or corrupted after it was written")


def load(model: nn.Module, directory: str | os.PathLike, *, check_base: bool = True,
         trainable: bool = False, quantize_base: bool = True) -> nn.Module:
    """Inject the adapter saved in ``directory`` into ``model`` and load its tensors.

    Raises :class:`AdapterLoadError` naming the file and problem; the model is unchanged then.
    ``check_base=False`` skips the base digests (:class:`BaseMismatchError`), nothing else.
    ``trainable=False`` leaves every parameter frozen (inference). ``quantize_base=False`` keeps
    the base dense even for an NF4 or FP8 adapter (the cost report loads onto a weightless skeleton).
    """
    directory = adapter_files(directory)[0].parent  # a run folder: its adapter/
    if hasattr(model, SHARED_ATTR):
        raise AdapterLoadError(f"{type(model).__name__} already holds a leanlora adapter; unload it first")
    config, meta = read_adapter_config(directory)
    config_path, weights_path = adapter_files(directory)
    tensors, metadata = read_checked_tensors(weights_path)
    if metadata.get(CONFIG_CHECKSUM_KEY) not in (None, config_sha256(meta)):  # absent in files written before it
        raise AdapterLoadError(f"{config_path}: edited after the adapter was saved (its rank, scale, module or "
                               f"layout entries no longer match the checksum in {weights_path.name}); "
                               "restore the file as it was written")
    if check_base:
        check_architecture(model, meta, directory)
    check_module_shapes(model, meta, directory)
    matched = verify_base(model, meta, directory) if check_base else {}
    if (bad := first_nonfinite(tensors.items())) is not None:
        raise AdapterLoadError(f"{weights_path}: tensor {bad[0]!r} holds {bad[1]}; "
                               "an adapter's values must be finite")
    try:
        inject(model, config, filter_fn=lambda _m, name: name in meta["modules"], quantize_base=False)
    except (InjectError, ConfigError) as err:
        raise AdapterLoadError(f"{directory}: the adapter's config does not apply to this model: {err}") from None
    try:
        _restore_tensors(model, meta, tensors, weights_path, trainable)
        shared_state(model).finalized = bool(meta.get("finalized", False))
        keep_verified_digests(model, matched)
    except BaseException:
        unload(model)
        raise
    if config.base == "nf4" and quantize_base:
        from leanlora.base.nf4 import quantize_bases

        quantize_bases(model, config.nf4)
    if config.base == "fp8" and quantize_base:
        from leanlora.base.fp8 import quantize_bases_fp8

        quantize_bases_fp8(model, config.fp8)
    if not trainable:
        model.requires_grad_(False)
    return model


def _module_of(key: str, modules: dict[str, Any]) -> str:
    owner = max((n for n in modules if key.startswith(n + ".")), key=len, default=None)
    if owner is None:
        return ""
    info = modules[owner]
    return (f" (the adapter config's modules[{owner!r}]: rank {info['rank']}, "
            f"{info['in_features']}->{info['out_features']})")


def _restore_tensors(model: nn.Module, meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                     path: Path, trainable: bool) -> None:
    """Copy the tensors read from ``path`` into the injected adapter, checking each first."""
    if meta.get("bank_storage", "logits") == "topk":  # rebuild the VB-LoRA logits from a top-k-only save
        try:
            tensors = unpack_state(model, tensors, trainable=trainable)
        except (ValueError, KeyError, IndexError, RuntimeError) as err:
            raise AdapterLoadError(f"{path}: {err}") from None
    layers = dict(adapted_layers(model))
    if missing_modules := sorted(set(meta["modules"]) - set(layers)):
        raise AdapterLoadError(f"{path.parent}: modules {missing_modules} could not be adapted in this model")
    for name, info in meta["modules"].items():
        layer = layers[name]
        if "finalized" in info:  # packed codes and frozen quantizers: lay out that structure first
            rebuild_finalized_(layer, info["finalized"])
        elif info["rank"] != layer.factors.rank:
            layer.prune_(info["rank"])
    expected = adapter_state_dict(model)
    if missing := sorted(set(expected) - set(tensors)):
        raise AdapterLoadError(f"{path}: missing tensor(s) {missing[:8]}"
                               + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    if unexpected := sorted(set(tensors) - set(expected)):
        raise AdapterLoadError(f"{path}: unexpected tensor(s) {unexpected[:8]} "
                               "(saved with a different adapter configuration?)")
    for key, want in expected.items():
        got = tensors[key]
        if tuple(got.shape) != tuple(want.shape):
            raise AdapterLoadError(f"{path}: tensor {key!r} has shape {tuple(got.shape)}, the model expects "
                                   f"{tuple(want.shape)}{_module_of(key, meta['modules'])}")
        floating = want.is_floating_point()
        if got.dtype != want.dtype and not (floating and got.is_floating_point()):  # any float for a float
            kind = "a floating-point tensor" if floating else f"dtype {want.dtype}"
            raise AdapterLoadError(f"{path}: tensor {key!r} is {got.dtype}; {kind} was expected")
    with torch.no_grad():
        for key, want in expected.items():
            want.copy_(tensors[key].to(want.dtype))


def restore(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Copy the adapter tensors saved in ``directory`` into the adapter ``model`` already holds.

    For training checkpoints of the same run (resume, best-model reload): nothing is injected or
    pruned, so optimizer state keyed by these parameters stays valid. The saved adapter config must
    equal the model's, field by field, and every tensor must be there with its shape; otherwise
    :class:`AdapterLoadError` names the file and the difference, and the model is unchanged.
    """
    directory = Path(directory)
    config, meta = read_adapter_config(directory)
    shared = shared_state(model)
    if differ := [f for f, v in config.to_dict().items() if shared.config.to_dict().get(f) != v]:
        raise AdapterLoadError(f"{directory / CONFIG_NAME}: adapter config differs from the model's in {differ} "
                               "(a checkpoint of another run?)")
    if bool(meta.get("finalized", False)) != bool(shared.finalized):
        raise AdapterLoadError(f"{directory}: finalized={meta.get('finalized')} but the model's adapter has "
                               f"finalized={shared.finalized}; a training checkpoint restores onto the same stage")
    layers = dict(adapted_layers(model))
    for name, info in meta.get("modules", {}).items():
        if name in layers and info.get("rank") != layers[name].factors.rank:
            raise AdapterLoadError(f"{directory}: module {name!r} has rank {info.get('rank')} in the checkpoint, "
                                   f"{layers[name].factors.rank} in the model")
    path = adapter_files(directory)[1]
    _restore_tensors(model, meta, read_checked_tensors(path)[0], path, trainable=True)
    return model
