"""args.optim is honoured over leanlora's parameter groups, or refused with a message naming it."""

from __future__ import annotations

import pytest
import torch
from transformers.optimization import Adafactor

from leanlora.train import callbacks as cb
from leanlora.train.trainer_optim import UnsupportedOptimizer
from trainer_fixtures import Rows, arguments, gated_model, trainable


def optimizer_for(tmp_path, **kw):
    trainer = cb.LeanLoraTrainer(model=gated_model(), args=arguments(tmp_path, **kw), train_dataset=Rows())
    return trainer, trainer.create_optimizer()


def roles(optimizer) -> dict[str, dict]:
    return {g["role"]: g for g in optimizer.param_groups}


@pytest.mark.parametrize("optim, cls, extra", [
    ("adamw_torch", torch.optim.AdamW, {}),
    ("adamw_torch_fused", torch.optim.AdamW, {"fused": True}),
    ("sgd", torch.optim.SGD, {"momentum": 0.0}),
    ("adagrad", torch.optim.Adagrad, {}),
    ("rmsprop", torch.optim.RMSprop, {}),
    ("adafactor", Adafactor, {"relative_step": False}),
])
def test_the_named_optimizer_gets_leanlora_groups(tmp_path, optim, cls, extra):
    trainer, opt = optimizer_for(tmp_path, optim=optim)
    assert type(opt) is cls
    got = roles(opt)
    config = trainer.model.leanlora_shared.config
    assert {"adapter", "head", "gates"} <= set(got)
    assert got["gates"]["lr"] == config.gates.lr and got["gates"]["weight_decay"] == 0.0
    assert got["adapter"]["lr"] == trainer.args.learning_rate
    for key, value in extra.items():
        assert opt.defaults[key] == value, key
    n_trainable = sum(1 for p in trainer.model.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in opt.param_groups) == n_trainable


def test_optim_args_reach_the_optimizer(tmp_path):
    _, opt = optimizer_for(tmp_path, optim="sgd", optim_args="momentum=0.9,nesterov=true")
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["nesterov"] is True


def test_sgd_trains(tmp_path):
    trainer, _ = optimizer_for(tmp_path, optim="sgd", max_steps=2)
    before = trainable(trainer.model)
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer,
                      torch.optim.SGD)
    after = trainable(trainer.model)
    assert any(not torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("optim", ["galore_adamw", "apollo_adamw", "lomo", "galore_adamw_layerwise"])
def test_model_bound_optimizers_are_refused_by_name(tmp_path, optim):
    with pytest.raises(UnsupportedOptimizer, match=rf"args.optim='{optim}' is not supported .*Supported: adamw_torch"):
        optimizer_for(tmp_path, optim=optim, optim_target_modules=["query"])


def test_an_optimizer_factory_is_refused(tmp_path):
    def factory(model, **kwargs):  # groups the model's parameters itself, as Muon's factory does
        raise AssertionError("never called")

    trainer = cb.LeanLoraTrainer(model=gated_model(), args=arguments(tmp_path), train_dataset=Rows(),
                                 optimizer_cls_and_kwargs=(factory, {}))
    with pytest.raises(UnsupportedOptimizer, match="optimizer factory"):
        trainer.create_optimizer()


def test_optimizer_cls_and_kwargs_is_honoured(tmp_path):
    trainer = cb.LeanLoraTrainer(model=gated_model(), args=arguments(tmp_path), train_dataset=Rows(),
                                 optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.05, "momentum": 0.5}))
    opt = trainer.create_optimizer()
    assert type(opt) is torch.optim.SGD and opt.defaults["momentum"] == 0.5
    assert roles(opt)["adapter"]["lr"] == 0.05
