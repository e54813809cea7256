"""A whole training step captured as one CUDA graph: the same training as running it step by step.

The CPU tests cover the checks around the graph; the CUDA tests (skipped without a GPU, run on the
device machine) compare graphed against plain training, value for value.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import types
import warnings

import pytest
import torch

import leanlora
from leanlora.optim import adamw
from leanlora.train.step_graph import StepGraph, batch_signature, capturable_optimizer
from conftest import tiny_llama, token_batch

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_batch_signature_names_shape_dtype_and_rejects_what_is_not_a_tensor_mapping():
    a = {"input_ids": torch.zeros(2, 8, dtype=torch.long), "labels": torch.zeros(2, 8, dtype=torch.long)}
    assert batch_signature(a) == batch_signature({k: v.clone() for k, v in a.items()})
    assert batch_signature(a) != batch_signature({**a, "labels": torch.zeros(2, 9, dtype=torch.long)})
    assert batch_signature(a) != batch_signature({**a, "labels": torch.zeros(2, 8, dtype=torch.int32)})
    ids = torch.zeros(2, 8, dtype=torch.long)
    assert batch_signature({"input_ids": ids, "labels": ids}) != batch_signature(a)  # one tensor, two names
    with pytest.raises(TypeError, match="mapping of names to tensors, got list"):
        batch_signature([torch.zeros(2)])
    with pytest.raises(TypeError, match="batch entry 'n' is of type int"):
        batch_signature({"input_ids": torch.zeros(2), "n": 3})


def test_capturable_optimizer_refuses_host_side_optimizers_by_group():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="param group 0 of AdamW is on cpu"):
        capturable_optimizer(torch.optim.AdamW([p]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_step_graph_says_it_needs_cuda():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(RuntimeError, match="StepGraph needs CUDA"):
        StepGraph(lambda batch: None, torch.optim.AdamW([p]))


# --- the bookkeeping around the graph, on the CPU with a stand-in for torch's CUDA graph --------

class _FakeCapture:
    """Stands in for torch.cuda: capturing runs the step's Python but none of its effects (the
    trained state is put back afterwards, as nothing would have run on the GPU); a replay runs the
    step again on the graph's input tensors, as the recorded kernels would."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer, self.replay_step = model, optimizer, None
        self.sync_mode, self.captures, self.fail_capture, self.sync_in_step = 0, 0, False, False
        self.pools = []  # the memory pool each capture was given

    # torch.cuda functions StepGraph calls
    def graph(self, g, pool=None, stream=None):
        fake = self
        fake.pools.append(pool)

        class Capture:
            def __enter__(self):
                fake.captures += 1
                fake.saved = ({k: v.clone() for k, v in fake.model.state_dict().items()},
                              copy.deepcopy(fake.optimizer.state_dict()))

            def __exit__(self, *exc):
                fake.model.load_state_dict(fake.saved[0])
                fake.optimizer.load_state_dict(fake.saved[1])
                return False

        return Capture()

    def replay(self):
        self.replay_step()


def _fake_cuda(monkeypatch, fake):
    from leanlora.train import step_graph

    class Graph:
        def replay(self):
            fake.replay()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "Stream", lambda: types.SimpleNamespace(wait_stream=lambda s: None))
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: types.SimpleNamespace(wait_stream=lambda s: None))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: torch.get_rng_state())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state: None)
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: fake.sync_mode)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: setattr(fake, "sync_mode", mode))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", fake.graph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())
    monkeypatch.setattr(step_graph, "capturable_optimizer", lambda optimizer: optimizer)


def _cpu_setup(monkeypatch, warmup=2, max_shapes=8):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    fake = _FakeCapture(model, optimizer)
    calls = []

    def step(batch):
        calls.append(batch)
        if fake.sync_in_step and fake.sync_mode == "error":
            raise RuntimeError("called a synchronizing CUDA operation")
        if fake.fail_capture and fake.captures and not hasattr(fake, "failed_once"):
            fake.failed_once = True
            raise RuntimeError("operation not permitted when stream is capturing")
        loss = (model(batch["x"]) - batch["y"]).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    _fake_cuda(monkeypatch, fake)
    run = StepGraph(step, optimizer, warmup=warmup, max_shapes=max_shapes)
    fake.replay_step = lambda: step(run.inputs)
    return model, run, fake, calls


