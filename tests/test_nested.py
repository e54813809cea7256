"""Nested ranks (DyLoRA / QDyLoRA): truncation, the shared sampler, frozen mode, bad input."""

from __future__ import annotations

import collections

import pytest
import torch

import leanlora
from leanlora.ranks.nested import RankSampler, rank_probabilities
from conftest import randomize_adapters, tiny_llama, token_batch

TARGETS = ("q_proj", "v_proj", "down_proj")


def nested_model(r: int = 8, seed: int = 0, **nested) -> torch.nn.Module:
    model = tiny_llama()
    leanlora.inject(model, leanlora.AdapterConfig(target_modules=TARGETS, r=r, alpha=16.0, ranks="nested",
                                                  nested=leanlora.NestedConfig(**nested)))
    randomize_adapters(model, seed=seed)
    return model


@pytest.mark.parametrize("scale", ["max", "sampled"])
@pytest.mark.parametrize("b", [1, 3, 8])
def test_truncation_at_b_equals_a_plain_lora_of_the_first_b_components(b, scale):
    model = nested_model(scale=scale)
    leanlora.set_rank(model, b)
    plain = tiny_llama()
    # "sampled" scales by alpha / b, a LoRA of rank b at the same alpha; "max" keeps alpha / r = 16 / 8
    alpha = 16.0 if scale == "sampled" else 16.0 * b / 8
    leanlora.inject(plain, leanlora.AdapterConfig(target_modules=TARGETS, r=b, alpha=alpha))
    nested_layers = dict(leanlora.adapted_layers(model))
    with torch.no_grad():
        for name, layer in leanlora.adapted_layers(plain):
            src = nested_layers[name].factors
            layer.factors.lora_A.copy_(src.lora_A[:b])
            layer.factors.lora_B.copy_(src.lora_B[:, :b])
    x = token_batch()
    assert torch.equal(model(x).logits, plain(x).logits)


def test_truncation_matches_peft_lora_at_rank_b(tmp_path):
    peft = pytest.importorskip("peft")
    model = nested_model()
    x = token_batch()
    leanlora.set_rank(model, 3)
    want = model(x).logits
    leanlora.export_peft(model, tmp_path / "peft")
    got = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft")(x).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_training_forward_uses_the_sampled_rank_shared_by_all_layers():
    model = nested_model()
    x = token_batch()
    model.train()
    for step in range(4):
        leanlora.advance(model, step)
        b = model.leanlora_shared.rank_sampler.current
        train_out = model(x).logits
        leanlora.set_rank(model, b)
        model.eval()
        # training masks components >= b (one graph for every b), eval slices them: the same sum
        # up to the order of fp32 additions
        torch.testing.assert_close(train_out, model(x).logits, rtol=1e-5, atol=1e-6, msg=f"step {step}, b {b}")
        model.train()


def test_training_forward_is_one_graph_for_every_sampled_rank():
    """The masked training forward must not recompile when b changes (a slice at an int b would)."""
    import torch._dynamo as dynamo
    from torch._dynamo.testing import CompileCounter

    model = nested_model()
    x = token_batch()
    model.train()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    dynamo.reset()
    ranks = set()
    for step in range(12):
        leanlora.advance(model, step)
        ranks.add(model.leanlora_shared.rank_sampler.current)
        want = model(x).logits
        torch.testing.assert_close(compiled(x).logits, want, rtol=1e-5, atol=1e-6)
    assert len(ranks) >= 4 and counter.frame_count == 1, (ranks, counter.frame_count)


def test_sampler_draws_are_a_pure_function_of_seed_and_step():
    a, b = RankSampler(2, 8, seed=7), RankSampler(2, 8, seed=7)   # e.g. two data-parallel processes
    seq_a = [a.draw(t) for t in range(200)]
    assert seq_a == [b.draw(t) for t in range(200)]
    assert seq_a != [RankSampler(2, 8, seed=8).draw(t) for t in range(200)]
    assert set(seq_a) == set(range(2, 9))
    b.advance(57)
    assert b.rank() == seq_a[57] and b.step == 57


