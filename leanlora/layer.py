"""The adapted linear layer: one class, four composed strategies.

    y = base(x) + scale · B~ · diag(d) · A~ · dropout(x)

The layer knows nothing about LoRA, VB-LoRA, DyLoRA or B-LoRA by name; the strategies it holds
decide where A and B come from, which components are on and at what precision they live.
Each axis package declares the contract its strategies keep (:class:`leanlora.factors.Factors`,
:class:`leanlora.ranks.RankSelector`, :class:`leanlora.precision.Quantizer`,
:class:`leanlora.base.BaseWeight`); the layer, finalize and the cost report use nothing else.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn


class MergeError(RuntimeError):
    """A merge would write NaN/inf into the base weight, or the layer state forbids it."""


class AdaptedLinear(nn.Module):
    def __init__(self, base: nn.Module, factors: nn.Module, ranks: nn.Module, quant_a: nn.Module, quant_b: nn.Module,
                 dropout: float = 0.0, name: str = "") -> None:
        super().__init__()
        self.base = base
        self.factors = factors
        self.ranks = ranks
        self.quant_a = quant_a
        self.quant_b = quant_b
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.name = name  # fully qualified name in the model, for messages
        self.in_features, self.out_features = base.in_features, base.out_features
        self.enabled = True
        self.merged = False
        self._unmerge_copy: object | None = None
        # the group whose stacked parameters this layer's strategies read, and its row there
        # (leanlora.groups.stacking); None once it holds parameters of its own
        self.group: nn.Module | None = None
        self.group_index = 0
        # (A~, B~, d, scale) of this forward when computed with the layer's group; None: the
        # layer computes its own
        self.pieces: tuple | None = None
        # the siblings that read this layer's input, sharing its first GEMM (leanlora.groups.siblings)
        self.siblings = None

    def __getstate__(self) -> dict:
        # the pieces of the last forward hang on its autograd graph, which deepcopy and pickle
        # refuse; they are recomputed at the next forward anyway
        state = self.__dict__.copy()
        state["pieces"] = None
        return state

    # --- forward -------------------------------------------------------------------------------

    def lowrank(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float | torch.Tensor]:
        """The update's pieces in their current mode: A~ (b, in), B~ (out, b), d (b,) or None, scale."""
        a, b = self.factors()                       # (r, in), (out, r)
        a, b = self.quant_a(a), self.quant_b(b)     # fake-quantized, straight-through grads
        return self.ranks.select(a, b)              # (b, in), (out, b), (b,) | None, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)                                      # (..., out)
        if self.merged or not self.enabled:
            return y
        a, b, d, scale = self.pieces if self.pieces is not None else self.lowrank()
        # Run the adapter path in the activations' dtype when they are low precision: casting
        # the small factors costs r·(in+out) values, casting x would cost tokens·in.
        dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else a.dtype
        h = None if self.siblings is None or self.pieces is None else self.siblings.narrow(self, x, dtype)
        if h is None:
            h = F.linear(self.dropout(x.to(dtype)), a.to(dtype))  # (..., b)
        h = h * (scale if d is None else d.to(dtype) * scale)  # scale the narrow tensor, not the wide one
        # Compiled, a plain add fuses into the next pointwise kernel; addmm would first copy y into
        # its output and run a GEMM that reads it back. Eager, addmm saves the separate add.
        if y.dtype != dtype or torch.compiler.is_compiling():  # dtype: never round an fp32 base output
            return y + F.linear(h, b.to(dtype)).to(y.dtype)
        out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), b.to(dtype).T)
        return out.view(y.shape)                              # (..., out), add fused into the GEMM

    # --- the update as a matrix ----------------------------------------------------------------

    def delta_weight(self) -> torch.Tensor:
        """scale · B~ diag(d) A~ as an (out, in) fp32 matrix, with eval-mode (deterministic) strategies."""
        with _eval_mode(self):
            a, b, d, scale = self.lowrank()
            b = b.float() if d is None else b.float() * d.float()
            return (b @ a.float()) * scale

    def export_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A (b, in), B (out, b), scale) with diag and quantization folded in, eval semantics.

        B·A·scale equals :meth:`delta_weight`; these are what a plain LoRA runtime needs.
        """
        with torch.no_grad(), _eval_mode(self):
            a, b, d, scale = self.lowrank()
            b = b.float() if d is None else b.float() * d.float()
            return a.float().clone(), b.clone(), float(scale)

    @torch.no_grad()
    def merge(self, keep_unmerge_copy: bool = True) -> dict[str, float]:
        """W0 += ΔW. Idempotent. Refuses NaN/inf. Returns the storage error the base added (NF4).

        ``keep_unmerge_copy`` keeps W0 aside so that :meth:`unmerge` restores it bit-exactly;
        ``merge_and_unload`` passes False because nothing will be unmerged.
        """
        if self.merged:
            return {}
        from leanlora.artifact.identity import record_layer_digest

        refuse_nonfinite((f"{self.name}.{k}", v) for k, v in self.state_dict().items() if not k.startswith("base."))
        delta = checked_delta(self, self.name)
        if keep_unmerge_copy:
            self._unmerge_copy = self.base.snapshot()
        else:
            record_layer_digest(self)  # of W0 before it changes (else from the copy): what a save records
        report = self.base.add_delta_(delta)
        self.merged = True
        return report

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`; exact when the copy was kept, else W0 -= ΔW (dtype rounding)."""
        if not self.merged:
            return
        if self._unmerge_copy is not None:
            self.base.restore_(self._unmerge_copy)
            self._unmerge_copy = None
        else:
            self.base.add_delta_(-self.delta_weight())
        self.merged = False

    @torch.no_grad()
    def prune_(self, keep: int) -> None:
        """Drop components keep..r-1 for good; the update of the kept ones is unchanged."""
        if not 1 <= keep <= self.factors.rank:
            raise ValueError(f"{self.name}: cannot prune to rank {keep}; allowed 1..{self.factors.rank}")
        from leanlora.groups.stacking import ungroup

        ungroup(self)  # its rank now differs from the group's
        self.factors.prune_(keep)
        self.ranks.prune_(keep)

    # --- bookkeeping ---------------------------------------------------------------------------

    def adapter_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Trainable tensors of the adapter path (the frozen base excluded): the layer's own
        parameters, or its rows of its group's stacks."""
        from leanlora.groups.rows import row_parameters

        for part in ("factors", "ranks", "quant_a", "quant_b"):
            yield from row_parameters(getattr(self, part), prefix=part)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.ranks.active_rank()}/"
                f"{self.factors.rank}, bits(A,B)=({self.quant_a.bits()},{self.quant_b.bits()})"
                f"{', merged' if self.merged else ''}{'' if self.enabled else ', disabled'}")


def refuse_nonfinite(tensors) -> None:
    """Raise MergeError naming the first of the (name, adapter tensor) pairs that holds NaN/inf."""
    from leanlora.artifact.finite import first_nonfinite

    bad = first_nonfinite(tensors)
    if bad is not None:
        raise MergeError(f"adapter tensor {bad[0]!r} holds {bad[1]}; refusing to merge it into the base")


def checked_delta(layer: AdaptedLinear, name: str) -> torch.Tensor:
    """``layer.delta_weight()``; MergeError naming the module (``name``) when it holds NaN/inf."""
    delta = layer.delta_weight()
    if not torch.isfinite(delta).all():
        raise MergeError(f"{name}: the adapter update holds NaN/inf; refusing to merge it into the base")
    return delta


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    """Run with every submodule in eval mode, then restore each one's own flag."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag
