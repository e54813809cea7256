"""Rank sweep from one nested-rank adapter: set_rank, sweep table, choice, plot, export."""

from __future__ import annotations

import csv
import random

import pytest
import torch
import torch.nn.functional as F

import leanlora
from leanlora.reports.sweep import choose_rank, rank_cost
from conftest import assets_dir, minilm_dir, randomize_adapters, tiny_llama, token_batch

TARGETS = ("q_proj", "v_proj", "down_proj")


def nested_model(r: int = 8) -> torch.nn.Module:
    model = tiny_llama()
    leanlora.inject(model, leanlora.AdapterConfig(target_modules=TARGETS, r=r, ranks="nested"))
    randomize_adapters(model)
    return model


def test_set_rank_per_module():
    model = nested_model()
    changed = leanlora.set_rank(model, 2, modules=["q_proj"])
    assert changed == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    ranks = {n: l.ranks.active_rank() for n, l in leanlora.adapted_layers(model)}
    assert all(r == (2 if n.endswith("q_proj") else 8) for n, r in ranks.items())
    leanlora.set_rank(model, 5, modules=".*layers\\.1\\..*")
    assert model.model.layers[1].mlp.down_proj.ranks.active_rank() == 5
    assert model.model.layers[0].mlp.down_proj.ranks.active_rank() == 8
    leanlora.set_rank(model, None)
    assert all(l.ranks.active_rank() == 8 for _, l in leanlora.adapted_layers(model))
    with pytest.raises(ValueError, match="match no adapted module"):
        leanlora.set_rank(model, 2, modules=["nope_proj"])


def test_rank_cost_counts_bytes_and_macs_of_the_truncated_factors():
    model = nested_model()
    shapes = [(l.in_features, l.out_features) for _, l in leanlora.adapted_layers(model)]
    nbytes, macs = rank_cost(model, 3)
    assert macs == sum(3 * (i + o) for i, o in shapes)
    assert nbytes == sum(3 * (i + o) * 4 for i, o in shapes)   # fp32 factors


def test_choose_rank_best_and_smallest_within_tolerance():
    scores = {1: 0.70, 2: 0.79, 3: 0.80, 4: 0.81, 5: 0.805}
    assert choose_rank(scores) == (4, 4)
    assert choose_rank(scores, tolerance=0.015) == (4, 3)
    assert choose_rank(scores, tolerance=0.2) == (4, 1)
    losses = {1: 2.0, 2: 1.5, 3: 1.4, 4: 1.41}
    assert choose_rank(losses, higher_is_better=False) == (3, 3)
    assert choose_rank(losses, tolerance=0.12, higher_is_better=False) == (3, 2)
    assert choose_rank({1: float("nan"), 2: 0.5}) == (2, 2)
    assert choose_rank({1: 0.5, 2: 0.5}) == (1, 1)   # ties go to the smaller rank


def test_sweep_evaluates_each_rank_from_one_adapter_and_restores_ranks():
    model = nested_model()
    leanlora.set_rank(model, 6, modules=["v_proj"])
    x = token_batch()
    model.eval()
    with torch.no_grad():
        leanlora.set_rank(model, None)
        full = model(x).logits
        leanlora.set_rank(model, 6, modules=["v_proj"])
    seen = []

    def closeness(m):   # higher is better: how close the rank-b model is to the full-rank one
        seen.append({n: l.ranks.active_rank() for n, l in leanlora.adapted_layers(m)})
        assert not m.training and not torch.is_grad_enabled()
        return -float((m(x).logits - full).pow(2).mean())

    model.train()
    result = leanlora.sweep_ranks(model, closeness, ranks=[8, 1, 2, 4], metric="-mse")
    assert [r.rank for r in result.rows] == [1, 2, 4, 8]
    assert all(set(s.values()) == {b} for s, b in zip(seen, [1, 2, 4, 8]))
    assert result.row(8).score == 0.0 and result.best_rank == 8 and result.chosen_rank == 8
    assert result.row(4).adapter_bytes == rank_cost(model, 4)[0]
    assert result.row(2).macs_per_token == rank_cost(model, 2)[1]
    # restored: training mode and the per-module rank set before the sweep
    assert model.training and model.model.layers[0].self_attn.v_proj.ranks.active_rank() == 6
    table = result.table()
    assert table.splitlines()[0].startswith("| rank | -mse | adapter bytes | adapter MACs/token")
    assert "best chosen" in table.splitlines()[-1] and len(table.splitlines()) == 6
    assert result.to_dict()["chosen_rank"] == 8


