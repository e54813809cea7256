"""Top-k-only storage of a VB-LoRA adapter (arXiv:2405.15179).

The logits are training state; the adapter itself is the bank plus, per sub-vector, which k bank
vectors it mixes and with what weights. ``leanlora.save(model, dir, topk_only=True)`` replaces each
layer's ``factors.logits`` (r, S, h) by

    factors.topk_indices  (r, S, k)    uint8 if h < 2^8, int16 if h < 2^15, else int32
    factors.topk_weights  (r, S, k-1)  the softmax weights in the adapter dtype; the k-th is 1 - Σ

and writes ``"bank_storage": "topk"`` in leanlora_config.json so that the loader knows the layout.

Reload. Inference (``load(..., trainable=False)``, the default) rebuilds the logits as PEFT does:
log-weights at the stored indices and -inf elsewhere, so the top k and their softmax come back
(outputs equal up to the float rounding of log/exp); merging and exporting work, and a training
forward raises a clear error, because a -inf logit can never re-enter the top k. With
``load(..., trainable=True)`` the entries outside the top k are set to a finite floor
``REOPEN_GAP`` nats below the smallest kept log-weight instead: outputs are the same (the top k
are unchanged) and training goes on with every logit able to compete again. It is not the same
as resuming from the full logits: the discarded values (which never had a gradient, only acted as
thresholds) are gone.
"""

from __future__ import annotations

import torch
from torch import nn

from leanlora.factors.bank import BankFactors, index_dtype
from leanlora.groups.rows import stack_holders

INDICES, WEIGHTS, LOGITS = "topk_indices", "topk_weights", "logits"
REOPEN_GAP = 1.0  # nats between the smallest kept log-weight and the floor given to the discarded logits


def pack_topk(logits: torch.Tensor, topk: int, num_vectors: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (..., h) -> indices (..., k) in :func:`index_dtype`, first k-1 softmax weights (..., k-1)."""
    values, index = logits.detach().topk(topk, dim=-1)
    weights = values.softmax(dim=-1)[..., :-1]
    return index.to(index_dtype(num_vectors)).contiguous(), weights.contiguous()


def unpack_topk(index: torch.Tensor, weights: torch.Tensor, num_vectors: int,
                floor_gap: float | None = None) -> torch.Tensor:
    """Logits (..., h) whose top-k softmax gives back the stored weights.

    Log-weights at ``index``; elsewhere -inf, or, with ``floor_gap``, the smallest log-weight of
    the sub-vector minus ``floor_gap`` (finite, strictly below the kept ones).
    """
    # the k-th weight is the smallest; rounding can leave 1 - Σ a hair below 0, which means 0
    last = (1 - weights.sum(-1, keepdim=True)).clamp_min(0)
    weights = torch.cat([weights, last], dim=-1)                                    # (..., k)
    log_w = weights.log()
    fill = (torch.full((*log_w.shape[:-1], 1), float("-inf"), dtype=log_w.dtype) if floor_gap is None
            else log_w.min(dim=-1, keepdim=True).values - floor_gap)
    logits = fill.expand(*log_w.shape[:-1], num_vectors).clone()                  # (..., h)
    return logits.scatter(-1, index.long(), log_w)


def topk_bytes(num_vectors: int, vector_length: int, num_subvectors: int, topk: int,
               float_bytes: int = 4) -> int:
    """Exact bytes of a top-k-only VB-LoRA payload: bank h·b and n·(k-1) weights in floats of
    ``float_bytes``, n·k indices of :func:`index_dtype` (tensor data only, no file header)."""
    floats = num_vectors * vector_length + num_subvectors * (topk - 1)
    return floats * float_bytes + num_subvectors * topk * index_dtype(num_vectors).itemsize


def float32_equivalents(num_vectors: int, vector_length: int, num_subvectors: int, topk: int) -> float:
    """VB-LoRA and PEFT count: h·b + n·(k-1) + n·k·f, f = 0.25 / 0.5 / 1 for uint8 / int16 / int32."""
    f = {torch.uint8: 0.25, torch.int16: 0.5, torch.int32: 1.0}[index_dtype(num_vectors)]
    return num_vectors * vector_length + num_subvectors * (topk - 1) + num_subvectors * topk * f


def bank_layers(model: nn.Module) -> dict[str, BankFactors]:
    """Adapted-module name -> its BankFactors, in model order."""
    from leanlora.layer import AdaptedLinear

    return {name: m.factors for name, m in model.named_modules()
            if isinstance(m, AdaptedLinear) and isinstance(m.factors, BankFactors)}


def topk_stored_bytes(model: nn.Module) -> int:
    """Exact bytes that ``save(model, dir, topk_only=True)`` writes for the bank, indices and weights."""
    layers = bank_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} holds no VB-LoRA (factors='bank') layer")
    first = next(iter(layers.values()))
    bank = first.bank
    n_sub = sum(f.num_subvectors for f in layers.values())
    return topk_bytes(bank.num_vectors, bank.vector_length, n_sub, first.topk, first.logits.element_size())


def pack_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter state dict with every ``<layer>.factors.logits`` replaced by its top-k form."""
    layers = bank_layers(model)
    if not layers:
        raise ValueError("save(..., topk_only=True) needs a VB-LoRA adapter (factors='bank'); "
                         f"{type(model).__name__} has none")
    out = dict(state)
    for name, factors in layers.items():
        logits = out.pop(f"{name}.factors.{LOGITS}")
        index, weights = pack_topk(logits, factors.topk, factors.bank.num_vectors)
        out[f"{name}.factors.{INDICES}"] = index
        out[f"{name}.factors.{WEIGHTS}"] = weights
    return out


def unpack_state(model: nn.Module, tensors: dict[str, torch.Tensor], *, trainable: bool) -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack_state` on loaded tensors; marks the layers top-k-only unless ``trainable``.

    Raises ValueError naming the tensor when a pair is missing, has the wrong dtype, rank or
    k, or holds an index outside the bank; the caller checks the rebuilt logits' shapes.
    """
    out = dict(tensors)
    for name, factors in bank_layers(model).items():
        h, k = factors.bank.num_vectors, factors.topk
        key_i, key_w = f"{name}.factors.{INDICES}", f"{name}.factors.{WEIGHTS}"
        missing = [key for key in (key_i, key_w) if key not in out]
        if missing:
            raise ValueError(f"missing tensor(s) {missing} of the top-k-only layout")
        index, weights = out.pop(key_i), out.pop(key_w)
        if index.dtype != index_dtype(h):
            raise ValueError(f"tensor {key_i!r} is {index.dtype}, expected {index_dtype(h)} for h={h}")
        if not weights.is_floating_point():
            raise ValueError(f"tensor {key_w!r} is {weights.dtype}, expected a float dtype")
        if index.dim() != 3 or index.shape[-1] != k or tuple(weights.shape) != (*index.shape[:-1], k - 1):
            raise ValueError(f"tensors {key_i!r} {tuple(index.shape)} and {key_w!r} {tuple(weights.shape)} "
                             f"do not form a top-{k} layout (r, S, {k}) and (r, S, {k - 1})")
        if index.numel() and int(index.long().max()) >= h:
            raise ValueError(f"tensor {key_i!r} holds index {int(index.long().max())}, outside the bank of h={h}")
        out[f"{name}.factors.{LOGITS}"] = unpack_topk(index, weights.float(), h,
                                                      REOPEN_GAP if trainable else None)
        factors.topk_only = not trainable
        for template in stack_holders(factors):  # its group's template composes the training forward
            template.topk_only = not trainable
    return out
