"""No non-finite weight leaves the training loop: the device-side check after each optimizer
step (FiniteGuard), its place in the plain and the graphed step, and what a run that trips it
leaves on disk; the stop message's advice is a command that runs."""

from __future__ import annotations

import contextlib
import math
import re
import shlex
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import leanlora
from conftest import OpCount, minilm_dir, tiny_bert
from leanlora.cli import main
from leanlora.config import ConfigError
from leanlora.train.finite import FiniteGuard, TrainingDiverged
from leanlora.train.loop import train
from leanlora.train.runconfig import load_run_config
from train_fixtures import classification_yaml, nan_loss_at, tiny_bert_dir

QUIET = dict(progress=False, log=lambda *_: None)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _params(*values: torch.Tensor) -> list[tuple[str, torch.nn.Parameter]]:
    return [(f"p{i}", torch.nn.Parameter(v)) for i, v in enumerate(values)]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_the_flag_trips_on_any_nonfinite_value_and_names_the_first_tensor(bad):
    named = _params(torch.ones(3), torch.zeros(2, 2), torch.ones(4))
    guard = FiniteGuard(named, torch.device("cpu"))
    guard.update()
    assert not bool(guard.tripped) and guard.fold(torch.tensor(0.5)).item() == 0.5
    with torch.no_grad():
        named[1][1][1, 0] = bad
        named[2][1][0] = bad
    guard.update()
    assert bool(guard.tripped) and guard.first_nonfinite() == "p1"
    assert torch.isnan(guard.fold(torch.tensor(0.5)))
    with torch.no_grad():  # the flag keeps what it saw until the run stops
        named[1][1].zero_()
        named[2][1].zero_()
    guard.update()
    assert bool(guard.tripped)


def test_large_finite_weights_do_not_trip_it():
    """max |x| cannot overflow the way a 2-norm of large finite values does."""
    big32 = torch.full((1000,), 3e38)
    big16 = torch.full((1000,), 65504.0, dtype=torch.float16)
    assert torch.isinf(torch.linalg.vector_norm(big32))  # what a 2-norm check would have reported
    guard = FiniteGuard(_params(big32, big16), torch.device("cpu"))
    guard.update()
    assert not bool(guard.tripped)


def test_frozen_and_empty_tensors_are_left_out():
    frozen = torch.nn.Parameter(torch.full((2,), float("nan")), requires_grad=False)
    guard = FiniteGuard([("frozen", frozen), ("empty", torch.nn.Parameter(torch.empty(0)))], torch.device("cpu"))
    guard.update()
    assert guard.names == ["empty"] and not bool(guard.tripped)


def test_the_check_reads_nothing_back_to_the_host():
    """What a captured CUDA graph needs, and what keeps a fast step from waiting on the GPU."""
    model = leanlora.inject(tiny_bert(), leanlora.AdapterConfig(target_modules=("query", "value"), r=4))
    guard = FiniteGuard(model.named_parameters(), torch.device("cpu"))
    with OpCount() as count:
        guard.update()
        guard.fold(torch.tensor(1.0))
    ops = [str(op) for op in count.ops]
    assert ops and not any("_local_scalar_dense" in op or "item" in op for op in ops), ops
    assert sum("_foreach_norm" in op for op in ops) == 1, ops  # one fused reduction over all its tensors
    assert len(guard.params) == sum(p.requires_grad for p in model.parameters()) == 2  # A and B of one group


def test_the_graphed_step_runs_the_check_after_its_update(monkeypatch):
    """train.cuda_graph: the check is part of the captured step (StepGraph stands in as a plain call)."""
    from leanlora.train import whole_step
    from leanlora.train.tasks import ClassificationTask

    class Uncaptured:
        def __init__(self, step, optimizer, log=None):
            self.step = step

        def __call__(self, batch):
            return self.step(batch)

    monkeypatch.setattr(whole_step, "StepGraph", Uncaptured)
    model = leanlora.inject(tiny_bert(), leanlora.AdapterConfig(target_modules=("query", "value"), r=4,
                                                                modules_to_save=("classifier",))).train()
    optimizer = leanlora.optim.adamw(leanlora.param_groups(model, float("inf")), lr=float("inf"))
    guard = FiniteGuard(model.named_parameters(), torch.device("cpu"))
    task = ClassificationTask.__new__(ClassificationTask)
    task.regression = False
    step = whole_step.graphed_training_step(model, task, optimizer, lambda m: torch.zeros(()),
                                            contextlib.nullcontext(), 0.0, after_update=guard.update)
    batch = {"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 5, dtype=torch.long),
             "labels": torch.tensor([0, 1])}
    loss, prior, grad_norm = step(batch)  # the step returns [task loss, prior, gradient norm before clipping]
    assert torch.isfinite(loss) and prior == 0 and torch.isfinite(grad_norm) and grad_norm > 0
    assert bool(guard.tripped)  # a finite loss, then an update to NaN/inf
    assert guard.first_nonfinite() is not None


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("finite")
    return classification_yaml(root, tiny_bert_dir(root, minilm_dir()), max_steps=8, batch_size=16, eval_every=4,
                               save_every=1)


