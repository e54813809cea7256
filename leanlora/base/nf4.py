"""NF4 frozen base (QLoRA / QDyLoRA): the weight held as torchao's 4-bit NormalFloat tensor.

Storage per weight (QLoRA's double quantization, as torchao lays it out):
    codes      4 bit               index into the 16-value NF4 codebook, two per byte
    absmax     int8 per block      block = ``block_size`` weights (64), stored as
                                   round((s_k - mean(s)) · f_j), f_j = 128 / max_k |s_k - mean(s)|
    f_j        1 float per group   group = ``scaler_block_size`` blocks (256)
    mean(s)    1 float per tensor
which is 4 + 8/64 + 32/(64·256) ≈ 4.13 bits ≈ 0.516 bytes per weight for large layers.

Decisions:
  * ``in_features`` must be a multiple of ``block_size`` so that no block straddles two output
    rows (torchao only needs numel to divide; rows make merge errors attributable per row).
  * torchao needs the number of blocks to be a multiple of ``scaler_block_size``; many real
    layers are not (SmolLM2's 576x576 has 5184 blocks). Such a layer uses the largest common
    divisor of the two as its scaler group, i.e. a few more float constants, never padding.
  * The NF4 tensor is kept in the weight's own dtype (torchtune does the same) and is not a
    parameter or buffer: ``model.to(torch.bfloat16)`` must not silently dequantize it, so
    :meth:`NF4Base._apply` moves it between devices only.
"""

from __future__ import annotations

import copy
import functools
import math

import torch
from torch import nn

from leanlora.base.dense import QuantizedBase
from leanlora.base.fp8 import check_fp8_shape
from leanlora.base.fp8_linear import fp8_gemm_available
from leanlora.base.nf4_linear import NF4Parts, fp8_rebuild_state, linear_nf4_fp8, linear_nf4_parts
from leanlora.config import ConfigError, NF4Config

__all__ = ["NF4Base", "check_nf4_shape", "nf4_codebook", "quantize_bases"]


@functools.cache  # imported once, on first use
def _torchao_nf4():
    """(to_nf4, linear_nf4) from torchao, wherever this torchao version keeps them."""
    try:
        from torchao.quantization import to_nf4
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4
    except ImportError:
        try:  # older torchao kept NF4 under dtypes
            from torchao.dtypes.nf4tensor import linear_nf4, to_nf4
        except ImportError:
            raise ImportError("the NF4 base needs torchao "
                              "(pip install 'leanlora[nf4]' or pip install torchao)") from None
    return to_nf4, linear_nf4


def nf4_codebook(weight: torch.Tensor) -> torch.Tensor:
    """The 16 NF4 code values (ascending, in [-1, 1]) that ``weight`` (an NF4 tensor) uses."""
    return weight.nf4.detach().float().cpu()


