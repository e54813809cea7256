"""2-process CPU runs (torchrun, gloo) of DDP and FSDP2 against single-process training.

Each mode is one ``torch.distributed.run`` launch of tests/dist_worker.py (module-scoped), which
trains LoRA, VB-LoRA, QDyLoRA (nested ranks on an NF4 base) and B-LoRA (gates deterministic)
for a few AdamW steps on a tiny Llama, two processes each on half of the global batch, beside a
single-process reference on the whole batch from the same initialisation.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from leanlora import distributed as D
from leanlora.distributed import process
from leanlora.distributed.wrapping import _refuse_bnb4

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_worker.py"
METHODS = ("lora", "vblora", "qdylora", "qlora_f8", "fp8", "blora")
TOL = 1e-5     # fp32 reduction order: two half-batch gradients summed vs one whole-batch gradient


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(mode: str, out: Path) -> dict:
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # gloo on CPU even on a GPU machine
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(WORKER), "--mode", mode, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        pytest.fail(f"torchrun {mode} failed (rc={proc.returncode}):\n{tail}")
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module", params=["ddp", "fsdp2"])
def launched(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    return request.param, out, _launch(request.param, out)


def test_two_processes_ran(launched):
    mode, _, results = launched
    assert results["world_size"] == 2 and results["mode"] == mode
    assert results["mean_of_ranks"] == 0.5            # all_reduce_mean of ranks 0 and 1
    assert results["sync_seed"] == [1234, 1234]        # rank 0's seed on both ranks


@pytest.mark.parametrize("method", METHODS)
def test_adapter_equals_single_process(launched, method):
    _, _, results = launched
    if method not in results["methods"]:
        pytest.skip(f"{method} is not in this tree yet")
    r = results["methods"][method]
    assert r["max_abs_diff"] < TOL, r
    assert r["grouped"][0] == r["grouped"][1] > 0, r["grouped"]  # each group computed its layers' pieces
    # The comparison means something only if training moved the adapter far more than that. With
    # B-LoRA's gates held deterministic, the learned quantizer ranges get no gradient and stay.
    moved = [m for m in r["moved"] if m > 0]
    assert len(moved) >= 0.5 * len(r["moved"]) and min(moved) > 100 * TOL, r["moved"]


def test_ddp_with_reentrant_checkpointing_reduces_the_shared_stacks_once(launched):
    mode, _, results = launched
    if mode != "ddp":
        pytest.skip("a DDP question")
    assert results["reentrant_checkpointing_diff"] < TOL, results["reentrant_checkpointing_diff"]


@pytest.mark.parametrize("method", METHODS)
def test_every_rank_has_the_same_trained_and_finalized_adapter(launched, method):
    _, _, results = launched
    if method not in results["methods"]:
        pytest.skip(f"{method} is not in this tree yet")
    r = results["methods"][method]
    assert len(set(r["ranks_trained"])) == 1, r["ranks_trained"]
    assert len(set(r["ranks_finalized"])) == 1, r["ranks_finalized"]


def test_only_rank0_writes(launched):
    _, out, results = launched
    for method in results["methods"]:
        assert (out / f"{method}-adapter-rank0" / "leanlora_adapter.safetensors").is_file()
        assert not (out / f"{method}-adapter-rank1").exists()


def test_resume_from_rank0_checkpoint_on_every_rank(launched):
    _, _, results = launched
    assert results["resume"]["max_abs_diff"] < TOL, results["resume"]


def test_gate_samples_differ_per_rank_yet_the_artifact_is_shared(launched):
    _, _, results = launched
    if "gate_noise" not in results:
        pytest.skip("B-LoRA gates are not in this tree yet")
    r = results["gate_noise"]
    assert r["gate_samples"][0] != r["gate_samples"][1]          # independent noise per rank
    assert r["prior"][0] == r["prior"][1]                        # the regularizer is a function of shared gates
    assert len(set(r["ranks_trained"])) == 1 and len(set(r["ranks_finalized"])) == 1


def test_a_budget_run_is_the_same_on_every_rank_meets_the_budget_and_resumes(launched):
    mode, _, results = launched
    if mode != "ddp":
        pytest.skip("adapter.budget runs under DDP (FSDP2 is refused by name)")
    r = results["budget"]
    assert len(set(r["ranks_trained"])) == 1 and len(set(r["controller"])) == 1, r
    assert r["frozen"] and abs(r["bops_vs_lora16"] / 0.25 - 1) <= 0.1, r
    assert r["resumed_max_abs_diff"] == 0.0 and r["resumed_controller_equal"], r


@pytest.mark.parametrize("method,base", [("qdylora", "nf4"), ("fp8", "fp8")])
def test_fsdp2_shards_the_quantized_base(launched, method, base):
    mode, _, results = launched
    if mode != "fsdp2":
        pytest.skip("sharding applies to FSDP2 only")
    shards = results["methods"][method][base]
    assert shards, f"no {base} base weight was registered for sharding"
    for name, (local, full) in shards.items():
        assert local * 2 == full, f"{name}: local {base} codes {local} of {full}: not sharded in 2"


# --- one process: what needs no launcher ------------------------------------------------------


def test_single_process_helpers_are_no_ops():
    from conftest import tiny_llama

    assert not D.is_distributed() and D.rank() == 0 and D.world_size() == 1 and D.is_main_process()
    assert D.all_reduce_mean(2.5) == 2.5
    assert D.sync_seed(7) == 7
    assert D.shard([3, 1, 2]) == [3, 1, 2]
    model = tiny_llama()
    assert D.wrap(model, "none") is model and D.unwrap(model) is model
    calls = []
    assert D.main_process_only(lambda: calls.append(1) or "done")() == "done" and calls == [1]


def test_wrap_errors_name_the_setting():
    from conftest import tiny_llama

    with pytest.raises(D.DistributedError, match="train.distributed='zero3'"):
        D.wrap(tiny_llama(), "zero3")
    with pytest.raises(D.DistributedError, match="torchrun"):
        D.wrap(tiny_llama(), "ddp")


def test_decoder_layers_of_a_llama_and_a_bert():
    from conftest import tiny_bert, tiny_llama

    layers = D.decoder_layers(tiny_llama(num_hidden_layers=3))
    assert [type(m).__name__ for m in layers] == ["LlamaDecoderLayer"] * 3
    bert = tiny_bert()
    assert [type(m).__name__ for m in D.decoder_layers(bert)].count("BertLayer") == 2
    with pytest.raises(D.DistributedError, match="layer_classes"):
        D.decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))


# --- the command line under a launcher --------------------------------------------------------


def _launcher(kind: str) -> list[str]:
    port = str(_free_port())
    if kind == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", port, "-m", "leanlora"]
    pytest.importorskip("accelerate")
    # --multi_gpu is accelerate's torch.distributed launcher; with no GPU visible it runs gloo on CPU
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", port, "-m", "leanlora"]


@pytest.mark.parametrize("kind, mode", [("torchrun", "fsdp2"),
                                        pytest.param("accelerate", "ddp", marks=pytest.mark.slow)])
def test_cli_train_under_a_launcher_equals_one_process(kind, mode, tmp_path):
    """`torchrun ... -m leanlora train` / `accelerate launch`: same losses and adapter as one process."""
    from conftest import minilm_dir
    from leanlora.cli import main
    from safetensors.torch import load_file
    from train_fixtures import classification_yaml, tiny_bert_dir

    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    config = classification_yaml(tmp_path, tiny_bert_dir(tmp_path, minilm_dir()), max_steps=3, batch_size=8,
                                 eval_every=3, log_every=1)
    assert main(["train", str(config), "--out", str(tmp_path / "one"), "--no-progress"]) == 0
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    cmd = _launcher(kind) + ["train", str(config), "--out", str(tmp_path / "two"), "--no-progress",
                             f"train.distributed={mode}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
    assert proc.stdout.count("trained 3 steps") == 1     # rank 0 alone reports

    one, two = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert two["train_losses"] == pytest.approx(one["train_losses"], abs=1e-6)
    assert two["best_metrics"] == pytest.approx(one["best_metrics"], abs=1e-6)
    a, b = (load_file(str(tmp_path / d / "adapter" / "leanlora_adapter.safetensors")) for d in ("one", "two"))
    assert set(a) == set(b) and max(float((a[k] - b[k]).abs().max()) for k in a) < TOL


def test_cli_refuses_a_launcher_without_a_mode(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(D.DistributedError, match="train.distributed='none'"):
        D.init_run("none", "cpu")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    with pytest.raises(D.DistributedError, match="needs a launcher"):
        D.init_run("fsdp2", "cpu")


@pytest.mark.slow
def test_benchmark_script_runs_on_two_cpu_processes(tmp_path):
    """benchmarks/distributed.py at its tiny size: the row it appends names both ranks' memory."""
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = tmp_path / "rows.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(ROOT / "benchmarks" / "distributed.py"), "--size", "tiny",
           "--mode", "fsdp2", "--device", "cpu", "--steps", "2", "--warmup", "1", "--seq", "16", "--batch", "2",
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
    row = json.loads(out.read_text())
    assert row["processes"] == 2 and row["mode"] == "fsdp2" and len(row["per_rank"]) == 2
    assert row["tokens_per_s"] > 0 and all(r["nf4_base_gib"] > 0 for r in row["per_rank"])


def test_shard_splits_a_batch_evenly_and_pads_the_last(monkeypatch):
    monkeypatch.setattr(process, "world_size", lambda: 2)
    parts = {}
    for r in (0, 1):
        monkeypatch.setattr(process, "rank", lambda r=r: r)
        parts[r] = D.shard([10, 11, 12, 13, 14])
    assert parts == {0: [10, 12, 14], 1: [11, 13, 10]}     # every rank gets ceil(5/2); 10 wraps around
    assert sorted(parts[0] + parts[1])[:5] == [10, 10, 11, 12, 13]


def test_fsdp2_refuses_a_bitsandbytes_base_by_name():
    Linear4bit = type("Linear4bit", (torch.nn.Linear,), {"__module__": "bitsandbytes.nn.modules"})
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), Linear4bit(4, 4))
    with pytest.raises(D.DistributedError, match="Linear4bit base of '1'.*adapter.base='nf4'"):
        _refuse_bnb4(model)