def test_plot_sweep_writes_a_png(tmp_path):
    model = nested_model()
    x = token_batch()
    result = leanlora.sweep_ranks(model, lambda m: float(m(x).logits.std()), ranks=[1, 2, 3])
    path = leanlora.plot_sweep(result, tmp_path / "sweep.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000


def test_export_chosen_rank_as_plain_adapter_and_as_peft(tmp_path):
    peft = pytest.importorskip("peft")
    model = nested_model()
    x = token_batch()
    leanlora.set_rank(model, 3)
    want = model(x).logits
    leanlora.export_rank(model, 3, tmp_path / "peft", peft=True)
    assert all(l.factors.rank == 8 for _, l in leanlora.adapted_layers(model))   # peft export prunes nothing
    got = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft")(x).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    leanlora.export_rank(model, 3, tmp_path / "plain")
    tensors = leanlora.artifact.io.read_adapter_tensors(tmp_path / "plain")
    assert tensors["model.layers.0.self_attn.q_proj.factors.lora_A"].shape == (3, 64)
    loaded = leanlora.load(tiny_llama(), tmp_path / "plain")
    assert all(l.ranks.active_rank() == 3 for _, l in leanlora.adapted_layers(loaded))
    assert torch.equal(loaded(x).logits, want)


# --- real model, real data -----------------------------------------------------------------------


def _sst2(split: str, n: int, seed: int) -> list[tuple[str, int]]:
    with open(assets_dir("glue/SST-2") / f"{split}.tsv", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    rows = [(s, int(label)) for s, label in rows]
    random.Random(seed).shuffle(rows)
    return rows[:n]


@pytest.mark.slow
@pytest.mark.real
def test_minilm_sst2_one_run_gives_a_usable_adapter_at_every_rank():
    """A cut-down check (80 steps, 128 dev sentences); the full sweep is benchmarks/qdylora_sst2.py."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    directory = minilm_dir()
    train, dev = _sst2("train", 80 * 16, seed=0), _sst2("dev", 128, seed=0)
    tok = AutoTokenizer.from_pretrained(directory)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(directory, num_labels=2)
    leanlora.inject(model, leanlora.AdapterConfig(target_modules=("query", "value"), r=4, alpha=8.0,
                                                  ranks="nested", modules_to_save=("classifier",)))
    enc = tok([s for s, _ in dev], padding=True, truncation=True, max_length=32, return_tensors="pt")
    labels = torch.tensor([y for _, y in dev])

    def accuracy(m):
        return float((m(**enc).logits.argmax(-1) == labels).float().mean())

    before = leanlora.sweep_ranks(model, accuracy, ranks=[4]).row(4).score
    opt = torch.optim.AdamW([p for _, p in leanlora.trainable_parameters(model)], lr=2e-3)
    model.train()
    for step in range(80):
        batch = train[step * 16:(step + 1) * 16]
        inputs = tok([s for s, _ in batch], padding=True, truncation=True, max_length=32, return_tensors="pt")
        leanlora.advance(model, step)
        loss = F.cross_entropy(model(**inputs).logits, torch.tensor([y for _, y in batch]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    result = leanlora.sweep_ranks(model, accuracy, tolerance=0.02, metric="accuracy")
    print(f"\nbefore training: {before:.3f}\n{result.table()}")
    scores = [r.score for r in result.rows]
    assert before < 0.62
    assert min(scores) > 0.65                       # every truncation is a usable adapter
    assert scores[-1] >= scores[0] - 0.05           # the full rank is not worse than rank 1
    assert result.chosen_rank <= result.best_rank
