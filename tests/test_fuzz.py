"""Bounded fuzzing runs of the adapter loader and the run config's override parser.

Each target runs under atheris (libFuzzer, coverage-guided) for a fixed number of inputs from
the checked-in seed corpus and a fixed seed, in a subprocess (libFuzzer ends its process). Where
atheris is not installed, the stdlib mutation fuzzer runs the same targets in-process. Longer
runs: ``python tests/fuzz/fuzz_adapter_load.py OUT_DIR tests/fuzz/corpus/adapter_load -runs=N``.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).parent / "fuzz"
RUNS = {"fuzz_adapter_load": (600, "adapter_load"), "fuzz_overrides": (3000, "overrides")}


@pytest.mark.parametrize("target", sorted(RUNS))
def test_seed_corpus_passes(target):
    sys.path.insert(0, str(FUZZ))
    try:
        module = __import__(target)
    finally:
        sys.path.remove(str(FUZZ))
    for entry in sorted((FUZZ / "corpus" / RUNS[target][1]).iterdir()):
        module.test_one_input(entry.read_bytes())


@pytest.mark.parametrize("target", sorted(RUNS))
def test_bounded_fuzzing_finds_nothing(target, tmp_path):
    runs, corpus = RUNS[target]
    seeds = FUZZ / "corpus" / corpus
    if importlib.util.find_spec("atheris") is None:
        sys.path.insert(0, str(FUZZ))
        try:
            import stdlib_fuzzer

            module = __import__(target)
        finally:
            sys.path.remove(str(FUZZ))
        stdlib_fuzzer.run(module.test_one_input, seeds, runs, seed=1)
        return
    # libFuzzer adds new inputs to the first folder: a scratch one, the checked-in seeds stay put
    cmd = [sys.executable, str(FUZZ / f"{target}.py"), str(tmp_path), str(seeds), f"-runs={runs}", "-seed=1",
           f"-artifact_prefix={tmp_path}/", "-max_len=8192", "-print_final_stats=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{target} found a failing input:\n{proc.stderr[-4000:]}"
    assert f"Done {runs} runs" in proc.stderr
