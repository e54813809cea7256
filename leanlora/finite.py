"""Find the first NaN/inf tensor, so that no non-finite adapter is written, exported or merged."""

from __future__ import annotations

from typing import Iterable

import torch


def first_nonfinite(tensors: Iterable[tuple[str, torch.Tensor]]) -> tuple[str, str] | None:
    """(name, "NaN" or "inf") of the first floating-point tensor holding a non-finite value, or None.

    One fused check over all tensors first (a single host sync), the per-tensor scan only when
    it fails.
    """
    floats = [(n, t.detach()) for n, t in tensors if t.is_floating_point() and t.numel() and not t.is_meta]
    if not floats:
        return None
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for _, t in floats:
        by_device.setdefault(t.device, []).append(t.reshape(-1).abs().amax().float())
    if all(bool(torch.isfinite(torch.stack(v)).all()) for v in by_device.values()):
        return None
    for name, t in floats:
        if not bool(torch.isfinite(t).all()):
            return name, "NaN" if bool(torch.isnan(t).any()) else "inf"
    return None
