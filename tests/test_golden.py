"""Golden outputs of the 36 design points (written by ``tests/golden/make_goldens.py``).

* training: five steps of each point give the recorded losses, regularizer terms and saved tensors;
* files: each checked-in adapter folder (trained and finalized) loads into a fresh model and gives
  the recorded outputs.

Tolerance is fp32 round-off carried through five AdamW steps (rtol 1e-4, atol 1e-5): matmul
reductions are ordered differently on another CPU (AVX2 against AVX-512 kernels) or thread count,
and Adam's normalised update enlarges a round-off difference in a gradient near zero. A wrong
formula moves these values by orders of magnitude more.
"""

from __future__ import annotations

import json

import pytest
import torch

import leanlora
from golden import make_goldens as golden
from leanlora.artifact.io import adapter_state_dict, read_adapter_tensors

RTOL, ATOL = 1e-4, 1e-5
RECORD = json.loads(golden.LOSSES.read_text())


def _needs(point: str) -> None:
    if point.split("-")[3] == "nf4":
        pytest.importorskip("torchao")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tensors this small gain nothing from a second thread, and on a busy CPU two threads that
    wait on each other make each step many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def outputs() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(golden.OUTPUTS)


def test_every_point_is_recorded():
    assert sorted(RECORD["points"]) == sorted(golden.POINTS) and len(golden.POINTS) == 36
    assert RECORD["steps"] == golden.STEPS
    saved = {p.name for p in golden.ADAPTERS.iterdir()}
    assert saved == {f"{p}{suffix}" for p in golden.POINTS for suffix in ("", "-final")}


@pytest.mark.parametrize("point", golden.POINTS)
def test_training_matches_golden(point):
    _needs(point)
    model, losses, priors = golden.train(point)
    want = RECORD["points"][point]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(want["loss"]), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(torch.tensor(priors), torch.tensor(want["regularizer"]), rtol=RTOL, atol=ATOL)
    tensors = read_adapter_tensors(golden.ADAPTERS / point)
    state = adapter_state_dict(model)
    assert sorted(state) == sorted(tensors)
    for key, value in tensors.items():
        torch.testing.assert_close(state[key], value, rtol=RTOL, atol=ATOL, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("folder", [f"{p}{s}" for p in golden.POINTS for s in ("", "-final")])
def test_checked_in_adapter_loads(folder, outputs):
    _needs(folder)
    model = leanlora.load(golden.tiny_llama(), golden.ADAPTERS / folder)
    torch.testing.assert_close(golden.probe(model), outputs[folder], rtol=RTOL, atol=ATOL)
