"""Pack a micro-batch of causal-LM examples into one sequence without padding (``data.packing``).

The examples are laid end to end in one row. Each keeps its own positions (``position_ids``
restart at 0, so rotary embeddings see what they see unpacked) and attends only to itself: the
attention mask is block-diagonal and causal, a boolean ``(1, 1, L, L)`` tensor in SDPA's
convention (True: may attend), which transformers takes as it is. Each example's first token is
a prompt token (label -100), so no example learns to predict the next one's start: the loss of
a packed batch is the loss of the same examples padded, without the compute spent on padding.
"""

from __future__ import annotations

import torch


def pack(examples: list[dict]) -> dict[str, torch.Tensor]:
    """input_ids, labels, position_ids (1, L) and the block-diagonal causal mask (1, 1, L, L)."""
    lengths = [len(e["input_ids"]) for e in examples]
    ids = [t for e in examples for t in e["input_ids"]]
    labels = [t for e in examples for t in e["labels"]]
    positions = torch.cat([torch.arange(n) for n in lengths])
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    index = torch.arange(len(ids))
    mask = (segment[:, None] == segment[None, :]) & (index[None, :] <= index[:, None])
    return {"input_ids": torch.tensor([ids], dtype=torch.long), "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": positions[None], "attention_mask": mask[None, None]}
