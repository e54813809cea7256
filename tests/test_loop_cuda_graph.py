"""train.cuda_graph: the training loop's whole step as one CUDA graph. What it refuses (anywhere),
that checkpoints hold the graph's tensor learning rates, that the loop's side of a captured step
(run uncaptured, on any device) records what the plain loop records, and (on a CUDA device) that a
graphed run trains what the plain loop trains, for a classifier and a causal LM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import leanlora
from conftest import minilm_dir, tiny_bert
from leanlora.config import ConfigError
from leanlora.train.checkpoint import load_checkpoint, save_checkpoint
from leanlora.train.loop import train
from leanlora.train.runconfig import load_run_config
from train_fixtures import (Crash, classification_yaml, crash_after_saving, tiny_bert_dir, tiny_llama_dir,
                            write_addition_jsonl)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
QUIET = dict(progress=False, log=lambda *_: None)


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cuda_graph")
    return classification_yaml(root, tiny_bert_dir(root, minilm_dir()), max_steps=12, batch_size=8,
                               eval_every=6, save_every=6)


@pytest.mark.parametrize("override,message", [
    ("train.grad_accum=2", "train.grad_accum=2 is invalid: train.cuda_graph captures one micro-batch"),
    ("train.compile_mode=reduce-overhead", "train.compile_mode='reduce-overhead' is invalid: train.cuda_graph "
                                          "already captures the whole step"),
    ("train.distributed=ddp", "train.distributed='ddp' is invalid: train.cuda_graph runs in one process"),
])
def test_what_a_captured_step_cannot_hold_is_refused_by_name(config, override, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(config, ["train.cuda_graph=true", override])


def test_a_cuda_graph_on_the_cpu_is_refused_before_anything_loads(config, tmp_path):
    run = load_run_config(config, ["train.cuda_graph=true", "train.device=cpu"])
    with pytest.raises(ConfigError, match="train.cuda_graph=true cannot run here: the run is on cpu; CUDA graphs need "
                                          "a CUDA device"):
        train(run, tmp_path / "cpu", **QUIET)
    assert not (tmp_path / "cpu" / "checkpoints").exists()


def test_checkpoints_hold_learning_rates_that_are_tensors(tmp_path):
    # a captured step keeps each group's lr as a 0-dim tensor (StepGraph), and the scheduler copies it
    model = leanlora.inject(tiny_bert(), leanlora.AdapterConfig(target_modules=("query", "value"), r=4)).train()
    opt = leanlora.optim.adamw(leanlora.param_groups(model, 1e-2), lr=1e-2)
    for group in opt.param_groups:
        group["lr"] = torch.tensor(float(group["lr"]))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / 10)
    model(input_ids=torch.ones(2, 4, dtype=torch.long)).logits.sum().backward()
    opt.step()
    sched.step()
    folder = save_checkpoint(tmp_path, 1, model, opt, sched, {"note": "x"})
    state = json.loads((folder / "state.json").read_text())
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.9e-2)
    assert state["scheduler"]["_last_lr"][0] == pytest.approx(0.9e-2)
    fresh = leanlora.optim.adamw(leanlora.param_groups(model, 1e-2), lr=1e-2)
    fresh_sched = torch.optim.lr_scheduler.LambdaLR(fresh, lambda s: 1.0 - s / 10)
    assert load_checkpoint(folder, model, fresh, fresh_sched)["step"] == 1
    assert float(fresh.param_groups[0]["lr"]) == pytest.approx(0.9e-2) and fresh_sched.last_epoch == 1


def _same_training(plain, graphed, plain_dir: Path, graphed_dir: Path, rtol: float, atol: float) -> None:
    assert graphed.steps == plain.steps
    assert graphed.losses == pytest.approx(plain.losses, rel=rtol, abs=atol)
    a = load_file(str(plain_dir / "adapter" / "leanlora_adapter.safetensors"))
    b = load_file(str(graphed_dir / "adapter" / "leanlora_adapter.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=rtol, atol=atol, msg=key)


@cuda
@pytest.mark.parametrize("adapter", [[], ["adapter.ranks=gated", "adapter.precision=learned"]], ids=["lora", "blora"])
def test_a_graphed_classifier_run_trains_what_the_plain_loop_trains(config, tmp_path, adapter):
    # fp32 and eager, padded alike, so that the two runs differ only in how the step is issued
    common = ["train.device=cuda", "train.precision=fp32", "train.compile=false", "data.pad_to_multiple_of=16", *adapter]
    lines: list[str] = []
    plain = train(load_run_config(config, [*common, "train.cuda_graph=false"]), tmp_path / "plain", **QUIET)
    graphed = train(load_run_config(config, [*common, "train.cuda_graph=true"]), tmp_path / "graphed",
                    progress=False, log=lines.append)
    assert any("captured the training step as one CUDA graph" in line for line in lines), lines
    _same_training(plain, graphed, tmp_path / "plain", tmp_path / "graphed", rtol=1e-4, atol=1e-5)


@cuda
def test_the_default_on_cuda_captures_one_graph_per_padded_length_and_trains_what_the_plain_loop_trains(
        config, tmp_path):
    # nothing set but what makes the two runs comparable: the default pads to multiples of a quarter
    # of max_length (8 of 32 here), which the plain run is given explicitly
    # 24 sentences of 1 to 4 words and 4 of 26: about half the batches of 4 pad to 8 tokens, the rest to 32
    words = [1 + k % 4 for k in range(24)] + [26] * 4
    train_file = tmp_path / "lengths.tsv"
    train_file.write_text("sentence\tlabel\n" + "".join(f"{' '.join(['good' if k % 2 else 'bad'] * n)}\t{k % 2}\n"
                                                       for k, n in enumerate(words)))
    common = ["train.device=cuda", "train.precision=fp32", "train.compile=false", "data.max_length=32",
              f"data.train_file={train_file}", "train.batch_size=4", "train.max_steps=40"]
    lines: list[str] = []
    plain = train(load_run_config(config, [*common, "train.cuda_graph=false", "data.pad_to_multiple_of=8"]),
                  tmp_path / "plain", **QUIET)
    graphed = train(load_run_config(config, common), tmp_path / "auto", progress=False, log=lines.append)
    assert any("batches are padded to multiples of 8" in line for line in lines), lines
    captured = [line for line in lines if "captured the training step" in line]
    assert len(captured) == 2 and "input_ids 4x8 " in " ".join(captured) and "input_ids 4x32 " in " ".join(captured), lines
    assert "cuda_graph: auto" in (tmp_path / "auto" / "run.yaml").read_text()
    _same_training(plain, graphed, tmp_path / "plain", tmp_path / "auto", rtol=1e-4, atol=1e-5)


@cuda
def test_a_graphed_causal_lm_run_trains_what_the_plain_loop_trains_also_when_resumed(tmp_path, monkeypatch):
    model_dir = tiny_llama_dir(tmp_path)
    train_file = write_addition_jsonl(tmp_path / "add" / "train.jsonl", 32, seed=0)
    args = [f"model.path={model_dir}", "data.task=causal_lm", f"data.train_file={train_file}",
            "data.prompt_template={question}", "data.response_column=answer", "data.max_length=32",
            "data.pad_to_multiple_of=32", "adapter.target_modules=[q_proj, v_proj, down_proj]",
            "adapter.modules_to_save=[]", "adapter.r=4", "train.max_steps=10", "train.batch_size=8",
            "train.lr=5e-2", "train.save_every=5", "train.device=cuda", "train.precision=fp32", "train.compile=false"]
    yaml = tmp_path / "lm.yaml"
    yaml.write_text("{}\n")
    plain = train(load_run_config(yaml, [*args, "train.cuda_graph=false"]), tmp_path / "plain", **QUIET)
    graphed_run = load_run_config(yaml, [*args, "train.cuda_graph=true"])
    graphed = train(graphed_run, tmp_path / "graphed", **QUIET)
    _same_training(plain, graphed, tmp_path / "plain", tmp_path / "graphed", rtol=1e-4, atol=1e-5)

    crash_after_saving(monkeypatch, 5)
    with pytest.raises(Crash):
        train(graphed_run, tmp_path / "crashed", **QUIET)
    monkeypatch.undo()
    resumed = train(None, tmp_path / "crashed", resume=True, **QUIET)  # warms up and captures again
    assert resumed.steps == 10 and len(resumed.losses) == 5
    assert resumed.losses == pytest.approx(plain.losses[5:], rel=1e-4, abs=1e-5)


def test_the_loops_captured_step_path_trains_and_records_what_the_plain_loop_does(config, tmp_path, monkeypatch):
    """The loop's side of a captured step (its [task loss, prior, norm] read after the step, the
    weights' flag folded in, the recapture at the budget's freeze), run on the CPU with the step
    uncaptured: losses and priors equal the plain loop's bit for bit, for B-LoRA under a budget."""
    from leanlora.train import loop, whole_step

    calls = []

    class Uncaptured:  # the same step function, called instead of replayed
        def __init__(self, step, optimizer, log=None, **kwargs):
            self.step = step

        def __call__(self, batch):
            calls.append(len(batch["input_ids"]))
            return self.step(batch)

        def reset(self):
            pass

    run = load_run_config(config, ["train.max_steps=8", "train.log_every=2", "train.eval_every=0", "train.save_every=0",
                                   "adapter.ranks=gated", "adapter.precision=learned"])
    plain = train(run, tmp_path / "plain", **QUIET)
    monkeypatch.setattr(whole_step, "StepGraph", Uncaptured)
    monkeypatch.setattr(loop, "plan_step_graph", lambda run, device, precision, log: (run, True))
    monkeypatch.setattr(loop, "_takes_a_graph", lambda run, model, log: True)
    stepped = train(run, tmp_path / "stepped", **QUIET)
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("plain", "stepped"))
    assert calls == [8] * 8  # every step went through the captured step's function
    assert stepped.losses == plain.losses and len(plain.losses) == 8
    assert b["train_priors"] == a["train_priors"] and any(a["train_priors"])
    assert b["log_history"] == a["log_history"]
