"""Save and load adapters: ``leanlora_config.json`` + ``leanlora_adapter.safetensors``, never pickle.

The names are leanlora's own so that no PEFT loader takes a leanlora folder for a PEFT adapter
(PEFT reads ``adapter_config.json``; :mod:`leanlora.export` writes that for PEFT). Folders
written under the earlier names (``adapter_config.json`` in leanlora's schema +
``adapter.safetensors``) still load.

A load is checked before anything is changed: the JSON parses and has a known format version,
the tensor file opens and holds every tensor the adapter needs with the right shape, and the
base model is the one the adapter was trained on (architecture, shapes and a weight probe).
Only then is the model injected; any later failure unloads it again, so a failed load leaves
the model as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from leanlora.base.dense import linear_shape
from leanlora.config import AdapterConfig, ConfigError
from leanlora.identity import probes_match, weight_probe
from leanlora.inject import SHARED_ATTR, adapted_layers, inject, shared_state, unload

FORMAT = "leanlora-adapter"
FORMAT_VERSION = 1
CONFIG_NAME = "leanlora_config.json"
WEIGHTS_NAME = "leanlora_adapter.safetensors"
LEGACY_CONFIG_NAME = "adapter_config.json"   # leanlora's earlier names, still read
LEGACY_WEIGHTS_NAME = "adapter.safetensors"


class AdapterLoadError(RuntimeError):
    """The adapter files cannot be loaded onto this model; the message says which file and why."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# --- what an adapter consists of ------------------------------------------------------------


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the adapter: adapted layers (base excluded), shared state, modules_to_save."""
    shared = shared_state(model)
    state: dict[str, torch.Tensor] = {}
    for name, layer in adapted_layers(model):
        for key, value in layer.state_dict(prefix=f"{name}.").items():
            if not key.startswith(f"{name}.base."):
                state[key] = value
    for key, value in shared.state_dict(prefix=f"{SHARED_ATTR}.").items():
        state[key] = value
    modules = dict(model.named_modules())
    for name in shared.modules_to_save_names:
        state.update(modules[name].state_dict(prefix=f"{name}."))
    return state


def base_identity(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    archs = getattr(config, "architectures", None) or [type(model).__name__]
    return {
        "architecture": archs[0],
        "model_type": getattr(config, "model_type", None),
        "name_or_path": getattr(config, "_name_or_path", None) or None,
    }


def save(model: nn.Module, directory: str | os.PathLike, *, topk_only: bool = False) -> Path:
    """Write the adapter of ``model`` to ``directory`` atomically and return the folder.

    ``topk_only`` (VB-LoRA only) stores the bank plus top-k indices and k-1 weights per sub-vector
    instead of the logits (:mod:`leanlora.factors.bank_storage`); such an adapter reloads with the
    same outputs, for inference, or for training with ``load(..., trainable=True)``.
    """
    directory = Path(directory)
    shared = shared_state(model)
    state = adapter_state_dict(model)
    if topk_only:
        from leanlora.factors.bank_storage import pack_state

        state = pack_state(model, state)
    modules: dict[str, Any] = {}
    for name, layer in adapted_layers(model):
        modules[name] = {
            "in_features": layer.in_features,
            "out_features": layer.out_features,
            "rank": layer.factors.rank,
            "probe": layer.base_probe,
        }
        if shared.finalized:  # packed layout and bits of each factor, to rebuild it on load
            from leanlora.finalize import layer_spec

            modules[name]["finalized"] = layer_spec(layer)
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "adapter": shared.config.to_dict(),
        "base_model": base_identity(model),
        "modules": modules,
        "modules_to_save": list(shared.modules_to_save_names),
        "finalized": bool(shared.finalized),
    }
    if shared.config.factors == "bank":
        meta["bank_storage"] = "topk" if topk_only else "logits"
    atomic_save_tensors(state, directory / WEIGHTS_NAME, metadata={"format": FORMAT})
    atomic_write_bytes(directory / CONFIG_NAME, json.dumps(meta, indent=2).encode())
    return directory


def adapter_files(directory: str | os.PathLike) -> tuple[Path, Path]:
    """(config, tensors) paths of the leanlora adapter in ``directory``: today's names, else the
    earlier ones when ``adapter_config.json`` is in leanlora's schema. A PEFT adapter is named as such."""
    directory = Path(directory)
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
    path, _ = adapter_files(directory)
    if not path.is_file():
        raise AdapterLoadError(f"{path}: not found (an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterLoadError(f"{path}: not valid JSON ({err}); the file is truncated or corrupted") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise AdapterLoadError(f"{path}: not a leanlora adapter config (format={meta.get('format')!r} "
                               f"where {FORMAT!r} was expected)" if isinstance(meta, dict) else f"{path}: not a mapping")
    if meta.get("version") != FORMAT_VERSION:
        raise AdapterLoadError(f"{path}: format version {meta.get('version')!r} is not supported by this leanlora "
                               f"(supports {FORMAT_VERSION})")
    try:
        config = AdapterConfig.from_dict(meta["adapter"])
    except (ConfigError, KeyError, TypeError) as err:
        raise AdapterLoadError(f"{path}: invalid adapter section: {err}") from None
    return config, meta


def read_adapter_tensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    _, path = adapter_files(directory)
    if not path.is_file():
        raise AdapterLoadError(f"{path}: not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterLoadError(f"{path}: cannot be read ({err}); the file is truncated or corrupted") from None


def verify_base(model: nn.Module, meta: dict[str, Any], directory: Path) -> None:
    """Refuse a base model other than the one the adapter was trained on."""
    want = meta.get("base_model", {}).get("architecture")
    have = base_identity(model)["architecture"]
    if want and want != have:
        raise AdapterLoadError(f"{directory}: adapter was trained on a {want}, this model is a {have} "
                               "(pass check_base=False to load anyway)")
    modules = dict(model.named_modules())
    for name, info in meta.get("modules", {}).items():
        module = modules.get(name)
        if module is None:
            raise AdapterLoadError(f"{directory}: adapted module {name!r} does not exist in this {have}")
        try:
            shape = linear_shape(module)
        except AttributeError:
            raise AdapterLoadError(f"{directory}: module {name!r} is a {type(module).__name__}, not a linear layer") from None
        if shape != (info["in_features"], info["out_features"]):
            raise AdapterLoadError(f"{directory}: module {name!r} is {shape[0]}->{shape[1]} here but "
                                   f"{info['in_features']}->{info['out_features']} in the adapter")
        probe = info.get("probe")
        if probe is not None and not probes_match(probe, weight_probe(_dense_weight(module))):
            raise AdapterLoadError(f"{directory}: the weights of {name!r} differ from the base the adapter was "
                                   "trained on (a different checkpoint?); pass check_base=False to load anyway")


def _dense_weight(module: nn.Module) -> torch.Tensor:
    from leanlora.base.bnb4 import Bnb4Base, is_linear4bit
    from leanlora.base.dense import is_conv1d

    if is_linear4bit(module):  # packed 4-bit codes: compare the dequantized weight
        return Bnb4Base(module).dense_weight()
    return module.weight.T if is_conv1d(module) else module.weight


def load(model: nn.Module, directory: str | os.PathLike, *, check_base: bool = True,
         trainable: bool = False, quantize_base: bool = True) -> nn.Module:
    """Inject the adapter saved in ``directory`` into ``model`` and load its tensors.

    Raises :class:`AdapterLoadError` naming the file and problem; the model is unchanged then.
    ``trainable=False`` leaves every parameter frozen (inference). ``quantize_base=False`` keeps
    the base dense even for an NF4 adapter (the cost report loads onto a weightless skeleton).
    """
    directory = Path(directory)
    if hasattr(model, SHARED_ATTR):
        raise AdapterLoadError(f"{type(model).__name__} already holds a leanlora adapter; unload it first")
    config, meta = read_adapter_config(directory)
    tensors = read_adapter_tensors(directory)
    if check_base:
        verify_base(model, meta, directory)
    targets = sorted(meta.get("modules", {}))
    inject(model, config, filter_fn=lambda _m, name: name in set(targets), quantize_base=False)
    try:
        tensors = _unpack_bank(model, meta, tensors, directory, trainable)
        _restore_tensors(model, meta, tensors, directory)
        shared_state(model).finalized = bool(meta.get("finalized", False))
    except BaseException:
        unload(model)
        raise
    if config.base == "nf4" and quantize_base:
        from leanlora.base.nf4 import quantize_bases

        quantize_bases(model, config.nf4)
    if not trainable:
        for p in model.parameters():
            p.requires_grad_(False)
    return model


def _unpack_bank(model: nn.Module, meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                 directory: Path, trainable: bool) -> dict[str, torch.Tensor]:
    """Rebuild VB-LoRA logits from a top-k-only save (``"bank_storage": "topk"``)."""
    layout = meta.get("bank_storage", "logits")
    if layout not in ("logits", "topk"):
        raise AdapterLoadError(f"{directory / CONFIG_NAME}: bank_storage={layout!r} is not supported "
                               "(allowed: 'logits', 'topk')")
    if layout == "logits":
        return tensors
    from leanlora.factors.bank_storage import unpack_state

    try:
        return unpack_state(model, tensors, trainable=trainable)
    except ValueError as err:
        raise AdapterLoadError(f"{directory / WEIGHTS_NAME}: {err}") from None


def _restore_tensors(model: nn.Module, meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                     directory: Path) -> None:
    layers = dict(adapted_layers(model))
    missing_modules = sorted(set(meta["modules"]) - set(layers))
    if missing_modules:
        raise AdapterLoadError(f"{directory}: modules {missing_modules} could not be adapted in this model")
    for name, info in meta["modules"].items():
        layer = layers[name]
        if "finalized" in info:  # packed codes and frozen quantizers: lay out that structure first
            from leanlora.finalize import rebuild_finalized_

            rebuild_finalized_(layer, info["finalized"])
        elif info["rank"] != layer.factors.rank:
            layer.prune_(info["rank"])
    expected = adapter_state_dict(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise AdapterLoadError(f"{directory / WEIGHTS_NAME}: missing tensor(s) {missing[:8]}"
                               + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    if unexpected:
        raise AdapterLoadError(f"{directory / WEIGHTS_NAME}: unexpected tensor(s) {unexpected[:8]} "
                               "(saved with a different adapter configuration?)")
    for key, want in expected.items():
        got = tensors[key]
        if tuple(got.shape) != tuple(want.shape):
            raise AdapterLoadError(f"{directory / WEIGHTS_NAME}: tensor {key!r} has shape {tuple(got.shape)}, "
                                   f"the model expects {tuple(want.shape)}")
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
    differ = [f for f, v in config.to_dict().items() if shared.config.to_dict().get(f) != v]
    if differ:
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
    tensors = _unpack_bank(model, meta, read_adapter_tensors(directory), directory, trainable=True)
    _restore_tensors(model, meta, tensors, directory)
    return model