def test_uniform_and_geometric_distributions():
    uniform = collections.Counter(RankSampler(1, 4).draw(t) for t in range(4000))
    assert all(abs(uniform[k] / 4000 - 0.25) < 0.03 for k in range(1, 5))
    p = rank_probabilities(1, 4, "geometric", decay=0.5)
    torch.testing.assert_close(p, torch.tensor([8, 4, 2, 1], dtype=torch.float64) / 15)
    geo = collections.Counter(RankSampler(1, 4, "geometric", decay=0.5).draw(t) for t in range(4000))
    assert geo[1] > geo[2] > geo[3] > geo[4]
    assert RankSampler(1, 4).mean() == pytest.approx(2.5)


def test_full_share_draws_the_full_rank_that_often_and_shares_the_rest_by_the_distribution():
    p = rank_probabilities(1, 4, "uniform", full_share=0.5)
    torch.testing.assert_close(p, torch.tensor([0.125, 0.125, 0.125, 0.625], dtype=torch.float64))
    draws = collections.Counter(RankSampler(1, 4, full_share=0.5).draw(t) for t in range(4000))
    assert abs(draws[4] / 4000 - 0.625) < 0.03 and all(abs(draws[k] / 4000 - 0.125) < 0.03 for k in (1, 2, 3))
    model = nested_model(full_share=0.5)
    assert model.leanlora_shared.rank_sampler.mean() == pytest.approx(0.5 * 8 + 0.5 * 4.5)
    with pytest.raises(leanlora.ConfigError, match=r"nested.full_share=1.0 .*ranks: fixed"):
        leanlora.NestedConfig(full_share=1.0)


