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
"""

from __future__ import annotations

from typing import Any

import torch
import xxhash

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
    digests = {_name(t.dtype): _hash(t)}
    if t.dtype in _WIDE:
        for d in _ROUNDINGS:
            digests[_name(d)] = _hash(t.to(d))
    return {"dtype": _name(t.dtype), "shape": list(t.shape), DIGEST: digests}


def digest_mismatch(saved: dict[str, Any], t: torch.Tensor) -> str | None:
    """None when ``t`` is the saved tensor (up to a dtype rounding), else why not, in words."""
    if t.is_meta:
        return "not materialised here (a meta tensor), so it cannot be compared"
    if list(t.shape) != list(saved["shape"]):
        return f"shape {list(t.shape)} here, {saved['shape']} when the adapter was saved"
    have, want = _name(t.dtype), saved["dtype"]
    recorded = saved[DIGEST]
    if have in recorded:
        key, value = have, t
    elif t.dtype in _WIDE and want in recorded and want in {_name(d) for d in _ROUNDINGS}:
        key, value = want, t.to(getattr(torch, want))
    else:
        return f"dtype {have} here, {want} when the adapter was saved (no common rounding to compare)"
    if _hash(value) != recorded[key]:
        return f"different {key} values: a different checkpoint, or changed weights"
    return None


def record_layer_digest(layer, weight: torch.Tensor | None = None) -> dict[str, Any] | None:
    """The digest of an adapted layer's base (weight and bias), computed once and kept on the layer.

    The base is frozen, so one pass per run suffices. Building an NF4 or FP8 base (:mod:`leanlora.build`,
    :func:`leanlora.base.nf4.quantize_bases`) and
    :meth:`AdaptedLinear.merge` call this before they change the base, so what is recorded is
    always the plain weight the model was given.
    """
    cached = getattr(layer, "base_digest", None)
    if cached is not None:
        return cached
    base = layer.base
    if weight is None:
        from leanlora.base.dense import DenseBase

        if getattr(layer, "merged", False):  # W0 + ΔW now: W0 is the kept copy, or unknown
            weight = getattr(layer, "_unmerge_copy", None)
            if weight is None:
                return None
        else:
            weight = base.weight if isinstance(base, DenseBase) else base.dense_weight()
    holder = getattr(base, "layer", base)  # DenseBase / Bnb4Base hold the module; NF4Base keeps the bias
    bias = getattr(holder, "bias", None)
    record = {"weight": tensor_digest(weight), "bias": None if bias is None else tensor_digest(bias)}
    if record["weight"] is None:
        return None  # deferred init: record when the weights exist
    layer.base_digest = record
    return record


# --- legacy probes (adapters saved before digests) ------------------------------------------

PROBE_SIZE = 16
# NF4 keeps ~2 significant bits per value, bf16 ~3 digits; unrelated weights differ by ~100%.
PROBE_RTOL = 0.2


def weight_probe(weight: torch.Tensor) -> list[float]:
    """PROBE_SIZE values of the (out, in) weight at evenly spaced flat positions, as Python floats."""
    if weight.is_meta:
        return []
    flat = weight.detach().reshape(-1)
    idx = torch.linspace(0, flat.numel() - 1, steps=min(PROBE_SIZE, flat.numel())).round().long().to(flat.device)
    return [float(v) for v in flat[idx].float().cpu()]


def probes_match(a: list[float], b: list[float]) -> bool:
    if len(a) != len(b):
        return False
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    scale = max(float(ta.norm()), float(tb.norm()), 1e-12)
    return float((ta - tb).norm()) <= PROBE_RTOL * scale
