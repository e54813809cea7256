"""Instruction rows as conversations, and conversations as token ids with a loss mask.

``data.format`` says how a row holds its example:

* ``prompt_response`` — ``data.prompt_template`` formatted with the row, and ``data.response_column``;
* ``alpaca`` — ``instruction``, optional ``input``, ``output`` (Stanford Alpaca's JSON);
* ``messages`` — a list of ``{"role", "content"}`` (OpenAI / transformers chat format);
* ``sharegpt`` — a list of ``{"from", "value"}`` with ``human`` / ``gpt`` / ``system`` speakers.

Every format becomes a list of messages. With the tokenizer's chat template (``data.chat_template``)
the conversation is rendered by ``apply_chat_template``; the loss covers what each assistant turn
adds to the rendered text (its content and end-of-turn tokens), never the system or user turns.
The ids are built turn by turn: the rendering of turns ``[:i]`` with the generation prompt is a
prefix of the rendering of turns ``[:i+1]``, and the difference is the assistant's turn ``i``.
Tokenizing each piece on its own keeps the prompt ids identical to what generation is given.
Without a template, a single-turn example is the prompt text followed by the response and EOS.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from leanlora.train.data import DataError, Row
from leanlora.train.runconfig import DataConfig

Message = dict[str, str]

# ShareGPT speakers -> chat roles (the names seen in the ShareGPT, Vicuna and OpenHermes dumps)
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant", "model": "assistant",
                  "tool": "tool", "function_response": "tool", "observation": "tool"}
ROLES = ("system", "user", "assistant", "tool")
CHAT_FORMATS = ("messages", "sharegpt")
DEFAULT_MESSAGES_COLUMN = {"messages": "messages", "sharegpt": "conversations"}
# Alpaca's own prompt (Taori et al., 2023), used when the tokenizer has no chat template
ALPACA_PREAMBLE = ("Below is an instruction that describes a task{paired}. "
                   "Write a response that appropriately completes the request.\n\n")


def uses_template(cfg: DataConfig, tokenizer) -> bool:
    """Whether the rows go through the tokenizer's chat template (an error if one is required)."""
    has = bool(getattr(tokenizer, "chat_template", None))
    if cfg.format in CHAT_FORMATS and not has:
        raise DataError(f"data.format={cfg.format!r} needs a tokenizer with a chat template; this tokenizer has "
                        "none (set model.tokenizer to one that has, or use data.format=prompt_response)")
    if cfg.chat_template is True and not has:
        raise DataError("data.chat_template=true but the tokenizer has no chat template; set it to auto or false")
    return has if cfg.chat_template == "auto" else bool(cfg.chat_template) or cfg.format in CHAT_FORMATS


def _text(path: Path, row: Row, column: str, key: str, optional: bool = False) -> str:
    value = row.fields.get(column)
    if optional and value in (None, ""):
        return ""
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{path} line {row.line}: column {column!r} ({key}) is missing, empty or not text: "
                        f"{value!r}")
    return value


def messages_of(cfg: DataConfig, path: Path, row: Row, templated: bool) -> list[Message]:
    """The row as a conversation: [system?, user, assistant, ...]; errors name file, line and key."""
    if cfg.format == "prompt_response":
        try:
            prompt = cfg.prompt_template.format_map(row.fields)
        except KeyError as err:
            raise DataError(f"{path} line {row.line}: data.prompt_template names field {err.args[0]!r}; "
                            f"the row has {sorted(row.fields)}") from None
        response = _text(path, row, cfg.response_column, "data.response_column")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    if cfg.format == "alpaca":
        instruction = _text(path, row, "instruction", "data.format=alpaca")
        extra = _text(path, row, "input", "data.format=alpaca", optional=True)
        output = _text(path, row, "output", "data.format=alpaca")
        if templated:
            prompt = instruction + (f"\n\n{extra}" if extra else "")
        else:
            prompt = (ALPACA_PREAMBLE.format(paired=", paired with an input that provides further context"
                                             if extra else "")
                      + f"### Instruction:\n{instruction}\n\n" + (f"### Input:\n{extra}\n\n" if extra else "")
                      + "### Response:\n")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return _conversation(cfg, path, row)


