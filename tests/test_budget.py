"""adapter.budget: config errors, the expected cost against the cost table, the schedule, the
projection by one global order, and the budget met by the loop (resumed or not)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import leanlora
from conftest import OpCount, minilm_dir, tiny_bert
from leanlora import budget as bud
from leanlora.config import AdapterConfig, ConfigError
from leanlora.train.loop import train
from leanlora.train.runconfig import load_run_config
from train_fixtures import Crash, classification_yaml, crash_after_saving, tiny_bert_dir

GATED = dict(target_modules=("query", "value"), r=4, ranks="gated", precision="learned")


def gated_bert(**kw):
    return leanlora.inject(tiny_bert(seed=0), AdapterConfig(**{**GATED, **kw}))


# --- config --------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, 0.0, -0.1, 1.5, True])
def test_a_budget_outside_0_1_is_refused_by_name(value):
    # a bool is refused by the type check of every field, the rest by the budget's range
    with pytest.raises(ConfigError, match=r"budget=.*(\(0, 1\]|must be a number)"):
        AdapterConfig(**GATED, budget=value)


def test_a_budget_with_nothing_to_gate_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"adapter\.budget=0.25 is invalid: needs something to gate.*ranks='fixed'"):
        AdapterConfig(target_modules=("query",), budget=0.25)
    AdapterConfig(target_modules=("query",), precision="learned", budget=0.25)   # learned bits alone: fine
    AdapterConfig(target_modules=("query",), ranks="gated", budget=1.0)


def test_a_yaml_budget_error_names_the_key_and_the_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("adapter:\n  ranks: fixed\n  budget: 0.2\n")
    with pytest.raises(ConfigError, match=r"run.yaml line 3: adapter\.budget=0.2"):
        load_run_config(path)


def test_budget_schedule_must_be_ordered_fractions():
    with pytest.raises(ConfigError, match="adapter.budget_schedule"):
        AdapterConfig(**GATED, budget=0.3, budget_schedule=(0.5, 0.2, 0.7))


# --- cost -----------------------------------------------------------------------------------------


@torch.no_grad()
def _set_gates(model, values):
    for c in bud.gate_chains(model)[1]:
        c.log_alpha.copy_(torch.as_tensor(values[c.name] if isinstance(values, dict) else values).expand_as(c.log_alpha))


def test_expected_cost_is_the_cost_tables_bops_when_gates_are_certain():
    model = gated_bert()
    for value in (40.0, -40.0):
        _set_gates(model, value)
        table = leanlora.cost_report(model).total
        assert float(bud.expected_cost(model).detach()) == pytest.approx(table["bops_vs_lora"], rel=1e-6)
    mixed = {c.name: torch.where(torch.arange(c.log_alpha.numel()) % 2 == 0, 40.0, -40.0)
             for c in bud.gate_chains(model)[1]}
    _set_gates(model, mixed)
    assert float(bud.expected_cost(model).detach()) == pytest.approx(leanlora.cost_report(model).total["bops_vs_lora"], rel=1e-6)


def test_expected_cost_has_a_gradient_on_every_gate():
    model = gated_bert(gates=leanlora.GatesConfig(rank_init_log_alpha=1.0, bit_init_log_alpha=1.0))
    bud.expected_cost(model).backward()
    gates = [(n, p) for n, p in model.named_parameters() if n.endswith("log_alpha")]  # the groups' stacks
    assert gates
    for name, p in gates:
        assert p.grad is not None and bool((p.grad > 0).all()), name


# --- schedule ---------------------------------------------------------------------------------------


def test_the_target_falls_cubically_from_the_full_cost_to_the_budget():
    ctl = bud.BudgetController(0.25, (0.1, 0.5, 0.7))
    ctl.total, ctl.full = 100, 2.0
    targets = [ctl.target_at(t) for t in range(100)]
    assert targets[:10] == [2.0] * 10 and targets[50:] == [0.25] * 50
    assert all(a >= b for a, b in zip(targets, targets[1:]))
    assert targets[30] == pytest.approx(0.25 + 1.75 * 0.5 ** 3)
    assert ctl.steps() == (10, 50, 70)


def test_advance_without_the_run_length_says_what_to_call():
    model = gated_bert(budget=0.3)
    with pytest.raises(RuntimeError, match=r"leanlora\.budget\.start\(model, total_steps\)"):
        leanlora.advance(model, 0)


@pytest.mark.parametrize("step", [-1, 2.5, True, "3"])
def test_advance_refuses_a_step_that_is_no_optimizer_step(step):
    """A negative or fractional step would set the schedules (the budget's target, the nested-rank
    draw) to a point no run reaches, silently."""
    model = gated_bert(budget=0.3)
    with pytest.raises(ValueError, match=rf"leanlora.advance: step={step!r} is invalid: .* an integer >= 0"):
        leanlora.advance(model, step)


# --- projection ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [0.05, 0.1, 0.25, 0.5, 1.0])
def test_projection_lands_on_the_budget(budget):
    model = gated_bert()
    done = bud.project(model, budget)
    cost = leanlora.cost_report(model).total["bops_vs_lora"]
    assert cost == pytest.approx(done["cost"])
    assert abs(cost / budget - 1) <= 0.1


@pytest.mark.parametrize("factors", ["dense", "bank"])
@pytest.mark.parametrize("ranks", ["fixed", "nested"])
def test_learned_bits_alone_are_projected_onto_the_budget(ranks, factors):
    """Learned bits over fixed or nested ranks: the budget prices bit levels alone, and each rank
    selector gives the update's scale for the distortion (only gated ranks store one)."""
    kw = dict(bank=leanlora.BankConfig(num_vectors=8, vector_length=8)) if factors == "bank" else {}
    model = gated_bert(ranks=ranks, factors=factors, **kw)
    done = bud.project(model, 0.25)
    cost = leanlora.cost_report(model).total["bops_vs_lora"]
    assert cost == pytest.approx(done["cost"]) and abs(cost / 0.25 - 1) <= 0.1


