"""Fuzz target: the run config's command-line overrides (``section.key=value``).

The contract: ``load_run_config(None, overrides)`` returns a RunConfig or raises ConfigError,
for any list of strings. Any other exception is a finding.

An input's first byte picks how it is read:
  0  raw: the rest is UTF-8 text (undecodable bytes kept as surrogates, as in ``sys.argv``),
     one override per line;
  1  1-3 overrides built from a real dotted key (or near one) and a YAML value from a palette
     of wrong types, boundaries and odd text (or free text).

    python tests/fuzz/fuzz_overrides.py CORPUS_DIR -runs=10000   # atheris / libFuzzer
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import yaml  # noqa: F401  (imported before instrumentation: only leanlora is instrumented)

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]  # the reader, and this checkout's leanlora
from input_reader import InputReader  # noqa: E402

try:
    import atheris
except ImportError:
    atheris = None

if atheris is not None and __name__ == "__main__":
    with atheris.instrument_imports(include=["leanlora"]):
        from leanlora.config import ConfigError
        from leanlora.train.runconfig import RunConfig, load_run_config
else:
    from leanlora.config import ConfigError
    from leanlora.train.runconfig import RunConfig, load_run_config

VALUES = ["", "0", "-1", "1", "8", "1e309", "-1e309", ".nan", ".inf", "-.inf", "2e-4", "true", "null", "~", "[]", "{}",
          "[1, 2]", "[a, b]", "{a: 1}", "'x'", '"', "[", "{", "!!python/object:os.system", "&a [*a]", "0x10", "1_000",
          "9" * 40, "auto", "cpu", "cuda:1", "nf4", "gated", "learned", "bank", "fixed", "{question}", "- a\n- b"]


def _keys(obj, prefix=""):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _keys(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


KEYS = sorted(_keys(RunConfig())) + ["adapter", "train", "adapter.bank", "model.x", "x.y", "adapter.quant.bits.z"]


def decode(data: bytes) -> list[str]:
    r = InputReader(data)
    if r.byte() % 2 == 0:
        return r.raw(r.left()).decode("utf-8", errors="surrogateescape").split("\n")[:8]
    out = []
    for _ in range(r.integer(1, 3)):
        key = r.pick(KEYS)
        value = r.pick(VALUES) if r.byte() % 4 else r.text()
        out.append(f"{key}={value}")
    return out


def test_one_input(data: bytes) -> None:
    try:
        load_run_config(None, decode(data))
    except ConfigError:
        pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
