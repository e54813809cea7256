"""leanlora's own file names: PEFT never takes a leanlora folder for its own, and folders written
under the earlier names (adapter_config.json in leanlora's schema) still load."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import leanlora
from conftest import randomize_adapters, tiny_llama, token_batch

FIXTURES = Path(__file__).parent / "fixtures"
LEGACY = FIXTURES / "legacy_adapter"   # written by leanlora.save before the rename (q/v_proj, r=4)


def test_folder_with_earlier_names_loads_to_the_outputs_it_was_saved_with(tmp_path):
    assert sorted(p.name for p in LEGACY.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    want = load_file(FIXTURES / "legacy_adapter_logits.safetensors")["logits"]
    model = leanlora.load(tiny_llama(), LEGACY)
    got = model(token_batch()).logits
    # recorded on another CPU: its matmul kernels may order sums differently (fp32 round-off)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # saved again, it takes today's names and loads to the same outputs
    leanlora.save(model, tmp_path / "again")
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == [
        "leanlora_adapter.safetensors", "leanlora_config.json"]
    again = leanlora.load(tiny_llama(), tmp_path / "again")
    torch.testing.assert_close(again(token_batch()).logits, got, rtol=0, atol=0)


def test_today_names_win_over_earlier_ones_in_one_folder(tmp_path):
    folder = tmp_path / "both"
    shutil.copytree(LEGACY, folder)
    model = tiny_llama()
    leanlora.inject(model, leanlora.AdapterConfig(target_modules=("k_proj",), r=2))
    randomize_adapters(model, seed=3)
    out = model(token_batch()).logits
    leanlora.save(model, folder)
    torch.testing.assert_close(leanlora.load(tiny_llama(), folder)(token_batch()).logits, out, rtol=0, atol=0)


def test_peft_does_not_take_a_leanlora_folder_for_its_own(tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    leanlora.inject(model, leanlora.AdapterConfig(target_modules=("q_proj",), r=2))
    leanlora.save(model, tmp_path / "ad")
    with pytest.raises(Exception) as info:  # PEFT looks for adapter_config.json and finds none
        peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ad")
    assert not isinstance(info.value, KeyError)
    assert "adapter_config.json" in str(info.value)


def test_leanlora_load_names_a_peft_folder_as_such(tmp_path):
    pytest.importorskip("peft")
    model = tiny_llama()
    leanlora.inject(model, leanlora.AdapterConfig(target_modules=("q_proj",), r=2))
    leanlora.export_peft(model, tmp_path / "peft")
    with pytest.raises(leanlora.AdapterLoadError, match=r"adapter_config.json: a PEFT LORA adapter, not a leanlora "
                                                        r"one.*PeftModel.from_pretrained"):
        leanlora.load(tiny_llama(), tmp_path / "peft")


def test_a_run_folder_loads_its_adapter(tmp_path):
    """``leanlora.load(model, "runs/a")`` after ``leanlora train --out runs/a``: the run's adapter/, as
    the command line reads a run folder; messages name that folder."""
    model = tiny_llama()
    leanlora.inject(model, leanlora.AdapterConfig(target_modules=("q_proj",), r=2))
    randomize_adapters(model, seed=1)
    leanlora.save(model, tmp_path / "run" / "adapter")
    (tmp_path / "run" / "metrics.json").write_text("{}")
    got = leanlora.load(tiny_llama(), tmp_path / "run")
    torch.testing.assert_close(got(token_batch()).logits, model(token_batch()).logits, rtol=0, atol=0)
    with pytest.raises(leanlora.BaseMismatchError, match=r"run/adapter: adapter was trained on a"):
        leanlora.load(torch.nn.Sequential(torch.nn.Linear(4, 4)), tmp_path / "run")
    with pytest.raises(leanlora.AdapterLoadError, match=r"empty/leanlora_config.json: not found"):
        leanlora.load(tiny_llama(), tmp_path / "empty")
