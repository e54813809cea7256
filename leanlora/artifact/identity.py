"""Digests of the frozen base, to refuse loading an adapter onto a model it was not trained on.

Every base tensor (each adapted layer's weight and bias, and every other parameter and
persistent buffer) is hashed whole with xxh3-128 over its raw bytes: any change of any value is
caught, and hashing runs at memory speed rather than a cryptographic hash's (the threat is a
wrong checkpoint, not an adversary; the adapter file itself carries a sha256).

Raw bytes alone would call a float32 model and its bfloat16 copy different models. So a
float32 (or float64) tensor also records the digests of its bfloat16 and float16 roundings,
and two tensors are compared at the lower precision of the two: a bf16 or fp16 copy of the
saved base, and an fp32 upcast of a bf16/fp16 saved base, both match exactly. Anything else
(bf16 against fp16, a different shape) does not match.

Adapters saved before digests existed carry a probe instead (a few values at fixed positions);
:func:`probes_match` still checks those, with a tolerance.

At save, each adapted layer's frozen weight and bias are recorded under ``modules[NAME].digest``,
and every other parameter and persistent buffer of the model (embeddings, norms, the layers not
adapted) under ``base_model.digests``, because an adapter applied to a base whose other weights
changed computes something else just as surely. The adapter's own tensors and its
``modules_to_save`` are excluded: the adapter file carries those. The base is frozen, so both
are computed once per model (at its first save, or before something replaces the plain weights:
NF4 quantization, merge, FSDP2 sharding) and kept. At load, :func:`verify_base` refuses another base.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import xxhash
from torch import nn

from leanlora.artifact.errors import AdapterLoadError, BaseMismatchError
from leanlora.base.dense import DenseBase, is_conv1d, linear_shape
from leanlora.inject import SHARED_ATTR, adapted_layers, shared_state

DIGEST = "xxh3_128"
_ROUNDINGS = (torch.bfloat16, torch.float16)
_WIDE = (torch.float32, torch.float64)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _hash(t: torch.Tensor) -> str:
    flat = t.detach().contiguous().reshape(-1).cpu()
    return xxhash.xxh3_128(memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else b"").hexdigest()


def tensor_digest(t: torch.Tensor) -> dict[str, Any] | None:
    """{"dtype", "shape", DIGEST: {dtype name: hex}} of ``t``; None for a meta (unmaterialised) tensor."""
    if t.is_meta:
        return None
    dtypes = (t.dtype, *_ROUNDINGS) if t.dtype in _WIDE else (t.dtype,)
    digests = {_name(d): _hash(t.to(d)) for d in dtypes}
    return {"dtype": _name(t.dtype), "shape": list(t.shape), DIGEST: digests}


def digest_mismatch(saved: dict[str, Any], t: torch.Tensor) -> str | None:
    """None when ``t`` is the saved tensor (up to a dtype rounding), else why not, in words."""
    if t.is_meta:
        return "not materialised here (a meta tensor), so it cannot be compared"
    if list(t.shape) != list(saved["shape"]):
        return f"shape {list(t.shape)} here, {saved['shape']} when the adapter was saved"
    have, want, recorded = _name(t.dtype), saved["dtype"], saved[DIGEST]
    if have in recorded:
        key, value = have, t
    elif t.dtype in _WIDE and want in recorded and want in {_name(d) for d in _ROUNDINGS}:
        key, value = want, t.to(getattr(torch, want))
    else:
        return f"dtype {have} here, {want} when the adapter was saved (no common rounding to compare)"
    if _hash(value) != recorded[key]:
        return f"different {key} values: a different checkpoint, or changed weights"
    return None


def record_layer_digest(layer) -> dict[str, Any] | None:
    """The digest of an adapted layer's base (weight and bias), computed once and kept on the layer.

    The base is frozen, so one pass per run suffices. Building an NF4 or FP8 base (:mod:`leanlora.build`,
    :func:`leanlora.base.nf4.quantize_bases`) and
    :meth:`AdaptedLinear.merge` call this before they change the base, so what is recorded is
    always the plain weight the model was given.
    """
    if getattr(layer, "base_digest", None) is not None:
        return layer.base_digest
    base = layer.base
    if getattr(layer, "merged", False):  # W0 + ΔW now: W0 is the kept copy, or unknown
        weight = getattr(layer, "_unmerge_copy", None)
    else:
        weight = base.weight if isinstance(base, DenseBase) else base.dense_weight()
    # None: merged without a kept copy, or deferred init (meta weights): record when the weights exist
    if weight is None or weight.is_meta:
        return None
    holder = getattr(base, "layer", base)  # DenseBase / Bnb4Base hold the module; NF4Base keeps the bias
    bias = getattr(holder, "bias", None)
    layer.base_digest = {"weight": tensor_digest(weight), "bias": None if bias is None else tensor_digest(bias)}
    return layer.base_digest


# --- legacy probes (adapters saved before digests) ------------------------------------------

PROBE_SIZE = 16
# NF4 keeps ~2 significant bits per value, bf16 ~3 digits; unrelated weights differ by ~100%.
PROBE_RTOL = 0.2


def weight_probe(module: nn.Module) -> list[float]:
    """PROBE_SIZE values of the module's (out, in) weight at evenly spaced flat positions, as Python floats."""
    weight = _module_weight(module)
    if weight.is_meta:
        return []
    flat = (weight.T if is_conv1d(module) else weight).detach().reshape(-1)
    idx = torch.linspace(0, flat.numel() - 1, steps=min(PROBE_SIZE, flat.numel())).round().long().to(flat.device)
    return [float(v) for v in flat[idx].float().cpu()]