def _poison_update(monkeypatch, at_step: int) -> None:
    """Make the loop's optimizer write one NaN into the last adapter tensor at its ``at_step``-th
    update (an update that overflowed, without the wait for one)."""
    from leanlora.train import loop

    real = loop.adamw

    def adamw(groups, **kwargs):
        adapter = next(g for g in groups if g["role"] == "adapter")
        optimizer, count, victim = real(groups, **kwargs), [0], adapter["params"][-1]

        def poison(*_):
            count[0] += 1
            if count[0] == at_step:
                with torch.no_grad():
                    victim.view(-1)[0] = float("nan")

        optimizer.register_step_post_hook(poison)
        return optimizer

    monkeypatch.setattr(loop, "adamw", adamw)


def test_a_nonfinite_update_is_never_saved(config, tmp_path, monkeypatch):
    """Checkpoints every step, evaluation (best/) every 4: step 5's update turns a weight NaN. The run
    stops at once naming step 5 and the tensor; the last checkpoint is the finite step 4, and best/
    holds step 4's finite adapter; adapter/ is not written."""
    _poison_update(monkeypatch, at_step=5)
    out = tmp_path / "r"
    with pytest.raises(TrainingDiverged, match=r"update of step 5 made trained weights non-finite \(first: "
                                               r"bert\.encoder\.layer\.0\.attention\.self\.query\.factors\.lora_B\)"
                                               r".*last good checkpoint is .*step-00000004"):
        train(load_run_config(config), out, **QUIET)
    steps = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert steps == ["step-00000004"]
    for path in (out / "checkpoints" / steps[0] / "adapter.safetensors", out / "best" / "leanlora_adapter.safetensors"):
        for name, tensor in load_file(str(path)).items():
            assert torch.isfinite(tensor).all(), (path, name)
    assert not (out / "adapter").exists()


def test_an_update_that_turns_weights_non_finite_stops_before_anything_is_written(config, tmp_path, monkeypatch):
    """Such a run used to exit 0 with NaN in adapter/, best/ and the checkpoint."""
    step = torch.optim.AdamW.step

    def overflowing(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing)
    run = load_run_config(config, ["train.max_steps=1", "train.warmup_ratio=0"])
    with pytest.raises(TrainingDiverged, match=r"update of step 1 made trained weights non-finite.*"
                                               r"No checkpoint was written before it"):
        train(run, tmp_path / "r1", **QUIET)
    assert sorted(p.name for p in (tmp_path / "r1").iterdir()) == ["run.yaml"]


