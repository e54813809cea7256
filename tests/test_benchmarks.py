"""The benchmark harnesses run end to end at a tiny shape on CPU (mechanics only, no timing claims)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_speed_rows_tiny(tmp_path):
    import speed

    out, fresh = tmp_path / "speed.jsonl", tmp_path / "fresh" / "speed.jsonl"
    common = ["--preset", "tiny", "--steps", "2", "--warmup", "1", "--device", "cpu"]
    speed.main(common + ["--same-process", "--rows", "base,peft_lora,lean_blora,lean_lora_fp8", "--out", str(out),
                         "--lean-fused-loss", "chunked"])
    speed.main(common + ["--rows", "lean_lora", "--out", str(fresh)])  # the default: the row in a child process
    for timing in ("window", "late"):
        timed = tmp_path / f"{timing}.jsonl"
        speed.main(common + ["--same-process", "--rows", "peft_lora,lean_lora", "--timing", timing, "--out", str(timed),
                             "--lean-activation-budget", "0.5", "--lean-inductor", "combo_kernels=1"])
        peft, lean = [r for r in map(json.loads, timed.read_text().splitlines()) if "row" in r]
        assert peft["timing"] == timing and peft["step_ms"] > 0 and peft["loss"] > 0
        assert lean["activation_memory_budget"] == 0.5 and "activation_memory_budget" not in peft
        assert "inductor combo_kernels=1" in lean["method"] and "inductor" not in peft["method"]
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    # a row's settings do not outlive it
    assert functorch_config.activation_memory_budget == 1.0 and inductor_config.combo_kernels is False
    with pytest.raises(SystemExit, match="no bool or int setting"):
        speed.inductor_settings("no_such_setting=1")
    rows = {r["row"]: r for f in (out, fresh) for r in map(json.loads, f.read_text().splitlines()) if "row" in r}
    assert not (fresh.parent / "row_lean_lora.jsonl").exists()  # the child's own file, gone once recorded
    assert set(rows) == {"base", "peft_lora", "lean_lora", "lean_blora", "lean_lora_fp8"}
    assert rows["lean_lora_fp8"]["fused_loss"] == rows["lean_blora"]["fused_loss"] == "chunked"
    assert rows["lean_lora"]["fused_loss"] == "off" and rows["peft_lora"]["fused_loss"] == "off"  # auto on CPU
    assert rows["base"]["trainable"] == 0
    # same adapter shape as PEFT: identical trainable parameter counts and a finite loss
    assert rows["peft_lora"]["trainable"] == rows["lean_lora"]["trainable"] > 0
    assert all(r["tokens_per_s"] > 0 and r["loss"] == r["loss"] for r in rows.values())
    # host time per phase: grouped pieces and the prior only where B-LoRA has them
    assert {"pieces", "prior", "forward", "backward", "optimizer"} <= set(rows["lean_blora"]["host_ms"])
    assert "pieces" in rows["lean_lora"]["host_ms"] and "pieces" not in rows["peft_lora"]["host_ms"]
    assert "prior" not in rows["peft_lora"]["host_ms"]
    assert all(r["gc_ms_per_step"] >= 0 for r in rows.values())


def test_quality_reads_glue_and_summarizes():
    import quality

    glue = Path(__file__).resolve().parents[1].parent / "shared" / "assets" / "glue"
    if not glue.exists():
        pytest.skip(f"{glue} is absent")
    texts, labels = quality.read_task(glue, "RTE", "dev")
    assert len(texts) == 277 and set(labels) == {0.0, 1.0} and len(texts[0]) == 2
    texts, labels = quality.read_task(glue, "CoLA", "dev")
    assert len(texts) == 527 and len(texts[0]) == 1
    rows = [{"task": "RTE", "method": "lean_lora", "seed": s, "score": 50.0 + s, "trainable": 10,
             "stored_bytes": 100, "bops": 1000, "train_s": 1.0} for s in range(3)]
    rows.append({"task": "RTE", "method": "lean_combo", "seed": 0, "skipped": "not importable"})
    summary, text = quality.summarize(rows)
    assert summary[0]["score"] == 51.0 and "not importable" in text


def test_launch_counts_against_peft(capsys):
    import launches

    rows = {r["row"]: r for r in (launches.count_row(n, layers=2, r=4) for n in ("peft_lora", "lean_lora", "lean_blora"))}
    # leanlora LoRA dispatches no more operators than PEFT's (its grouped pieces cost a few per group
    # of layers and save a few per layer: from two layers on it is fewer); B-LoRA's gates and
    # quantizers are what makes eager B-LoRA launch-bound (the reason for the compiled path)
    assert rows["lean_lora"]["kernels"] <= rows["peft_lora"]["kernels"]
    assert rows["lean_blora"]["kernels"] > 4 * rows["peft_lora"]["kernels"]
    launches.main(["--rows", "peft_lora,lean_lora", "--layers", "1", "--r", "4"])
    assert "| leanlora LoRA |" in capsys.readouterr().out


def test_loop_speed_runs_both_loops_on_the_same_run(tmp_path):
    import loop_speed
    from conftest import minilm_dir
    from train_fixtures import tiny_bert_dir, write_sentiment_tsv

    folder = tmp_path / "SST-2"  # the GLUE layout is chosen by the folder's name
    folder.mkdir()
    for split in ("train", "dev"):
        write_sentiment_tsv(folder / f"{split}.tsv", 48, seed=0)
    common = ["--model", str(tiny_bert_dir(tmp_path, minilm_dir())), "--data", str(folder), "--steps", "5",
              "--warmup", "2", "--batch", "8", "--device", "cpu", "--max-length", "64"]  # the tiny BERT places 64
    out, fresh = tmp_path / "loop.jsonl", tmp_path / "fresh.jsonl"
    loop_speed.main(common + ["--same-process", "--out", str(out),
                              "--rows", "peft_lora@eager,lean_blora@eager,peft_vblora@eager"])
    loop_speed.main(common + ["--out", str(fresh), "--rows", "lean_lora@eager"])  # the default: a child process
    rows = {r["row"]: r for f in (out, fresh) for r in map(json.loads, f.read_text().splitlines()) if "row" in r}
    assert rows["peft_vblora@eager"]["skipped"] == "the PEFT loop here runs LoRA only"
    timed = [rows[k] for k in ("peft_lora@eager", "lean_lora@eager", "lean_blora@eager")]
    assert all(r["steps"] == 5 and 0 < r["step_ms_min"] <= r["step_ms"] <= r["step_ms_max"] for r in timed)
    assert all(r["loss"] == r["loss"] for r in timed)  # finite
    # same adapter on the same model: the same trainable count (LoRA on 5 projection types + the head)
    assert rows["peft_lora@eager"]["trainable"] == rows["lean_lora@eager"]["trainable"] > 0
    with pytest.raises(ValueError, match="mode one of"):
        loop_speed.run_row("lean_lora@graphs", loop_speed.parse_args(["--model", "m", "--data", str(folder)]))


def test_short_runs_pins_the_old_defaults_beside_the_new():
    import short_runs

    old, new = short_runs.adapter_config("old_vblora"), short_runs.adapter_config("vblora")
    assert old.factors == new.factors == "bank" and old.bank.bank_lr == 1e-3 and new.bank.bank_lr != old.bank.bank_lr
    old, probe = short_runs.adapter_config("old_qdylora"), short_runs.adapter_config("qdylora_scale_max")
    assert old.base == probe.base == "nf4" and old.ranks == probe.ranks == "nested"
    assert old.nested.scale == "sampled" and probe.nested.scale == "max"
    labels = [1.0] * 7 + [0.0] * 3
    assert short_runs.majority_score("SST-2", labels) == pytest.approx(70.0)
    assert short_runs.majority_score("CoLA", labels) == 0.0  # Matthews correlation of a constant prediction
    rows = [{"task": "CoLA", "variant": "old_qdylora", "seed": s, "steps": 10, "score": 10.0 * s, "majority": 0.0,
             "per_rank": {str(b): float(b) for b in range(1, 9)}, "delta_norm": {"10": 0.5}} for s in range(3)]
    text = short_runs.summarize(rows)
    assert "| CoLA | old_qdylora | 10.0 | 0: 0.0, 1: 10.0, 2: 20.0 | 0.0 | 1.0 / 2.0 / 4.0 / 8.0 |" in text


def test_pinned_gates_times_lora_sampled_and_pinned_rows(tmp_path):
    import pinned_gates
    from conftest import minilm_dir

    out = tmp_path / "pinned.jsonl"
    pinned_gates.main(["--model", str(minilm_dir()), "--steps", "4", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["row"] for r in rows] == ["lora", "sampled", "pinned"]
    assert all(r["eager_step_ms"] > 0 and r["compiled_pieces_ms"] > 0 for r in rows)


@pytest.mark.parametrize("pair, ref, new, extra", [("dense-fp8", "dense", "fp8", []),
                                                   ("nf4-gemm", "nf4", "nf4_fp8", ["adapter.nf4.block_size=16"])])
def test_fp8_guard_pairs_the_two_runs_of_one_config(tmp_path, capsys, pair, ref, new, extra):
    import fp8_guard
    from conftest import minilm_dir
    from train_fixtures import classification_yaml, tiny_bert_dir

    config = classification_yaml(tmp_path, tiny_bert_dir(tmp_path, minilm_dir()), max_steps=6, eval_every=0)
    fp8_guard.main([str(config), "train.lr=1e-2", *extra, "--out", str(tmp_path / "guard"), "--window", "3",
                    "--parallel", "--pair", pair])
    report = json.loads((tmp_path / "guard" / "fp8_guard.json").read_text())
    reference, float8 = report["runs"][ref], report["runs"][new]
    assert len(reference["losses"]) == len(float8["losses"]) == 6 and reference["losses"] != float8["losses"]
    c = report["comparison"]
    assert c["steps"] == 6 and c["tail_steps"] == 1 and c[f"{ref}_tail"] == reference["losses"][-1]
    assert 0 < c["max_rel_window"] < 0.5 and c["mean_rel_window"] <= c["max_rel_window"]
    assert f"6 steps: last 1 mean loss {ref}" in capsys.readouterr().out
    assert fp8_guard.moving_average([1.0, 2.0, 3.0, 4.0], 2) == [1.5, 2.5, 3.5]


def test_quant_error_ranks_the_ways_of_choosing_a_range():
    """Clipping never does worse than max|w| (1.0 is among the clips), and one range per component
    wins where components differ in size."""
    import quant_error

    g = torch.Generator().manual_seed(0)
    sizes = torch.tensor([1.0, 0.3, 0.05, 0.01], dtype=torch.float64)
    a = torch.randn(4, 48, generator=g, dtype=torch.float64)
    b = torch.randn(40, 4, generator=g, dtype=torch.float64) * sizes
    errors = quant_error.update_errors({"layer": (a, b)}, 4)
    assert errors["tensor, clipped"] <= errors["tensor"] + 1e-12
    assert errors["component, clipped"] <= errors["component"] + 1e-12
    assert errors["component"] < errors["tensor"]
    n = 7  # 4 bits: 7 steps a side, the largest |w| on the last one
    q = quant_error.fake_quant(b, 4, (0,))
    torch.testing.assert_close(q.abs().amax(0), b.abs().amax(0))
    assert torch.allclose(q / (b.abs().amax(0) / n), torch.round(q / (b.abs().amax(0) / n)))
    assert quant_error.spread({"layer": (a, b)})["b_columns"] > 50


def test_nf4_rebuild_times_each_rebuild_against_its_bytes(tmp_path):
    pytest.importorskip("torchao")
    import nf4_rebuild

    out = tmp_path / "rebuild.jsonl"
    rows = nf4_rebuild.main(["--preset", "tiny", "--device", "cpu", "--calls", "1", "--repeats", "1",
                             "--out", str(out)])
    timed = [r for r in rows if "variant" in r]
    assert {(r["proj"], r["variant"]) for r in timed} == {(p, v) for p in nf4_rebuild.PRESETS["tiny"]["shapes"]
                                                          for v in nf4_rebuild.VARIANTS if "triton" not in v}
    with pytest.raises(SystemExit, match="need CUDA and Triton"):  # never a silent torch stand-in
        nf4_rebuild.main(["--preset", "tiny", "--device", "cpu", "--variants", "fp8_triton"])
    assert all(r["ms"] > 0 and r["floor_ms"] > 0 and r["bytes"] > 0 for r in timed)
    q = {r["variant"]: r["bytes"] for r in timed if r["proj"] == "q"}
    assert q["dequant_bf16"] - q["fp8"] == 64 * 64 - 64 * 4  # one more byte a weight, no row scales
    summary = rows[-1]
    assert summary["step_fp8_ms"] == pytest.approx(summary["layers_fp8_ms"] + summary["layers_fp8_transposed_ms"],
                                                  abs=2e-3)  # forward and backward layouts
    assert summary["step_dequant_bf16_ms"] == pytest.approx(2 * summary["layers_dequant_bf16_ms"], abs=2e-3)
    assert summary["step_fp8_ms"] > 0 and len(out.read_text().splitlines()) == len(rows)
    parts = nf4_rebuild.parts_of(64, 128, torch.device("cpu"), 64, 256)
    kept = nf4_rebuild.kept_state(parts)
    w8, s = nf4_rebuild.rebuild_fp8(parts, kept)
    t8, t = nf4_rebuild.rebuild_fp8_transposed(parts, kept)
    assert torch.equal(t8.float(), w8.t().float()) and t8.shape == (128, 64) and t8.is_contiguous()
    assert torch.equal(s, t)
    # the library's codes with its kept state; the arithmetic it replaced (a rounding to the weight's
    # dtype, then a division) lands within one e4m3 step of them
    assert torch.equal(nf4_rebuild.rebuild_fp8_kept(parts, kept).view(torch.uint8), w8.view(torch.uint8))
    packed = nf4_rebuild.rebuild_fp8_packed(parts, kept)
    assert packed.dtype == w8.dtype and torch.equal(packed.view(torch.uint8), w8.view(torch.uint8))
    from test_fp8_base import e4m3_step

    divided = nf4_rebuild.rebuild_fp8_divide(parts, kept).float()
    assert ((divided - w8.float()).abs() <= e4m3_step(w8.float())).all()


def test_kernel_launchers_names_the_ops_above_each_kernel():
    from types import SimpleNamespace as E

    import speed

    backward = E(name="CompiledFunctionBackward", cpu_parent=None, kernels=())
    zeros = E(name="aten::zeros", cpu_parent=backward, kernels=())
    zero_ = E(name="aten::zero_", cpu_parent=zeros, kernels=())
    memset = E(name="cudaMemsetAsync", cpu_parent=zero_, kernels=[E(name="Memset (Device)")] * 3)
    gemm = E(name="aten::mm", cpu_parent=backward, kernels=[E(name="nvjet_gemm"), E(name="splitKreduce")])
    got = speed.kernel_launchers([backward, zeros, zero_, memset, gemm], {"Memset (Device)", "splitKreduce"})
    assert got == {("Memset (Device)", "aten::zero_ < aten::zeros < CompiledFunctionBackward"): 3,
                   ("splitKreduce", "aten::mm < CompiledFunctionBackward"): 1}
    assert speed.kernel_launchers([memset], {"Memset (Device)"}, depth=1) == {("Memset (Device)", "aten::zero_"): 3}


def test_seed_noise_counts_the_disjoint_triples_whose_median_misses(tmp_path):
    import seed_noise

    assert seed_noise.chance_of_missing([5.0] * 8, margin=1.0) == 0.0
    # of the 20 triples of 0,0,0,10,10,10 half hold two tens or more, and their complement's median is 0
    assert seed_noise.chance_of_missing([0, 0, 0, 10, 10, 10], margin=1.0) == 0.5
    assert seed_noise.chance_of_missing([0, 0, 0, 10, 10, 10], margin=11.0) == 0.0
    with pytest.raises(ValueError, match="5 seeds"):
        seed_noise.chance_of_missing([1.0] * 5, margin=1.0)
    rows = [{"task": "RTE", "steps": 500, "method": "lean_lora", "seed": s, "score": v}
            for s, v in enumerate([0, 0, 0, 10, 10, 10])]
    rows += [{"task": "RTE", "steps": 500, "method": "lean_blora", "seed": 0, "score": 1.0},
             {"task": "CoLA", "steps": 800, "method": "lean_lora", "seed": 0, "score": 1.0}]  # too few seeds: skipped
    path = tmp_path / "runs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    # of the 20 orders of three 0s and three 10s taken as three pairs, 7 have no pair falling from 10
    # to 0: three rising pairs, or one each of (0, 0), (0, 10) and (10, 10) in any of 6 orders
    assert seed_noise.chance_any_seed_misses([0, 0, 0, 10, 10, 10], margin=3.0) == pytest.approx(13 / 20)
    assert seed_noise.chance_any_seed_misses([0, 0, 0, 10, 10, 10], margin=10.0) == 0.0
    assert seed_noise.main([str(path)]) == [{"task": "RTE", "steps": 500, "method": "lean_lora", "seeds": 6,
                                             "spread": [0, 10], "chance_of_missing": 0.5,
                                             "chance_a_seed_misses": 0.65}]


def test_the_1b_table_script_runs_each_row_alone_and_keeps_going_past_one_out_of_time(tmp_path):
    """benchmarks/speed_table_1b.sh: one JSON line a finished row in one file, and a row over its
    limit is named and skipped, not the end of the table."""
    import os
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "speed_table_1b.sh"
    env = dict(os.environ, PYTHON=sys.executable, SPEED_ARGS="--preset tiny --warmup 1 --steps 1 --device cpu")
    done = subprocess.run(["bash", str(script), str(tmp_path), "lean_lora@eager:0.01", "lean_lora@eager:300"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert "lean_lora@eager: exit 124" in done.stdout
    rows = [json.loads(line) for line in (tmp_path / "speed.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rows if "row" in r] == ["lean_lora@eager"] and rows[-1]["step_ms"] > 0
