"""Attention without a mask, for batches without padding: a forward that reads nothing back to the host.

Before its layers run, a transformers model builds an attention mask, and that reads tensors back
to the host: a causal LM called without an attention mask and without a cache checks its position
ids for packed sequences (``find_packed_sequence_indices``), a padding mask is checked for being
all ones. Each is a host synchronisation per step, and inside a CUDA-graph capture transformers
takes the other branch instead (a 4D mask), so a warmed-up compiled model would have to compile
again inside the capture (:mod:`leanlora.train.step_graph`).

For batches without padding or packing none of that is needed: transformers' SDPA attention with
no mask runs ``is_causal`` for a causal model and full attention for an encoder, the kernels the
checks pick anyway (bit-equal logits, tests/test_unpadded_attention.py). Registering that same
function under a name of its own, with no mask function, makes transformers skip mask creation.
The model then refuses an ``attention_mask`` argument rather than ignore it.
"""

from __future__ import annotations

from torch import nn

NAME = "sdpa_unpadded"


def use_unpadded_attention(model: nn.Module) -> nn.Module:
    """Switch a transformers model to mask-free SDPA attention (only for batches without padding)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not hasattr(getattr(model, "config", None), "_attn_implementation"):
        raise TypeError(f"use_unpadded_attention: {type(model).__name__} is not a transformers model "
                        "(it has no config._attn_implementation)")
    AttentionInterface.register(NAME, sdpa_attention_forward)
    model.set_attn_implementation(NAME)  # a PreTrainedModel method in every transformers leanlora supports
    if not getattr(model, "_leanlora_refuses_masks", False):
        model.register_forward_pre_hook(_refuse_mask, with_kwargs=True)
        model._leanlora_refuses_masks = True
    return model


def _refuse_mask(module: nn.Module, args: tuple, kwargs: dict):
    if kwargs.get("attention_mask") is not None:
        raise ValueError(f"{type(module).__name__} uses unpadded attention ({NAME}), which would ignore the "
                         "attention_mask passed; batches with padding need the model's own attention "
                         "implementation (do not call use_unpadded_attention for them)")