def test_the_advised_resume_command_runs_with_the_lower_learning_rate(config, tmp_path, monkeypatch, capsys):
    nan_loss_at(monkeypatch, call=3)
    out = tmp_path / "run dir"  # a space: the advised command quotes the path
    assert main(["train", str(config), "--out", str(out), "--no-progress", "data.eval_file="]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "loss is nan at step 3" in err and "step-00000002" in err, err
    command = re.search(r"`(leanlora train --resume [^`]+)`", err).group(1)
    assert command.endswith("train.lr=0.003")
    monkeypatch.undo()

    assert main(shlex.split(command)[1:] + ["--no-progress"]) == 0
    assert load_run_config(out / "run.yaml").train.lr == pytest.approx(3e-3)
    state = load_file(str(out / "adapter" / "leanlora_adapter.safetensors"))
    assert all(torch.isfinite(t).all() for t in state.values())


def test_without_a_checkpoint_the_advice_is_a_fresh_run_that_runs(config, tmp_path, monkeypatch, capsys):
    _poison_update(monkeypatch, at_step=1)
    out = tmp_path / "r"
    assert main(["train", str(config), "--out", str(out), "--no-progress", "train.max_steps=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "the update of step 1 made trained weights non-finite" in err and "No checkpoint was written" in err, err
    command = re.search(r"`(leanlora train [^`]+)`", err).group(1)
    assert command == f"leanlora train {out / 'run.yaml'} train.lr=0.003 --out {out}"
    monkeypatch.undo()
    assert main(shlex.split(command)[1:] + ["--no-progress"]) == 0
    assert load_run_config(out / "run.yaml").train.lr == pytest.approx(3e-3)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_hold_skips_the_update_of_a_nonfinite_loss_and_every_later_one_on_the_device(device):
    """The flag reaches torch's fused AdamW as ``found_inf``: weights, moments and step count stay put
    from the first non-finite loss on, with nothing read back to the host."""
    weight = torch.nn.Parameter(torch.ones(4, device=device))
    optimizer = torch.optim.AdamW([weight], lr=0.1, fused=True)
    guard = FiniteGuard([("w", weight)], torch.device(device))
    states = []
    for loss_value in (1.0, float("nan"), 2.0):
        (weight.sum() * loss_value).backward()
        assert guard.hold(torch.tensor(loss_value, device=device), optimizer)
        optimizer.step()
        optimizer.zero_grad()
        states.append((weight.detach().clone(), optimizer.state[weight]["exp_avg"].clone(),
                       float(optimizer.state[weight]["step"])))
    assert not torch.equal(states[0][0], torch.ones(4, device=device))  # the finite loss's update landed
    for later in states[1:]:
        assert torch.equal(later[0], states[0][0]) and torch.equal(later[1], states[0][1]) and later[2] == 1.0
    assert not guard.hold(torch.tensor(1.0), torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))], foreach=True))


def _fused_optimizer(monkeypatch) -> list[dict[str, torch.Tensor]]:
    """Give the loop torch's fused AdamW on the CPU too (it takes a ``found_inf`` flag, so the loop reads
    each loss a step late, as it does on CUDA); the trained tensors after each ``step()`` call."""
    from leanlora.train import loop

    real, after = loop.adamw, []

    def adamw(groups, **kwargs):
        optimizer = real(groups, fused=True, **kwargs)
        params = [p for g in groups for p in g["params"]]
        optimizer.register_step_post_hook(lambda *_: after.append({i: p.detach().clone() for i, p in enumerate(params)}))
        return optimizer

    monkeypatch.setattr(loop, "adamw", adamw)
    return after


UNSAVED = ["data.eval_file=", "train.save_every=0", "train.log_every=100"]  # nothing read the loss between steps


def test_a_loss_read_a_step_late_still_keeps_its_update_off_the_weights(config, tmp_path, monkeypatch):
    """Step 5's loss is NaN. The loop issues step 6 before it reads step 5's loss, then stops naming
    step 5: the optimizer was called for steps 5 and 6 and changed nothing in either."""
    after = _fused_optimizer(monkeypatch)
    nan_loss_at(monkeypatch, call=5)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 5 "):
        train(load_run_config(config, UNSAVED), tmp_path / "r", **QUIET)
    assert len(after) == 6  # the late read: step 6's update was issued, and skipped on the device
    for later in after[4:]:
        for i, tensor in after[3].items():
            assert torch.equal(later[i], tensor), i
    assert not any(torch.equal(after[2][i], t) for i, t in after[3].items() if t.abs().sum() > 0)  # step 4 moved them


def test_a_broken_weight_found_a_step_late_still_names_the_update_that_broke_it(config, tmp_path, monkeypatch):
    """Step 5's update writes a NaN; the losses of steps 6 and 7 are NaN (folded) and their updates skipped.
    The late read of step 6's loss names step 5's update, and nothing is written."""
    after = _fused_optimizer(monkeypatch)
    _poison_update(monkeypatch, at_step=5)  # wraps the fused optimizer above
    out = tmp_path / "r"
    with pytest.raises(TrainingDiverged, match=r"update of step 5 made trained weights non-finite"):
        train(load_run_config(config, UNSAVED), out, **QUIET)
    assert len(after) == 7 and sorted(p.name for p in out.iterdir()) == ["run.yaml"]


