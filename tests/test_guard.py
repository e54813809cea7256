"""The end-of-run guard: a dev score within one standard error of a constant predictor's is flagged."""

from __future__ import annotations

import math
import random

import pytest

import leanlora
from leanlora.train.guard import (BANK_EXAMPLES_NEEDED, check, likely_cause, short_run_notice, stall_warning,
                                  standard_error, task_verdict)
from leanlora.train.metrics import classification_metrics, regression_metrics


def labels_with_share(n: int, share_of_one: float, seed: int = 0) -> list[int]:
    ys = [1] * round(n * share_of_one) + [0] * (n - round(n * share_of_one))
    random.Random(seed).shuffle(ys)
    return ys


def flip(ys: list[int], fraction: float, seed: int = 1) -> list[int]:
    """Predictions equal to the labels except a random ``fraction`` of them, flipped."""
    rng = random.Random(seed)
    return [1 - y if rng.random() < fraction else y for y in ys]


@pytest.mark.parametrize("metric", ["accuracy", "f1", "matthews"])
def test_the_majority_class_prediction_is_flagged(metric):
    ys = labels_with_share(500, 0.7)
    score = classification_metrics([1] * len(ys), ys, 2)[metric]
    verdict = check(metric, score, ys, regression=False)
    assert verdict.stalled
    assert verdict.chance == pytest.approx(score)
    assert "class 1 (70.0% of the dev set)" == verdict.constant


@pytest.mark.parametrize("metric", ["accuracy", "f1", "matthews"])
def test_a_model_that_learned_is_not_flagged(metric):
    ys = labels_with_share(500, 0.7)
    score = classification_metrics(flip(ys, 0.15), ys, 2)[metric]
    assert not check(metric, score, ys, regression=False).stalled


def test_a_score_inside_one_standard_error_of_chance_is_flagged_and_one_outside_is_not():
    ys = labels_with_share(400, 0.6)
    se = standard_error("accuracy", 0.6, 400)
    assert se == pytest.approx(math.sqrt(0.6 * 0.4 / 400))
    assert check("accuracy", 0.6 + 0.5 * se, ys, regression=False).stalled
    assert not check("accuracy", 0.6 + 2.0 * se, ys, regression=False).stalled
    assert check("accuracy", 0.55, ys, regression=False).stalled  # below chance: no better than it


def test_the_same_margin_counts_on_a_large_dev_set():
    """The standard error shrinks with n: 1.5 points above chance is noise at 400, signal at 20,000."""
    small, large = labels_with_share(400, 0.6), labels_with_share(20_000, 0.6)
    assert check("accuracy", 0.615, small, regression=False).stalled
    assert not check("accuracy", 0.615, large, regression=False).stalled


def test_regression_mean_predictor_is_flagged_and_a_correlated_one_is_not():
    rng = random.Random(0)
    ys = [rng.uniform(0, 5) for _ in range(300)]
    constant = regression_metrics([sum(ys) / len(ys)] * len(ys), ys)["pearson"]
    verdict = check("pearson", constant, ys, regression=True)
    assert verdict.stalled and verdict.chance == 0.0 and verdict.constant.startswith("the mean label")
    good = regression_metrics([y + rng.gauss(0, 1.0) for y in ys], ys)["pearson"]
    assert good > 0.5 and not check("pearson", good, ys, regression=True).stalled


def test_metrics_without_a_constant_predictor_are_not_checked():
    assert check("exact_match", 0.0, [0, 1, 1], regression=False) is None
    assert check("loss", 0.7, [0, 1, 1], regression=False) is None
    with pytest.raises(ValueError, match="exact_match"):
        standard_error("exact_match", 0.1, 10)


@pytest.mark.parametrize("config, setting", [
    (leanlora.AdapterConfig(factors="bank"), "train.max_steps"),
    (leanlora.AdapterConfig(ranks="nested"), "leanlora sweep"),
    (leanlora.AdapterConfig(ranks="nested", base="nf4"), "adapter.base=dense"),
    (leanlora.AdapterConfig(ranks="gated", precision="learned"), "adapter.budget=0.25"),
    (leanlora.AdapterConfig(ranks="gated", precision="learned", budget=0.1), "adapter.budget=0.1"),
    (leanlora.AdapterConfig(ranks="gated", precision="learned", budget="off"), "adapter.prior.lmbda"),
    (leanlora.AdapterConfig(), "train.lr"),
])
def test_the_warning_names_a_cause_and_a_setting_for_each_method(config, setting):
    ys = labels_with_share(200, 0.7)
    verdict = check("accuracy", 0.7, ys, regression=False)
    text = stall_warning(verdict, config, steps=126)
    assert setting in likely_cause(config) and setting in text
    assert "did not learn" in text and "126 steps" in text and "0.7000" in text


