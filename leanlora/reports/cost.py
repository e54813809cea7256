"""Cost accounting of an adapter: effective ranks, bits, MACs, BOPs, stored bytes, parameters.

Per adapted layer, for the adapter path only (the frozen base is the same for every method):

* ``rank``: components in use in eval (open gates, the chosen nested rank, or r);
  ``stored_rank``: components the finalized artifact keeps (= rank, except non-nested gates over
  bank factors, which keep a prefix with closed components masked).
* ``bits_a``, ``bits_b``, ``bits_e``: eval bit-width of A, B and E (32 = float; E only with diag).
* ``macs``: multiply-adds per token, ``in·k + k (E) + k·out`` at k = stored_rank.
* ``bops``: Σ MACs × weight bits × activation bits, activations at ``ACT_BITS`` = 16 (nothing in
  leanlora quantizes activations): ``16·(in·k·b_A + k·b_E + k·out·b_B)`` (Bayesian-LoRA, arXiv:2406.13046).
* ``stored_bytes``: the tensor payload of the finalized artifact. Dense factors: packed codes,
  ceil(n·b/8) bytes + a 4-byte fp32 scale per quantized tensor, or n · element size for float
  ones (:func:`leanlora.artifact.packing.stored_nbytes`); E likewise; a mask of 4-byte floats if any. Bank
  factors: their top-k form (k-1 weights and k indices per sub-vector, what
  ``save(..., topk_only=True)`` writes) plus a 4-byte scale per quantized factor; the bank itself
  is counted once in ``shared_bytes``. ``modules_to_save`` tensors count in ``head_bytes``.
  For a finalized model this equals the bytes of ``leanlora_adapter.safetensors`` minus its header
  (bank factors: saved with ``topk_only=True``; tested); before finalize it is the prediction.
* ``params``: parameters the adapter trains now (0 once finalized: it holds buffers).

Beside them, the same layer as a plain LoRA of the same r: ``lora_*`` with 16-bit weights and
activations (the usual bf16 deployment), and ``fp32_*`` at 32-bit weights and activations (Bayesian
Bits' baseline, Σ MACs × 32 × 32).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from leanlora.build import adapter_dtype
from leanlora.inject import adapted_layers, shared_state
from leanlora.layer import AdaptedLinear
from leanlora.artifact.finalize import stored_components
from leanlora.artifact.packing import SCALE_BYTES, stored_nbytes

ACT_BITS = 16


@dataclass
class LayerCost:
    name: str
    module: str
    in_features: int
    out_features: int
    r: int
    rank: int
    stored_rank: int
    bits_a: int
    bits_b: int
    bits_e: int | None
    expected_rank: float
    expected_bits_a: float
    expected_bits_b: float
    macs: int
    bops: int
    stored_bytes: int
    params: int
    lora_macs: int
    lora_bops: int
    lora_bytes: int
    lora_params: int
    fp32_bops: int
    fp32_bytes: int


@dataclass
class CostReport:
    layers: list[LayerCost]
    shared_bytes: int = 0
    head_bytes: int = 0
    shared_params: int = 0
    total: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: {"layers": [...], "total": {...}, "act_bits": 16}."""
        return {"layers": [asdict(r) for r in self.layers], "total": dict(self.total),
                "shared_bytes": self.shared_bytes, "head_bytes": self.head_bytes, "act_bits": ACT_BITS}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def format_table(self) -> str:
        head = (f"{'module':<40} {'rank':>7} {'bits A/B/E':>11} {'MACs/tok':>9} {'BOPs':>12} "
                f"{'bytes':>10} {'params':>8} | {'LoRA16 BOPs':>12} {'LoRA16 B':>10}")
        lines = [head, "-" * len(head)]
        for r in self.layers:
            bits = f"{r.bits_a}/{r.bits_b}/{'-' if r.bits_e is None else r.bits_e}"
            lines.append(f"{_fit(r.name, 40):<40} {f'{r.rank}/{r.r}':>7} {bits:>11} {r.macs:>9,} {r.bops:>12,} "
                         f"{r.stored_bytes:>10,} {r.params:>8,} | {r.lora_bops:>12,} {r.lora_bytes:>10,}")
        t = self.total
        lines.append("-" * len(head))
        if self.shared_bytes or self.head_bytes:
            lines.append(f"{'shared (bank) / modules_to_save bytes':<40} {self.shared_bytes:,} / {self.head_bytes:,}")
        ranks = f"{t['rank']}/{t['r']}"
        lines.append(f"{'total':<40} {ranks:>7} {'':>11} {t['macs']:>9,} {t['bops']:>12,} "
                     f"{t['stored_bytes']:>10,} {t['params']:>8,} | {t['lora_bops']:>12,} {t['lora_bytes']:>10,}")
        lines.append(f"BOPs: {t['bops_vs_lora']:.1%} of LoRA-16 (r={t['r_max']}), {t['bops_vs_fp32']:.1%} of "
                     f"LoRA-fp32 ({t['fp32_bops']:,}); bytes: {t['bytes_vs_lora']:.1%} of LoRA-16, "
                     f"{t['bytes_vs_fp32']:.1%} of LoRA-fp32 ({t['fp32_bytes']:,}); "
                     f"mean rank {t['mean_rank']:.2f}, mean bits A/B {t['mean_bits_a']:.1f}/{t['mean_bits_b']:.1f}")
        return "\n".join(lines)

    __str__ = format_table


