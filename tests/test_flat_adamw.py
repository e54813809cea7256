"""FlatAdamW against torch.optim.AdamW: the same update, state dicts that resume, clear refusals."""

import copy

import pytest
import torch

from leanlora.speed.flat_adamw import FlatAdamW


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 6), (6,), (3,), (1,), (2, 3, 2), (5,)]
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def _groups(params):
    return [{"params": params[:4], "lr": 3e-2, "weight_decay": 0.1},
            {"params": params[4:], "lr": 1e-2, "weight_decay": 0.0, "betas": (0.8, 0.95)}]


def _grads(params, step, missing=()):
    g = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(params):
        p.grad = None if i in missing else torch.randn(p.shape, generator=g)


def _run(opt, params, steps, start=0, missing_at=None, scheduler=None):
    for step in range(start, start + steps):
        _grads(params, step, (missing_at or {}).get(step, ()))
        opt.step()
        if scheduler is not None:
            scheduler.step()


def test_matches_torch_adamw_with_two_groups_and_a_scheduler():
    ref, flat = _params(), _params()
    opt_ref, opt_flat = torch.optim.AdamW(_groups(ref), foreach=False), FlatAdamW(_groups(flat))
    sched_ref = torch.optim.lr_scheduler.LambdaLR(opt_ref, lambda s: 1.0 / (1 + s))
    sched_flat = torch.optim.lr_scheduler.LambdaLR(opt_flat, lambda s: 1.0 / (1 + s))
    _run(opt_ref, ref, 7, scheduler=sched_ref)
    _run(opt_flat, flat, 7, scheduler=sched_flat)
    for a, b in zip(ref, flat):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(a, b) for a, b in zip(_params(), flat))  # it moved them


def test_tensors_without_a_gradient_are_skipped_with_their_own_step_counts():
    ref, flat = _params(), _params()
    missing = {1: (2,), 2: (2, 5), 4: (0, 1, 2, 3, 4, 5)}  # step 4: nothing at all has a gradient
    opt_ref, opt_flat = torch.optim.AdamW(_groups(ref), foreach=False), FlatAdamW(_groups(flat))
    _run(opt_ref, ref, 6, missing_at=missing)
    _run(opt_flat, flat, 6, missing_at=missing)
    for a, b in zip(ref, flat):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    assert opt_flat.state[flat[0]]["member_steps"] == [5, 5, 3, 5]
    assert opt_flat.state[flat[4]]["member_steps"] == [5, 4]


def test_a_saved_state_resumes_the_same_trajectory():
    straight, resumed = _params(), _params()
    opt = FlatAdamW(_groups(straight))
    _run(opt, straight, 3)
    saved, weights = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in straight]
    _run(opt, straight, 3, start=3)

    with torch.no_grad():
        for p, w in zip(resumed, weights):
            p.copy_(w)
    fresh = FlatAdamW(_groups(resumed))
    fresh.load_state_dict(saved)
    _run(fresh, resumed, 3, start=3)
    for a, b in zip(straight, resumed):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_a_torch_adamw_state_dict_loads_and_continues_as_torch_would():
    ref, flat = _params(), _params()
    opt_ref = torch.optim.AdamW(_groups(ref), foreach=False)
    _run(opt_ref, ref, 3, missing_at={1: (3,)})
    with torch.no_grad():
        for p, r in zip(flat, ref):
            p.copy_(r)
    opt_flat = FlatAdamW(_groups(flat))
    opt_flat.load_state_dict(copy.deepcopy(opt_ref.state_dict()))
    assert opt_flat.state[flat[0]]["member_steps"] == [3, 3, 3, 2]
    _run(opt_ref, ref, 2, start=3)
    _run(opt_flat, flat, 2, start=3)
    for a, b in zip(ref, flat):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_its_state_dict_loads_into_torch_adamw_and_continues_as_itself():
    flat, ref = _params(), _params()
    opt_flat = FlatAdamW(_groups(flat))
    _run(opt_flat, flat, 3, missing_at={0: (5,)})  # tensor 5 steps twice, the rest three times
    saved = opt_flat.state_dict()
    assert sorted(len(s) for s in saved["state"].values()) == [3] * 6
    assert float(saved["state"][5]["step"]) == 2.0
    with torch.no_grad():
        for p, f in zip(ref, flat):
            p.copy_(f)
    opt_ref = torch.optim.AdamW(_groups(ref), foreach=False)
    opt_ref.load_state_dict(copy.deepcopy(saved))
    _run(opt_flat, flat, 2, start=3)
    _run(opt_ref, ref, 2, start=3)
    for a, b in zip(ref, flat):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_a_state_of_other_parameters_is_refused_with_the_sizes():
    opt = FlatAdamW([torch.nn.Parameter(torch.randn(4))])
    opt.param_groups[0]["params"][0].grad = torch.randn(4)
    opt.step()
    other = FlatAdamW([torch.nn.Parameter(torch.randn(5))])
    with pytest.raises(ValueError, match="exp_avg of a tensor of param group 0 holds 4 values; the parameter has 5"):
        other.load_state_dict(opt.state_dict())