def check_nf4_shape(name: str, in_features: int, out_features: int, config: NF4Config) -> None:
    """Raise ConfigError naming the module when its weight cannot be split into NF4 blocks."""
    if in_features % config.block_size:
        ok = [b for b in (16, 32, 64, 128, 256) if in_features % b == 0]
        raise ConfigError(
            f"nf4.block_size={config.block_size} does not divide in_features={in_features} of module {name!r}; "
            f"an NF4 base needs whole blocks per row (block sizes that divide it: {ok or 'none of 16..256'}); "
            "exclude this module or use base='dense'")
    if (in_features * out_features // config.block_size) % 2:
        raise ConfigError(f"module {name!r} ({in_features}->{out_features}) has an odd number of NF4 blocks; "
                          "torchao packs two codes per byte and needs an even count")
    if config.gemm == "fp8":
        check_fp8_shape(name, in_features, out_features)


class NF4Base(QuantizedBase):
    """Frozen base ``x W0^T + bias`` with W0 stored as a torchao ``NF4Tensor``."""

    KIND = "NF4"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, block_size: int = 64,
                 scaler_block_size: int = 256, transposed: bool = False, name: str = "",
                 gemm: str = "dequant") -> None:
        """``weight`` is the dense (out, in) W0; it is quantized here and not kept. ``gemm``: see
        :attr:`leanlora.config.NF4Config.gemm`."""
        super().__init__(weight, bias, transposed, name)
        self.block_size = block_size
        self.scaler_block_size = scaler_block_size  # configured; the group used is in .weight
        self.gemm = gemm
        check_nf4_shape(name, self.in_features, self.out_features, NF4Config(block_size, scaler_block_size, gemm))
        self._set_weight(self._quantize(weight.detach()))

    # --- quantization --------------------------------------------------------------------------

    def _quantize(self, w: torch.Tensor) -> torch.Tensor:
        to_nf4, _ = _torchao_nf4()
        n_blocks = w.numel() // self.block_size
        # blocks per scaler group: the configured size, or the largest size that divides the block count
        return to_nf4(w.contiguous(), self.block_size, math.gcd(n_blocks, self.scaler_block_size))

    # --- BaseWeight protocol -------------------------------------------------------------------

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        # Neither path builds a weight gradient: the backward is grad_y @ W0 alone.
        parts = self.__dict__.get("_parts")
        if self.gemm == "fp8":  # under FSDP2 the parts (and rebuild state) of the gathered weight, each call
            if parts is None:
                return linear_nf4_fp8(x, NF4Parts.of(self.weight), self.fast)
            return linear_nf4_fp8(x, parts, self.fast, self.__dict__["_rebuild"])
        if parts is not None:  # the NF4 tensor's plain parts: no subclass at a compiled region's edge
            return linear_nf4_parts(x, parts)
        _, linear_nf4 = _torchao_nf4()  # registered as a parameter (FSDP2 shards it): torchao's own linear
        return linear_nf4(x, self.weight)

    def dense_weight(self) -> torch.Tensor:
        """Dequantized W0 (out, in) in the NF4 tensor's dtype."""
        return self.weight.get_original_weight()

    def _requantize(self, w: torch.Tensor) -> None:
        self._set_weight(self._quantize(w.to(self.weight.dtype)))

    def snapshot(self) -> torch.Tensor:
        # add_delta_ replaces the NF4 tensor instead of writing into it, so the old one is exact.
        return self.weight

    def restore_(self, snapshot: torch.Tensor) -> None:
        self._set_weight(snapshot)

    def nbytes(self) -> int:
        """Codes + int8 block scales + float group factors + mean + codebook, in bytes, and with float8
        GEMMs the rebuild state kept beside them (an fp32 factor a block, one scale a row)."""
        kept = self.__dict__.get("_rebuild")
        return sum(t.nbytes for t in NF4Parts.of(self.weight)[:5]) + sum(t.nbytes for t in kept or ())

    def __deepcopy__(self, memo: dict) -> "NF4Base":
        # torchao's NF4Tensor deep-copies by quantizing again with its default scaler block size,
        # which fails for layers whose block count it does not divide; copy its parts instead
        w = self.weight
        names, ctx = w.__tensor_flatten__()
        memo[id(w)] = type(w).__tensor_unflatten__({n: getattr(w, n).clone() for n in names}, ctx,
                                                   w.size(), w.stride())
        new = object.__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy({k: v for k, v in self.__dict__.items() if k not in ("_parts", "_rebuild")},
                                          memo))
        new._set_weight(new.weight)  # parts that are views of the copy's own tensors
        return new

    # --- device moves ----------------------------------------------------------------------------

    def _apply(self, fn, recurse: bool = True):
        # See where fn sends a float tensor: follow its device, ignore its dtype (NF4 stays NF4).
        probe = fn(torch.empty(0, device=self.weight.device))
        if probe.device != self.weight.device and "weight" not in self._parameters:
            self._set_weight(self.weight.to(probe.device))
        return super()._apply(fn, recurse)

    def _set_weight(self, w: torch.Tensor) -> None:
        self.fast = fp8_gemm_available(w.device)  # decided here, not per call: a constant to torch.compile
        # FSDP2 (leanlora.distributed) registers the NF4 tensor as a frozen parameter; keep it one.
        if "weight" in self._parameters:
            self._parameters["weight"] = nn.Parameter(w, requires_grad=False)
            self.__dict__["_parts"] = self.__dict__["_rebuild"] = None
        else:
            self.weight = w
            # views of w's inner tensors, held beside it so that the forward never reaches them
            # through the subclass (a plain attribute: not state_dict, not moved by nn.Module)
            parts = self.__dict__["_parts"] = NF4Parts.of(w)
            # the float8 rebuild's row scales, block factors and pair table (one fp32 a row, one a
            # block, 512): the weight is frozen, so made once, not in every step
            self.__dict__["_rebuild"] = (fp8_rebuild_state(*parts[1:5], parts.shape[0], parts.scaler_group)
                                         if self.gemm == "fp8" else None)

    def as_parameter(self) -> None:
        """Register the NF4 tensor as a frozen parameter (what FSDP2 shards); its parts are dropped."""
        w = self.__dict__.pop("weight")
        self.__dict__["_parts"] = self.__dict__["_rebuild"] = None
        self.register_parameter("weight", nn.Parameter(w, requires_grad=False))

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, nf4 block={self.block_size}, "
                f"scaler group={self.weight.scaler_block_size}, dtype={self.weight.dtype}"
                + (f", gemm=fp8 ({'_scaled_mm' if self.fast else 'fp32 fallback'})" if self.gemm == "fp8" else ""))


def quantize_bases(model: nn.Module, nf4_config: NF4Config | None = None) -> dict[str, int]:
    """Replace the dense base of every adapted layer of ``model`` by an :class:`NF4Base`.

    All shapes are checked before any layer changes. Bases that are already 4-bit (NF4, or a
    bitsandbytes ``Linear4bit`` the user loaded) are left as they are. The dense weight is
    released, so memory drops once nothing else refers to it. Returns {module: base bytes}.
    """
    config = nf4_config or NF4Config()
    return NF4Base.replace_dense_bases(model, functools.partial(check_nf4_shape, config=config),
                                       block_size=config.block_size, scaler_block_size=config.scaler_block_size,
                                       gemm=config.gemm)