def _fit(name: str, width: int) -> str:
    """``name`` in ``width`` characters: a long module name keeps its distinctive end, and says it was cut."""
    return name if len(name) <= width else "…" + name[-(width - 1):]


def _stored_components(layer: AdaptedLinear) -> tuple[int, int, bool]:
    """(effective rank, stored rank, masked) as finalize keeps them."""
    ranks = layer.ranks
    if ranks.finalized:
        return ranks.active_rank(), ranks.rank, ranks.keep_mask is not None
    keep, stored, mask = stored_components(layer)
    return int(keep.numel()), int(stored.numel()), mask is not None


def layer_cost(name: str, layer: AdaptedLinear, r: int, elem: int) -> LayerCost:
    ranks = layer.ranks
    rank, k, masked = _stored_components(layer)
    in_f, out_f = layer.in_features, layer.out_features
    qa, qb, qe = layer.quant_a, layer.quant_b, ranks.diag_quantizer()
    bits_a, bits_b = qa.bits(), qb.bits()
    bits_e = qe.bits() if qe is not None else None
    macs = in_f * k + k * out_f + (k if qe is not None else 0)
    bops = ACT_BITS * (in_f * k * bits_a + k * out_f * bits_b + (k * bits_e if qe is not None else 0))
    stored = layer.factors.compact_nbytes(k, elem)  # None: the factors are stored as tensors of their own
    if stored is None:
        stored = (stored_nbytes(k * in_f, bits_a, qa.quantized(), elem)
                  + stored_nbytes(out_f * k, bits_b, qb.quantized(), elem))
    else:
        stored += SCALE_BYTES * (int(qa.quantized()) + int(qb.quantized()))
    if qe is not None:
        stored += stored_nbytes(k, bits_e, qe.quantized(), elem)
    if masked:
        stored += 4 * k
    lora_macs = (in_f + out_f) * r
    return LayerCost(
        name=name, module=name.rsplit(".", 1)[-1], in_features=in_f, out_features=out_f, r=r,
        rank=rank, stored_rank=k, bits_a=bits_a, bits_b=bits_b, bits_e=bits_e,
        expected_rank=float(ranks.expected_rank()), expected_bits_a=float(qa.expected_bits()),
        expected_bits_b=float(qb.expected_bits()), macs=macs, bops=bops, stored_bytes=stored,
        params=sum(p.numel() for _, p in layer.adapter_parameters()),
        lora_macs=lora_macs, lora_bops=lora_macs * 16 * 16, lora_bytes=lora_macs * 2,
        lora_params=lora_macs, fp32_bops=lora_macs * 32 * 32, fp32_bytes=lora_macs * 4)


def cost_report(model: nn.Module) -> CostReport:
    """Per-layer and total cost of ``model``'s adapter; see the module docstring for what is counted."""
    shared = shared_state(model)
    config = shared.config
    elem = adapter_dtype(config).itemsize
    rows = [layer_cost(name, layer, config.r, elem) for name, layer in adapted_layers(model)]
    head = [t for n in shared.modules_to_save_names for t in model.get_submodule(n).state_dict().values()]
    # the groups' stacks are the layers' rows, counted per layer
    shared_params = sum(p.numel() for n, p in shared.named_parameters() if not n.startswith("groups."))
    report = CostReport(rows, shared_bytes=sum(t.nbytes for t in shared.state_dict().values()),
                        head_bytes=sum(t.nbytes for t in head), shared_params=shared_params)
    report.total = _totals(report, config.r)
    return report


def _totals(report: CostReport, r: int) -> dict[str, Any]:
    rows = report.layers

    def s(key: str) -> int:
        return sum(getattr(row, key) for row in rows)

    n = max(len(rows), 1)
    t: dict[str, Any] = {k: s(k) for k in ("rank", "stored_rank", "macs", "bops", "params", "lora_macs",
                                            "lora_bops", "lora_bytes", "lora_params", "fp32_bops", "fp32_bytes")}
    t.update(r=r * len(rows), r_max=r, layers=len(rows),
             stored_bytes=s("stored_bytes") + report.shared_bytes + report.head_bytes,
             adapter_bytes=s("stored_bytes") + report.shared_bytes)
    t["params"] += report.shared_params
    for key in ("rank", "expected_rank", "bits_a", "bits_b"):
        t[f"mean_{key}"] = s(key) / n
    for key, amount in (("bops", "bops"), ("bytes", "adapter_bytes")):  # e.g. bops_vs_lora = bops / lora_bops
        for base in ("lora", "fp32"):
            t[f"{key}_vs_{base}"] = t[amount] / max(t[f"{base}_{key}"], 1)
    return t