def test_untrained_gates_give_up_float_residuals_before_rank():
    """Equal gates: distortion per BOP decides, and a float residual distorts far less than a component."""
    model = gated_bert()
    with torch.no_grad():
        for _, layer in leanlora.adapted_layers(model):
            torch.nn.init.normal_(layer.factors.lora_B, std=0.1)   # a trained-looking update (B starts at 0)
    bud.project(model, 1.0)
    t = leanlora.cost_report(model).total
    assert t["mean_rank"] == 4 and t["mean_bits_a"] <= 16 and t["mean_bits_b"] <= 16


def test_the_order_nests_and_a_pinned_adapter_gives_its_order_back():
    model = gated_bert()
    order, costs, full, chains = bud.removal_order(model)
    assert all(a > b for a, b in zip(costs, costs[1:])) and costs[0] < full
    seen: dict[int, int] = {}
    for item in order:  # each chain empties from its end
        if chains[item.chain].nested:
            assert item.index == chains[item.chain].log_alpha.numel() - 1 - seen.get(item.chain, 0)
            seen[item.chain] = seen.get(item.chain, 0) + 1
    bud.project(model, 0.3)
    assert bud.is_pinned(chains)
    assert bud.removal_order(model)[0] == order


def test_after_the_freeze_each_advance_puts_every_gate_back_on_its_pin():
    model = gated_bert(target_modules=("query", "key", "value", "dense"))  # stacked groups and a lone layer
    ctl = bud.BudgetController(0.3, (0.05, 0.2, 0.25))
    model.leanlora_shared.budget_controller, ctl.total = ctl, 8  # as budget.start leaves it, for 8 steps
    ctl.advance(model, 2)  # at the freeze: the projection sets the pins
    chains = ctl.plan(model).chains
    pinned = {c.name: c.log_alpha.detach().clone() for c in chains}
    assert {c.name for c in chains} == set(ctl.pins)
    for c in chains:
        torch.testing.assert_close(pinned[c.name], ctl.pins[c.name])
    with torch.no_grad():  # what Adam's momentum does to gates after the freeze
        for _, p in leanlora.trainable_parameters(model):
            p.add_(0.01)
    for step in (3, 4):
        ctl.advance(model, step)
        for c in chains:
            assert torch.equal(c.log_alpha.detach(), pinned[c.name]), c.name


