"""Tiny on-disk models and data sets for the training / CLI tests (built in a tmp folder, fast)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch

POSITIVE = ["good", "great", "fine", "nice", "happy", "superb"]
NEGATIVE = ["bad", "awful", "poor", "sad", "ugly", "terrible"]
FILLER = ["the", "movie", "was", "a", "plot", "and", "very", "really", "show", "it", "story", "felt"]


def sentiment_rows(n: int, seed: int) -> list[tuple[str, int]]:
    """Sentences whose label is whether they hold a positive word: learnable in a few steps."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = rng.choices(FILLER, k=rng.randint(3, 7))
        words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label else NEGATIVE))
        rows.append((" ".join(words), label))
    return rows


def write_sentiment_tsv(path: Path, n: int, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in sentiment_rows(n, seed)))
    return path


def tiny_bert_dir(root: Path, minilm: Path) -> Path:
    """A 2-layer hidden-32 random BERT encoder saved with the (local) MiniLM WordPiece tokenizer."""
    from transformers import BertConfig, BertModel

    out = root / "tiny-bert"
    if (out / "config.json").is_file():
        return out
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    BertModel(cfg).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm / name, out / name)
    return out


def tiny_llama_dir(root: Path) -> Path:
    """A 2-layer hidden-64 random Llama with a whitespace word-level tokenizer (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = root / "tiny-llama"
    if (out / "config.json").is_file():
        return out
    words = ["<pad>", "<s>", "</s>", "<unk>", "####", "plus", "is", "what", "?"] + [str(i) for i in range(40)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    tok.save_pretrained(out)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(words), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def write_addition_jsonl(path: Path, n: int, seed: int) -> Path:
    """GSM8K-shaped rows: question "what is a plus b ?", answer "a plus b is c #### c"."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randint(0, 19), rng.randint(0, 19)
            f.write(json.dumps({"question": f"what is {a} plus {b} ?", "answer": f"{a} plus {b} is {a + b} #### {a + b}"})
                    + "\n")
    return path


def classification_yaml(root: Path, model_dir: Path, **train) -> Path:
    """A run YAML for the tiny BERT on the toy sentiment data (train/dev written next to it)."""
    train_file = write_sentiment_tsv(root / "data" / "train.tsv", 32, seed=1)
    dev_file = write_sentiment_tsv(root / "data" / "dev.tsv", 48, seed=2)
    # Full-batch steps on 32 rows: the loss falls steadily within 20 steps (a random tiny BERT).
    settings = {"seed": 0, "max_steps": 20, "batch_size": 32, "lr": 3e-2, "eval_every": 10, "log_every": 5,
                "num_threads": 1, **train}
    lines = ["model:", f"  path: {model_dir}", "data:", f"  train_file: {train_file}", f"  eval_file: {dev_file}",
             "  max_length: 16", "adapter:", "  r: 4", "  target_modules: [query, value]",
             "  modules_to_save: [classifier]", "train:"]
    lines += [f"  {k}: {v}" for k, v in settings.items()]
    path = root / "run.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def resumable_run_yaml(root: Path) -> Path:
    """A 12-step tiny-BERT run that checkpoints every 4 steps, evaluates at 6 and logs every 2: enough
    checkpoints, evaluations and log steps for a crash-and-resume test."""
    from conftest import minilm_dir

    return classification_yaml(root, tiny_bert_dir(root, minilm_dir()), max_steps=12, batch_size=8, save_every=4,
                               eval_every=6, log_every=2, lr=1e-2)


class Crash(Exception):
    """A stand-in for a process killed right after a checkpoint was written."""


def crash_after_saving(monkeypatch, at_step: int) -> None:
    """Make the training loop raise :class:`Crash` once the checkpoint of ``at_step`` is on disk;
    ``monkeypatch.undo()`` (or the test's end) restores it."""
    from leanlora.train import loop

    real_save = loop.save_checkpoint

    def save_then_crash(run_dir, step, *rest, **kwargs):
        real_save(run_dir, step, *rest, **kwargs)
        if step == at_step:
            raise Crash

    monkeypatch.setattr(loop, "save_checkpoint", save_then_crash)


def nan_loss_at(monkeypatch, call: int) -> None:
    """The classification loss turns NaN at its ``call``-th computation (1-based), finite otherwise."""
    from leanlora.train import tasks

    calls, original = {"n": 0}, tasks.ClassificationTask.loss

    def loss(self, model, batch):
        calls["n"] += 1
        value = original(self, model, batch)
        return value * float("nan") if calls["n"] == call else value

    monkeypatch.setattr(tasks.ClassificationTask, "loss", loss)