def test_a_parameter_that_cannot_be_flattened_is_refused():
    with pytest.raises(ValueError, match="dtype torch.int64 cannot be flattened"):
        FlatAdamW([torch.zeros(3, dtype=torch.int64)])


def test_mixed_dtypes_in_one_group_step_in_their_own_buckets():
    ref = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2, dtype=torch.float64))]
    flat = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    opt_ref, opt_flat = torch.optim.AdamW(ref, lr=1e-2, foreach=False), FlatAdamW(flat, lr=1e-2)
    for opt, ps in ((opt_ref, ref), (opt_flat, flat)):
        for step in range(3):
            for p in ps:
                p.grad = torch.full_like(p, 0.5 + step)
            opt.step()
    assert [len(b) for b in opt_flat.buckets()] == [2]
    for a, b in zip(ref, flat):
        torch.testing.assert_close(b, a)


def test_a_group_added_later_steps_like_torch():
    ref, flat = _params(), _params()
    opt_ref = torch.optim.AdamW(ref[:3], lr=1e-2, foreach=False)
    opt_flat = FlatAdamW(flat[:3], lr=1e-2)
    _run(opt_ref, ref, 2)
    _run(opt_flat, flat, 2)
    opt_ref.add_param_group({"params": ref[3:], "lr": 5e-2})
    opt_flat.add_param_group({"params": flat[3:], "lr": 5e-2})
    _run(opt_ref, ref, 2, start=2)
    _run(opt_flat, flat, 2, start=2)
    for a, b in zip(ref, flat):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_a_training_checkpoint_of_it_resumes_into_torch_adamw(tmp_path):
    """The loop's checkpoint (safetensors + JSON) written with FlatAdamW loads into torch's AdamW,
    as a run resumed under FSDP2 (sharded parameters step with torch's) would load it."""
    import leanlora
    from conftest import tiny_llama
    from leanlora.optim import adamw
    from leanlora.train.checkpoint import load_checkpoint, save_checkpoint

    def setup(make):
        torch.manual_seed(0)
        model = leanlora.inject(tiny_llama(), leanlora.AdapterConfig(target_modules=("q_proj",), ranks="gated",
                                                                    precision="learned"))
        opt = make(leanlora.param_groups(model, lr=1e-2))
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    def train(model, opt, steps):
        ids = torch.arange(16).reshape(2, 8)
        for _ in range(steps):
            (model(input_ids=ids, labels=ids).loss + leanlora.regularizer(model)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    model, opt, sched = setup(lambda g: adamw(g, lr=1e-2))
    assert isinstance(opt, FlatAdamW)
    train(model, opt, 2)
    folder = save_checkpoint(tmp_path, 2, model, opt, sched, {})
    other, torch_opt, torch_sched = setup(lambda g: torch.optim.AdamW(g, lr=1e-2, foreach=False))
    load_checkpoint(folder, other, torch_opt, torch_sched)
    train(model, opt, 2)
    train(other, torch_opt, 2)
    mine = [p for p in model.parameters() if p.requires_grad]
    theirs = [p for p in other.parameters() if p.requires_grad]
    for a, b in zip(theirs, mine):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_flat_adamw_counts_come_from_the_device_counter_while_members_agree():
    """A replayed step advances FlatAdamW's device counter without its Python bookkeeping."""
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = FlatAdamW([a, b], lr=0.1)
    for _ in range(2):
        a.grad, b.grad = torch.ones(3), torch.ones(2)
        opt.step()
    state = next(iter(opt.state.values()))
    state["step"] += 3  # what three replays of a captured step do
    steps = [float(s["step"]) for s in opt.state_dict()["state"].values()]
    assert steps == [5.0, 5.0]
    # an uneven step (b without a gradient) continues from the device count, not the stale list
    a.grad, b.grad = torch.ones(3), None
    opt.step()
    assert state["member_steps"] == [6, 5]
    assert [float(s["step"]) for s in opt.state_dict()["state"].values()] == [6.0, 5.0]
