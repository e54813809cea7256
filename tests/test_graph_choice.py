"""train.cuda_graph: "auto" captures the step wherever a captured step trains what the plain loop
trains, says why where it does not, and pads batches to a few lengths instead of max_length."""

from __future__ import annotations

import pytest
import torch

from leanlora.config import ConfigError
from leanlora.train.graph_choice import LENGTHS, padding_for_graphs, plan_step_graph, why_not_captured
from leanlora.train.runconfig import load_run_config

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def _run(*overrides):
    return load_run_config(None, ["data.task=causal_lm", *overrides])


@pytest.mark.parametrize("max_length,multiple", [(128, 32), (1024, 256), (100, 32), (8, 8), (2048, 512)])
def test_padding_leaves_at_most_four_lengths_in_multiples_of_eight(max_length, multiple):
    assert padding_for_graphs(max_length) == multiple
    assert multiple % 8 == 0 and -(-max_length // multiple) <= LENGTHS


def test_auto_is_the_default_and_captures_on_cuda_with_padded_lengths():
    run = _run("data.max_length=128")
    assert run.train.cuda_graph == "auto" and run.data.pad_to_multiple_of == 0
    lines = []
    planned, graphed = plan_step_graph(run, CUDA, "bf16", lines.append)
    assert graphed and planned.data.pad_to_multiple_of == 32 and planned.train.cuda_graph == "auto"
    assert lines == ["train.cuda_graph: the training step runs as CUDA graphs, one per padded length; batches are "
                     "padded to multiples of 32 (data.pad_to_multiple_of), at most 4 lengths up to "
                     "data.max_length=128"]


def test_a_padding_the_user_set_is_kept():
    planned, graphed = plan_step_graph(_run("data.pad_to_multiple_of=16"), CUDA, "bf16", print)
    assert graphed and planned.data.pad_to_multiple_of == 16


def test_auto_on_the_cpu_is_off_without_a_word():
    lines = []
    run = _run()
    assert plan_step_graph(run, CPU, "fp32", lines.append) == (run, False) and lines == []


@pytest.mark.parametrize("overrides,precision,reason", [
    (["train.grad_accum=2"], "bf16", "train.grad_accum=2 (a captured step holds one micro-batch)"),
    (["train.distributed=ddp"], "bf16", "train.distributed='ddp' (a captured step runs in one process)"),
    (["train.compile_mode=reduce-overhead"], "bf16", "train.compile_mode='reduce-overhead'"),
    (["data.packing=true"], "bf16", "data.packing=true (packed batches vary in length)"),
    ([], "fp16", "fp16's gradient scaler reads on the host"),
])
def test_auto_on_cuda_says_what_keeps_it_off_and_leaves_the_padding(overrides, precision, reason):
    run = _run(*overrides)
    lines = []
    planned, graphed = plan_step_graph(run, CUDA, precision, lines.append)
    assert not graphed and planned is run
    assert len(lines) == 1 and lines[0].startswith("train.cuda_graph=auto: the step is not captured (")
    assert reason in lines[0]


def test_two_reasons_are_both_named():
    why = why_not_captured(_run("train.grad_accum=4", "data.packing=true"), CUDA, "fp16")
    assert why.count(";") == 2 and "grad_accum=4" in why and "packing" in why and "fp16" in why


def test_true_where_it_cannot_run_is_refused_by_name_and_false_is_never_captured():
    with pytest.raises(ConfigError, match=r"train.cuda_graph=true cannot run here: fp16's gradient scaler"):
        plan_step_graph(_run("train.cuda_graph=true"), CUDA, "fp16", print)
    with pytest.raises(ConfigError, match=r"train.cuda_graph=true cannot run here: the run is on cpu"):
        plan_step_graph(_run("train.cuda_graph=true"), CPU, "fp32", print)
    run = _run("train.cuda_graph=false")
    assert plan_step_graph(run, CUDA, "bf16", print) == (run, False)


def test_auto_allows_what_true_refuses_at_load():
    # true with grad_accum 2 is refused when the config loads; auto only declines when the run starts
    with pytest.raises(ConfigError, match="train.grad_accum=2 is invalid"):
        _run("train.cuda_graph=true", "train.grad_accum=2")
    assert _run("train.grad_accum=2").train.cuda_graph == "auto"
    assert _run("data.packing=true").data.packing


def test_a_model_without_sdpa_attention_is_declined_under_auto_and_refused_under_true():
    from types import SimpleNamespace

    from leanlora.train.loop import _takes_a_graph

    eager = SimpleNamespace(config=SimpleNamespace(_attn_implementation="eager"))
    lines = []
    assert not _takes_a_graph(_run(), eager, lines.append)
    assert lines and lines[0].startswith("train.cuda_graph=auto: the step is not captured (train.cuda_graph needs "
                                         "the model's attention implementation to be 'sdpa'")
    with pytest.raises(ConfigError, match="attention implementation to be 'sdpa'"):
        _takes_a_graph(_run("train.cuda_graph=true"), eager, print)
    sdpa = SimpleNamespace(config=SimpleNamespace(_attn_implementation="sdpa"))
    assert _takes_a_graph(_run(), sdpa, print)


def test_metrics_json_says_what_the_auto_settings_became(tmp_path):
    import json

    from conftest import minilm_dir
    from leanlora.train.loop import train
    from train_fixtures import classification_yaml, tiny_bert_dir

    config = classification_yaml(tmp_path, tiny_bert_dir(tmp_path, minilm_dir()), max_steps=2, eval_every=0)
    train(load_run_config(config, ["train.device=cpu"]), tmp_path / "run", progress=False, log=lambda *_: None)
    ran_as = json.loads((tmp_path / "run" / "metrics.json").read_text())["ran_as"]
    assert ran_as == {"device": "cpu", "base": "dense", "nf4_gemm": None, "cuda_graph": False, "pad_to_multiple_of": 0}
