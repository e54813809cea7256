"""Checksums that make a changed adapter file detectable on load.

``tensors_sha256`` covers every tensor's name, dtype, shape and bytes in sorted name order, so
overwriting bytes in place, at the same length, changes it; it is stored in the safetensors
metadata under ``CHECKSUM_KEY``. ``config_sha256`` covers the parts of ``adapter_config.json``
that decide the adapter's outputs (rank, alpha, module list, finalized layout); the tensor file
carries it under ``CONFIG_CHECKSUM_KEY``, so an edit of the JSON (say ``r``, which sets the
alpha/r scale) is refused instead of silently changing the outputs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import torch

CHECKSUM_KEY = "leanlora.sha256"
CONFIG_CHECKSUM_KEY = "leanlora.config_sha256"


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        header = json.dumps([name, str(t.dtype).removeprefix("torch."), list(t.shape)])
        h.update(len(header).to_bytes(8, "little") + header.encode())
        data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        h.update(len(data).to_bytes(8, "little"))
        h.update(memoryview(data))
    return h.hexdigest()


def config_sha256(meta: dict[str, Any]) -> str:
    """sha256 of the output-deciding sections of an adapter config, in canonical JSON.

    ``meta`` is one :func:`leanlora.artifact.io.adapter_meta` wrote or
    :func:`leanlora.artifact.schema.check_adapter_meta` checked.
    """
    part = {key: meta.get(key) for key in ("adapter", "modules_to_save", "finalized", "bank_storage")}
    keys = ("in_features", "out_features", "rank", "finalized")
    part["modules"] = {name: {k: v for k, v in info.items() if k in keys} for name, info in meta["modules"].items()}
    text = json.dumps(part, sort_keys=True, separators=(",", ":"), allow_nan=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


def read_verified(path: Path, error: Callable[[str], Exception], *, missing: str, unreadable: str,
                  changed: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of the safetensors file ``path`` (safetensors' own parser: no code runs from
    the file), its tensors checked against the sha256 it carries. A file that is absent, cannot be
    parsed (``unreadable`` is formatted with the parser's error) or was changed raises ``error(why)``."""
    from safetensors import safe_open

    if not path.is_file():
        raise error(missing)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # safetensors raises its own error, OSError, or a bare Exception on bad headers
        raise error(unreadable.format(err)) from None
    if (stored := metadata.get(CHECKSUM_KEY)) is not None and stored != tensors_sha256(tensors):
        raise error(changed)
    return tensors, metadata