def _frozen_bert():
    """A gated BERT (stacked groups and a lone layer) just past its freeze, dropout off."""
    model = gated_bert(target_modules=("query", "key", "value", "dense")).train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0  # the sampled path draws gate noise first: dropout masks would differ
    ctl = bud.BudgetController(0.3, (0.05, 0.2, 0.25))
    model.leanlora_shared.budget_controller, ctl.total = ctl, 8
    ctl.advance(model, 2)
    return model, ctl


def _gated_modules(model):
    from leanlora.precision.learned import LearnedBits
    from leanlora.ranks.gated import GatedRanks

    return [m for m in model.modules() if isinstance(m, (GatedRanks, LearnedBits))]


def test_pinned_gates_train_on_the_threshold_with_the_values_and_gradients_of_sampling():
    # pinned far past saturation, a sample is exactly its 0/1 threshold with no gradient through the
    # clamp: the pinned path (thresholds, the chosen level alone) must give sampling's step bit for bit
    model, _ = _frozen_bert()
    assert all(m.pinned for m in _gated_modules(model))
    ids = torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(0))

    def step(pinned: bool):
        bud.mark_pinned(model, pinned)
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids).logits
        logits.pow(2).sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    (out_pinned, grads_pinned), (out_sampled, grads_sampled) = step(True), step(False)
    assert torch.equal(out_pinned, out_sampled)
    # every trainable tensor gets a gradient on both paths (DDP needs one), the gates' exactly zero
    assert grads_pinned.keys() == grads_sampled.keys() and any("log_scale" in n for n in grads_pinned)
    assert all(not grads_pinned[n].any() for n in grads_pinned if "log_alpha" in n)
    for name, grad in grads_sampled.items():
        assert torch.equal(grads_pinned[name], grad), name


def test_a_pinned_quantizer_reads_each_members_own_width_float_included():
    from leanlora.precision.learned import LearnedBits

    model, _ = _frozen_bert()
    template = next(m for g in model.leanlora_shared.groups for m in g.modules()
                    if isinstance(m, LearnedBits) and m.stacked and m.log_alpha.shape[0] >= 3)
    with torch.no_grad():  # member 0 float, member 1 at the second width, the rest at 2 bits
        template.log_alpha.fill_(-300.0)
        template.log_alpha[0] = 100.0
        template.log_alpha[1, 0] = 100.0
    members = template.log_alpha.shape[0]
    w = torch.randn(members, 4, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)

    def quantize(pinned: bool):
        template.pinned = pinned
        out = template._quantize(w, training=True)
        grad_w, grad_scale = torch.autograd.grad(out.pow(3).sum(), (w, template.log_scale))
        return out.detach(), grad_w, grad_scale

    pinned, sampled = quantize(True), quantize(False)
    for a, b in zip(pinned, sampled):
        assert torch.equal(a, b)
    assert torch.equal(pinned[0][0], w.detach()[0])  # float: w itself
    assert not torch.equal(pinned[0][1], w.detach()[1])
    assert pinned[0][1].unique().numel() <= 2 ** template.bit_set[1] - 1
    assert pinned[0][2].unique().numel() <= 3  # 2 bits: codes -1, 0, 1


def test_the_modules_learn_they_are_pinned_at_the_freeze_on_resume_and_not_in_a_new_run():
    model, ctl = _frozen_bert()
    state = ctl.state_dict()
    bud.mark_pinned(model, False)  # as a fresh process holds the model
    resumed = bud.BudgetController(0.3, (0.05, 0.2, 0.25))
    resumed.load_state_dict(state)
    model.leanlora_shared.budget_controller = resumed
    resumed.advance(model, 3)
    assert all(m.pinned for m in _gated_modules(model))
    model.leanlora_shared.budget_controller = None  # a new run on the trained model, its own controller
    model.leanlora_shared.config = AdapterConfig(**{**GATED, "target_modules": ("query", "key", "value", "dense"),
                                                    "budget": "off"})
    bud.start(model, 8)
    assert not any(m.pinned for m in _gated_modules(model))


