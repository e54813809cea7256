"""Fuzz target: ``leanlora.load`` of a mutated adapter folder.

The contract: whatever the bytes of ``adapter_config.json`` and ``adapter.safetensors``, load
either succeeds (and the model then runs and unloads to the very base it was given) or raises
:class:`leanlora.AdapterLoadError` and leaves the model unchanged. Any other exception, or a
changed model, is a finding.

An input's first byte picks how it is read (:class:`InputReader` turns the rest into choices):
  0  raw: a length-prefixed JSON file and a safetensors file, as bytes (the checked-in corpus);
  1  1-3 edits of the JSON of a valid adapter (a key replaced, deleted, or set to another type),
     with or without the checksums in the tensor file;
  2  an edit of the safetensors header of a valid adapter (dtype, shape, offsets, names, metadata);
  3  bytes of a valid adapter's files overwritten in place, at the same length;
  2 and 3 also with the checksums removed, so that the checks behind them are reached too.

    python tests/fuzz/fuzz_adapter_load.py CORPUS_DIR -runs=10000   # atheris / libFuzzer
    python tests/fuzz/fuzz_adapter_load.py --write-corpus DIR        # the raw seed entries
"""

from __future__ import annotations

import atexit
import json
import math
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]  # the reader, and this checkout's leanlora
from input_reader import InputReader  # noqa: E402

try:
    import atheris
except ImportError:
    atheris = None

def _import_leanlora():
    # leanlora imports its submodules on first use: name the ones load reaches, so that they are
    # imported (and instrumented) here
    import leanlora
    import leanlora.factors.bank_storage  # noqa: F401
    import leanlora.artifact.finalize  # noqa: F401
    import leanlora.artifact.io

    return leanlora


if atheris is not None and __name__ == "__main__":
    with atheris.instrument_imports(include=["leanlora"]):
        leanlora = _import_leanlora()
else:
    leanlora = _import_leanlora()

CONFIG, WEIGHTS = leanlora.artifact.io.CONFIG_NAME, leanlora.artifact.io.WEIGHTS_NAME
PALETTE = [None, True, False, 0, -1, 1, 2, 3, 4, 99, 2 ** 63, -(2 ** 31), 1.5, math.nan, math.inf, "", "x", "float32",
           "int64", "packed", "own", "topk", [], {}, [1], [2, 2], {"bits": 4}, "0", "2"]
DTYPES = ["F32", "F16", "BF16", "I64", "I32", "U8", "BOOL", "F64", "I8", "F8_E4M3", "X", ""]


def base_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def _variants() -> dict[str, tuple[bytes, bytes]]:
    """Valid adapters of several kinds on :func:`base_model`, as (json bytes, safetensors bytes)."""
    kinds = {
        "lora": (dict(r=2), {}),
        "blora": (dict(r=4, ranks="gated", precision="learned"), {"finalize": True}),
        "nested": (dict(r=4, ranks="nested", modules_to_save=("4",)), {}),
        "bank": (dict(r=2, factors="bank", bank=leanlora.BankConfig(num_vectors=8, vector_length=8)), {"topk": True}),
    }
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (kw, how) in kinds.items():
            model = base_model()
            leanlora.inject(model, leanlora.AdapterConfig(target_modules=("0", "2"), **kw))
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.add_(torch.randn(p.shape, generator=g) * 0.1)
            if how.get("finalize"):
                leanlora.finalize(model)
            folder = Path(tmp) / name
            leanlora.save(model, folder, topk_only=how.get("topk", False))
            out[name] = ((folder / CONFIG).read_bytes(), (folder / WEIGHTS).read_bytes())
    return out


VARIANTS = _variants()
MODEL = base_model()
BASE_STATE = {k: v.clone() for k, v in MODEL.state_dict().items()}
X = torch.randn(2, 16, generator=torch.Generator().manual_seed(2))
WORK = Path(tempfile.mkdtemp(prefix="leanlora-fuzz-"))
atexit.register(shutil.rmtree, WORK, True)


def encode(config: bytes, weights: bytes) -> bytes:
    return bytes([0]) + struct.pack(">H", len(config)) + config + weights


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


def _value(r: InputReader):
    return r.pick(PALETTE) if r.byte() % 4 else r.text()


