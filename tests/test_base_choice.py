"""adapter.base=auto and nf4.gemm=auto: float8 GEMMs exactly where they pay (a GPU with float8
tensor cores, layers at least FP8_MIN_WIDTH wide), the exact base everywhere else, and the
saved adapter records what was chosen."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import leanlora
from conftest import tiny_llama
from leanlora.base import choice
from leanlora.config import NF4Config
from leanlora.base.choice import FP8_MIN_WIDTH, float8_note, float8_pays, resolve_auto_base
from leanlora.inject import shared_state

WIDE = FP8_MIN_WIDTH


@pytest.fixture
def float8_gpu(monkeypatch):
    """The weights' device counts as one with float8 tensor cores (the choice reads nothing else of it)."""
    monkeypatch.setattr(choice, "fp8_gemm_available", lambda device: True)


def _targets(*shapes):
    return {f"m{i}": nn.Linear(i_f, o_f, bias=False) for i, (i_f, o_f) in enumerate(shapes)}


def test_the_defaults_are_auto():
    config = leanlora.AdapterConfig()
    assert config.base == "auto" and config.nf4.gemm == "auto"


def test_on_a_device_without_float8_gemms_auto_is_the_exact_base():
    config = resolve_auto_base(leanlora.AdapterConfig(), _targets((WIDE, WIDE), (WIDE, 4 * WIDE)))
    assert config.base == "dense" and config.nf4.gemm == "dequant"


@pytest.mark.parametrize("shapes,fp8", [
    (((WIDE, WIDE), (WIDE, WIDE // 4), (4 * WIDE, WIDE)), True),   # a 1B-class decoder block
    (((WIDE // 2, WIDE // 2), (WIDE // 2, 2 * WIDE)), False),      # narrower: the quantization does not pay
    (((WIDE, WIDE), (WIDE, WIDE + 8)), False),                     # a shape torch._scaled_mm cannot take
    ((), False),
])
def test_float8_where_the_gpu_has_it_and_the_layers_are_wide(float8_gpu, shapes, fp8):
    assert float8_pays(_targets(*shapes)) is fp8
    config = resolve_auto_base(leanlora.AdapterConfig(), _targets(*shapes))
    assert (config.base, config.nf4.gemm) == (("fp8", "fp8") if fp8 else ("dense", "dequant"))


def test_a_choice_the_user_made_is_kept(float8_gpu):
    wide = _targets((WIDE, WIDE))
    for base in ("dense", "fp8", "nf4"):
        assert resolve_auto_base(leanlora.AdapterConfig(base=base), wide).base == base
    nf4 = resolve_auto_base(leanlora.AdapterConfig(base="nf4"), wide)
    assert nf4.nf4.gemm == "fp8"  # only what was left to auto is chosen
    kept = leanlora.AdapterConfig(base="nf4", nf4=NF4Config(gemm="dequant"))
    assert resolve_auto_base(kept, wide).nf4.gemm == "dequant"


def test_inject_records_the_choice_and_the_saved_adapter_holds_it(tmp_path):
    model = leanlora.inject(tiny_llama(), leanlora.AdapterConfig(target_modules=("q_proj", "v_proj"), r=4))
    assert shared_state(model).config.base == "dense" and shared_state(model).config.nf4.gemm == "dequant"
    leanlora.save(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "leanlora_config.json").read_text())["adapter"]
    assert saved["base"] == "dense" and saved["nf4"]["gemm"] == "dequant"


def test_the_log_says_when_auto_chose_float8():
    auto, fp8 = leanlora.AdapterConfig(), leanlora.AdapterConfig(base="fp8")
    assert "adapter.base=auto: the frozen base is float8" in float8_note(auto, fp8)
    assert float8_note(fp8, fp8) is None and float8_note(auto, leanlora.AdapterConfig(base="dense")) is None
    nf4_auto = leanlora.AdapterConfig(base="nf4")
    nf4_fp8 = leanlora.AdapterConfig(base="nf4", nf4=NF4Config(gemm="fp8"))
    assert "adapter.nf4.gemm=auto: the 4-bit base runs its GEMMs in float8" in float8_note(nf4_auto, nf4_fp8)


def test_an_auto_value_of_the_wrong_kind_is_refused_by_name():
    with pytest.raises(ValueError, match="base='float8' is invalid: allowed: 'auto', 'dense', 'nf4', 'fp8'"):
        leanlora.AdapterConfig(base="float8")
    with pytest.raises(ValueError, match="nf4.gemm='bf16' is invalid: allowed: 'auto', 'dequant', 'fp8'"):
        NF4Config(gemm="bf16")


def test_a_model_whose_weights_sit_on_two_devices_keeps_the_exact_base(float8_gpu):
    targets = _targets((WIDE, WIDE), (WIDE, WIDE))
    targets["m1"].to(torch.device("meta"))
    assert not float8_pays(targets)

