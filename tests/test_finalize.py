"""Finalize: pruned, packed adapters give the eval-mode outputs, save at the accounted size, reload,
export to PEFT with per-module ranks, and report."""

from __future__ import annotations

import json
import struct

import pytest
import torch

import leanlora
from conftest import randomize_adapters, randomize_gates, tiny_bert, tiny_llama, token_batch

TARGETS = ("q_proj", "v_proj", "down_proj")


def _trained_like(seed=0, factors="dense", nested=True, diag=True, precision="learned", **kw):
    """A B-LoRA adapter with random factors and random gates (as if trained): varied ranks and bits."""
    model = tiny_llama()
    cfg = leanlora.AdapterConfig(
        target_modules=TARGETS, r=6, alpha=12, factors=factors, ranks="gated", precision=precision,
        gated=leanlora.GatedConfig(nested=nested, diag=diag),
        bank=leanlora.BankConfig(num_vectors=16, vector_length=16, topk=2), **kw)
    leanlora.inject(model, cfg)
    randomize_adapters(model, seed=seed)
    randomize_gates(model, seed=seed)
    return model.eval()


def _payload_bytes(path):
    """Bytes of tensor data in a safetensors file: its size minus the 8-byte length and the JSON header."""
    with open(path, "rb") as f:
        header = struct.unpack("<Q", f.read(8))[0]
    return path.stat().st_size - 8 - header


@pytest.mark.parametrize("nested, diag", [(True, True), (True, False), (False, True)])
def test_finalized_outputs_equal_eval_mode_outputs(nested, diag):
    model = _trained_like(nested=nested, diag=diag)
    x = token_batch()
    with torch.no_grad():
        ref = model(x).logits
        ranks = [layer.ranks.active_rank() for _, layer in leanlora.adapted_layers(model)]
        leanlora.finalize(model)
        out = model(x).logits
    assert min(ranks) < 6, "the random gates should close some components"
    assert [layer.factors.rank for _, layer in leanlora.adapted_layers(model)] == ranks  # pruned for real
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for _, layer in leanlora.adapted_layers(model) for _, p in layer.adapter_parameters())


def test_saved_size_equals_accounted_bytes_and_reload_is_exact(tmp_path):
    model = _trained_like()
    leanlora.finalize(model)
    x = token_batch()
    with torch.no_grad():
        out = model(x).logits
    report = leanlora.cost_report(model)
    path = leanlora.save(model, tmp_path / "ad")
    # Counted: packed codes (ceil(n·bits/8) bytes) + one fp32 scale per quantized tensor, float
    # tensors at their element size; not counted: safetensors' 8-byte length + JSON header.
    assert _payload_bytes(path / "leanlora_adapter.safetensors") == report.total["stored_bytes"]
    meta = json.loads((path / "leanlora_config.json").read_text())
    assert meta["finalized"] is True
    for row in report.layers:
        spec = meta["modules"][row.name]["finalized"]
        assert (spec["rank"], spec["a"]["bits"], spec["b"]["bits"], spec["e"]["bits"]) == \
            (row.stored_rank, row.bits_a, row.bits_b, row.bits_e)
    fresh = leanlora.load(tiny_llama(), path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, out, rtol=0, atol=0)
    assert fresh.leanlora_shared.finalized


def test_finalized_adapter_is_much_smaller_than_its_unfinalized_save(tmp_path):
    model = _trained_like()
    leanlora.save(model, tmp_path / "raw")
    leanlora.finalize(model)
    leanlora.save(model, tmp_path / "fin")
    raw = (tmp_path / "raw" / "leanlora_adapter.safetensors").stat().st_size
    fin = (tmp_path / "fin" / "leanlora_adapter.safetensors").stat().st_size
    assert fin < raw / 3


def test_size_with_modules_to_save_and_float_factors(tmp_path):
    model = tiny_bert()
    leanlora.inject(model, leanlora.AdapterConfig(target_modules=("query", "value"), r=4, ranks="gated",
                                                  precision="float", modules_to_save=("classifier",)))
    randomize_adapters(model)
    leanlora.finalize(model.eval())
    report = leanlora.cost_report(model)
    assert report.head_bytes == (64 * 2 + 2) * 4
    path = leanlora.save(model, tmp_path / "ad")
    assert _payload_bytes(path / "leanlora_adapter.safetensors") == report.total["stored_bytes"]


@pytest.mark.parametrize("nested", [True, False])
def test_bank_factors_finalize_and_size(tmp_path, nested):
    model = _trained_like(factors="bank", nested=nested)
    x = token_batch()
    with torch.no_grad():
        ref = model(x).logits
        leanlora.finalize(model)
        torch.testing.assert_close(model(x).logits, ref, rtol=1e-5, atol=1e-5)
    report = leanlora.cost_report(model)
    path = leanlora.save(model, tmp_path / "ad", topk_only=True)  # VB-LoRA's compact form
    assert _payload_bytes(path / "leanlora_adapter.safetensors") == report.total["stored_bytes"]
    fresh = leanlora.load(tiny_llama(), path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, ref, rtol=1e-4, atol=1e-4)


def test_export_to_peft_with_per_module_ranks(tmp_path):
    peft = pytest.importorskip("peft")
    model = _trained_like(seed=3)
    leanlora.finalize(model)
    x = token_batch()
    with torch.no_grad():
        out = model(x).logits
    leanlora.export_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    ranks = {name: layer.ranks.active_rank() for name, layer in leanlora.adapted_layers(model)}
    assert config["rank_pattern"] == ranks and len(set(ranks.values())) > 1
    served = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(served(x).logits, out, rtol=1e-4, atol=1e-4)


def test_finalize_is_idempotent_and_refuses_a_merged_adapter():
    model = _trained_like()
    leanlora.merge(model)
    with pytest.raises(leanlora.MergeError, match="unmerge"):
        leanlora.finalize(model)
    leanlora.unmerge(model)
    first = leanlora.finalize(model)
    assert leanlora.finalize(model) == first
    assert float(leanlora.regularizer(model)) == 0.0  # no gates left to price


def test_report_from_a_saved_adapter_folder(tmp_path):
    model = _trained_like()
    leanlora.finalize(model)
    leanlora.save(model, tmp_path / "ad")
    paths = leanlora.write_report(tmp_path / "ad", tmp_path / "report")
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(paths["json"].read_text())
    assert saved == json.loads(json.dumps(leanlora.cost_report(model).to_dict()))
    assert "model.layers.1.mlp.down_proj" in paths["table"].read_text()


def test_report_of_an_unfinalized_adapter_predicts_the_finalized_costs(tmp_path):
    model = _trained_like(seed=1)
    leanlora.save(model, tmp_path / "ad")
    paths = leanlora.write_report(tmp_path / "ad", tmp_path / "report")
    predicted = json.loads(paths["json"].read_text())["total"]
    leanlora.finalize(model)
    final = leanlora.cost_report(model).total
    for key in ("rank", "macs", "bops", "stored_bytes"):
        assert predicted[key] == final[key]
