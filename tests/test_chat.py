"""Instruction formats (prompt_response, alpaca, sharegpt, messages) and their loss masks.

The masks are checked against an independent reading of the rendered conversation: the tokens
from each "<|im_start|> assistant" header to its "<|im_end|>" are the ones that carry a label.
"""

import json

import pytest

from leanlora.config import ConfigError
from leanlora.train.runconfig import DataConfig, load_run_config
from leanlora.train.tasks import CausalLMTask, build_task

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "system", "user", "assistant", "be", "brief", "what",
         "is", "two", "plus", "three", "four", "five", "and", "times", "six", "?", "####", "5", "6",
         "Below", "an", "instruction", "###", "Instruction:", "Input:", "Response:"]

CONVERSATION = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": "what is two plus three ?"},
                {"role": "assistant", "content": "five #### 5"},
                {"role": "user", "content": "and two times three ?"},
                {"role": "assistant", "content": "six #### 6"}]


def chat_tokenizer(template: str | None = CHATML):
    """A word-level tokenizer with ChatML special tokens and (optionally) a chat template, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<|im_end|>", unk_token="<unk>",
                                  additional_special_tokens=["<|im_start|>"])
    tok.chat_template = template
    return tok


def assistant_mask(ids: list[int], tok) -> list[bool]:
    """True from each '<|im_start|> assistant' header's end through its '<|im_end|>'."""
    start, end, role = (tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "assistant"))
    mask, inside = [], False
    for i, t in enumerate(ids):
        if t == end and inside:
            mask.append(True)
            inside = False
            continue
        mask.append(inside)
        if i > 0 and ids[i - 1] == start and t == role:
            inside = True
    return mask


def learned(example, tok) -> str:
    """The tokens that carry a label, as text (the word-level tokenizer joins them with spaces)."""
    return tok.decode([t for t in example["labels"] if t != -100])


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def causal(tmp_path, records, tok, **data):
    path = write_jsonl(tmp_path / "d.jsonl", records)
    return CausalLMTask(DataConfig(task="causal_lm", train_file=path, max_length=64, **data), tok)


def test_messages_loss_covers_every_assistant_turn_and_nothing_else(tmp_path):
    tok = chat_tokenizer()
    ex = causal(tmp_path, [{"messages": CONVERSATION}], tok, format="messages").train[0]
    full = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert ex["input_ids"] == tok(full, add_special_tokens=False)["input_ids"]
    mask = assistant_mask(ex["input_ids"], tok)
    assert [label != -100 for label in ex["labels"]] == mask
    assert all(label in (-100, t) for label, t in zip(ex["labels"], ex["input_ids"]))
    assert learned(ex, tok) == "five #### 5 <|im_end|> six #### 6 <|im_end|>"
    # generation is given everything up to the last assistant turn, with the assistant header
    prompt = tok.apply_chat_template(CONVERSATION[:-1], tokenize=False, add_generation_prompt=True)
    assert ex["prompt_ids"] == tok(prompt, add_special_tokens=False)["input_ids"]
    assert ex["response"] == "six #### 6"


def test_sharegpt_reads_as_the_same_conversation(tmp_path):
    tok = chat_tokenizer()
    speakers = {"system": "system", "user": "human", "assistant": "gpt"}
    share = [{"from": speakers[m["role"]], "value": m["content"]} for m in CONVERSATION]
    a = causal(tmp_path, [{"conversations": share}], tok, format="sharegpt").train[0]
    b = causal(tmp_path, [{"messages": CONVERSATION}], tok, format="messages").train[0]
    assert a == b


def test_alpaca_with_and_without_a_chat_template(tmp_path):
    row = {"instruction": "what is two plus three ?", "input": "be brief", "output": "five #### 5"}
    tok = chat_tokenizer()
    ex = causal(tmp_path, [row], tok, format="alpaca").train[0]
    conv = [{"role": "user", "content": "what is two plus three ?\n\nbe brief"},
            {"role": "assistant", "content": "five #### 5"}]
    assert ex["input_ids"] == tok(tok.apply_chat_template(conv, tokenize=False), add_special_tokens=False)["input_ids"]
    assert [label != -100 for label in ex["labels"]] == assistant_mask(ex["input_ids"], tok)
    plain = causal(tmp_path, [row], chat_tokenizer(None), format="alpaca").train[0]
    text = tok.decode(plain["prompt_ids"])
    assert "### Instruction:" in text and "### Input:" in text and text.rstrip().endswith("### Response:")
    assert learned(plain, tok) == "five #### 5 <|im_end|>"


def test_prompt_response_uses_the_template_when_there_is_one(tmp_path):
    row = {"question": "what is two plus three ?", "answer": "five #### 5"}
    tok = chat_tokenizer()
    data = dict(prompt_template="{question}", response_column="answer")
    templated = causal(tmp_path, [row], tok, **data).train[0]
    assert tok.decode(templated["prompt_ids"]) == "<|im_start|> user what is two plus three ? <|im_end|> <|im_start|> assistant"
    assert [label != -100 for label in templated["labels"]] == assistant_mask(templated["input_ids"], tok)
    plain = causal(tmp_path, [row], tok, chat_template=False, **data).train[0]
    assert tok.decode(plain["input_ids"]) == "what is two plus three ? five #### 5 <|im_end|>"
    assert plain["labels"][:len(plain["prompt_ids"])] == [-100] * len(plain["prompt_ids"])


