"""Every point of the design space works, not only the papers' points.

factors {dense, bank} × ranks {fixed, nested, gated} × precision {float, fixed, learned}
× base {dense, nf4}: inject, train a step, eval, merge == unmerged, save/load, PEFT export,
finalize — on a tiny Llama.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools

import pytest
import torch

import leanlora
from conftest import tiny_llama, token_batch

peft = pytest.importorskip("peft")

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GRID = list(itertools.product(("dense", "bank"), ("fixed", "nested", "gated"),
                              ("float", "fixed", "learned"), ("dense", "nf4")))


def _config(factors, ranks, precision, base):
    return leanlora.AdapterConfig(
        target_modules=TARGETS, r=4, alpha=8, factors=factors, ranks=ranks, precision=precision, base=base,
        bank=leanlora.BankConfig(num_vectors=16, vector_length=16, topk=2),
        nf4=leanlora.NF4Config(block_size=32, scaler_block_size=32),
    )


def _train_a_few_steps(model, steps=3):
    model.train()
    opt = torch.optim.AdamW(leanlora.param_groups(model, lr=1e-2), lr=1e-2)
    x = token_batch()
    for step in range(steps):
        leanlora.advance(model, step)
        loss = model(x, labels=x).loss + leanlora.regularizer(model)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("factors, ranks, precision, base", GRID, ids=["-".join(c) for c in GRID])
def test_combination(factors, ranks, precision, base, tmp_path):
    if base == "nf4":
        pytest.importorskip("torchao")
    model = tiny_llama()
    leanlora.inject(model, _config(factors, ranks, precision, base))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    _train_a_few_steps(model)
    for n, p in model.named_parameters():
        if n in frozen:
            assert p.grad is None and torch.equal(p, frozen[n]), f"frozen {n} changed"

    x = token_batch(seed=7)
    with torch.no_grad():
        out = model(x).logits
    assert torch.isfinite(out).all()

    # the saved adapter reloads to the same outputs
    leanlora.save(model, tmp_path / "ad")
    reloaded = leanlora.load(tiny_llama(), tmp_path / "ad")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, out, rtol=1e-4, atol=1e-4)

    # a plain PEFT LoRA serves the same function (NF4 bases: PEFT sees the dense original base)
    leanlora.export_peft(model, tmp_path / "peft")
    served = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft").eval()
    if base == "dense":
        with torch.no_grad():
            torch.testing.assert_close(served(x).logits, out, rtol=1e-4, atol=1e-4)

    # finalize keeps eval outputs (pruned ranks, packed bits), and merging keeps them too
    leanlora.finalize(model)
    with torch.no_grad():
        final = model(x).logits
        torch.testing.assert_close(final, out, rtol=1e-4, atol=1e-4)
        report = leanlora.merge(model)
        merged = model(x).logits
    if base == "dense":
        torch.testing.assert_close(merged, final, rtol=1e-4, atol=1e-4)
    else:
        # merging into NF4 requantizes W0 + ΔW: the error is reported per module, never silent,
        # and it stays one 4-bit rounding's worth: no larger than what quantizing the base cost
        assert all(r["max_abs"] > 0 and r["mean_abs"] < r["max_abs"] for r in report.values())
        dense_model = tiny_llama()
        with torch.no_grad():
            dense_logits = dense_model(x).logits
            nf4_logits = leanlora.inject(dense_model, _config("dense", "fixed", "float", "nf4"))(x).logits
        one_rounding = float((nf4_logits - dense_logits).norm() / dense_logits.norm())
        assert float((merged - final).norm() / final.norm()) < 2 * one_rounding


@pytest.mark.parametrize("factors, ranks, precision",
                         list(itertools.product(("dense", "bank"), ("fixed", "nested", "gated"),
                                                ("float", "fixed", "learned"))))
def test_every_adapter_tensor_lives_on_the_base_weights_device(factors, ranks, precision):
    """Injected into a model already on an accelerator, no strategy may leave a tensor on the CPU.

    The meta device stands in for CUDA here (CI has no GPU): a constructor that forgets its
    ``device`` puts its buffer on the CPU, which a CUDA forward then refuses (as the masked
    nested ranks once did on an H200)."""
    model = tiny_llama().to("meta")
    leanlora.inject(model, _config(factors, ranks, precision, "dense"))
    placed = {name: t.device.type for name, t in itertools.chain(model.named_parameters(), model.named_buffers())}
    assert set(placed.values()) == {"meta"}, {n: d for n, d in placed.items() if d != "meta"}


GATED_GRID = [c for c in GRID if c[1] == "gated" or c[2] == "learned"]


@pytest.mark.parametrize("factors, ranks, precision, base", GATED_GRID, ids=["-".join(c) for c in GATED_GRID])
def test_the_default_budget_runs_through_its_freeze_on_every_gated_point(factors, ranks, precision, base):
    """Every point with something to gate, under ``adapter.budget: auto`` as ``leanlora train``
    runs it: the ramp, the freeze's projection, the fine-tuning after it, then finalize lands on
    the budget, or on the cheapest structure the point allows, with a warning that says so."""
    if base == "nf4":
        pytest.importorskip("torchao")
    model = leanlora.inject(tiny_llama(), _config(factors, ranks, precision, base))
    floor = leanlora.budget.floor_cost(model)
    unreachable = floor > leanlora.budget.DEFAULT_BUDGET * (1 + leanlora.budget.BUDGET_TOLERANCE)
    with pytest.warns(UserWarning, match="smallest cost") if unreachable else contextlib.nullcontext():
        leanlora.budget.start(model, 8)
    _train_a_few_steps(model, steps=8)
    assert leanlora.budget.controller(model).frozen
    leanlora.finalize(model)
    cost = leanlora.cost_report(model).total["bops_vs_lora"]
    assert abs(cost / max(floor, leanlora.budget.DEFAULT_BUDGET) - 1) <= 0.1


def test_an_explicit_budget_below_what_the_adapter_can_reach_is_refused_by_name():
    model = leanlora.inject(tiny_llama(), dataclasses.replace(_config("dense", "gated", "float", "dense"), budget=0.1))
    with pytest.raises(leanlora.ConfigError, match=r"adapter\.budget=0\.1 is below .* 0\.5 of LoRA-16.*adapter\.precision=learned"):
        leanlora.budget.start(model, 8)
