"""Gated ranks: nested gate semantics, prior, the regularizer's effect, config errors, compile."""

from __future__ import annotations

import pytest
import torch

import leanlora
from leanlora.groups.rows import row_grad
from conftest import randomize_adapters, tiny_llama, token_batch
from leanlora.gates import hardconcrete as hc
from leanlora.precision.learned import PriorScale
from leanlora.ranks.gated import GatedRanks

OPEN, CLOSED = 8.0, -8.0


def _ranks(log_alpha, **kw):
    g = GatedRanks(len(log_alpha) + 1, alpha=8.0, **kw).eval()
    with torch.no_grad():
        g.log_alpha.copy_(torch.tensor(log_alpha))
    return g


def test_nested_gates_keep_only_a_prefix():
    g = _ranks([OPEN, OPEN, CLOSED, OPEN])           # gate 3 closed: components 3 and 4 go
    assert g.mask().tolist() == [1, 1, 1, 0, 0]
    assert g.active_rank() == 3 and g.keep_indices().tolist() == [0, 1, 2]
    free = _ranks([OPEN, OPEN, CLOSED, OPEN], nested=False)
    assert free.mask().tolist() == [1, 1, 1, 0, 1] and free.active_rank() == 4


def test_first_component_is_always_on():
    g = _ranks([CLOSED] * 5)
    assert g.mask().tolist() == [1, 0, 0, 0, 0, 0] and g.active_rank() == 1


def test_training_masks_are_binary_nonincreasing_and_start_on():
    g = _ranks([1.0, 0.0, 2.0, -0.5, 1.0, 0.5, 3.0]).train()
    for _ in range(200):
        m = g.mask()
        assert set(m.tolist()) <= {0.0, 1.0} and m[0] == 1
        assert torch.all(m[1:] <= m[:-1])


def test_mask_frequency_matches_nested_open_probabilities():
    torch.manual_seed(0)
    la = [1.0, 0.0, 2.0]
    g = _ranks(la).train()
    n = 20000
    freq = torch.stack([g.mask() for _ in range(n)]).mean(0)
    # after rounding, a component is on when every sampled z_j in the chain makes the product >= 1/2;
    # it is always on less often than the chain is open, and at least as often as all gates are at 1
    q = torch.cumprod(hc.prob_open(torch.tensor(la)), 0)
    one = torch.cumprod(hc.prob_one(torch.tensor(la)), 0)
    assert torch.all(freq[1:] <= q + 0.01) and torch.all(freq[1:] >= one - 0.01)


def test_expected_rank_and_priors_closed_forms():
    la = [1.0, -0.5, 2.0, 0.0]
    q = hc.prob_open(torch.tensor(la))
    nested = _ranks(la, prior="nested")
    assert nested.expected_rank() == pytest.approx(1 + float(torch.cumprod(q, 0).sum()), rel=1e-6)
    assert float(nested.prior().detach()) == pytest.approx(float(torch.cumprod(q, 0).sum()), rel=1e-6)
    individual = _ranks(la, prior="individual")
    assert float(individual.prior().detach()) == pytest.approx(float(q.sum()), rel=1e-6)
    scale = PriorScale()
    scale.update(4000.0)
    bop = _ranks(la, reg_type="bop", component_macs=100.0, prior_scale=scale)
    # a component priced as its MACs at 16 bits, over the model's largest adapter MACs
    assert float(bop.prior().detach()) == pytest.approx(float(torch.cumprod(q, 0).sum()) * 100 * 16 / 4000, rel=1e-6)


def test_select_scales_and_diag():
    g = _ranks([OPEN, CLOSED], diag=True)
    a, b = torch.randn(3, 5), torch.randn(4, 3)
    a2, b2, d, scale = g.select(a, b)
    assert scale == pytest.approx(8.0 / 3) and a2 is a and b2 is b
    assert d.tolist() == [1.0, 1.0, 0.0]  # E starts at 1
    _, _, d, _ = _ranks([OPEN, CLOSED], diag=False).select(a, b)
    assert d.tolist() == [1.0, 1.0, 0.0]


def _gated_model(lmbda=1e-3, init_log_alpha=6.0, **gated):
    model = tiny_llama()
    cfg = leanlora.AdapterConfig(target_modules=("q_proj", "v_proj"), r=4, ranks="gated",
                                 gated=leanlora.GatedConfig(**gated),
                                 gates=leanlora.GatesConfig(rank_init_log_alpha=init_log_alpha),
                                 prior=leanlora.PriorConfig(lmbda=lmbda))
    leanlora.inject(model, cfg)
    randomize_adapters(model)
    return model


@pytest.mark.parametrize("diag", [True, False])
def test_pruning_closed_components_is_exact(diag):
    model = _gated_model(diag=diag)
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.ranks.log_alpha.copy_(torch.tensor([OPEN, CLOSED, OPEN]))
        if diag:
            layer.ranks.E.copy_(torch.tensor([0.5, -1.0, 2.0, 1.5]))
    x = torch.randn(3, 64)
    before = layer(x)
    layer.prune_(2)
    assert layer.factors.rank == 2 and layer.ranks.rank == 2 and layer.ranks.active_rank() == 2
    torch.testing.assert_close(layer(x), before, rtol=1e-6, atol=1e-6)


