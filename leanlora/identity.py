"""A cheap fingerprint of a frozen base weight, to refuse loading an adapter onto another model.

A cryptographic hash of the weight bytes would call an fp32 model and its bf16 copy (or an NF4
copy) different models. Instead we keep a probe: a few values sampled at fixed positions, compared
with a relative tolerance far looser than any dtype rounding and far tighter than the distance
between two different checkpoints.
"""

from __future__ import annotations

import torch

PROBE_SIZE = 16
# NF4 keeps ~2 significant bits per value, bf16 ~3 digits; unrelated weights differ by ~100%.
PROBE_RTOL = 0.2


def weight_probe(weight: torch.Tensor) -> list[float]:
    """PROBE_SIZE values of the (out, in) weight at evenly spaced flat positions, as Python floats."""
    if weight.is_meta:  # deferred init (weights materialised later): nothing to probe yet
        return []
    flat = weight.detach().reshape(-1)
    n = flat.numel()
    idx = torch.linspace(0, n - 1, steps=min(PROBE_SIZE, n)).round().long().to(flat.device)
    return [float(v) for v in flat[idx].float().cpu()]


def probes_match(a: list[float], b: list[float]) -> bool:
    if len(a) != len(b):
        return False
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    scale = max(float(ta.norm()), float(tb.norm()), 1e-12)
    return float((ta - tb).norm()) <= PROBE_RTOL * scale
