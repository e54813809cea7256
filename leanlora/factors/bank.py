"""VB-LoRA factors: A and B composed from one vector bank shared by the whole model.

VB-LoRA (arXiv:2405.15179). Each rank-one term of ΔW = Σ_k b_k ⊗ a_k is cut into length-b sub-vectors
(a_k into in/b of them, b_k into out/b); each sub-vector u has its own logits σ_u ∈ R^h and is a
top-k admixture of the h bank vectors α_1..α_h:

    u = Σ_{s ∈ TopK(σ_u)} w_s α_s,    w = softmax(σ_u restricted to its top k)      (no noise, no temperature)

The bank (:class:`VectorBank`, h × b) lives once in ``model.leanlora_shared.bank``; every
:class:`BankFactors` reads it through a plain tuple, so it is not a submodule of any layer: the
optimizer and the state dict see it exactly once.

Layout. One logits tensor per layer, ``logits (r, (in + out)/b, h)``: row k holds the sub-vectors
of a_k followed by those of b_k. One composition gives ``M (r, in + out)``; A = M[:, :in] and
B = M[:, in:]^T are strided views (F.linear reads them without a copy: no aten::copy_ in a CPU
profile). PEFT keeps ``logits_A (r, in/b, h)`` and ``logits_B (out/b, r, h)``;
:meth:`BankFactors.peft_logits` gives those views. Component-major rows make ``prune_(keep)`` a slice of the first ``keep`` rows.

Cost of one composition (once per layer call, never per token): a top-k over r·(in+out)/b·h
logits and r·(in+out)·k multiply-adds; :func:`composition_cost` counts both. For a Llama-7B
q_proj at r=4, b=256, h=2048, k=2 that is 262,144 logits scanned and 65,536 MACs, against the
16.8M MACs the frozen 4096×4096 base costs for every single token.

Scale. VB-LoRA has no alpha/r: the update is plain B·A (BankConfig.scaled=False). build.py then
hands the rank strategy alpha = r and rslora = False, so alpha/r = 1 at the full rank r. Fixed and
gated ranks (scale alpha/r, fixed r) therefore give B·diag(m)·A exactly; nested ranks keep their
own relative rule alpha/b (``nested.scale="sampled"``), i.e. r/b at a sampled rank b, which is 1 at
the full rank (DyLoRA's rescaling of a truncated update, anchored on VB-LoRA's plain full-rank
update), or 1 at every b with ``nested.scale="max"``. With ``scaled=True`` the config's alpha and
rslora go through untouched, as for dense factors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from leanlora.config import ConfigError
from leanlora.groups.rows import StackedRows


def compose(logits: torch.Tensor, bank: torch.Tensor, topk: int) -> torch.Tensor:
    """Top-k admixture of bank vectors for every sub-vector at once (VB-LoRA, arXiv:2405.15179).

    logits (..., h), bank (h, b) -> (..., b): u = Σ_{s in TopK(σ)} softmax(σ_TopK)_s · bank[s].
    Entries outside the top k get neither weight nor gradient (as if set to -inf).
    """
    values, index = logits.topk(topk, dim=-1)          # (..., k), (..., k)
    weights = values.softmax(dim=-1)                    # (..., k)
    vectors = F.embedding(index, bank)                  # (..., k, b)
    return (weights.unsqueeze(-1) * vectors).sum(-2)    # (..., b)


def composition_cost(rank: int, in_features: int, out_features: int, vector_length: int,
                     num_vectors: int, topk: int) -> dict[str, int]:
    """Work of one :func:`compose` call for one layer: logits scanned by top-k and multiply-adds."""
    subvectors = rank * (in_features + out_features) // vector_length
    return {"topk_logits": subvectors * num_vectors, "macs": subvectors * topk * vector_length}


def check_divides(vector_length: int, in_features: int, out_features: int, name: str = "") -> None:
    """Raise ConfigError naming the module, the dimension and the lengths that would divide it."""
    for dim_name, dim in (("in_features", in_features), ("out_features", out_features)):
        if dim % vector_length:
            divisors = [d for d in range(1, 1025) if in_features % d == 0 and out_features % d == 0][-6:]
            raise ConfigError(
                f"bank.vector_length={vector_length} does not divide {dim_name}={dim} of module {name or '?'!r}; "
                f"vector lengths that divide every dimension of this module include {divisors}")


def index_dtype(num_vectors: int) -> torch.dtype:
    """Smallest integer dtype that holds indices 0..h-1 (PEFT's thresholds)."""
    for limit, dtype in ((2**8, torch.uint8), (2**15, torch.int16), (2**31, torch.int32)):
        if num_vectors < limit:
            return dtype
    raise ValueError(f"num_vectors={num_vectors} needs 64-bit indices; top-k-only storage supports h < 2^31")


class VectorBank(StackedRows, nn.Module):
    """The one bank of h vectors of length b shared by every adapted module, A and B alike."""

    PARAM_ROLES = {"vectors": "bank"}

    def __init__(self, num_vectors: int, vector_length: int, init_range: float = 0.02,
                 dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> None:
        super().__init__()
        self.num_vectors, self.vector_length = num_vectors, vector_length
        self.vectors = nn.Parameter(torch.empty(num_vectors, vector_length, dtype=dtype, device=device))
        nn.init.uniform_(self.vectors, -init_range, init_range)   # VB-LoRA (arXiv:2405.15179): U(-0.02, 0.02)

    def extra_repr(self) -> str:
        return f"h={self.num_vectors}, b={self.vector_length}"


class BankFactors(StackedRows, nn.Module):
    """A (r, in) and B (out, r) composed from the shared bank by per-sub-vector top-k logits."""

    PARAM_ROLES = {"logits": "logits"}
    stores_rows = False  # composed at run time: finalize keeps a prefix and masks closed components

    def __init__(self, bank: VectorBank, in_features: int, out_features: int, rank: int, topk: int,
                 logits_init_std: float = 0.01, name: str = "", dtype: torch.dtype = torch.float32,
                 device: torch.device | None = None) -> None:
        super().__init__()
        check_divides(bank.vector_length, in_features, out_features, name)
        self.in_features, self.out_features, self.rank, self.topk = in_features, out_features, rank, topk
        self.name = name
        # A plain tuple, not a submodule: the bank is registered once, in model.leanlora_shared.
        self._bank = (bank,)
        subvectors = (in_features + out_features) // bank.vector_length  # per component
        self.logits = nn.Parameter(torch.empty(rank, subvectors, bank.num_vectors, dtype=dtype, device=device))
        nn.init.normal_(self.logits, 0.0, logits_init_std)
        # True after loading a top-k-only adapter frozen: logits are -inf outside the stored top k.
        self.topk_only = False

    @property
    def bank(self) -> VectorBank:
        return self._bank[0]

    @property
    def num_subvectors(self) -> int:
        """Sub-vectors of this layer: r · (in + out) / b."""
        return self.logits.shape[0] * self.logits.shape[1]

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.topk_only and self.training and self.logits.requires_grad:
            raise RuntimeError(
                f"{self.name}: this VB-LoRA adapter was loaded from a top-k-only save, so its logits are -inf "
                "outside the stored top k and the selection can never change; load it with "
                "leanlora.load(..., trainable=True) to train it further (finite logits, same outputs)")
        m = compose(self.logits, self.bank.vectors, self.topk)    # (..., r, (in+out)/b, b)
        m = m.flatten(-2)                                          # (..., r, in + out)
        # (..., r, in), (..., out, r)
        return m[..., :self.in_features], m[..., self.in_features:].transpose(-1, -2)

    def peft_logits(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views in PEFT's layout: logits_A (r, in/b, h) and logits_B (out/b, r, h)."""
        s_in = self.in_features // self.bank.vector_length
        return self.logits[:, :s_in], self.logits[:, s_in:].transpose(0, 1)

    def compact_nbytes(self, rank: int, elem: int) -> int:
        """Bytes of the top-k-only form at ``rank`` components: per sub-vector, k - 1 weights of
        ``elem`` bytes and k indices (:mod:`leanlora.factors.bank_storage`)."""
        n_sub = rank * (self.in_features + self.out_features) // self.bank.vector_length
        return n_sub * (self.topk - 1) * elem + n_sub * self.topk * index_dtype(self.bank.num_vectors).itemsize

    @torch.no_grad()
    def prune_(self, keep: int) -> None:
        """Keep components 0..keep-1: row k of the logits holds every sub-vector of a_k and b_k."""
        self.logits = nn.Parameter(self.logits[:keep].clone(), requires_grad=self.logits.requires_grad)
        self.rank = keep

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.rank}, k={self.topk}, "
                f"subvectors={self.num_subvectors}{', topk-only' if self.topk_only else ''}")
