"""Dense trainable factors (LoRA): A Kaiming-uniform, B zero, so the update starts at zero."""

from __future__ import annotations

import math

import torch
from torch import nn

from leanlora.groups.rows import StackedRows


class DenseFactors(StackedRows, nn.Module):
    """A (r, in) and B (out, r) as plain parameters."""

    stores_rows = True  # finalize can keep any subset of rows: the factors are the matrices themselves

    def __init__(self, in_features: int, out_features: int, rank: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))
        # a=sqrt(5) is nn.Linear's own init and PEFT's, so our starting A matches theirs.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A, self.lora_B  # (..., r, in), (..., out, r)

    def compact_nbytes(self, rank: int, elem: int) -> None:
        return None  # the rows themselves: their bytes follow from the quantizers' bits

    @torch.no_grad()
    def prune_(self, keep: int) -> None:
        self.lora_A = nn.Parameter(self.lora_A[:keep].clone(), requires_grad=self.lora_A.requires_grad)
        self.lora_B = nn.Parameter(self.lora_B[:, :keep].clone(), requires_grad=self.lora_B.requires_grad)
        self.rank = keep

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.rank}"
