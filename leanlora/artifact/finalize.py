"""Finalize: threshold the gates, prune closed rank components for real, pack the factors.

For every adapted layer, with all strategies in eval mode:

1. The kept components are the eval-open ones: the surviving gates of :class:`GatedRanks` (a
   prefix when nested), the chosen rank of nested ranks, all r of fixed ranks.
2. Each quantizer is frozen at its eval bit-width. The grid's scale is taken from the *full*
   r-row factor, exactly as the eval-mode model quantized it, so pruning rows moves nothing.
3. Dense factors are replaced by :class:`~leanlora.artifact.packing.PackedFactors`: the integer codes of
   the kept rows of A and columns of B, bit-packed, plus one fp32 scale each (float factors are
   kept as float). Factors composed at run time (the VB-LoRA bank) keep their own compact form;
   they are pruned to the kept prefix and their quantizers become fixed-scale fake-quantizers.
4. Gated ranks drop their gates; E keeps its kept entries, packed at its own bit-width.

The finalized model computes what the eval-mode model computed (up to float rounding of
``scale·code`` against the nested residual sum), and :func:`leanlora.save` writes the packed
tensors; :func:`layer_spec` is what ``leanlora_config.json`` records so that
:func:`rebuild_finalized_` can lay out the same empty structure before loading them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from leanlora.groups.stacking import ungroup, ungroup_all
from leanlora.inject import adapted_layers, shared_state
from leanlora.layer import AdaptedLinear, MergeError, _eval_mode
from leanlora.artifact.packing import PackedFactors, StoredTensor
from leanlora.precision.fixed import FrozenBits


def finalize(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Finalize every adapted layer of ``model`` in place; returns :func:`layer_spec` per module.

    Idempotent. Refuses a merged adapter (unmerge first). Training further is not possible
    afterwards: the gates are gone and the factors are buffers.
    """
    shared = shared_state(model)
    if not shared.finalized:
        if not any(layer.merged for _, layer in adapted_layers(model)):
            ungroup_all(shared)  # each layer keeps its own ranks and bits from here on
        for name, layer in adapted_layers(model):
            if layer.merged:
                raise MergeError(f"{name}: finalize needs the unmerged adapter; call leanlora.unmerge(model) first")
            finalize_layer_(layer)
    shared.finalized = True
    return {name: layer_spec(layer) for name, layer in adapted_layers(model)}


def _store(w: torch.Tensor, encoded, bits: int, index: torch.Tensor, dim: int) -> StoredTensor:
    index = index.to(w.device)
    if encoded is None:
        return StoredTensor.from_float(w.index_select(dim, index), bits)
    codes, scale = encoded
    return StoredTensor.from_codes(codes.index_select(dim, index), scale, bits, w.dtype)


def stored_components(layer: AdaptedLinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(kept, stored, mask): the components eval uses (ascending), those finalize stores, and a mask over
    the stored ones (None when they are the kept ones). Dense factors can keep any subset of rows;
    others only a prefix, with closed ones masked. Call it in the mode whose components count."""
    keep = layer.ranks.keep_indices()
    if layer.factors.stores_rows or bool(torch.equal(keep, torch.arange(int(keep.numel())))):
        return keep, keep, None
    stored = torch.arange(int(keep.max()) + 1)
    return keep, stored, torch.isin(stored, keep).float()


@torch.no_grad()
def finalize_layer_(layer: AdaptedLinear) -> None:
    with _eval_mode(layer):
        a, b = layer.factors()                               # (r, in), (out, r)
        _, stored, mask = stored_components(layer)
        enc_a, enc_b = layer.quant_a.encode(a), layer.quant_b.encode(b)
        bits_a, bits_b = layer.quant_a.bits(), layer.quant_b.bits()
        e_store, e_bits, e_quant = None, 32, False
        if (diagonal := layer.ranks.diagonal()) is not None:
            e, qe = diagonal
            enc_e, e_bits = qe.encode(e), qe.bits()
            e_store, e_quant = _store(e.detach(), enc_e, e_bits, stored, 0), enc_e is not None
    dense = layer.factors.stores_rows
    if dense:
        layer.factors = PackedFactors(_store(a, enc_a, bits_a, stored, 0), _store(b, enc_b, bits_b, stored, 1))
    elif int(stored.numel()) < layer.factors.rank:
        layer.factors.prune_(int(stored.numel()))
    # Packed factors dequantize themselves; factors composed at run time keep a fixed-scale fake-quantizer.
    layer.quant_a = FrozenBits(bits_a, None if dense or enc_a is None else enc_a[1], quantized=enc_a is not None)
    layer.quant_b = FrozenBits(bits_b, None if dense or enc_b is None else enc_b[1], quantized=enc_b is not None)
    layer.ranks.finalize_(int(stored.numel()), e_store, e_bits, e_quant, mask)


def _quant_spec(q: nn.Module) -> dict[str, Any]:
    return {"bits": q.bits(), "quantized": bool(q.quantized()), "scale": getattr(q, "scale", None) is not None}


def layer_spec(layer: AdaptedLinear) -> dict[str, Any]:
    """The finalized layout of one layer, as recorded in leanlora_config.json."""
    ranks = layer.ranks
    e = None if ranks.e_store is None else {"bits": ranks.e_store.bits, "quantized": ranks.e_store.quantized}
    return {"rank": int(layer.factors.rank), "effective_rank": int(ranks.active_rank()),
            "factors": "packed" if isinstance(layer.factors, PackedFactors) else "own",
            "a": _quant_spec(layer.quant_a), "b": _quant_spec(layer.quant_b), "e": e,
            "mask": ranks.keep_mask is not None}


@torch.no_grad()
def rebuild_finalized_(layer: AdaptedLinear, spec: dict[str, Any]) -> None:
    """Give a freshly injected layer the empty finalized structure of ``spec`` (for load)."""
    ungroup(layer)
    k = int(spec["rank"])
    ref = next(layer.factors.parameters(), None)
    dtype, device = (torch.float32, None) if ref is None else (ref.dtype, ref.device)

    def frozen(s):
        scale = torch.ones((), device=device) if s["scale"] else None
        return FrozenBits(int(s["bits"]), scale, quantized=bool(s["quantized"]))

    def stored(shape, s):
        return StoredTensor(shape, int(s["bits"]), bool(s["quantized"]), dtype, device)

    if spec["factors"] == "packed":
        layer.factors = PackedFactors(stored((k, layer.in_features), spec["a"]),
                                      stored((layer.out_features, k), spec["b"]))
    elif k < layer.factors.rank:
        layer.factors.prune_(k)
    layer.quant_a, layer.quant_b = frozen(spec["a"]), frozen(spec["b"])
    se = spec.get("e")
    e_store = None if se is None else stored((k,), se)
    mask = torch.ones(k, device=device) if spec.get("mask") else None
    layer.ranks.finalize_(k, e_store, 32 if se is None else int(se["bits"]), bool(se and se["quantized"]), mask)
