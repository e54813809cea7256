"""The adapter's rank, bits, BOPs (against LoRA-16 and the budget) and prior reach every report_to
backend: read back from TensorBoard's event files."""

from __future__ import annotations


import pytest
from transformers import TrainerCallback

import leanlora
from leanlora.train import callbacks as cb
from trainer_fixtures import Rows, arguments, gated_config, gated_model, scalars

KEYS = ("leanlora/rank", "leanlora/bits", "leanlora/bops", "leanlora/bops_vs_lora16", "leanlora/prior")


class Seen(TrainerCallback):
    """Any other integration: what its on_log receives."""

    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_tensorboard_and_every_callback_get_the_adapter_keys(tmp_path):
    config = gated_config(budget=0.25, budget_schedule=(0.1, 0.5, 0.7))  # the ramp within the logged steps
    model = gated_model(config=config)
    seen = Seen()
    trainer = cb.LeanLoraTrainer(model=model, args=arguments(tmp_path, report_to=["tensorboard"], logging_steps=2),
                                 train_dataset=Rows(), callbacks=[seen])
    trainer.train()
    tb = scalars(tmp_path)
    history = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in history] == [2, 4]
    for key in (*KEYS, "leanlora/budget"):
        written = tb.get(f"train/{key}")
        assert written is not None, f"{key} missing from TensorBoard; tags: {sorted(tb)}"
        assert [s for s, _ in written][:2] == [2, 4]
        for (_, value), h in zip(written, history):
            assert value == pytest.approx(h[key], rel=1e-6), key
    assert all(key in logs for logs in seen.logs if "loss" in logs for key in KEYS)
    assert tb["train/leanlora/budget"][0][1] == pytest.approx(0.25)
    first = history[0]
    # with a budget the logged prior is the controller's λ_t·(E[C] − target_t): λ starts at 0 and rises
    # while the target falls below the expected cost, so by the first log it is positive
    assert first["leanlora/prior"] > 0 and "leanlora/cost" in first and "leanlora/target" in first
    report = leanlora.cost_report(model).total
    assert history[-1]["leanlora/bops"] == report["bops"]  # float bits at the start: 2x LoRA-16's BOPs
    assert history[-1]["leanlora/bops_vs_lora16"] == pytest.approx(report["bops"] / report["lora_bops"], rel=1e-5)


def test_no_budget_no_budget_key(tmp_path):
    trainer = cb.LeanLoraTrainer(model=gated_model(config=gated_config(budget="off")), args=arguments(tmp_path, max_steps=1),
                                 train_dataset=Rows())
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and "leanlora/budget" not in logged[0] and "leanlora/bops" in logged[0]
