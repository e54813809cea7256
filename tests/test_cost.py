"""Cost accounting: closed forms for LoRA and B-LoRA layers, and every strategy combination."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

import leanlora
from conftest import randomize_adapters, tiny_llama

OPEN, CLOSED = 8.0, -8.0
GRID = list(itertools.product(("dense", "bank"), ("fixed", "nested", "gated"),
                              ("float", "fixed", "learned"), ("dense", "nf4")))


def _config(factors="dense", ranks="fixed", precision="float", base="dense", **kw):
    return leanlora.AdapterConfig(
        target_modules=("q_proj", "v_proj"), r=4, alpha=8, factors=factors, ranks=ranks, precision=precision,
        base=base, bank=leanlora.BankConfig(num_vectors=16, vector_length=16, topk=2),
        nf4=leanlora.NF4Config(block_size=32, scaler_block_size=32), **kw)


def test_plain_lora_closed_form():
    model = leanlora.inject(tiny_llama(), _config())
    rep = leanlora.cost_report(model)
    assert [r.name for r in rep.layers] == [f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")]
    for row in rep.layers:
        macs = (row.in_features + row.out_features) * 4       # q: 64 -> 64, v: 64 -> 32 (2 kv heads)
        assert (row.rank, row.bits_a, row.bits_b, row.bits_e) == (4, 32, 32, None)
        assert row.macs == row.lora_macs == macs == row.params == row.lora_params
        assert row.bops == macs * 32 * 16 and row.lora_bops == macs * 16 * 16 and row.fp32_bops == macs * 32 * 32
        assert row.stored_bytes == 4 * macs == row.fp32_bytes and row.lora_bytes == 2 * macs
    t = rep.total
    assert t["macs"] == 2 * (128 + 96) * 4 and t["bops_vs_lora"] == pytest.approx(2.0) and t["bops_vs_fp32"] == 0.5


def test_gated_learned_closed_form():
    # AdaLoRA's diagonal E, so that its bits are priced too
    model = leanlora.inject(tiny_llama(), _config(ranks="gated", precision="learned",
                                                  gated=leanlora.GatedConfig(diag=True)))
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.ranks.log_alpha.copy_(torch.tensor([OPEN, CLOSED, OPEN]))          # rank 2
        layer.quant_a.log_alpha.copy_(torch.tensor([OPEN, CLOSED, OPEN, OPEN]))  # 4 bits
        layer.quant_b.log_alpha.copy_(torch.tensor([CLOSED, OPEN, OPEN, OPEN]))  # 2 bits
        layer.ranks.quant_e.log_alpha.copy_(torch.tensor([OPEN, OPEN, CLOSED, OPEN]))  # 8 bits
    row = leanlora.cost_report(model).layers[0]
    assert (row.rank, row.stored_rank, row.bits_a, row.bits_b, row.bits_e) == (2, 2, 4, 2, 8)
    assert row.macs == 64 * 2 + 2 + 2 * 64
    assert row.bops == 16 * (64 * 2 * 4 + 2 * 8 + 2 * 64 * 2)
    # packed codes + one fp32 scale per tensor: A 128 values at 4 bits, B 128 at 2, E 2 at 8
    assert row.stored_bytes == (64 + 4) + (32 + 4) + (2 + 4)
    # trainable: A, B, E, 3 rank gates, and 4 bit gates + 1 scale for each of A, B, E
    assert row.params == 4 * 64 * 2 + 4 + 3 + 3 * 5


def test_bop_prior_uses_layer_macs():
    cfg = _config(ranks="gated", precision="learned", prior=leanlora.PriorConfig(reg_type="bop"))
    model = leanlora.inject(tiny_llama(), cfg)
    q_a = model.model.layers[0].self_attn.q_proj.quant_a
    v_b = model.model.layers[0].self_attn.v_proj.quant_b
    assert model.leanlora_shared.prior_scale.value == (64 + 64) * 4      # largest layer: q_proj
    assert (q_a.macs, v_b.macs) == (64 * 4, 32 * 4)
    assert float(q_a.prior().detach()) > float(v_b.prior().detach()) > 0


@pytest.mark.parametrize("factors, ranks, precision, base", GRID, ids=["-".join(c) for c in GRID])
def test_every_combination_reports_and_finalize_keeps_the_numbers(factors, ranks, precision, base):
    if base == "nf4":
        pytest.importorskip("torchao")
    model = leanlora.inject(tiny_llama(), _config(factors, ranks, precision, base))
    randomize_adapters(model)
    model.eval()
    before = leanlora.cost_report(model)
    json.loads(json.dumps(before.to_dict()))
    table = before.format_table()
    assert all(r.name[-39:] in table for r in before.layers) and "of LoRA-16" in table
    leanlora.finalize(model)
    after = leanlora.cost_report(model)
    keys = ("rank", "stored_rank", "bits_a", "bits_b", "bits_e", "macs", "bops", "stored_bytes")
    for b, a in zip(before.layers, after.layers):
        assert {k: getattr(b, k) for k in keys} == {k: getattr(a, k) for k in keys}, b.name
        if factors == "dense":  # packed buffers; bank factors keep their logits (their own compact form)
            assert a.params == 0
    assert after.total["stored_bytes"] == before.total["stored_bytes"]


def test_cost_table_cuts_long_module_names_at_the_front_and_marks_the_cut():
    from leanlora.reports.cost import _fit

    long = "bert.encoder.layer.0.attention.self.query.extra"
    assert _fit("model.layers.0.q_proj", 40) == "model.layers.0.q_proj"
    assert _fit(long, 40) == "…" + long[-39:] and len(_fit(long, 40)) == 40
