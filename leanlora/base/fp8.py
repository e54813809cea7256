"""FP8 frozen base: W0 stored as float8 e4m3 codes with one fp32 scale per output channel.

Storage is 1 byte a weight plus 4 bytes a row, half of bf16; the forward and input-gradient
GEMMs run in float8 on GPUs that have it (:mod:`leanlora.base.fp8_linear` states the formats,
the recipe and the error bound). Like :class:`~leanlora.base.nf4.NF4Base`, the codes and scales
are plain attributes, not parameters or buffers: ``model.to(torch.bfloat16)`` must not turn the
codes into bf16 (float8 counts as floating point to ``nn.Module``), so :meth:`FP8Base._apply`
moves them between devices only, and they stay out of ``state_dict`` (an adapter never stores
its base).
"""

from __future__ import annotations

import torch
from torch import nn

from leanlora.base.dense import DenseBase, as_linear, is_conv1d
from leanlora.base.fp8_linear import dequantize_weight, fp8_gemm_available, linear_fp8, quantize_weight
from leanlora.config import ConfigError

__all__ = ["FP8Base", "check_fp8_shape", "quantize_bases_fp8"]

FP8_MULTIPLE = 16  # torch._scaled_mm needs both weight dimensions to be multiples of 16


def check_fp8_shape(name: str, in_features: int, out_features: int) -> None:
    """Raise ConfigError naming the module when its weight cannot go through ``torch._scaled_mm``."""
    bad = [f"{k}={v}" for k, v in (("in_features", in_features), ("out_features", out_features))
           if v % FP8_MULTIPLE]
    if bad:
        raise ConfigError(f"module {name!r} has {', '.join(bad)}; an fp8 base needs in_features and out_features "
                          f"that are multiples of {FP8_MULTIPLE} (torch._scaled_mm's limit); exclude this module "
                          "(adapter.exclude_modules) or use base='dense'")


class FP8Base(nn.Module):
    """Frozen base ``x W0^T + bias`` with W0 as e4m3 ``codes`` (out, in) and fp32 ``scales`` (out,)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool = False,
                 name: str = "") -> None:
        """``weight`` is the dense (out, in) W0; it is quantized here and not kept."""
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.name = name
        self.transposed = transposed  # the module came from a GPT-2 Conv1D (matters for unload only)
        self.dtype = weight.dtype     # the dtype W0 was given in: what dense_weight and unload hand back
        check_fp8_shape(name, self.in_features, self.out_features)
        self._set(*quantize_weight(weight))
        # The bias stays the original frozen parameter, so it follows model.to() like any other.
        self.bias = bias

    @classmethod
    def from_dense(cls, base: DenseBase, name: str = "") -> "FP8Base":
        layer = base.as_module()
        return cls(base.dense_weight().detach(), layer.bias, transposed=is_conv1d(layer), name=name)

    def _set(self, codes: torch.Tensor, scales: torch.Tensor) -> None:
        self.codes, self.scales = codes, scales
        self.fast = fp8_gemm_available(codes.device)  # decided here, not per call: a constant to torch.compile

    # --- BaseWeight protocol -------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear_fp8(x, self.codes, self.scales, self.fast)          # (..., out) in x.dtype
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def dense_weight(self) -> torch.Tensor:
        """Dequantized W0 (out, in) in the dtype it was given in."""
        return dequantize_weight(self.codes, self.scales).to(self.dtype)

    @torch.no_grad()
    def add_delta_(self, delta: torch.Tensor) -> dict[str, float]:
        """W0 <- FP8(deq(W0) + delta), scales recomputed; returns the error requantization added."""
        target = dequantize_weight(self.codes, self.scales) + delta.to(self.codes.device, torch.float32)
        if not torch.isfinite(target).all():
            raise ValueError(f"{self.name}: W0 + delta holds NaN/inf; the fp8 base was left unchanged")
        self._set(*quantize_weight(target))
        err = (dequantize_weight(self.codes, self.scales) - target).abs()
        return {"mean_abs": float(err.mean()), "max_abs": float(err.max())}

    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor]:
        # add_delta_ rebinds new tensors instead of writing into these, so the old pair is exact
        return self.codes, self.scales

    def restore_(self, snapshot: tuple[torch.Tensor, torch.Tensor]) -> None:
        self._set(*snapshot)

    def nbytes(self) -> int:
        """Codes (1 byte a weight) + fp32 scales (4 bytes a row)."""
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * self.scales.element_size()

    def as_module(self) -> nn.Module:
        """A dense ``nn.Linear`` (or ``Conv1D``) holding the dequantized weight and the same bias."""
        return as_linear(self.dense_weight().detach(), self.bias, self.transposed)

    def _apply(self, fn, recurse: bool = True):
        # See where fn sends a float tensor: follow its device; a dtype change moves the dtype
        # dense_weight returns, never the codes (fp8 stays fp8).
        probe = fn(torch.empty(0, device=self.codes.device, dtype=self.dtype))
        if probe.device != self.codes.device:
            self._set(self.codes.to(probe.device), self.scales.to(probe.device))
        if probe.dtype.is_floating_point:
            self.dtype = probe.dtype
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, float8_e4m3fn, per-channel fp32 scales, "
                f"dtype={self.dtype}, gemm={'_scaled_mm' if self.fast else 'fp32 fallback'}")


def quantize_bases_fp8(model: nn.Module) -> dict[str, int]:
    """Replace the dense base of every adapted layer of ``model`` by an :class:`FP8Base`.

    All shapes are checked before any layer changes; bases that are already quantized (NF4,
    FP8, a bitsandbytes ``Linear4bit``) are left as they are. Returns {module: base bytes}.
    """
    from leanlora.artifact.identity import record_layer_digest
    from leanlora.layer import AdaptedLinear

    layers = [(n, m) for n, m in model.named_modules()
              if isinstance(m, AdaptedLinear) and isinstance(m.base, DenseBase)]
    for name, layer in layers:
        if layer.merged:
            raise ValueError(f"{name}: unmerge the adapter before quantizing its base to fp8")
        check_fp8_shape(name, layer.in_features, layer.out_features)
    sizes = {}
    for name, layer in layers:
        record_layer_digest(layer)  # of the plain weight, before it is rounded to fp8 (what load compares)
        layer.base = FP8Base.from_dense(layer.base, name=name)
        layer.base.train(layer.training)
        sizes[name] = layer.base.nbytes()
    return sizes