def _batches(n, rows=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(rows, 4, generator=g), "y": torch.randn(rows, 1, generator=g)} for _ in range(n)]


def _plain(batches):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    for b in batches:
        (model(b["x"]) - b["y"]).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model


def test_warmup_capture_and_replays_train_what_plain_steps_train(monkeypatch):
    model, run, fake, calls = _cpu_setup(monkeypatch)
    batches = _batches(6)
    for b in batches:
        run(b)
    assert (run.uncaptured_calls, fake.captures, run.replays) == (2, 1, 4)
    # every call, warm-up and capture included, ran on the graph's own input tensors
    assert all(c is run.inputs for c in calls)
    assert fake.sync_mode == 0  # the last warm-up step's synchronisation check was switched off again
    torch.testing.assert_close(model.weight, _plain(batches).weight)


def test_one_tensor_under_two_names_is_one_input_and_must_stay_one(monkeypatch):
    _, run, fake, _ = _cpu_setup(monkeypatch)
    x = torch.randn(3, 4)

    def step(batch):
        return batch["a"].sum()

    run.step = step
    fake.replay_step = lambda: step(run.inputs)
    for _ in range(3):
        run({"a": x, "b": x})
    assert run.inputs["a"] is run.inputs["b"] and run.replays == 1
    run({"a": x, "b": x.clone()})  # now two tensors: not what was captured
    assert run.replays == 1 and run.uncaptured_calls == 3


def test_a_batch_of_another_shape_warms_up_on_its_own_and_the_first_graph_stays(monkeypatch):
    model, run, fake, _ = _cpu_setup(monkeypatch)
    batches = _batches(4) + _batches(1, rows=5, seed=1) + _batches(2, seed=2)
    for b in batches:
        run(b)
    assert (run.uncaptured_calls, fake.captures, run.replays) == (3, 1, 4)
    torch.testing.assert_close(model.weight, _plain(batches).weight)


def test_each_shape_gets_its_own_graph_in_one_shared_pool_and_replays_its_own_inputs(monkeypatch):
    model, run, fake, calls = _cpu_setup(monkeypatch)
    a, b = _batches(8, rows=3), _batches(8, rows=5, seed=1)
    batches = [x for pair in zip(a, b) for x in pair]  # the shapes alternate, as padded lengths do
    for batch in batches:
        run(batch)
        assert calls[-1] is run.inputs and calls[-1]["x"].shape == batch["x"].shape
    # 2 warm-up steps and a capture per shape, then replays of the shape's own graph
    assert (run.uncaptured_calls, fake.captures, run.replays, run.graphs) == (4, 2, 12, 2)
    assert fake.pools[0] is fake.pools[1] is not None
    torch.testing.assert_close(model.weight, _plain(batches).weight)


def test_shapes_past_max_shapes_run_uncaptured_and_a_reset_drops_every_graph(monkeypatch):
    model, run, fake, _ = _cpu_setup(monkeypatch, max_shapes=1)
    batches = _batches(4) + _batches(3, rows=5, seed=1) + _batches(1, seed=2)
    for b in batches:
        run(b)
    assert (run.uncaptured_calls, fake.captures, run.replays, run.graphs) == (5, 1, 3, 1)
    run.reset()  # what the loop does at a budget's freeze
    assert run.graphs == 0 and run.graph is None and not run.stale
    more = _batches(3, seed=3)
    for b in more:
        run(b)
    assert (fake.captures, run.graphs) == (2, 1) and fake.pools[1] is not fake.pools[0]  # a fresh pool
    torch.testing.assert_close(model.weight, _plain(batches + more).weight)


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_shapes=0), "max_shapes=0 is invalid: an integer >= 1"),
    (dict(max_shapes="4"), "max_shapes='4' is invalid: an integer >= 1"),
    (dict(warmup=2.5), "warmup=2.5 is invalid: an integer >= 1"),
    (dict(warmup=True), "warmup=True is invalid: an integer >= 1"),
])
def test_counts_that_are_not_integers_of_at_least_one_are_refused_by_name(monkeypatch, kwargs, message):
    _fake_cuda(monkeypatch, _FakeCapture(None, None))
    with pytest.raises(ValueError, match=message):
        StepGraph(lambda batch: None, torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))]), **kwargs)