def test_reading_each_loss_a_step_late_changes_no_number(config, tmp_path, monkeypatch):
    """The same run with each loss read at once (the path of optimizers without ``found_inf``)."""
    _fused_optimizer(monkeypatch)
    late = train(load_run_config(config, UNSAVED), tmp_path / "late", **QUIET)
    monkeypatch.setattr(FiniteGuard, "hold", lambda *_: False)
    now = train(load_run_config(config, UNSAVED), tmp_path / "now", **QUIET)
    assert late.losses == now.losses and len(now.losses) == 8 and all(map(math.isfinite, now.losses))
    a, b = (load_file(str(d / "adapter" / "leanlora_adapter.safetensors")) for d in (tmp_path / "late", tmp_path / "now"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- on a CUDA device (skipped without one) ---------------------------------------------------


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_on_cuda_the_fused_reduction_sees_every_nonfinite_value(dtype, bad):
    sizes = [1, 7, 4096, 100_003, 3]  # small and large tensors: several chunks of the multi-tensor kernel
    for where in range(len(sizes)):
        g = torch.Generator(device="cuda").manual_seed(where)
        tensors = [torch.randn(n, device="cuda", generator=g).to(dtype) for n in sizes]
        guard = FiniteGuard(_params(*tensors), torch.device("cuda"))
        guard.update()
        assert not bool(guard.tripped)
        with torch.no_grad():
            guard.params[where].view(-1)[sizes[where] // 2] = bad
        guard.update()
        assert bool(guard.tripped) and guard.first_nonfinite() == f"p{where}", (where, dtype, bad)


@cuda
def test_the_guard_runs_inside_a_captured_step_and_trips_on_a_replay():
    from conftest import tiny_llama, token_batch
    from leanlora.train.step_graph import StepGraph

    model = leanlora.inject(tiny_llama().cuda(), leanlora.AdapterConfig(target_modules=("q_proj", "v_proj"), r=4))
    model.train()
    optimizer = leanlora.optim.adamw(leanlora.param_groups(model, 1e-3), lr=1e-3)
    guard = FiniteGuard(model.named_parameters(), torch.device("cuda"))

    def step(batch):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        guard.update()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    run = StepGraph(step, optimizer, warmup=2)  # the last warm-up step runs under sync checking
    x = token_batch().cuda()
    losses = [float(guard.fold(run({"input_ids": x, "labels": x}))) for _ in range(5)]
    assert run.failure is None and run.replays == 3 and all(map(math.isfinite, losses))
    assert not bool(guard.tripped)
    for group in optimizer.param_groups:
        group["lr"].fill_(float("inf"))  # what a scheduler would write into the captured step's rate
    loss = run({"input_ids": x, "labels": x})
    assert run.replays == 4 and torch.isfinite(loss)  # the loss came before the update
    assert math.isnan(float(guard.fold(loss))) and guard.first_nonfinite() is not None


@cuda
def test_a_graphed_run_stops_at_the_replay_that_broke_a_weight(config, tmp_path, monkeypatch):
    """The loop's graphed path: from step 6 on the scheduler writes an infinite rate into the
    captured step; the run stops naming step 6, after step 4's checkpoint, with no adapter/."""
    from leanlora.train import loop

    real = loop.build_scheduler

    def inf_from_step_5(optimizer, *args, **kwargs):
        scheduler = real(optimizer, *args, **kwargs)
        scheduler.lr_lambdas = [lambda step, f=f: float("inf") if step >= 5 else f(step) for f in scheduler.lr_lambdas]
        return scheduler

    monkeypatch.setattr(loop, "build_scheduler", inf_from_step_5)
    lines: list[str] = []
    run = load_run_config(config, ["train.device=cuda", "train.cuda_graph=true", "train.precision=fp32",
                                   "train.compile=false", "train.save_every=2", "train.eval_every=0"])
    with pytest.raises(TrainingDiverged, match=r"update of step 6 made trained weights non-finite .*step-00000004"):
        train(run, tmp_path / "g", progress=False, log=lines.append)
    assert any("captured the training step" in line for line in lines), lines
    assert not (tmp_path / "g" / "adapter").exists()


def test_float16_factors_are_refused_before_training_with_the_reason(config, tmp_path):
    """AdamW's moments in float16 turn the first update NaN (eps rounds to 0; LoRA's A has a 0 gradient)."""
    run = load_run_config(config, ["adapter.adapter_dtype=float16", "train.max_steps=1"])
    with pytest.raises(ConfigError, match=r"AdamW cannot train float16 weights \(the 'adapter' group.*"
                                          r"float32 or bfloat16"):
        train(run, tmp_path / "half", **QUIET)
    assert sorted(p.name for p in (tmp_path / "half").iterdir()) == ["run.yaml"]