# --- the loop ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget")
    return classification_yaml(root, tiny_bert_dir(root, minilm_dir()), max_steps=24, save_every=4, eval_every=8)


BUDGET_RUN = ["adapter.ranks=gated", "adapter.precision=learned", "adapter.budget=0.25"]
QUIET = dict(progress=False, log=lambda *_: None)


@pytest.mark.parametrize("gate_lr", ["3e-3", "3e-2"])
def test_the_loop_meets_the_budget_and_records_the_cost(config, tmp_path, gate_lr):
    run = load_run_config(config, [*BUDGET_RUN, f"adapter.gates.lr={gate_lr}"])
    result = train(run, tmp_path / "run", **QUIET)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    cost = metrics["cost"]
    assert {"bops", "bops_lora16", "bops_vs_lora16", "bytes", "mean_rank"} <= set(cost)
    assert abs(cost["bops_vs_lora16"] / 0.25 - 1) <= 0.1
    assert cost["bops_vs_lora16"] == leanlora.cost_report(result.model).total["bops_vs_lora"]
    assert metrics["best_step"] >= bud.controller(result.model).steps()[2]   # only the final structure
    assert all("cost" in h and "target" in h for h in metrics["history"])
    leanlora.finalize(result.model)
    assert leanlora.cost_report(result.model).total["bops_vs_lora"] == cost["bops_vs_lora16"]