def probes_match(a: list[float], b: list[float]) -> bool:
    if len(a) != len(b):
        return False
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    scale = max(float(ta.norm()), float(tb.norm()), 1e-12)
    return float((ta - tb).norm()) <= PROBE_RTOL * scale


# --- recording at save, checking at load ------------------------------------------------------


def base_identity(model: nn.Module) -> dict[str, Any]:
    """What ``adapter_config.json`` records of the base model under ``base_model``."""
    config = getattr(model, "config", None)
    archs = getattr(config, "architectures", None) or [type(model).__name__]
    return {"architecture": archs[0], "model_type": getattr(config, "model_type", None),
            "name_or_path": getattr(config, "_name_or_path", None) or None}


def other_base_tensors(model: nn.Module, skip: list[str]) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers of ``model`` outside the modules named in ``skip``."""
    return {k: t for k, t in model.state_dict(keep_vars=True).items()
            if not any(k == p or k.startswith(p + ".") for p in skip)}


def digest_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """name -> :func:`tensor_digest`; a tensor tied under several names is hashed once."""
    seen = {id(t): t for t in tensors.values()}  # one tensor per identity, in first-seen order
    digests = {key: tensor_digest(t) for key, t in seen.items()}
    return {key: digests[id(t)] for key, t in tensors.items()}


def record_base_digests(model: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """({adapted module: digest}, {other base tensor: digest}) of an injected model, cached."""
    shared = shared_state(model)
    layers = {name: record_layer_digest(layer) for name, layer in adapted_layers(model)}
    others = getattr(shared, "base_digests", None)
    if others is None:
        skip = [*layers, SHARED_ATTR, *shared.modules_to_save_names]
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
    for name, info in meta["modules"].items():
        module = modules.get(name)
        if module is None:
            raise AdapterLoadError(f"{directory}: adapted module {name!r} does not exist in this "
                                   f"{type(model).__name__}")
        try:
            shape = linear_shape(module)
        except AttributeError:
            raise AdapterLoadError(f"{directory}: module {name!r} is a {type(module).__name__}, "
                                   "not a linear layer") from None
        if shape != (info["in_features"], info["out_features"]):
            raise AdapterLoadError(f"{directory}: module {name!r} is {shape[0]}->{shape[1]} here but "
                                   f"{info['in_features']}->{info['out_features']} in the adapter")


def check_architecture(model: nn.Module, meta: dict[str, Any], directory: Path) -> None:
    want, have = meta.get("base_model", {}).get("architecture"), base_identity(model)["architecture"]
    if want and want != have:
        raise BaseMismatchError(f"{directory}: adapter was trained on a {want}, this model is a {have}")


def verify_base(model: nn.Module, meta: dict[str, Any], directory: Path) -> dict[str, Any]:
    """Refuse a base other than the one the adapter was saved with; returns the matched module digests.

    Raises :class:`BaseMismatchError` naming the first tensor that differs and how. The caller
    checks the architecture first (:func:`check_architecture`).
    """
    matched = {}
    for name, info in meta["modules"].items():
        module = model.get_submodule(name)  # exists: check_module_shapes ran first
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
        elif probe is not None and not probes_match(probe, weight_probe(module)):
            raise BaseMismatchError(f"{directory}: the weights of {name!r} differ from the base the adapter "
                                    "was trained on (a different checkpoint?)")
    _verify_others(model, meta, directory)
    return matched


def keep_verified_digests(model: nn.Module, matched: dict[str, Any]) -> None:
    """Give each injected layer the digest :func:`verify_base` just matched (same dtype), instead of
    hashing the base again at the next save."""
    for name, layer in adapted_layers(model):
        record = matched.get(name)
        if (record is not None and isinstance(layer.base, DenseBase)
                and record["weight"]["dtype"] == _name(layer.base.weight.dtype)):
            layer.base_digest = record


def _compare(directory: Path, what: str, saved: dict[str, Any], tensor: torch.Tensor) -> None:
    reason = digest_mismatch(saved, tensor)
    if reason is not None:
        raise BaseMismatchError(f"{directory}: the {what} differs from the base the adapter was trained on ({reason})")


def _verify_others(model: nn.Module, meta: dict[str, Any], directory: Path) -> None:
    saved = meta.get("base_model", {}).get("digests")
    if saved is None:  # an adapter saved before whole-base digests
        return
    here = other_base_tensors(model, [*meta["modules"], *(meta.get("modules_to_save") or [])])
    missing, extra = sorted(set(saved) - set(here)), sorted(set(here) - set(saved))
    if missing or extra:
        detail = " and ".join(([f"lacks {missing[:4]}"] if missing else [])
                              + ([f"has {extra[:4]} which the saved base did not"] if extra else []))
        raise BaseMismatchError(f"{directory}: this model's base tensors differ from the saved base's: it {detail}")
    for key, record in saved.items():
        if record is not None:
            _compare(directory, f"base tensor {key!r}", record, here[key])
