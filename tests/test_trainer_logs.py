"""The adapter's rank, bits, BOPs (against LoRA-16 and the budget) and prior reach every report_to
backend: read back from TensorBoard's event files."""

from __future__ import annotations

import dataclasses

import pytest
from transformers import TrainerCallback

import leanlora
from leanlora.config import AdapterConfig
from leanlora.train import callbacks as cb
from trainer_fixtures import Rows, arguments, gated_config, gated_model, scalars

KEYS = ("leanlora/rank", "leanlora/bits", "leanlora/bops", "leanlora/bops_vs_lora16", "leanlora/prior")


@dataclasses.dataclass(frozen=True)
class BudgetedConfig(AdapterConfig):
    """An adapter config with ``budget`` (a fraction of LoRA-16 BOPs), as ``adapter.budget`` states it."""

    budget: float = 0.25


class Seen(TrainerCallback):
    """Any other integration: what its on_log receives."""

    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_tensorboard_and_every_callback_get_the_adapter_keys(tmp_path):
    config = BudgetedConfig(**{f.name: getattr(gated_config(), f.name) for f in dataclasses.fields(AdapterConfig)})
    model = gated_model(config=config)
    prior_at_start = leanlora.regularizer(model).item()
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
    assert first["leanlora/prior"] > 0
    # the first log's prior is the mean of λ·R over steps 1-2: the gates only moved once in between
    assert first["leanlora/prior"] == pytest.approx(prior_at_start, rel=0.05)
    report = leanlora.cost_report(model).total
    assert history[-1]["leanlora/bops"] == report["bops"]  # float bits at the start: 2x LoRA-16's BOPs
    assert history[-1]["leanlora/bops_vs_lora16"] == pytest.approx(report["bops"] / report["lora_bops"], rel=1e-5)


def test_no_budget_no_budget_key(tmp_path):
    trainer = cb.LeanLoraTrainer(model=gated_model(), args=arguments(tmp_path, max_steps=1), train_dataset=Rows())
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and "leanlora/budget" not in logged[0] and "leanlora/bops" in logged[0]