def test_truncation_drops_conversations_with_nothing_left_to_learn(tmp_path):
    tok = chat_tokenizer()
    long_user = {"role": "user", "content": " ".join(["what"] * 80)}
    rows = [{"messages": [long_user, {"role": "assistant", "content": "five"}, long_user,
                          {"role": "assistant", "content": "six"}]}, {"messages": CONVERSATION}]
    task = causal(tmp_path, rows, tok, format="messages")
    # the first conversation's single exchange rule does not apply (two turns): cut at the end, no label left
    assert len(task.train) == 1 and task.train[0]["response"] == "six #### 6"


@pytest.mark.parametrize("fmt,record,message", [
    ("sharegpt", {"conversations": [{"from": "alien", "value": "x"}]}, r"d.jsonl line 1: turn 0 has from='alien'"),
    ("messages", {"chat": []}, r"d.jsonl line 1: column 'messages' \(data.messages_column\) is missing"),
    ("messages", {"messages": [{"role": "user", "content": "x"}]}, r"line 1: .* has no assistant turn"),
    ("alpaca", {"instruction": "x"}, r"line 1: column 'output' \(data.format=alpaca\) is missing"),
])
def test_bad_rows_name_the_line_and_the_key(tmp_path, fmt, record, message):
    with pytest.raises(ConfigError, match=message):
        causal(tmp_path, [record], chat_tokenizer(), format=fmt)


def test_chat_formats_need_a_template(tmp_path):
    with pytest.raises(ConfigError, match=r"data.format='messages' needs a tokenizer with a chat template"):
        causal(tmp_path, [{"messages": CONVERSATION}], chat_tokenizer(None), format="messages")
    with pytest.raises(ConfigError, match=r"data.format=.*only data.task=causal_lm"):
        load_run_config(None, ["data.format=alpaca"])
    with pytest.raises(ConfigError, match=r"data.format='chatml' is invalid"):
        load_run_config(None, ["data.task=causal_lm", "data.format=chatml"])


def test_datasets_folder_and_dataset_object_read_like_the_jsonl(tmp_path):
    datasets = pytest.importorskip("datasets")
    tok = chat_tokenizer()
    rows = [{"messages": CONVERSATION}, {"messages": CONVERSATION[:3]}]
    from_file = causal(tmp_path, rows, tok, format="messages").train
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "saved"))
    cfg = DataConfig(task="causal_lm", train_file=str(tmp_path / "saved"), format="messages", max_length=64)
    assert CausalLMTask(cfg, tok).train == from_file
    in_python = build_task(DataConfig(task="causal_lm", format="messages", max_length=64), tok,
                           sources={"train_file": ds})
    assert in_python.train == from_file
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(ConfigError, match=r"it is a DatasetDict: name one split folder.*splits: \['train'\]"):
        CausalLMTask(DataConfig(task="causal_lm", train_file=str(tmp_path / "dict"), format="messages"), tok)


def test_holdout_splits_one_file_into_disjoint_train_and_eval(tmp_path):
    tok = chat_tokenizer()
    rows = [{"question": f"what is {w} ?", "answer": w} for w in ("two", "three", "four", "five", "six")]
    path = write_jsonl(tmp_path / "one.jsonl", rows)
    task = CausalLMTask(DataConfig(task="causal_lm", train_file=path, holdout=2, prompt_template="{question}",
                                   response_column="answer"), tok)
    train, held = {e["response"] for e in task.train}, {e["response"] for e in task.eval}
    assert len(train) == 3 and len(held) == 2 and train | held == {r["answer"] for r in rows}
    with pytest.raises(ConfigError, match=r"data.holdout=5 leaves no training row"):
        CausalLMTask(DataConfig(task="causal_lm", train_file=path, holdout=5, prompt_template="{question}",
                                response_column="answer"), tok)
    with pytest.raises(ConfigError, match=r"data.holdout=2 is invalid: .*data.eval_file is set too"):
        DataConfig(task="causal_lm", train_file=path, eval_file=path, holdout=2)


def test_a_packed_batch_has_the_loss_of_the_padded_one(tmp_path):
    """Examples of different lengths, packed into one row, give the padded batch's loss and logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train_fixtures import tiny_llama_dir

    folder = tiny_llama_dir(tmp_path)
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, attn_implementation="sdpa").eval()
    sums = [[3, 4], [1, 2, 5, 7], [9], [2, 2, 2, 2, 2, 2], [6, 1, 1]]
    rows = [{"question": "what is " + " plus ".join(map(str, terms)) + " ?", "answer": f"#### {sum(terms)}"}
            for terms in sums]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    data = dict(task="causal_lm", train_file=path, prompt_template="{question}", response_column="answer",
                max_length=32)
    padded = CausalLMTask(DataConfig(**data), tok)
    packed = CausalLMTask(DataConfig(**data, packing=True), tok)
    assert len({len(e["input_ids"]) for e in padded.train}) > 1   # lengths differ: padding is real
    one_row = packed.collate(packed.train)
    assert one_row["input_ids"].shape == (1, sum(len(e["input_ids"]) for e in packed.train))
    with torch.no_grad():
        torch.testing.assert_close(packed.loss(model, one_row), padded.loss(model, padded.collate(padded.train)),
                                   rtol=1e-5, atol=1e-6)
        # and each example's logits are its own, as if it were alone
        first = packed.train[0]["input_ids"]
        alone = model(input_ids=torch.tensor([first])).logits[0]
        inside = model(input_ids=one_row["input_ids"], attention_mask=one_row["attention_mask"],
                       position_ids=one_row["position_ids"]).logits[0, :len(first)]
        torch.testing.assert_close(inside, alone, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match=r"data.packing=True is invalid: packs causal-LM examples"):
        DataConfig(packing=True)
    with pytest.raises(ConfigError, match=r"data.packing=True is invalid: train.cuda_graph"):
        load_run_config(None, ["data.task=causal_lm", "data.packing=true", "train.cuda_graph=true"])