def _train(model, steps=30):
    groups = leanlora.param_groups(model, lr=1e-3, role_lr={"gates": 0.1})
    opt = torch.optim.Adam(groups)
    x = token_batch()
    model.train()
    for _ in range(steps):
        loss = model(x, labels=x).loss + leanlora.regularizer(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _mean_expected_rank(model):
    return leanlora.gate_summary(model)["rank"]


def test_regularizer_lowers_expected_ranks_only_when_lambda_is_large():
    start = _mean_expected_rank(_gated_model(init_log_alpha=2.0))
    kept = _gated_model(lmbda=0.0, init_log_alpha=2.0)
    _train(kept)
    pushed = _gated_model(lmbda=10.0, init_log_alpha=2.0)
    _train(pushed)
    print(f"mean expected rank: start {start:.3f}, lambda=0 {_mean_expected_rank(kept):.3f}, "
          f"lambda=10 {_mean_expected_rank(pushed):.3f}")
    assert _mean_expected_rank(kept) > 0.95 * start
    assert _mean_expected_rank(pushed) < 0.6 * start
    assert leanlora.cost_report(pushed).total["rank"] < leanlora.cost_report(kept).total["rank"]


def test_gates_and_scales_have_their_own_optimizer_groups():
    model = tiny_llama()
    leanlora.inject(model, leanlora.AdapterConfig(target_modules=("q_proj",), r=4, ranks="gated",
                                                  precision="learned", gates=leanlora.GatesConfig(lr=0.05)))
    groups = {g["role"]: g for g in leanlora.param_groups(model, lr=1e-4)}
    assert groups["gates"]["lr"] == 0.05 and groups["gates"]["weight_decay"] == 0.0
    n_gates = sum(p.numel() for p in groups["gates"]["params"])
    # rank gates (r - 1) + bit gates of A and B (4 each) in each of the 2 layers (plain B·A: no E)
    assert n_gates == 2 * (3 + 2 * 4)
    assert "scales" in groups and sum(p.numel() for p in groups["scales"]["params"]) == 2 * 2


def test_training_forward_compiles_without_graph_breaks():
    model = tiny_llama()
    leanlora.inject(model, leanlora.AdapterConfig(target_modules=("q_proj",), r=4, ranks="gated",
                                                  precision="learned"))
    layer = model.model.layers[0].self_attn.q_proj.train()
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    compiled(torch.randn(2, 5, 64)).sum().backward()
    assert row_grad(layer.ranks, "log_alpha") is not None and row_grad(layer.quant_a, "log_alpha") is not None
    prior = torch.compile(lambda: leanlora.regularizer(model), backend="eager", fullgraph=True)()
    assert prior.requires_grad


@pytest.mark.parametrize("kwargs, message", [
    (dict(prior="sum"), "gated.prior='sum' is invalid: allowed: 'nested', 'individual'"),
])
def test_gated_config_errors(kwargs, message):
    with pytest.raises(leanlora.ConfigError) as err:
        leanlora.GatedConfig(**kwargs)
    assert str(err.value) == message


@pytest.mark.parametrize("cls, kwargs, message", [
    ("GatesConfig", dict(threshold=0.0), "gates.threshold=0.0 is invalid: must be in (0, 1)"),
    ("GatesConfig", dict(threshold=1.5), "gates.threshold=1.5 is invalid: must be in (0, 1)"),
    ("GatesConfig", dict(lr=0.0), "gates.lr=0.0 is invalid: must be > 0 and at most 3e+38 (optimizers use float32)"),
    ("PriorConfig", dict(lmbda=-1e-3), "prior.lmbda=-0.001 is invalid: must be >= 0"),
    ("PriorConfig", dict(reg_type="l1"), "prior.reg_type='l1' is invalid: allowed: 'const', 'bop'"),
])
def test_gates_and_prior_config_errors(cls, kwargs, message):
    with pytest.raises(leanlora.ConfigError) as err:
        getattr(leanlora, cls)(**kwargs)
    assert str(err.value) == message


@pytest.mark.parametrize("kwargs, message", [
    (dict(bit_set=(2, 3)), "quant.bit_set=(2, 3) is invalid: must be a non-empty subset of (2, 4, 8, 16, 32)"),
    (dict(bit_set=(4, 8)), "quant.bit_set=(4, 8) is invalid: must be a non-empty subset of (2, 4, 8, 16, 32)"),
    (dict(bits=3), "quant.bits=3 is invalid: allowed: (2, 4, 8, 16, 32)"),
])
def test_quant_config_errors(kwargs, message):
    with pytest.raises(leanlora.ConfigError) as err:
        leanlora.QuantConfig(**kwargs)
    assert str(err.value).startswith(message)
