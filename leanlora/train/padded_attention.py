"""A padding mask that a transformers model takes without reading anything back to the host.

Given a 2D padding mask, transformers builds the 4D attention mask itself and, on the way, asks
the device whether the mask is all ones (to call SDPA's causal kernel without a mask instead). That
read waits for the GPU, so a step that makes it cannot be captured as a CUDA graph
(:mod:`leanlora.train.step_graph`). A 4D mask is taken as it is, so building it here, from tensor
operations only, keeps the whole step on the device.

The mask is boolean (True: may attend), SDPA's convention; a model with another attention
implementation would read it differently, so :func:`require_sdpa` says so up front.
"""

from __future__ import annotations

import torch
from torch import nn

from leanlora.config import ConfigError  # a ValueError: a model this path cannot take is a setting to change


def attends_causally(model: nn.Module) -> bool:
    """Whether ``model``'s self-attention is causal (a decoder: Llama, GPT) or bidirectional (BERT)."""
    flags = {m.is_causal for m in model.modules() if isinstance(getattr(m, "is_causal", None), bool)}
    if len(flags) != 1:
        raise ConfigError(f"{type(model).__name__}: cannot tell whether its attention is causal (attention "
                         f"modules with is_causal={sorted(flags) or 'none found'}); a 4D padding mask needs to know")
    return flags.pop()


def require_sdpa(model: nn.Module, why: str) -> None:
    """Refuse a model whose attention is not transformers' SDPA (the 4D mask below is SDPA's kind)."""
    if (impl := getattr(getattr(model, "config", None), "_attn_implementation", None)) != "sdpa":
        raise ConfigError(f"{why} needs the model's attention implementation to be 'sdpa' (a boolean 4D mask "
                         f"built on the device); {type(model).__name__} uses {impl!r}. Load the model with "
                         "attn_implementation='sdpa'")


def attention_mask_4d(padding: torch.Tensor, causal: bool) -> torch.Tensor:
    """(batch, seq) 0/1 padding mask -> (batch, 1, seq, seq) boolean mask, True where a query may
    attend a key: every real key, and for a causal model only those at or before the query.

    Each position may also attend itself, padding included: a padded query would otherwise have
    no key at all, and SDPA gives NaN for such a row, which backward would spread. Real queries
    attend themselves anyway, so their outputs are those of transformers' own mask; padded
    positions are ignored by the loss.
    """
    if padding.dim() != 2:
        raise ValueError(f"attention_mask_4d: expected a (batch, seq) padding mask, got shape {tuple(padding.shape)}")
    seq = padding.shape[1]
    keys = padding.bool()[:, None, None, :]
    position = torch.arange(seq, device=padding.device)
    itself = position[:, None] == position[None, :]
    if causal:
        return (keys & (position[None, :] <= position[:, None])) | itself
    return keys.expand(-1, -1, seq, -1) | itself
