"""Find the first NaN/inf tensor, so that no non-finite adapter is written, exported or merged.

One exception: VB-LoRA logits frozen to their top k (:mod:`leanlora.factors.bank_storage`) are
-inf outside the top k on purpose; there -inf is a mask, and only NaN and +inf count.
"""

from __future__ import annotations

from typing import Iterable

import torch

MASK_LEAVES = ("logits",)


def _magnitude(name: str, t: torch.Tensor) -> torch.Tensor:
    if name.rsplit(".", 1)[-1] in MASK_LEAVES:
        t = t.masked_fill(t == float("-inf"), 0)
    return t.reshape(-1).abs().amax().float()


def first_nonfinite(tensors: Iterable[tuple[str, torch.Tensor]]) -> tuple[str, str] | None:
    """(name, "NaN" or "inf") of the first floating-point tensor holding a non-finite value, or None.

    One fused check over all tensors first (a single host sync per device), the per-tensor scan
    only when it fails.
    """
    floats = [(n, t.detach()) for n, t in tensors if t.is_floating_point() and t.numel() and not t.is_meta]
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for name, t in floats:
        by_device.setdefault(t.device, []).append(_magnitude(name, t))
    if all(bool(torch.isfinite(torch.stack(v)).all()) for v in by_device.values()):
        return None
    for name, t in floats:
        if not bool(torch.isfinite(_magnitude(name, t))):
            return name, "NaN" if bool(torch.isnan(t).any()) else "inf"
    return None