def test_task_verdict_reads_the_dev_labels_of_a_task():
    class Task:
        metric, regression, num_labels = "matthews", False, 2
        eval = [{"label": y} for y in labels_with_share(100, 0.7)]

    verdict = task_verdict(Task(), {"matthews": 0.0, "accuracy": 0.7})
    assert verdict.stalled and verdict.n == 100
    assert task_verdict(Task(), {"accuracy": 0.7}) is None  # the metric was not scored
    Task.eval = []
    assert task_verdict(Task(), {"matthews": 0.0}) is None   # no dev set


def test_a_vb_lora_run_shorter_than_it_needs_is_told_at_its_start_with_the_steps_it_needs():
    bank = leanlora.AdapterConfig(factors="bank")
    text = short_run_notice(bank, steps=126, examples_per_step=32)
    need = math.ceil(BANK_EXAMPLES_NEEDED / 32)
    assert "126 steps" in text and f"{need} steps here" in text and "train.max_steps" in text
    assert f"{math.ceil(BANK_EXAMPLES_NEEDED / 64)} steps here" in short_run_notice(bank, 126, 64)
    assert short_run_notice(bank, steps=need, examples_per_step=32) is None          # long enough
    for other in (leanlora.AdapterConfig(), leanlora.AdapterConfig(ranks="nested"),
                  leanlora.AdapterConfig(ranks="gated", precision="learned")):
        assert short_run_notice(other, steps=10, examples_per_step=8) is None        # no known need


def test_the_training_loop_prints_the_notice_when_the_run_starts(tmp_path):
    from conftest import minilm_dir
    from leanlora.train.loop import train
    from leanlora.train.runconfig import load_run_config
    from train_fixtures import classification_yaml, tiny_bert_dir

    config = classification_yaml(tmp_path, tiny_bert_dir(tmp_path, minilm_dir()), max_steps=2, eval_every=2)
    lines: list[str] = []
    train(load_run_config(config, ["adapter.factors=bank", "adapter.bank.vector_length=8"]), tmp_path / "run",
          progress=False, log=lines.append)
    assert any("adapter.factors=bank (VB-LoRA) learns more slowly" in line and "2 steps" in line for line in lines)


def test_a_4_bit_base_on_a_small_model_is_told_at_the_start_of_the_run():
    from leanlora.train.guard import SMALL_FOR_4BIT, base_weights, small_base_notice
    from conftest import tiny_llama

    nf4 = leanlora.AdapterConfig(base="nf4")
    text = small_base_notice(nf4, 22_700_000)
    assert "22.7M-parameter model" in text and "adapter.base=dense" in text
    assert small_base_notice(nf4, SMALL_FOR_4BIT) is None                    # large enough
    assert small_base_notice(leanlora.AdapterConfig(), 1000) is None         # a dense base: nothing to say
    model = tiny_llama()
    plain = sum(p.numel() for p in model.parameters())
    pytest.importorskip("torchao")
    leanlora.inject(model, leanlora.AdapterConfig(target_modules=("q_proj", "v_proj"), r=4, base="nf4",
                                                  nf4=leanlora.NF4Config(block_size=32, scaler_block_size=32)))
    assert base_weights(model) == plain                                      # codes and adapters not counted


def test_the_training_loop_prints_the_small_base_notice(tmp_path):
    pytest.importorskip("torchao")
    from conftest import minilm_dir
    from leanlora.train.loop import train
    from leanlora.train.runconfig import load_run_config
    from train_fixtures import classification_yaml, tiny_bert_dir

    config = classification_yaml(tmp_path, tiny_bert_dir(tmp_path, minilm_dir()), max_steps=1, eval_every=1)
    lines: list[str] = []
    train(load_run_config(config, ["adapter.base=nf4", "adapter.nf4.block_size=16", "adapter.nf4.scaler_block_size=16"]),
          tmp_path / "run", progress=False, log=lines.append)
    assert any("adapter.base=nf4 rounds the frozen weights" in line for line in lines)