def _conversation(cfg: DataConfig, path: Path, row: Row) -> list[Message]:
    column = cfg.messages_column or DEFAULT_MESSAGES_COLUMN[cfg.format]
    turns = row.fields.get(column)
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{path} line {row.line}: column {column!r} (data.messages_column) is missing or not a "
                        f"non-empty list of turns; the row has {sorted(row.fields)}")
    role_key, text_key = ("from", "value") if cfg.format == "sharegpt" else ("role", "content")
    out: list[Message] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get(text_key), str):
            raise DataError(f"{path} line {row.line}: turn {i} of {column!r} is not an object with a text "
                            f"{text_key!r} (data.format={cfg.format}): {turn!r}")
        who = turn.get(role_key)
        role = SHAREGPT_ROLES.get(str(who).lower()) if cfg.format == "sharegpt" else who
        if role not in ROLES:
            allowed = sorted(SHAREGPT_ROLES) if cfg.format == "sharegpt" else list(ROLES)
            raise DataError(f"{path} line {row.line}: turn {i} has {role_key}={who!r}; allowed: {allowed}")
        out.append({"role": role, "content": turn[text_key]})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{path} line {row.line}: the conversation in {column!r} has no assistant turn to learn")
    return out


def encode(messages: list[Message], tokenizer, templated: bool) -> tuple[list[list[int]], list[bool]]:
    """The conversation as token pieces and, per piece, whether the loss covers it."""
    if not templated:
        if len(messages) != 2 or [m["role"] for m in messages] != ["user", "assistant"]:
            raise DataError("a multi-turn conversation needs the tokenizer's chat template")
        prompt = tokenizer(messages[0]["content"], add_special_tokens=True)["input_ids"]
        response = tokenizer(messages[1]["content"], add_special_tokens=False)["input_ids"]
        return [prompt, response + [tokenizer.eos_token_id]], [False, True]
    pieces: list[list[int]] = []
    learn: list[bool] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt = _append(pieces, learn, tokenizer, done, _render(tokenizer, messages[:i], True), False)
            done = _append(pieces, learn, tokenizer, prompt, _render(tokenizer, messages[:i + 1], False), True)
    return pieces, learn


def _render(tokenizer, messages: list[Message], generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _append(pieces: list[list[int]], learn: list[bool], tokenizer, before: str, after: str, loss: bool) -> str:
    if not after.startswith(before):
        raise DataError("the tokenizer's chat template does not render a conversation as the rendering of its "
                        "earlier turns plus the new one, so assistant turns cannot be told apart; use "
                        "data.chat_template=false with data.format=prompt_response or alpaca")
    text = after[len(before):]
    if text:
        # the template spells out its special tokens (BOS included): adding them again would double them
        pieces.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        learn.append(loss)
    return after


def example(messages: list[Message], tokenizer, templated: bool, max_length: int) -> dict[str, Any] | None:
    """Token ids, loss labels and the generation prompt of one conversation, cut to ``max_length``:
    ``input_ids``, ``labels`` (-100 outside the assistant turns), ``prompt_ids`` (everything before
    the last assistant turn: its generation prompt) and ``response`` (the last assistant turn's
    text: the reference of exact match).

    A single exchange keeps its response whole when it fits and cuts the prompt from the left;
    a longer conversation is cut at the end. None when no assistant token is left to learn.
    """
    pieces, learn = encode(messages, tokenizer, templated)
    last = max(i for i, flag in enumerate(learn) if flag)
    prompt_ids = [t for p in pieces[:last] for t in p]
    response = next(m["content"] for m in reversed(messages) if m["role"] == "assistant")
    if sum(learn) == 1 and len(pieces) == last + 1:
        r_ids = pieces[last][:max(1, max_length - min(len(prompt_ids), max_length // 2))]
        prompt_ids = prompt_ids[-(max_length - len(r_ids)):]
        ids, labels = prompt_ids + r_ids, [-100] * len(prompt_ids) + r_ids
    else:
        ids = [t for p in pieces for t in p][:max_length]
        labels = [t if flag else -100 for p, flag in zip(pieces, learn) for t in p][:max_length]
        if all(t == -100 for t in labels):
            return None
        prompt_ids = prompt_ids[-max_length:]
    return {"input_ids": ids, "labels": labels, "prompt_ids": prompt_ids, "response": response}


def row_examples(cfg: DataConfig, tokenizer, path: Path, rows: list[Row]) -> list[dict[str, Any]]:
    """Each row as a causal-LM example; conversations whose assistant turns fall past max_length are dropped."""
    templated = uses_template(cfg, tokenizer)
    encoded = [example(messages_of(cfg, path, row, templated), tokenizer, templated, cfg.max_length) for row in rows]
    out = [enc for enc in encoded if enc is not None]
    if not out:
        raise DataError(f"{path}: no example has an assistant token within data.max_length={cfg.max_length}")
    return out
