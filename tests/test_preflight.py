"""Task-dependent modules_to_save defaults, and adapter patterns checked on the meta skeleton
before any weight or data is loaded."""

from __future__ import annotations

import re

import pytest

from leanlora.cli import main
from leanlora.train import loop
from leanlora.train.preflight import PreflightError, check_adapter, skeleton, task_head
from leanlora.train.runconfig import DataConfig, RunConfig, load_run_config
from train_fixtures import tiny_llama_dir, write_addition_jsonl


def test_modules_to_save_follows_the_task():
    assert load_run_config(None).adapter.modules_to_save == ("classifier",)
    assert load_run_config(None, ["data.task=regression"]).adapter.modules_to_save == ("classifier",)
    assert load_run_config(None, ["data.task=causal_lm"]).adapter.modules_to_save == ()
    assert RunConfig(data=DataConfig(task="causal_lm")).adapter.modules_to_save == ()
    # a value the user sets is kept, whatever the task
    run = load_run_config(None, ["data.task=causal_lm", "adapter.modules_to_save=[lm_head]"])
    assert run.adapter.modules_to_save == ("lm_head",)


def test_skeleton_is_weightless_and_names_the_head(tmp_path):
    run = load_run_config(None, [f"model.path={tiny_llama_dir(tmp_path)}", "adapter.target_modules=[q_proj]"])
    model = skeleton(run)
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert all(p.is_meta for p in model.parameters())
    assert task_head(model) == ["score"]
    with pytest.raises(PreflightError, match=r"adapter.modules_to_save entry 'classifier' matches no module.*"
                                             r"this model's classification head is \['score'\]"):
        check_adapter(run, model)
    check_adapter(run.replace(adapter=run.adapter.__class__(target_modules=("q_proj",),
                                                            modules_to_save=("score",))), model)


@pytest.mark.parametrize("override,message", [
    ("adapter.modules_to_save=[classifier]",
     r"adapter.modules_to_save entry 'classifier' matches no module.*a causal LM needs none"),
    ("adapter.target_modules=[q_prj]", r"adapter.target_modules entry 'q_prj' matches no module.*q_proj"),
    ("adapter.r=100", r"adapter.r=100 is invalid for module"),
])
def test_cli_stops_before_loading_anything(tmp_path, monkeypatch, capsys, override, message):
    data = write_addition_jsonl(tmp_path / "a.jsonl", 4, seed=0)

    def no_loading(*args, **kwargs):
        raise AssertionError("weights or data were loaded before the adapter was checked")

    monkeypatch.setattr(loop, "load_for_run", no_loading)
    model_dir = tiny_llama_dir(tmp_path)
    capsys.readouterr()
    argv = ["train", f"model.path={model_dir}", "data.task=causal_lm", f"data.train_file={data}",
            "adapter.target_modules=[q_proj]", override, "--out", str(tmp_path / "run"), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("leanlora") and ": adapter." in err and "Traceback" not in err
    assert re.search(message, err), err


@pytest.mark.parametrize("family, limit", [("bert", 512), ("roberta", 512), ("gpt2", 1024), ("opt", 2048),
                                           ("distilbert", 512), ("llama", None)])
def test_the_position_limit_is_the_usable_rows_of_a_learned_position_table(family, limit):
    """RoBERTa's 514 rows start after its padding index and OPT's 2050 after an offset of 2; Llama's
    rotary positions have no table and place any length."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from leanlora.train.preflight import position_limit

    config = AutoConfig.for_model(family, **({"max_position_embeddings": 514, "pad_token_id": 1}
                                             if family == "roberta" else {}))
    auto = AutoModelForCausalLM if family in ("gpt2", "opt", "llama") else AutoModelForSequenceClassification
    with torch.device("meta"):
        assert position_limit(auto.from_config(config)) == limit


def test_a_max_length_past_the_models_positions_stops_before_loading(tmp_path, monkeypatch, capsys):
    """The tiny BERT places 64 tokens; data.max_length=65 fails on the skeleton (it would fail at
    the first longer example, mid-run), and so does an eval override of a trained run."""
    from conftest import minilm_dir
    from train_fixtures import classification_yaml, tiny_bert_dir

    config = classification_yaml(tmp_path, tiny_bert_dir(tmp_path, minilm_dir()), max_steps=1)
    original = loop.load_for_run
    monkeypatch.setattr(loop, "load_for_run", lambda *a, **k: pytest.fail("loaded before the length was checked"))
    assert main(["train", str(config), "data.max_length=65", "--out", str(tmp_path / "long"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "data.max_length=65 is longer than the 64 positions BertForSequenceClassification" in err
    assert "set data.max_length to at most 64" in err and "Traceback" not in err
    monkeypatch.setattr(loop, "load_for_run", original)
    assert main(["train", str(config), "data.max_length=64", "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    assert main(["eval", str(tmp_path / "run"), "data.max_length=100"]) == 2
    assert "data.max_length=100 is longer than the 64 positions" in capsys.readouterr().err
