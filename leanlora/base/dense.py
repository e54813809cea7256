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
        return tuple(module.weight.shape)  # Conv1D keeps W as (in, out)
    return module.in_features, module.out_features


class HeldLayer(nn.Module):
    """A base that holds the original layer as ``layer``: the forward is the layer's own, and unload
    hands back the very same object."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.in_features, self.out_features = linear_shape(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    def as_module(self) -> nn.Module:
        return self.layer


class DenseBase(HeldLayer):
    """The original ``nn.Linear`` or ``Conv1D``, kept as it was loaded."""

    def __init__(self, layer: nn.Module) -> None:
        if not supported_linear(layer):
            raise TypeError(f"DenseBase wraps nn.Linear or transformers Conv1D, got {type(layer).__name__}")
        super().__init__(layer)
        self.transposed = is_conv1d(layer)  # Conv1D keeps W as (in, out)

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
        return self.layer.weight.nbytes

    def extra_repr(self) -> str:
        return f"{'Conv1D' if self.transposed else 'Linear'}, dtype={self.layer.weight.dtype}"


class Requantized(nn.Module):
    """A frozen base held in a quantized form (NF4, FP8, bitsandbytes 4-bit), merged into by requantizing.

    A subclass names its format in ``KIND`` (for messages) and provides ``dense_weight()`` and
    ``_requantize(w)`` (store fp32 ``w`` as the new W0); ``_fp32_weight()`` is W0 dequantized to fp32.
    """

    KIND = "quantized"

    def _fp32_weight(self) -> torch.Tensor:
        return self.dense_weight().float()

    @torch.no_grad()
    def add_delta_(self, delta: torch.Tensor) -> dict[str, float]:
        """W0 <- Q(deq(W0) + delta); returns the error requantization added: |Q(W) - W|."""
        w0 = self._fp32_weight()
        target = w0 + delta.to(w0.device, torch.float32)
        if not torch.isfinite(target).all():
            raise ValueError(f"{self.name}: W0 + delta holds NaN/inf; the {self.KIND} base was left unchanged")
        self._requantize(target)
        err = (self._fp32_weight() - target).abs()
        return {"mean_abs": float(err.mean()), "max_abs": float(err.max())}


class QuantizedBase(Requantized):
    """What the quantized bases (NF4, FP8) share: W0 (out, in) held in a quantized form beside the
    original frozen bias, merging by requantizing, unloading to a dense layer.

    A subclass provides ``_linear(x)`` (x W0^T, no bias, in x's dtype) and what :class:`Requantized` needs.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool, name: str) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.name = name
        self.transposed = transposed  # the module came from a GPT-2 Conv1D (matters for unload only)
        # The bias stays the original frozen parameter, so it follows model.to() like any other.
        self.bias = bias

    @classmethod
    def from_dense(cls, base: DenseBase, name: str = "", **settings) -> QuantizedBase:
        """The quantized copy of a dense base's W0 (out, in; a transposed view for Conv1D), same bias."""
        return cls(base.dense_weight().detach(), base.layer.bias, transposed=base.transposed, name=name, **settings)

    @classmethod
    def replace_dense_bases(cls, model: nn.Module, check, **settings) -> dict[str, int]:
        """Replace the dense base of every adapted layer of ``model`` by a ``cls``; returns {module: base bytes}.

        ``check(name, in_features, out_features)`` sees every layer before any changes; bases that
        are already quantized are left as they are.
        """
        from leanlora.artifact.identity import record_layer_digest
        from leanlora.layer import AdaptedLinear

        layers = [(n, m) for n, m in model.named_modules()
                  if isinstance(m, AdaptedLinear) and isinstance(m.base, DenseBase)]
        for name, layer in layers:
            if layer.merged:
                raise ValueError(f"{name}: unmerge the adapter before quantizing its base to {cls.KIND}")
            check(name, layer.in_features, layer.out_features)
        sizes = {}
        for name, layer in layers:
            record_layer_digest(layer)  # of the plain weight, before it is rounded (what load compares)
            layer.base = cls.from_dense(layer.base, name=name, **settings)
            layer.base.train(layer.training)
            sizes[name] = layer.base.nbytes()
        return sizes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._linear(x)                                   # (..., out) in x.dtype
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def as_module(self) -> nn.Module:
        """A frozen dense ``nn.Linear`` (``Conv1D`` when the module came from one) holding the dequantized
        weight and the same bias: what the base hands back when it is merged or unloaded."""
        weight = self.dense_weight().detach().clone()                          # (out, in)
        if self.transposed:
            from transformers.pytorch_utils import Conv1D

            module = Conv1D(self.out_features, self.in_features).to(device=weight.device, dtype=weight.dtype)
            module.weight = nn.Parameter(weight.T.contiguous(), requires_grad=False)
        else:
            module = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=weight.device,
                               dtype=weight.dtype)
            module.weight = nn.Parameter(weight, requires_grad=False)
        if self.bias is not None:
            module.bias = self.bias
        return module