@pytest.mark.parametrize("failure,warning", [
    ("fail_capture", "cannot be captured as a CUDA graph: RuntimeError: operation not permitted"),
    ("sync_in_step", "the step waits for the GPU inside"),  # found by the last warm-up step's check
])
def test_a_step_that_cannot_be_captured_warns_and_trains_on_uncaptured(monkeypatch, failure, warning):
    model, run, fake, _ = _cpu_setup(monkeypatch)
    setattr(fake, failure, True)
    batches = _batches(5)
    with pytest.warns(RuntimeWarning, match=warning):
        for b in batches:
            run(b)
    assert run.stale and run.graph is None and run.replays == 0 and fake.sync_mode == 0
    assert fake.captures == (1 if failure == "fail_capture" else 0)
    assert "stream is capturing" in run.failure_trace or "synchronizing" in run.failure_trace
    torch.testing.assert_close(model.weight, _plain(batches).weight)


def test_gradients_left_before_capture_are_refused(monkeypatch):
    model, run, fake, _ = _cpu_setup(monkeypatch)
    run.step = lambda batch: (model(batch["x"]).sum().backward(), torch.zeros(()))[1]  # never clears them
    with pytest.raises(RuntimeError, match="must end with optimizer.zero_grad"):
        for b in _batches(3):
            run(b)


# --- on a CUDA device --------------------------------------------------------------------------

def _adapted(ranks: str, precision: str, factors: str = "dense", base: str = "dense"):
    config = leanlora.AdapterConfig(target_modules=TARGETS, r=4, alpha=8, ranks=ranks, precision=precision,
                                    factors=factors, base=base,
                                    bank=leanlora.BankConfig(num_vectors=16, vector_length=16))
    return leanlora.inject(tiny_llama().cuda(), config).train()


