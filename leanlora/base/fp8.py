"""FP8 frozen base: W0 stored as float8 e4m3 codes with one fp32 scale per output channel.

Storage is 1 byte a weight plus 4 bytes a row, half of bf16; where the GEMMs run in float8 the
base by default also holds the codes transposed for the backward (``fp8.transposed_copy``: 2 bytes
a weight in all, as bf16). The forward and input-gradient GEMMs run in float8 on GPUs that have it
(:mod:`leanlora.base.fp8_linear` states the formats, the recipe and the error bound). Like
:class:`~leanlora.base.nf4.NF4Base`, the codes and scales are plain attributes, not parameters or
buffers: ``model.to(torch.bfloat16)`` must not turn the codes into bf16 (float8 counts as floating
point to ``nn.Module``), so :meth:`FP8Base._apply` moves them between devices only, and they stay
out of ``state_dict`` (an adapter never stores its base).
"""

from __future__ import annotations

import torch
from torch import nn

from leanlora.base.dense import QuantizedBase
from leanlora.base.fp8_linear import dequantize_weight, fp8_gemm_available, linear_fp8, quantize_weight
from leanlora.config import ConfigError, FP8Config

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


class FP8Base(QuantizedBase):
    """Frozen base ``x W0^T + bias`` with W0 as e4m3 ``codes`` (out, in) and fp32 ``scales`` (out,)."""

    KIND = "fp8"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool = False,
                 name: str = "", transposed_copy: bool = True) -> None:
        """``weight`` is the dense (out, in) W0; it is quantized here and not kept. ``transposed_copy``:
        :attr:`leanlora.config.FP8Config.transposed_copy`."""
        super().__init__(weight, bias, transposed, name)
        self.dtype = weight.dtype     # the dtype W0 was given in: what dense_weight and unload hand back
        self.transposed_copy = transposed_copy
        check_fp8_shape(name, self.in_features, self.out_features)
        self._set(*quantize_weight(weight))

    def _set(self, codes: torch.Tensor, scales: torch.Tensor) -> None:
        if "codes" in self._parameters:  # registered for FSDP2 (as_parameter): they stay parameters
            self._parameters["codes"] = nn.Parameter(codes, requires_grad=False)
            self._parameters["scales"] = nn.Parameter(scales, requires_grad=False)
        else:
            self.codes, self.scales = codes, scales
        self.fast = fp8_gemm_available(codes.device)  # decided here, not per call: a constant to torch.compile
        # The backward's layout, made once: only where _scaled_mm runs (the fallback multiplies the
        # codes as they are), and not for FSDP2's shards, which are gathered anew for each backward.
        keep = self.transposed_copy and self.fast and "codes" not in self._parameters
        self.codes_t = codes.t().contiguous() if keep else None

    def as_parameter(self) -> None:
        """Register the codes and scales as frozen parameters, which FSDP2 shards by rows and gathers
        for each forward and backward as it does a dense weight (float8 included). Call it after any
        ``.to()``: a dtype cast would then reach the codes, and is refused."""
        codes, scales = self.__dict__.pop("codes"), self.__dict__.pop("scales")
        self.register_parameter("codes", nn.Parameter(codes, requires_grad=False))
        self.register_parameter("scales", nn.Parameter(scales, requires_grad=False))
        self.codes_t = None  # a whole-weight copy on every process would undo the sharding

    # --- BaseWeight protocol -------------------------------------------------------------------

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        return linear_fp8(x, self.codes, self.scales, self.fast, self.codes_t)

    def dense_weight(self) -> torch.Tensor:
        """Dequantized W0 (out, in) in the dtype it was given in."""
        return dequantize_weight(self.codes, self.scales).to(self.dtype)

    def _fp32_weight(self) -> torch.Tensor:
        return dequantize_weight(self.codes, self.scales)

    def _requantize(self, w: torch.Tensor) -> None:
        """New codes and scales (recomputed) for fp32 ``w``."""
        self._set(*quantize_weight(w))

    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor]:
        # add_delta_ rebinds new tensors instead of writing into these, so the old pair is exact
        return self.codes, self.scales

    def restore_(self, snapshot: tuple[torch.Tensor, torch.Tensor]) -> None:
        self._set(*snapshot)

    def nbytes(self) -> int:
        """Codes (1 byte a weight; twice with the transposed copy) + fp32 scales (4 bytes a row)."""
        copy = 0 if self.codes_t is None else self.codes_t.nbytes
        return self.codes.nbytes + self.scales.nbytes + copy

    def _apply(self, fn, recurse: bool = True):
        # See where fn sends a float tensor: follow its device; a dtype change moves the dtype
        # dense_weight returns, never the codes (fp8 stays fp8).
        probe = fn(torch.empty(0, device=self.codes.device, dtype=self.dtype))
        if "codes" in self._parameters:  # parameters now: torch moves them, and would cast them too
            if probe.dtype != self.dtype:
                raise RuntimeError(f"{self.name or 'an FP8 base'}: its codes are parameters for FSDP2 and a cast to "
                                   f"{probe.dtype} would turn them into {probe.dtype}; change the model's dtype "
                                   "before leanlora.distributed.wrap")
            return super()._apply(fn, recurse)
        if probe.device != self.codes.device:
            self._set(self.codes.to(probe.device), self.scales.to(probe.device))
        if probe.dtype.is_floating_point:
            self.dtype = probe.dtype
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, float8_e4m3fn, per-channel fp32 scales, "
                f"dtype={self.dtype}, gemm={'_scaled_mm' if self.fast else 'fp32 fallback'}"
                + (", transposed copy" if self.codes_t is not None else ""))


def quantize_bases_fp8(model: nn.Module, fp8_config: FP8Config | None = None) -> dict[str, int]:
    """Replace the dense base of every adapted layer of ``model`` by an :class:`FP8Base`.

    All shapes are checked before any layer changes; bases that are already quantized (NF4,
    FP8, a bitsandbytes ``Linear4bit``) are left as they are. Returns {module: base bytes}.
    """
    config = fp8_config or FP8Config()
    return FP8Base.replace_dense_bases(model, check_fp8_shape, transposed_copy=config.transposed_copy)
