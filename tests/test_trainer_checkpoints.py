"""LeanLoraTrainer checkpoints hold the adapter (plus Trainer's optimizer, scheduler and RNG files),
never a model that from_pretrained would load; resume and load_best_model_at_end restore exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, Trainer, TrainerCallback

import leanlora
from conftest import tiny_bert
from leanlora.artifact.io import AdapterLoadError, restore
from leanlora.train import callbacks as cb
from trainer_fixtures import Rows, arguments, gated_config, gated_model, trainable

# files with which a transformers / PEFT loader would take a folder for a model or a PEFT adapter
MODEL_FILES = ("config.json", "model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
               "adapter_model.safetensors", "adapter_model.bin")


def train_to(out: Path, **kw):
    torch.manual_seed(0)
    model = gated_model()
    trainer = cb.LeanLoraTrainer(model=model, args=arguments(out, save_strategy="steps", save_steps=2, **kw),
                                 train_dataset=Rows())
    return model, trainer


def test_a_checkpoint_holds_the_adapter_and_the_training_state(tmp_path):
    model, trainer = train_to(tmp_path)
    trainer.train()
    ckpt = tmp_path / "checkpoint-2"
    names = {p.name for p in ckpt.iterdir()}
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"} <= names
    assert not names & set(MODEL_FILES), names & set(MODEL_FILES)
    # the adapter alone: no tensor of the frozen base is stored
    fresh = leanlora.load(tiny_bert(seed=0), ckpt, trainable=True)
    assert not any(".base." in n for n in leanlora.artifact.io.read_adapter_tensors(ckpt))
    final = tmp_path / "checkpoint-4"
    fresh4 = leanlora.load(tiny_bert(seed=0), final)
    for name, p in trainable(model).items():  # the last checkpoint is the trained model's adapter
        torch.testing.assert_close(dict(fresh4.named_parameters())[name], p, rtol=0, atol=0, msg=name)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == set(trainable(model))
    with pytest.raises((OSError, ValueError, KeyError)):  # never a full model with re-initialised weights
        AutoModelForSequenceClassification.from_pretrained(ckpt)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_resume_ends_where_the_uninterrupted_run_ends(tmp_path, accumulation):
    straight, trainer = train_to(tmp_path / "straight", gradient_accumulation_steps=accumulation)
    trainer.train()
    # a new process picking up the step-2 checkpoint
    resumed, trainer = train_to(tmp_path / "resumed", gradient_accumulation_steps=accumulation)
    before = trainable(resumed)
    trainer.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-2"))
    assert trainer.state.global_step == 4
    a, b = trainable(straight), trainable(resumed)
    assert set(a) == set(b) and any(not torch.equal(before[n], b[n]) for n in b)
    for n in a:  # bit for bit: adapter, classifier, optimizer moments, schedule and gate noise all restored
        assert torch.equal(b[n], a[n]), n


class Snapshots(TrainerCallback):
    """The trainable tensors after each optimizer step, by step."""

    def __init__(self, model) -> None:
        self.model, self.by_step = model, {}

    def on_step_end(self, args, state, control, **kwargs):
        self.by_step[state.global_step] = trainable(self.model)


def test_load_best_model_at_end_restores_the_best_step(tmp_path):
    scores = iter([0.1, 0.9, 0.3, 0.2])  # the eval at step 2 is the best one
    torch.manual_seed(0)
    model = gated_model()
    snaps = Snapshots(model)
    args = arguments(tmp_path, eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
                     load_best_model_at_end=True, metric_for_best_model="score", greater_is_better=True)
    trainer = cb.LeanLoraTrainer(model=model, args=args, train_dataset=Rows(), eval_dataset=Rows(n=8, seed=1),
                                 compute_metrics=lambda _: {"score": next(scores)}, callbacks=[snaps])
    trainer.train()
    assert trainer.state.best_global_step == 2
    evals = [h for h in trainer.state.log_history if "eval_score" in h]
    assert len(evals) == 4 and not any("leanlora/rank" in h for h in evals)  # adapter keys: training records
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    now = trainable(model)
    assert any(not torch.equal(snaps.by_step[4][n], now[n]) for n in now)
    for n, p in now.items():
        assert torch.equal(p, snaps.by_step[2][n]), n


def test_a_checkpoint_of_the_whole_model_still_resumes(tmp_path):
    """Folders an earlier LeanLoraTrainer wrote (save_pretrained of everything) load through Trainer's loader."""
    model = gated_model()
    with torch.no_grad():  # unlike a fresh model's
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    old = Trainer(model=model, args=arguments(tmp_path / "old"))
    with pytest.warns(UserWarning, match="not PEFT's adapter save"):  # plain Trainer: the whole model
        old.save_model(str(tmp_path / "old-ckpt"))
    assert (tmp_path / "old-ckpt" / "model.safetensors").is_file()
    fresh = gated_model()
    trainer = cb.LeanLoraTrainer(model=fresh, args=arguments(tmp_path / "new"))
    trainer._load_from_checkpoint(str(tmp_path / "old-ckpt"))
    want, got = trainable(model), trainable(fresh)
    for n in want:
        assert torch.equal(got[n], want[n]), n


def test_restoring_a_checkpoint_of_another_adapter_is_refused(tmp_path):
    leanlora.save(gated_model(), tmp_path / "r4")
    other = gated_model(config=gated_config(r=2))
    before = trainable(other)
    with pytest.raises(AdapterLoadError, match=r"differs from the model's in \['r'\]"):
        restore(other, tmp_path / "r4")
    assert all(torch.equal(before[n], p) for n, p in trainable(other).items())
