"""Dense frozen base: the original ``nn.Linear`` (or GPT-2's ``Conv1D``) kept as it was loaded."""

from __future__ import annotations

import torch
from torch import nn


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D`` is a linear layer whose weight is stored (in, out)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for plain torch models
        return False
    return isinstance(module, Conv1D)


def supported_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or Conv1D."""
    if is_conv1d(module):
        in_f, out_f = module.weight.shape
        return in_f, out_f
    return module.in_features, module.out_features


class DenseBase(nn.Module):
    """Holds the original layer as ``layer`` so that unload hands back the very same object."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        if not supported_linear(layer):
            raise TypeError(f"DenseBase wraps nn.Linear or transformers Conv1D, got {type(layer).__name__}")
        self.layer = layer
        self.transposed = is_conv1d(layer)  # Conv1D keeps W as (in, out)
        self.in_features, self.out_features = linear_shape(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    @property
    def weight(self) -> torch.Tensor:
        return self.layer.weight

    def dense_weight(self) -> torch.Tensor:
        w = self.layer.weight
        return w.T if self.transposed else w  # (out, in)

    @torch.no_grad()
    def add_delta_(self, delta: torch.Tensor) -> dict[str, float]:
        w = self.layer.weight
        w.add_((delta.T if self.transposed else delta).to(w.dtype))
        return {}

    def snapshot(self) -> torch.Tensor:
        return self.layer.weight.detach().clone()

    @torch.no_grad()
    def restore_(self, snapshot: torch.Tensor) -> None:
        self.layer.weight.copy_(snapshot)

    def nbytes(self) -> int:
        return self.layer.weight.numel() * self.layer.weight.element_size()

    def as_module(self) -> nn.Module:
        return self.layer

    def extra_repr(self) -> str:
        return f"{'Conv1D' if self.transposed else 'Linear'}, dtype={self.layer.weight.dtype}"


def as_linear(weight: torch.Tensor, bias: nn.Parameter | None, transposed: bool) -> nn.Module:
    """A frozen dense ``nn.Linear`` (``Conv1D`` when ``transposed``) over ``weight`` (out, in) and
    ``bias``: what a quantized base hands back when it is merged or unloaded."""
    out_features, in_features = weight.shape
    if transposed:
        from transformers.pytorch_utils import Conv1D

        module = Conv1D(out_features, in_features).to(device=weight.device, dtype=weight.dtype)
        module.weight = nn.Parameter(weight.T.contiguous(), requires_grad=False)
    else:
        module = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype)
        module.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        module.bias = bias
    return module
