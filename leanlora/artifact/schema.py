"""Check the structure of ``adapter_config.json`` before anything acts on it.

Every key load reads is checked here for presence, type and range, and a failure names the key
by its path in the file (``modules['q_proj'].rank``), so a tampered or truncated file gives an
:class:`AdapterLoadError` and never a ``KeyError`` or ``TypeError`` from deeper down.
"""

from __future__ import annotations

from typing import Any

from leanlora.artifact.errors import AdapterLoadError
from leanlora.config import AdapterConfig
from leanlora.artifact.identity import DIGEST
from leanlora.artifact.packing import PACK_BITS

_DTYPES = {"float32", "float64", "float16", "bfloat16", "int8", "uint8", "int16", "int32", "int64", "bool",
           "float8_e4m3fn", "float8_e5m2"}
_MAX_BITS = 32


class _Checker:
    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, key: str, problem: str) -> None:
        raise AdapterLoadError(f"{self.where}: {key}: {problem}")

    def get(self, node: dict, key: str, path: str) -> Any:
        """``node[key]``, a required key; ``path`` is the prefix naming ``node`` in messages."""
        if key not in node:
            self.fail(f"{path}{key}", "missing (the file is incomplete or was edited)")
        return node[key]

    def mapping(self, value: Any, path: str) -> dict:
        if not isinstance(value, dict):
            self.fail(path, f"expected a mapping, got {type(value).__name__} {_short(value)}")
        return value

    def valid(self, ok: bool, value: Any, path: str, expected: str) -> Any:
        """``value`` when ``ok``; else fail, naming ``path`` and what was ``expected`` there."""
        if not ok:
            self.fail(path, f"{_short(value)} is invalid; expected {expected}")
        return value

    def integer(self, value: Any, path: str, lo: int, hi: int | None = None) -> int:
        ok = type(value) is int and value >= lo and (hi is None or value <= hi)
        return self.valid(ok, value, path, f"an integer >= {lo}" if hi is None else f"an integer in {lo}..{hi}")

    def flag(self, value: Any, path: str) -> bool:
        return self.valid(type(value) is bool, value, path, "true or false")

    def string(self, value: Any, path: str, allowed: tuple[str, ...] | set[str] | None = None) -> str:
        ok = isinstance(value, str) and (allowed is None or value in allowed)
        return self.valid(ok, value, path, "a string" if allowed is None else f"one of {sorted(allowed)}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_adapter_meta(meta: dict[str, Any], config: AdapterConfig, where: str) -> None:
    """Raise AdapterLoadError naming the first key of ``meta`` that load could not use."""
    c = _Checker(where)
    modules = c.mapping(c.get(meta, "modules", ""), "modules")
    if not modules:
        c.fail("modules", "empty; an adapter adapts at least one module")
    finalized = c.flag(meta.get("finalized", False), "finalized")
    for name, info in modules.items():
        _check_module(c, name, info, config, finalized)
    saved = meta.get("modules_to_save") or []
    c.valid(isinstance(saved, list) and all(isinstance(n, str) for n in saved), saved, "modules_to_save",
            "a list of module names")
    if "bank_storage" in meta:
        c.string(meta["bank_storage"], "bank_storage", ("logits", "topk"))
    base = c.mapping(meta.get("base_model", {}), "base_model")
    if base.get("architecture") is not None:
        c.string(base["architecture"], "base_model.architecture")
    digests = c.mapping(base.get("digests", {}), "base_model.digests")
    for name, record in digests.items():
        _check_digest(c, record, f"base_model.digests[{name!r}]", nullable=True)


def _check_module(c: _Checker, name: str, info: Any, config: AdapterConfig, finalized: bool) -> None:
    path = f"modules[{name!r}]"
    info = c.mapping(info, path)
    for key, most in (("in_features", None), ("out_features", None), ("rank", config.r)):
        c.integer(c.get(info, key, path + "."), f"{path}.{key}", 1, most)
    probe = info.get("probe")
    numbers = isinstance(probe, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in probe)
    c.valid(probe is None or numbers, probe, f"{path}.probe", "a list of numbers")
    digest = info.get("digest")
    if digest is not None:
        digest = c.mapping(digest, f"{path}.digest")
        _check_digest(c, c.get(digest, "weight", f"{path}.digest."), f"{path}.digest.weight", nullable=False)
        _check_digest(c, digest.get("bias"), f"{path}.digest.bias", nullable=True)
    spec = info.get("finalized")
    if finalized != (spec is not None):
        c.fail(f"{path}.finalized", "present although the adapter is not finalized" if spec is not None
               else "missing although the adapter is finalized (top-level \"finalized\": true)")
    if spec is not None:
        _check_finalized(c, c.mapping(spec, f"{path}.finalized"), f"{path}.finalized", config, info["rank"])


def _check_finalized(c: _Checker, spec: dict, path: str, config: AdapterConfig, rank: int) -> None:
    k = c.integer(c.get(spec, "rank", path + "."), f"{path}.rank", 1, config.r)
    if k != rank:
        c.fail(f"{path}.rank", f"{k} differs from the module's rank {rank}")
    c.integer(spec.get("effective_rank", k), f"{path}.effective_rank", 0, k)
    kind = c.string(c.get(spec, "factors", path + "."), f"{path}.factors", ("packed", "own"))
    want = "packed" if config.factors == "dense" else "own"
    if kind != want:
        c.fail(f"{path}.factors", f"{kind!r} does not fit factors={config.factors!r} (expected {want!r})")
    for part in ("a", "b"):
        _check_quant(c, c.get(spec, part, path + "."), f"{path}.{part}", packed=kind == "packed")
    if spec.get("e") is not None:
        _check_quant(c, spec["e"], f"{path}.e", packed=True, scale=False)
    c.flag(spec.get("mask", False), f"{path}.mask")


def _check_quant(c: _Checker, q: Any, path: str, packed: bool, scale: bool = True) -> None:
    q = c.mapping(q, path)
    bits = c.integer(c.get(q, "bits", path + "."), f"{path}.bits", 1, _MAX_BITS)
    quantized = c.flag(c.get(q, "quantized", path + "."), f"{path}.quantized")
    if scale:
        c.flag(c.get(q, "scale", path + "."), f"{path}.scale")
    if packed and quantized and bits not in PACK_BITS:
        c.fail(f"{path}.bits", f"{bits} cannot be stored packed; allowed {list(PACK_BITS)}")


def _check_digest(c: _Checker, record: Any, path: str, nullable: bool) -> None:
    if record is None and nullable:
        return
    record = c.mapping(record, path)
    dtype = c.string(c.get(record, "dtype", path + "."), f"{path}.dtype", _DTYPES)
    shape = c.get(record, "shape", path + ".")
    c.valid(isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape), shape, f"{path}.shape",
            "a list of sizes")
    digests = c.mapping(c.get(record, DIGEST, path + "."), f"{path}.{DIGEST}")
    for key, value in digests.items():
        c.string(key, f"{path}.{DIGEST} key", _DTYPES)
        c.string(value, f"{path}.{DIGEST}[{key!r}]")
    if dtype not in digests:
        c.fail(f"{path}.{DIGEST}", f"holds no digest of the tensor's own dtype {dtype!r}")