def _train(model, steps: int, graphed: bool, compiled: bool = False, batches=None, optimizer_class=None):
    """``steps`` AdamW steps under a linear LR decay; the trained tensors and the losses."""
    groups = leanlora.param_groups(model, 1e-2, 0.0)
    optimizer = optimizer_class(groups, lr=1e-2) if optimizer_class else adamw(groups, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / (2 * steps))
    forward = torch.compile(model) if compiled else model

    def step(batch):
        loss = forward(**batch).loss + leanlora.regularizer(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    run = StepGraph(step, optimizer, warmup=2) if graphed else step
    torch.manual_seed(7)
    losses = []
    for i in range(steps):
        leanlora.advance(model, i)
        x = (batches[i] if batches else token_batch(seed=i)).cuda()
        losses.append(float(run({"input_ids": x, "labels": x})))
        scheduler.step()
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return trained, losses, run


@cuda
@pytest.mark.parametrize("ranks,precision,factors,base", [
    ("fixed", "float", "dense", "dense"),      # LoRA
    ("gated", "learned", "dense", "dense"),    # B-LoRA: gate noise drawn inside the graph
    ("nested", "float", "dense", "dense"),     # DyLoRA: the rank drawn outside, written into a buffer
    ("nested", "float", "dense", "nf4"),       # QDyLoRA: the same over a 4-bit base
    ("gated", "learned", "bank", "dense"),     # the bank with gates and learned bits
    ("gated", "learned", "bank", "nf4"),       # all three axes over a 4-bit base
])
def test_graphed_training_equals_plain_training(ranks, precision, factors, base):
    plain, plain_losses, _ = _train(_adapted(ranks, precision, factors, base), 8, graphed=False)
    graphed, graphed_losses, run = _train(_adapted(ranks, precision, factors, base), 8, graphed=True)
    assert run.replays == 6 and run.uncaptured_calls == 2  # 2 warm-up steps, then capture + 5 replays
    # the bank's backward adds with atomics (index_add), in an order that differs from run to run
    rtol, atol = (1e-4, 1e-5) if factors == "bank" else (1e-5, 1e-6)
    assert graphed_losses == pytest.approx(plain_losses, rel=rtol, abs=atol)
    for name, value in plain.items():
        torch.testing.assert_close(graphed[name], value, rtol=rtol, atol=atol, msg=name)


@cuda
def test_graphed_training_with_torchs_fused_adamw_equals_plain_training():
    # torch refuses to capture its optimizers' step unless 'capturable' is set, fused or not
    fused = functools.partial(torch.optim.AdamW, fused=True)
    plain, plain_losses, _ = _train(_adapted("fixed", "float"), 6, graphed=False, optimizer_class=fused)
    graphed, graphed_losses, run = _train(_adapted("fixed", "float"), 6, graphed=True, optimizer_class=fused)
    assert run.replays == 4 and run.graph is not None
    assert graphed_losses == pytest.approx(plain_losses, rel=1e-5, abs=1e-6)
    for name, value in plain.items():
        torch.testing.assert_close(graphed[name], value, rtol=1e-5, atol=1e-6, msg=name)


@cuda
def test_graphed_compiled_training_equals_compiled_training():
    plain, plain_losses, _ = _train(_adapted("gated", "learned"), 6, graphed=False, compiled=True)
    graphed, graphed_losses, run = _train(_adapted("gated", "learned"), 6, graphed=True, compiled=True)
    assert run.replays == 4
    assert graphed_losses == pytest.approx(plain_losses, rel=1e-4, abs=1e-5)
    for name, value in plain.items():
        torch.testing.assert_close(graphed[name], value, rtol=1e-4, atol=1e-5, msg=name)


@cuda
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_padded_lengths_that_alternate_each_get_a_graph_and_train_what_plain_steps_train(compiled):
    # three lengths in turn, as batches padded to multiples of a bucket come; the graphs share one
    # memory pool, so each replay must leave the others' inputs and the trained tensors intact
    batches = [token_batch(seq=(8, 12, 16)[i % 3], seed=i) for i in range(15)]
    plain, plain_losses, _ = _train(_adapted("gated", "learned"), 15, graphed=False, compiled=compiled,
                                    batches=batches)
    graphed, graphed_losses, run = _train(_adapted("gated", "learned"), 15, graphed=True, compiled=compiled,
                                          batches=batches)
    assert (run.graphs, run.uncaptured_calls, run.replays) == (3, 6, 9)
    tol = dict(rel=1e-4, abs=1e-5) if compiled else dict(rel=1e-5, abs=1e-6)
    assert graphed_losses == pytest.approx(plain_losses, **tol)
    for name, value in plain.items():
        torch.testing.assert_close(graphed[name], value, rtol=tol["rel"], atol=tol["abs"], msg=name)


@cuda
def test_a_batch_of_another_shape_runs_uncaptured_and_training_stays_the_same():
    batches = [token_batch(seq=12 if i != 5 else 9, seed=i) for i in range(8)]
    plain, plain_losses, _ = _train(_adapted("gated", "learned"), 8, graphed=False, batches=batches)
    graphed, graphed_losses, run = _train(_adapted("gated", "learned"), 8, graphed=True, batches=batches)
    assert run.uncaptured_calls == 3 and run.replays == 5
    assert graphed_losses == pytest.approx(plain_losses, rel=1e-5, abs=1e-6)
    for name, value in plain.items():
        torch.testing.assert_close(graphed[name], value, rtol=1e-5, atol=1e-6, msg=name)


@cuda
def test_replaced_trained_tensors_stop_the_replays_with_a_warning():
    model = _adapted("fixed", "float")
    _, _, run = _train(model, 4, graphed=True)
    assert run.graph is not None
    p = next(p for p in model.parameters() if p.requires_grad)
    p.data = p.data.clone()  # new storage: the graph would write the old one
    x = token_batch().cuda()
    with pytest.warns(RuntimeWarning, match="changed storage since the step was captured"):
        run({"input_ids": x, "labels": x})
    assert run.graph is None and run.stale
    calls = run.uncaptured_calls
    run({"input_ids": x, "labels": x})
    assert run.uncaptured_calls == calls + 1 and run.graph is None


@cuda
def test_capturable_optimizer_refuses_foreach_adamw_and_makes_lr_a_tensor():
    p = torch.nn.Parameter(torch.zeros(3, device="cuda"))
    with pytest.raises(ValueError, match="fused=True or capturable=True"):
        capturable_optimizer(torch.optim.AdamW([p], foreach=True))
    opt = capturable_optimizer(torch.optim.AdamW([p], lr=0.5, fused=True))
    assert opt.param_groups[0]["capturable"]
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor) and opt.param_groups[0]["lr"].is_cuda
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    p.grad = torch.zeros_like(p)
    opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the scheduler fills the tensor in place, without complaint
        sched.step()
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.25)