def _sgd_step_at(model, b: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One SGD step (no momentum, no decay) at rank b; returns the factors from before it."""
    sampler = model.leanlora_shared.rank_sampler
    step = next(t for t in range(1000) if sampler.draw(t) == b)
    before = {n: (l.factors.lora_A.detach().clone(), l.factors.lora_B.detach().clone())
              for n, l in leanlora.adapted_layers(model)}
    opt = torch.optim.SGD([p for _, p in leanlora.trainable_parameters(model)], lr=0.5)
    model.train()
    leanlora.advance(model, step)
    x = token_batch()
    model(x, labels=x).loss.backward()
    opt.step()
    return before


def test_frozen_mode_updates_only_component_b():
    b = 5
    model = nested_model(frozen=True)
    before = _sgd_step_at(model, b)
    for name, layer in leanlora.adapted_layers(model):
        a0, b0 = before[name]
        a1, b1 = layer.factors.lora_A.detach(), layer.factors.lora_B.detach()
        assert torch.equal(a1[: b - 1], a0[: b - 1]) and torch.equal(b1[:, : b - 1], b0[:, : b - 1]), name
        assert not torch.equal(a1[b - 1], a0[b - 1]) and not torch.equal(b1[:, b - 1], b0[:, b - 1]), name
        assert torch.equal(a1[b:], a0[b:]) and torch.equal(b1[:, b:], b0[:, b:]), name


def test_non_frozen_mode_updates_every_component_below_b():
    b = 5
    model = nested_model(frozen=False)
    before = _sgd_step_at(model, b)
    for name, layer in leanlora.adapted_layers(model):
        a0, b0 = before[name]
        a1, b1 = layer.factors.lora_A.detach(), layer.factors.lora_B.detach()
        assert all(not torch.equal(a1[i], a0[i]) and not torch.equal(b1[:, i], b0[:, i]) for i in range(b)), name
        assert torch.equal(a1[b:], a0[b:]) and torch.equal(b1[:, b:], b0[:, b:]), name


def test_frozen_mode_caveat_adamw_momentum_still_moves_detached_components():
    """The DyLoRA caveat: detach stops the gradient, not AdamW's momentum from earlier steps."""
    model = nested_model(frozen=True)
    sampler = model.leanlora_shared.rank_sampler
    opt = torch.optim.AdamW([p for _, p in leanlora.trainable_parameters(model)], lr=1e-2, weight_decay=0.0)
    model.train()
    x = token_batch()
    first = next(t for t in range(1000) if sampler.draw(t) == 2)          # component 1 learns
    later = next(t for t in range(first + 1, 1000) if sampler.draw(t) == 4)  # component 3 learns
    for step in (first, later):
        if step == later:
            a1_before = model.model.layers[0].self_attn.q_proj.factors.lora_A[1].detach().clone()
        opt.zero_grad()
        leanlora.advance(model, step)
        model(x, labels=x).loss.backward()
        opt.step()
    moved = model.model.layers[0].self_attn.q_proj.factors.lora_A[1].detach()
    assert not torch.equal(moved, a1_before)


@pytest.mark.parametrize("scale", ["max", "sampled"])
def test_prune_keeps_the_update_at_the_chosen_rank(scale):
    model = nested_model(scale=scale)
    x = token_batch()
    leanlora.set_rank(model, 3)
    want = model(x).logits
    for _, layer in leanlora.adapted_layers(model):
        layer.prune_(3)
        assert layer.factors.lora_A.shape[0] == 3 and layer.ranks.active_rank() == 3
    assert torch.equal(model(x).logits, want)


def test_expected_rank_is_the_distribution_mean_in_training():
    model = nested_model(r_min=2, full_share=0.0)
    model.train()
    assert leanlora.gate_summary(model)["rank"] == pytest.approx(5.0)
    model = nested_model(r_min=2)  # by default half the steps draw the full rank
    model.train()
    assert leanlora.gate_summary(model)["rank"] == pytest.approx(0.5 * 8 + 0.5 * 5.0)
    model.eval()
    assert leanlora.gate_summary(model)["rank"] == 8


# --- bad input -----------------------------------------------------------------------------------


def test_r_min_above_r_max_is_refused():
    with pytest.raises(ValueError, match=r"r_min=5, r_max=4"):
        RankSampler(5, 4)
    with pytest.raises(leanlora.ConfigError, match=r"nested\.r_min=5.*r=4"):
        leanlora.AdapterConfig(r=4, ranks="nested", nested=leanlora.NestedConfig(r_min=5))
    with pytest.raises(leanlora.ConfigError, match=r"nested\.decay"):
        leanlora.NestedConfig(distribution="geometric", decay=1.5)
    with pytest.raises(leanlora.ConfigError, match=r"nested\.scale='half'.*'sampled', 'max', 'sqrt'"):
        leanlora.NestedConfig(scale="half")


@pytest.mark.parametrize("b", [0, 9, -1])
def test_rank_outside_range_names_module_and_value(b):
    model = nested_model()
    with pytest.raises(ValueError, match=rf"b={b}.*1\.\.8.*model\.layers\.0\.self_attn\.q_proj"):
        leanlora.set_rank(model, b)
    assert all(l.ranks.active_rank() == 8 for _, l in leanlora.adapted_layers(model))


def test_sampled_rank_above_a_pruned_layer_names_module():
    model = nested_model()
    layer = model.model.layers[1].mlp.down_proj
    layer.prune_(2)
    sampler = model.leanlora_shared.rank_sampler
    model.train()
    leanlora.advance(model, next(t for t in range(1000) if sampler.draw(t) == 6))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj.*sampled rank b=6.*1\.\.2"):
        model(token_batch())


def test_training_without_advance_says_what_to_call():
    model = nested_model().train()
    with pytest.raises(RuntimeError, match=r"leanlora\.advance\(model, step\)"):
        model(token_batch())


def test_set_rank_on_fixed_ranks_is_refused():
    model = tiny_llama()
    leanlora.inject(model, leanlora.AdapterConfig(target_modules=TARGETS, r=4))
    with pytest.raises(TypeError, match=r"q_proj.*FixedRanks.*nested"):
        leanlora.set_rank(model, 2)


def test_an_unclipped_nested_run_is_warned_at_its_start_and_a_clipped_one_is_not(tmp_path):
    from conftest import minilm_dir
    from leanlora.train.loop import train
    from leanlora.train.runconfig import load_run_config
    from train_fixtures import classification_yaml, tiny_bert_dir

    config = classification_yaml(tmp_path, tiny_bert_dir(tmp_path, minilm_dir()), max_steps=1)
    for clip, warned in (("0", True), ("1.0", False)):
        lines: list[str] = []
        run = load_run_config(config, ["adapter.ranks=nested", f"train.max_grad_norm={clip}"])
        train(run, tmp_path / f"run{clip}", progress=False, log=lines.append)
        hits = [line for line in lines if "max_grad_norm=0" in line]
        assert bool(hits) == warned, lines
        if warned:
            assert "adapter.ranks=nested" in hits[0] and "train.max_grad_norm=1.0" in hits[0]
