"""The optimizer the training loop and the HF Trainer integration build."""

from __future__ import annotations

import torch

import leanlora
from leanlora.optim import adamw
from conftest import tiny_llama


def test_adamw_keeps_the_role_groups_and_steps_one_stack_per_group_and_name():
    model = leanlora.inject(tiny_llama(), leanlora.AdapterConfig(target_modules=("q_proj",), ranks="gated",
                                                                precision="learned"))
    groups = leanlora.param_groups(model, lr=1e-3)
    opt = adamw(groups, lr=1e-3)
    assert type(opt) is torch.optim.AdamW
    assert [g["role"] for g in opt.param_groups] == [g["role"] for g in groups]
    assert {g["role"]: g["lr"] for g in opt.param_groups}["gates"] == model.leanlora_shared.config.gates.lr
    # q_proj of both layers is one group: A, B, rank gates, bit gates and ranges of A and B
    assert sum(len(g["params"]) for g in opt.param_groups) == 7
    assert all(p.shape[0] == 2 for g in opt.param_groups for p in g["params"])  # a row per layer


def test_adamw_training_steps_equal_torch_adamw_on_an_adapted_model():
    def trained(make_optimizer):
        torch.manual_seed(0)
        model = leanlora.inject(tiny_llama(), leanlora.AdapterConfig(target_modules=("q_proj", "v_proj"),
                                                                    ranks="gated", precision="learned"))
        model.train()  # sampled gates, grouped pieces: the training path
        opt = make_optimizer(leanlora.param_groups(model, lr=1e-2, weight_decay=0.01))
        ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
        for _ in range(3):
            torch.manual_seed(2)  # the same gate draws for both runs
            loss = model(input_ids=ids, labels=ids).loss + leanlora.regularizer(model)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return [p.detach() for p in model.parameters() if p.requires_grad]

    flat = trained(lambda groups: adamw(groups, lr=1e-2))
    ref = trained(lambda groups: torch.optim.AdamW(groups, lr=1e-2, foreach=False))
    for a, b in zip(ref, flat):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_adamw_leaves_tensor_subclasses_to_torch():
    class Tagged(torch.Tensor):
        pass

    param = torch.Tensor._make_subclass(Tagged, torch.randn(3), True)
    assert type(adamw([{"params": [param]}], lr=1e-3)) is torch.optim.AdamW