def _edit_json(r: InputReader, config: bytes) -> bytes:
    meta = json.loads(config)
    for _ in range(r.integer(1, 3)):
        paths = [p for p in _paths(meta) if p]
        path = r.pick(paths)
        parent = meta
        for k in path[:-1]:
            parent = parent[k]
        action = r.integer(0, 2)
        if action == 0 and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = _value(r)
    return json.dumps(meta).encode()


def _strip_checksums(weights: bytes) -> bytes:
    path = WORK / "strip.safetensors"
    path.write_bytes(weights)
    save_file(load_file(path), path)
    return path.read_bytes()


def _edit_header(r: InputReader, weights: bytes) -> bytes:
    n = struct.unpack("<Q", weights[:8])[0]
    header, data = json.loads(weights[8:8 + n]), weights[8 + n:]
    names = sorted(header)
    name = r.pick(names)
    entry = header[name]
    field = r.integer(0, 5)
    if name == "__metadata__" or field == 5:
        meta = header.setdefault("__metadata__", {})
        meta[r.pick(sorted(meta) or ["k"])] = r.text() if r.byte() % 2 else _value(r)
    elif field == 0:
        entry["dtype"] = r.pick(DTYPES)
    elif field == 1:
        entry["shape"] = [r.integer(0, 40) for _ in range(r.integer(0, 3))]
    elif field == 2:
        entry["data_offsets"] = [r.integer(0, len(data) + 8), r.integer(0, len(data) + 8)]
    elif field == 3:
        header[r.text() or "x"] = header.pop(name)
    else:
        del header[name]
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def _overwrite(r: InputReader, blob: bytes) -> bytes:
    buf = bytearray(blob)
    for _ in range(r.integer(1, 4)):
        buf[r.integer(0, len(buf) - 1)] = r.byte()
    return bytes(buf)


def decode(data: bytes) -> tuple[bytes, bytes]:
    r = InputReader(data)
    mode = r.byte() % 4
    if mode == 0:
        n = r.integer(0, 65535)
        config = r.raw(n)
        return config, r.raw(r.left())
    config, weights = VARIANTS[r.pick(sorted(VARIANTS))]
    if mode == 1:
        if r.byte() % 2:
            weights = _strip_checksums(weights)
        return _edit_json(r, config), weights
    if r.byte() % 2:  # as a file without checksums: the edit must be caught by the checks behind them
        weights = _strip_checksums(weights)
    if mode == 2:
        return config, _edit_header(r, weights)
    if r.byte() % 4 == 0:
        return _overwrite(r, config), weights
    return config, _overwrite(r, weights)


def test_one_input(data: bytes) -> None:
    config, weights = decode(data)
    (WORK / CONFIG).write_bytes(config)
    (WORK / WEIGHTS).write_bytes(weights)
    try:
        leanlora.load(MODEL, WORK)
    except leanlora.AdapterLoadError:
        _assert_base_unchanged("a failed load")
        return
    MODEL(X)  # an accepted adapter must run
    trained = tuple(MODEL.leanlora_shared.modules_to_save_names)  # loaded into the model by design
    leanlora.unload(MODEL)
    _assert_base_unchanged("load and unload", skip=trained)
    MODEL.load_state_dict(BASE_STATE)


def _assert_base_unchanged(after: str, skip: tuple[str, ...] = ()) -> None:
    if hasattr(MODEL, "leanlora_shared"):
        raise AssertionError(f"{after} left an adapter in the model")
    state = {k: v for k, v in MODEL.state_dict().items() if not k.startswith(tuple(f"{n}." for n in skip))}
    want = {k: v for k, v in BASE_STATE.items() if not k.startswith(tuple(f"{n}." for n in skip))}
    if state.keys() != want.keys() or not all(torch.equal(state[k], want[k]) for k in state):
        raise AssertionError(f"{after} changed the base model")


def write_corpus(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, (config, weights) in VARIANTS.items():
        (directory / f"raw-{name}").write_bytes(encode(config, weights))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write-corpus"]:
        write_corpus(Path(sys.argv[2]))
    else:
        atheris.Setup(sys.argv, test_one_input)
        atheris.Fuzz()