def test_a_resumed_budget_run_ends_where_an_uninterrupted_one_does(config, tmp_path, monkeypatch):
    """Killed during the ramp (step 8) and again after the freeze (step 20, gates pinned at 17)."""
    run = load_run_config(config, BUDGET_RUN)
    full = train(run, tmp_path / "full", **QUIET)
    crash_after_saving(monkeypatch, 8)
    with pytest.raises(Crash):
        train(run, tmp_path / "crashed", **QUIET)
    crash_after_saving(monkeypatch, 20)
    with pytest.raises(Crash):
        train(None, tmp_path / "crashed", resume=True, **QUIET)
    monkeypatch.undo()
    resumed = train(None, tmp_path / "crashed", resume=True, **QUIET)
    assert resumed.losses == full.losses[20:]
    a = load_file(str(tmp_path / "full" / "adapter" / "leanlora_adapter.safetensors"))
    b = load_file(str(tmp_path / "crashed" / "adapter" / "leanlora_adapter.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ma, mb = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("full", "crashed"))
    assert ma["cost"] == mb["cost"] and ma["history"] == mb["history"] and ma["train_losses"] == mb["train_losses"]


def test_budget_takes_a_captured_step_and_refuses_fsdp2():
    bud.check_run(0.25, "none")                              # train.cuda_graph needs nothing of it
    assert bud.supported("none")
    with pytest.raises(ConfigError, match="adapter.budget.*fsdp2"):
        bud.check_run(0.25, "fsdp2")


def _penalty_ops(model) -> list[str]:
    """The operators of the loss's budget term and its backward, as a captured step records them."""
    with OpCount() as count:
        leanlora.regularizer(model).backward()
    model.zero_grad(set_to_none=True)
    return [str(op) for op in count.ops]


def test_a_captured_step_sees_every_steps_lambda_and_target():
    """Under train.cuda_graph a replay runs the operators recorded once, on the tensors recorded
    once: the budget term must be the same operators at every step before the freeze (before the
    ramp too, where λ is 0) and read λ and the target from tensors written in place."""
    model = gated_bert()
    bud.start(model, 100)                                    # ramp from step 5 to 20, freeze at 25
    ctl = bud.controller(model)
    leanlora.advance(model, 0)
    lmbda, target = ctl.lmbda, ctl.target
    assert float(lmbda) == 0.0 and float(leanlora.regularizer(model).detach()) == 0.0
    recorded = _penalty_ops(model)
    seen = []
    for step in range(1, 25):
        with torch.no_grad():                                # the gates travel, as training moves them
            for name, p in model.named_parameters():
                if "log_alpha" in name:
                    p.add_(0.01)
        leanlora.advance(model, step)
        assert ctl.lmbda is lmbda and ctl.target is target   # the same tensors, new values
        assert _penalty_ops(model) == recorded
        seen.append((float(lmbda), float(target)))
        expected = float(ctl.plan(model).expected())
        assert float(leanlora.regularizer(model).detach()) == pytest.approx(seen[-1][0] * (expected - seen[-1][1]), rel=1e-5)
    assert seen[2][0] == 0.0 < seen[-1][0]                    # 0 before the ramp, then risen in place
    assert seen[0][1] > seen[-1][1] == pytest.approx(ctl.budget)


def test_the_loop_captures_its_step_again_at_the_budgets_freeze():
    from types import SimpleNamespace

    from leanlora.train.loop import _advance

    class Graph:
        resets = 0

        def reset(self):
            self.resets += 1

    model = gated_bert()
    bud.start(model, 40)
    lines = []
    loop = SimpleNamespace(model=model, graphed=Graph(), log=lines.append)
    frozen_at = None
    for step in range(40):
        _advance(loop, step)
        if bud.frozen(model) and frozen_at is None:
            frozen_at = step
    assert frozen_at == 10 and loop.graphed.resets == 1       # once, at the freeze (a quarter of 40)
    assert lines == ["step 10: the budget fixed the adapter's structure; the step is compiled and captured again "
                     "for it (once)"]


# --- the budget sweep -------------------------------------------------------------------------------


def test_a_budget_sweep_costs_less_as_the_budget_falls_and_gives_the_trained_adapter_back(config, tmp_path):
    from leanlora.reports.budget_sweep import sweep_budgets
    from leanlora.cli import main

    out = tmp_path / "run"
    assert main(["train", str(config), "--out", str(out), "--no-progress", *BUDGET_RUN]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    trained = metrics["best_metrics"]["accuracy"]
    assert main(["sweep", str(out), "--budgets", "0.05,0.1,0.25,0.5", "--export", str(tmp_path / "chosen")]) == 0
    result = json.loads((out / "sweep.json").read_text())
    rows = sorted(result["rows"], key=lambda r: r["budget"])
    costs = [r["bops_vs_lora16"] for r in rows]
    assert all(a < b for a, b in zip(costs, costs[1:])), costs
    at_trained = next(r for r in rows if r["budget"] == 0.25)
    assert at_trained["score"] == trained and at_trained["bops_vs_lora16"] == metrics["cost"]["bops_vs_lora16"]
    assert (out / "sweep.png").is_file()
    chosen = json.loads((tmp_path / "chosen" / "leanlora_config.json").read_text())
    assert chosen  # the chosen point, finalized and saved

    # the same in Python, and the gates are given back as they were
    from leanlora.cli import load_trained

    _, model, _, task = load_trained(out)
    before = {c.name: c.log_alpha.detach().clone() for c in bud.gate_chains(model)[1]}
    res = sweep_budgets(model, lambda m: task.evaluate(m, 32, torch.device("cpu"))["accuracy"], [0.1, 0.25])
    assert res.row(0.25).score == trained and "| 0.25 |" in res.table()
    assert all(torch.equal(c.log_alpha, before[c.name]) for c in bud.gate_chains(model)[1])


def test_a_gated_run_without_a_budget_can_be_swept(config, tmp_path, capsys):
    from leanlora.cli import main

    out = tmp_path / "run"
    assert main(["train", str(config), "--out", str(out), "--no-progress", "adapter.ranks=gated",
                 "train.max_steps=4"]) == 0
    capsys.readouterr()
    assert main(["sweep", str(out), "--budgets", "0.2,0.6"]) == 0
    text = capsys.readouterr().out
    assert "| budget |" in text and "chosen budget" in text
    # float factors with gated ranks cost at least one component of four at 32 bits: 0.5 of LoRA-16
    assert "note: budget 0.2: this adapter's gates reach no cost that low; its point costs 0.5000" in text
    assert "note: budget 0.6" not in text
    assert main(["sweep", str(out), "--budgets", "0,0.5"]) == 2


# --- the default: budget "auto" --------------------------------------------------------------


def test_auto_is_the_default_and_becomes_the_default_budget_once_the_run_length_is_known():
    model = gated_bert()
    assert AdapterConfig(**GATED).budget == "auto" and bud.resolved(AdapterConfig(**GATED)) == bud.DEFAULT_BUDGET
    assert bud.controller(model) is None                   # a loop that never says its length: the prior alone
    leanlora.advance(model, 0)                              # ... trains as published, no error
    bud.start(model, 100)
    ctl = bud.controller(model)
    assert ctl is not None and ctl.budget == bud.DEFAULT_BUDGET and ctl.total == 100


def test_auto_on_an_adapter_with_nothing_to_gate_is_no_budget():
    config = AdapterConfig(target_modules=("query",))
    assert config.budget == "auto" and bud.resolved(config) is None
    model = leanlora.inject(tiny_bert(seed=0), config)
    bud.start(model, 100)
    assert bud.controller(model) is None


@pytest.mark.parametrize("off", ["off", None])
def test_off_means_the_gate_prior_alone(off):
    model = gated_bert(budget=off)
    assert model.leanlora_shared.config.budget is None
    bud.start(model, 100)
    assert bud.controller(model) is None


def test_an_explicit_budget_needs_the_run_length_and_says_how():
    model = gated_bert(budget=0.3)
    with pytest.raises(RuntimeError, match=r"leanlora\.budget\.start\(model, total_steps\)"):
        leanlora.advance(model, 0)


def test_auto_steps_aside_where_the_controller_cannot_run_but_an_explicit_budget_is_refused():
    bud.check_run("auto", "fsdp2")                   # auto: no error, the loop starts it with auto=False
    model = gated_bert()
    bud.start(model, 100, auto=bud.supported("fsdp2"))
    assert bud.controller(model) is None
    with pytest.raises(ConfigError, match="adapter.budget=off"):
        bud.check_run(0.25, "fsdp2")


def test_the_controller_reads_nothing_back_from_the_device_between_log_steps():
    model = gated_bert()
    bud.start(model, 40)
    ctl = bud.controller(model)
    for step in range(8):                                   # into the ramp (step 2 to 8), before the freeze (10)
        leanlora.advance(model, step)
    assert isinstance(ctl.lmbda, torch.Tensor) and isinstance(ctl.cost, torch.Tensor)
    state = json.loads(json.dumps(ctl.state_dict()))        # numbers in a checkpoint, tensors again after it
    again = bud.BudgetController(ctl.budget, (0.1, 0.5, 0.7))
    again.load_state_dict(state)
    assert isinstance(again.lmbda, torch.Tensor) and float(again.lmbda) == float(ctl.lmbda)


@pytest.mark.parametrize("bit_set, pins", [((2, 4, 8), (100.0, -300.0)), ((2, 4, 8, 16, 32), (100.0,) * 4),
                                           ((2, 8, 32), (-300.0, -300.0))])
def test_a_lone_pinned_quantizer_matches_sampling_at_any_width(bit_set, pins):
    from leanlora.precision.learned import LearnedBits

    q = LearnedBits(bit_set=bit_set).train()
    with torch.no_grad():
        q.log_alpha.copy_(torch.tensor(pins))
        q.log_scale.fill_(-0.2)  # clipping on: the range's gradient goes through the clamp too
    w = torch.randn(6, 24, generator=torch.Generator().manual_seed(2), requires_grad=True)
    results = []
    for pinned in (True, False):
        q.pinned = pinned
        out = q(w)
        results.append((out.detach(), *torch.autograd.grad(out.pow(3).sum(), (w, q.log_scale))))
    for a, b in zip(*results):
        assert torch.equal(a, b)
