"""A tiny gated BERT classifier, its data, TrainingArguments and a TensorBoard reader for the Trainer tests."""

from __future__ import annotations

import torch
from transformers import TrainingArguments

import leanlora
from conftest import tiny_bert
from leanlora.config import AdapterConfig, GatesConfig, PriorConfig


class Rows(torch.utils.data.Dataset):
    """Random token ids labelled by the parity of the first one."""

    def __init__(self, n: int = 16, seq: int = 8, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(5, 128, (n, seq), generator=g)
        self.labels = (self.ids[:, 0] % 2).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def gated_config(**kw) -> AdapterConfig:
    """B-LoRA (gated ranks, learned bits) on query/value with the classifier trained in full."""
    base = dict(target_modules=("query", "value"), modules_to_save=("classifier",), r=4, ranks="gated",
                precision="learned", gates=GatesConfig(rank_init_log_alpha=2.0), prior=PriorConfig(lmbda=0.1))
    return AdapterConfig(**{**base, **kw})


def gated_model(seed: int = 0, config: AdapterConfig | None = None):
    return leanlora.inject(tiny_bert(seed=seed), config or gated_config())


def arguments(tmp_path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    return TrainingArguments(**{**base, **kw})


def trainable(model) -> dict[str, torch.Tensor]:
    """A copy of every trainable tensor, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted(logdir.rglob("events.out.tfevents*"))
    assert events, f"no TensorBoard event file under {logdir}"
    out: dict[str, list[tuple[int, float]]] = {}
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out
