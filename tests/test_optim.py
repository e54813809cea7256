"""The optimizer the training loop and the HF Trainer integration build."""

from __future__ import annotations

import torch

import leanlora
from leanlora.optim import adamw
from conftest import tiny_llama


def test_adamw_keeps_the_role_groups_and_is_fused_only_for_plain_cuda_parameters():
    model = leanlora.inject(tiny_llama(), leanlora.AdapterConfig(target_modules=("q_proj",), ranks="gated",
                                                                precision="learned"))
    groups = leanlora.param_groups(model, lr=1e-3)
    opt = adamw(groups, lr=1e-3)
    # CPU parameters: torch's own default (fused needs every parameter on the GPU here)
    assert not opt.defaults.get("fused")
    assert [g["role"] for g in opt.param_groups] == [g["role"] for g in groups]
    assert {g["role"]: g["lr"] for g in opt.param_groups}["gates"] == model.leanlora_shared.config.gated.gate_lr
    if torch.cuda.is_available():
        assert adamw(leanlora.param_groups(model.cuda(), lr=1e-3), lr=1e-3).defaults["fused"]
