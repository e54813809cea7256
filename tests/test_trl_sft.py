"""TRL's SFTTrainer with a leanlora model: the README's recipe, 3 steps of chat-format data on a tiny
random Llama with an offline tokenizer that has a chat template."""

from __future__ import annotations

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from trl import SFTConfig

import leanlora
from conftest import tiny_llama
from leanlora.artifact.io import adapter_state_dict
from leanlora.train.sft import LeanLoraSFTTrainer
from trainer_fixtures import scalars

SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "system", "user", "assistant"]
WORDS = "hello how are you i am fine thanks what is the weather sunny rainy today name my bot".split()
# {% generation %} marks what the assistant says: SFTTrainer's assistant_only_loss masks everything else
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} "
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }} <|im_end|>{% endgeneration %}"
    "{% else %}{{ m['content'] }} <|im_end|>{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
CHATS = [
    ("hello how are you", "i am fine thanks"),
    ("what is the weather today", "sunny"),
    ("what is my name", "bot"),
    ("how is the weather", "rainy today"),
]


def chat_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with a chat template, built in memory (nothing downloaded)."""
    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="<|im_end|>", chat_template=CHAT_TEMPLATE)


def test_sft_trainer_recipe(tmp_path):
    tokenizer = chat_tokenizer()
    model = tiny_llama(seed=0)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    # --- the README's recipe -------------------------------------------------------------------
    leanlora.inject(model, leanlora.AdapterConfig(target_modules=("q_proj", "v_proj"), r=4,
                                                  ranks="gated", precision="learned", budget="off"))
    chats = Dataset.from_list([{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                               for q, a in CHATS * 2])
    args = SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
                     logging_steps=1, save_steps=3, assistant_only_loss=True, max_length=32,
                     report_to=["tensorboard"], use_cpu=True, disable_tqdm=True, seed=0)
    trainer = LeanLoraSFTTrainer(model=model, args=args, train_dataset=chats, processing_class=tokenizer)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    # ----------------------------------------------------------------------------------------------
    assert trainer.state.global_step == 3
    row = trainer.train_dataset[0]
    assert tokenizer.decode([t for t, y in zip(row["input_ids"], row["labels"]) if y != -100]) == \
        "i am fine thanks <|im_end|>"  # the loss is on the assistant's turn only
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logged)
    assert all(h["leanlora/prior"] > 0 and "leanlora/rank" in h and "mean_token_accuracy" in h for h in logged)
    written = scalars(tmp_path)
    assert [s for s, _ in written["train/leanlora/bops_vs_lora16"]][:3] == [1, 2, 3], sorted(written)
    assert isinstance(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer,
                      torch.optim.AdamW)
    assert start and all(".q_proj." in n or ".v_proj." in n or n.startswith("leanlora_shared") for n in start)
    assert any(not torch.equal(p, start[n]) for n, p in model.named_parameters() if n in start)
    for name, p in model.named_parameters():  # the frozen base never changes
        key = name.replace(".base.weight", ".weight")
        if not p.requires_grad and key in base:
            assert torch.equal(p, base[key]), name
    # checkpoint-3 is the adapter: loaded onto a fresh base it is the trained adapter, tensor for tensor,
    # and gives the trained model's logits (under the bf16 autocast SFTConfig turns on and Trainer wraps
    # the trained model's forward in)
    fresh = leanlora.load(tiny_llama(seed=0), tmp_path / "checkpoint-3")
    saved, trained = adapter_state_dict(fresh), adapter_state_dict(model)
    assert set(saved) == set(trained) and all(torch.equal(saved[k], trained[k]) for k in saved)
    ids = torch.tensor([tokenizer.apply_chat_template([{"role": "user", "content": "hello how are you"}],
                                                      add_generation_prompt=True, tokenize=True, return_dict=False)])
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
        torch.testing.assert_close(fresh(ids).logits.float(), model(ids).logits.float())


def test_peft_config_reaches_a_model_trl_loads_by_name(tmp_path):
    """TRL's habit: the model as a folder name and the adapter as ``peft_config``; the trainer injects
    it once TRL has loaded the model, and the checkpoint is that adapter."""
    folder = tmp_path / "base"
    tiny_llama(seed=0).save_pretrained(folder)
    chats = Dataset.from_list([{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                               for q, a in CHATS])
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2,
                     learning_rate=1e-2, save_steps=2, max_length=32, report_to=[], use_cpu=True,
                     disable_tqdm=True, seed=0)
    config = leanlora.AdapterConfig(target_modules=("q_proj", "v_proj"), r=4)
    trainer = LeanLoraSFTTrainer(model=str(folder), args=args, train_dataset=chats, processing_class=chat_tokenizer(),
                                 peft_config=config)
    adapted = sorted(name.rsplit(".", 1)[-1] for name, _ in leanlora.adapted_layers(trainer.model))
    assert adapted == ["q_proj"] * 2 + ["v_proj"] * 2
    trainer.train()
    fresh = leanlora.load(tiny_llama(seed=0), tmp_path / "out" / "checkpoint-2")
    saved, trained = adapter_state_dict(fresh), adapter_state_dict(trainer.model)
    assert set(saved) == set(trained) and all(torch.equal(saved[k], trained[k]) for k in saved)
