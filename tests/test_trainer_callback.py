"""HF Trainer users: LeanLoraTrainer / LeanLoraCallback advance the schedules, add the prior to
the loss, use leanlora's parameter groups, and log expected rank and bits."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer

import leanlora
from leanlora.config import AdapterConfig
from conftest import tiny_bert
from leanlora.train import callbacks as cb
from trainer_fixtures import Rows, arguments, gated_config, gated_model


def test_trainer_trains_with_the_callback(tmp_path, monkeypatch):
    steps: list[int] = []
    real_advance = cb.advance
    monkeypatch.setattr(cb, "advance", lambda model, step: (steps.append(step), real_advance(model, step)))
    model = gated_model()
    gates_before = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("log_alpha")}
    trainer = cb.LeanLoraTrainer(model=model, args=arguments(tmp_path, gradient_accumulation_steps=2),
                                 train_dataset=Rows())
    result = trainer.train()
    assert steps == [0, 1, 2, 3]                       # once per optimizer step, not per micro-batch
    assert result.global_step == 4
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 4 and all("leanlora/rank" in h and "leanlora/bits" in h for h in logged)
    assert all(0 < h["leanlora/rank"] <= 4 for h in logged)
    roles = {g["role"]: g for g in trainer.optimizer.param_groups}
    assert {"adapter", "head", "gates"} <= set(roles)
    assert roles["gates"]["weight_decay"] == 0.0
    moved = [n for n, p in model.named_parameters() if n in gates_before and not torch.equal(p, gates_before[n])]
    assert moved, "the gate parameters never changed"


def test_loss_includes_the_regularizer_once(tmp_path):
    model = gated_model().train()
    trainer = cb.LeanLoraTrainer(model=model, args=arguments(tmp_path), train_dataset=Rows())
    batch = Rows()[0]
    inputs = {"input_ids": batch["input_ids"][None], "labels": batch["labels"][None]}
    torch.manual_seed(1)
    with_prior = trainer.compute_loss(model, inputs)
    torch.manual_seed(1)
    task = Trainer.compute_loss(trainer, model, inputs)
    reg = leanlora.regularizer(model)
    assert reg.item() > 0
    torch.testing.assert_close(with_prior, task + reg)
    model.eval()                                       # eval loss is the task loss alone
    torch.testing.assert_close(trainer.compute_loss(model, inputs), Trainer.compute_loss(trainer, model, inputs))


def test_add_regularizer_to_a_plain_trainer(tmp_path):
    model = gated_model().train()
    trainer = Trainer(model=model, args=arguments(tmp_path, max_steps=2), train_dataset=Rows(),
                      optimizers=(cb.leanlora_optimizer(model, arguments(tmp_path)), None))
    cb.add_regularizer(trainer)
    assert sum(isinstance(c, cb.LeanLoraCallback) for c in trainer.callback_handler.callbacks) == 1
    batch = Rows()[1]
    inputs = {"input_ids": batch["input_ids"][None], "labels": batch["labels"][None]}
    torch.manual_seed(2)
    a = trainer.compute_loss(model, inputs)
    torch.manual_seed(2)
    b = Trainer.compute_loss(trainer, model, inputs) + leanlora.regularizer(model)
    torch.testing.assert_close(a, b)
    assert trainer.train().global_step == 2


def test_no_adapter_is_a_clear_error_when_the_trainer_is_made(tmp_path):
    with pytest.raises(leanlora.InjectError, match=r"holds no leanlora adapter; pass peft_config=leanlora"):
        cb.LeanLoraTrainer(model=tiny_bert(), args=arguments(tmp_path), train_dataset=Rows())


def test_peft_config_injects_the_adapter_as_inject_does(tmp_path):
    """``peft_config=AdapterConfig`` (TRL's habit) injects once the trainer holds the model, after it has
    seeded torch from ``args.seed``: the adapter inject gives under that seed, which then trains."""
    from transformers import set_seed

    trainer = cb.LeanLoraTrainer(model=tiny_bert(seed=0), args=arguments(tmp_path), train_dataset=Rows(),
                                 peft_config=gated_config())
    injected = tiny_bert(seed=0)
    set_seed(0)
    leanlora.inject(injected, gated_config())
    given = dict(leanlora.trainable_parameters(trainer.model))
    assert given.keys() == dict(leanlora.trainable_parameters(injected)).keys()
    for n, p in leanlora.trainable_parameters(injected):
        assert torch.equal(given[n], p), n
    start = {n: p.detach().clone() for n, p in given.items()}
    assert trainer.train().global_step == 4
    assert any(not torch.equal(p, start[n]) for n, p in leanlora.trainable_parameters(trainer.model))


@pytest.mark.parametrize("make, error, match", [
    (lambda: dict(model=tiny_bert(), peft_config=object()), TypeError, "takes a leanlora.AdapterConfig, got object"),
    (lambda: dict(model=gated_model(), peft_config=gated_config()), leanlora.InjectError, "already holds leanlora"),
    (lambda: dict(model_init=tiny_bert, peft_config=gated_config()), TypeError, "inject the adapter inside"),
])
def test_peft_config_refusals(tmp_path, make, error, match):
    with pytest.raises(error, match=match):
        cb.LeanLoraTrainer(args=arguments(tmp_path), train_dataset=Rows(), **make())
def test_a_budget_is_met_and_resumed_under_the_trainer(tmp_path):
    """The callback gives the controller the run's length, and its state travels in trainer_state.json."""
    from leanlora import budget

    def run(out):
        torch.manual_seed(0)
        model = leanlora.inject(tiny_bert(seed=0), AdapterConfig(
            target_modules=("query", "value"), modules_to_save=("classifier",), r=4, ranks="gated",
            precision="learned", budget=0.25))
        trainer = cb.LeanLoraTrainer(model=model, args=arguments(out, max_steps=10, save_strategy="steps",
                                                                 save_steps=5), train_dataset=Rows())
        return model, trainer

    straight, trainer = run(tmp_path / "straight")
    trainer.train()
    ctl = budget.controller(straight)
    assert ctl.total == 10 and ctl.frozen
    assert abs(leanlora.cost_report(straight).total["bops_vs_lora"] / 0.25 - 1) <= 0.1
    assert all("leanlora/cost" in h for h in trainer.state.log_history if "loss" in h)
    resumed, trainer = run(tmp_path / "resumed")
    trainer.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-5"))
    assert budget.controller(resumed).state_dict() == ctl.state_dict()
    a = {n: p for n, p in straight.named_parameters() if p.requires_grad}
    b = {n: p for n, p in resumed.named_parameters() if p.requires_grad}
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=1e-5, atol=1e-6, msg=n)
