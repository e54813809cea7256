"""Record the base model's digests at save, and refuse another base at load.

What is recorded (see :mod:`leanlora.artifact.identity` for the digest itself):

* each adapted layer's frozen weight and bias, under ``modules[NAME].digest``;
* every other parameter and persistent buffer of the model (embeddings, norms, the layers not
  adapted), under ``base_model.digests``, because an adapter applied to a base whose other
  weights changed computes something else just as surely. The adapter's own tensors and its
  ``modules_to_save`` are excluded: the adapter file carries those.

The base is frozen, so both are computed once per model (at its first save, or before
something replaces the plain weights: NF4 quantization, merge, FSDP2 sharding) and kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from leanlora.artifact.errors import AdapterLoadError, BaseMismatchError
from leanlora.base.dense import linear_shape
from leanlora.artifact.identity import digest_mismatch, probes_match, record_layer_digest, tensor_digest, weight_probe
from leanlora.inject import SHARED_ATTR, adapted_layers, shared_state


def _outside(key: str, prefixes: list[str]) -> bool:
    return not any(key == p or key.startswith(p + ".") for p in prefixes)


def other_base_tensors(model: nn.Module, skip: list[str]) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers of ``model`` outside the modules named in ``skip``."""
    return {k: t for k, t in model.state_dict(keep_vars=True).items() if _outside(k, skip)}


def digest_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """name -> :func:`tensor_digest`; a tensor tied under several names is hashed once."""
    seen: dict[int, Any] = {}
    out = {}
    for key, t in tensors.items():
        if id(t) not in seen:
            seen[id(t)] = tensor_digest(t)
        out[key] = seen[id(t)]
    return out


def record_base_digests(model: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """({adapted module: digest}, {other base tensor: digest}) of an injected model, cached."""
    shared = shared_state(model)
    layers = {name: record_layer_digest(layer) for name, layer in adapted_layers(model)}
    others = getattr(shared, "base_digests", None)
    if others is None:
        skip = [n for n in layers] + [SHARED_ATTR] + list(shared.modules_to_save_names)
        others = digest_tensors(other_base_tensors(model, skip))
        if all(r is not None for r in others.values()):  # deferred init: try again at the next save
            shared.base_digests = others
    return layers, others


def _module_weight(module: nn.Module) -> torch.Tensor:
    from leanlora.base.bnb4 import Bnb4Base, is_linear4bit

    if is_linear4bit(module):  # packed 4-bit codes: the dequantized weight, as recorded at save
        return Bnb4Base(module).dense_weight()
    return module.weight


def check_module_shapes(model: nn.Module, meta: dict[str, Any], directory: Path) -> None:
    """Every adapted module exists here, is linear, and has the shape the adapter was built for."""
    modules = dict(model.named_modules())
    have = type(model).__name__
    for name, info in meta["modules"].items():
        module = modules.get(name)
        if module is None:
            raise AdapterLoadError(f"{directory}: adapted module {name!r} does not exist in this {have}")
        try:
            shape = linear_shape(module)
        except AttributeError:
            raise AdapterLoadError(f"{directory}: module {name!r} is a {type(module).__name__}, "
                                   "not a linear layer") from None
        if shape != (info["in_features"], info["out_features"]):
            raise AdapterLoadError(f"{directory}: module {name!r} is {shape[0]}->{shape[1]} here but "
                                   f"{info['in_features']}->{info['out_features']} in the adapter")


def check_architecture(model: nn.Module, meta: dict[str, Any], directory: Path) -> None:
    want = meta.get("base_model", {}).get("architecture")
    config = getattr(model, "config", None)
    have = (getattr(config, "architectures", None) or [type(model).__name__])[0]
    if want and want != have:
        raise BaseMismatchError(f"{directory}: adapter was trained on a {want}, this model is a {have}")


def verify_base(model: nn.Module, meta: dict[str, Any], directory: Path) -> dict[str, Any]:
    """Refuse a base other than the one the adapter was saved with; returns the matched module digests.

    Raises :class:`BaseMismatchError` naming the first tensor that differs and how.
    """
    check_architecture(model, meta, directory)
    modules = dict(model.named_modules())
    matched = {}
    for name, info in meta["modules"].items():
        module = modules[name]
        digest, probe = info.get("digest"), info.get("probe")
        if digest is not None:
            _compare(directory, f"weight of adapted layer {name!r}", digest["weight"], _module_weight(module))
            bias = getattr(module, "bias", None)
            if (digest.get("bias") is None) != (bias is None):
                raise BaseMismatchError(f"{directory}: adapted layer {name!r} "
                                        f"{'has no' if bias is None else 'has a'} bias here, unlike the saved base")
            if bias is not None:
                _compare(directory, f"bias of adapted layer {name!r}", digest["bias"], bias)
            matched[name] = digest
        elif probe is not None and not probes_match(probe, weight_probe(_dense(module))):
            raise BaseMismatchError(f"{directory}: the weights of {name!r} differ from the base the adapter "
                                    "was trained on (a different checkpoint?)")
    _verify_others(model, meta, directory)
    return matched


def _dense(module: nn.Module) -> torch.Tensor:
    from leanlora.base.dense import is_conv1d

    w = _module_weight(module)
    return w.T if is_conv1d(module) else w


def _compare(directory: Path, what: str, saved: dict[str, Any], tensor: torch.Tensor) -> None:
    reason = digest_mismatch(saved, tensor)
    if reason is not None:
        raise BaseMismatchError(f"{directory}: the {what} differs from the base the adapter was trained on ({reason})")


def _verify_others(model: nn.Module, meta: dict[str, Any], directory: Path) -> None:
    saved = meta.get("base_model", {}).get("digests")
    if saved is None:  # an adapter saved before whole-base digests
        return
    skip = list(meta["modules"]) + list(meta.get("modules_to_save") or [])
    here = other_base_tensors(model, skip)
    missing, extra = sorted(set(saved) - set(here)), sorted(set(here) - set(saved))
    if missing or extra:
        detail = (f"lacks {missing[:4]}" if missing else "") + (" and " if missing and extra else "") + \
                 (f"has {extra[:4]} which the saved base did not" if extra else "")
        raise BaseMismatchError(f"{directory}: this model's base tensors differ from the saved base's: it {detail}")
    for key, record in saved.items():
        if record is not None:
            _compare(directory, f"base tensor {key!r}", record, here[key])
