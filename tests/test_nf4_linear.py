"""The NF4 base's linear from plain parts equals torchao's NF4Tensor path, value for value."""

from __future__ import annotations

import copy

import pytest
import torch

from leanlora.base.nf4 import NF4Base
from leanlora.base.nf4_linear import NF4Parts, dequantize_nf4, linear_nf4_parts

pytest.importorskip("torchao")
from torchao.quantization import to_nf4  # noqa: E402
from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4  # noqa: E402


def _weight(out_f, in_f, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.02
    w[torch.rand(out_f, in_f, generator=g) < 0.02] *= 15  # outliers spread the block scales
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,block,group", [((64, 128), 64, 16), ((96, 256), 32, 24), ((48, 64), 64, 3)])
def test_dequantize_equals_torchao_bit_for_bit(dtype, shape, block, group):
    for seed in range(3):  # fresh weights each time
        nf4 = to_nf4(_weight(*shape, dtype, seed), block, group)
        ours = dequantize_nf4(*NF4Parts.of(nf4))
        ref = nf4.get_original_weight()
        assert ours.dtype == ref.dtype == dtype and ours.shape == ref.shape
        assert torch.equal(ours, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_and_input_gradient_equal_torchao_linear_nf4(dtype):
    nf4 = to_nf4(_weight(80, 128, dtype, 7), 64, 16)
    x = torch.randn(3, 5, 128, dtype=dtype, requires_grad=True)
    grad_y = torch.randn(3, 5, 80, dtype=dtype)
    (ref_x,) = torch.autograd.grad(linear_nf4(x, nf4), x, grad_y)
    y = linear_nf4_parts(x, NF4Parts.of(nf4))
    (got_x,) = torch.autograd.grad(y, x, grad_y)
    assert torch.equal(y, linear_nf4(x, nf4))
    assert torch.equal(got_x, ref_x)


def test_only_the_parts_are_saved_for_backward_never_the_dense_weight():
    nf4 = to_nf4(_weight(256, 256, torch.float32, 1), 64, 16)
    x = torch.randn(2, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        linear_nf4_parts(x, NF4Parts.of(nf4))
    assert saved, "nothing saved: the backward could not rebuild W0"
    assert all(t.numel() < 256 * 256 // 2 + 1 for t in saved)  # codes at most: half a byte a weight
    assert not any(t.shape == (256, 256) for t in saved)


def test_base_uses_its_parts_and_keeps_them_views_of_its_weight():
    base = NF4Base(_weight(64, 128, torch.float32, 2), None, block_size=64, scaler_block_size=16)
    parts = base.__dict__["_parts"]
    assert parts.codes.data_ptr() == base.weight.quantized_data.data_ptr()
    x = torch.randn(4, 128)
    assert torch.equal(base(x), linear_nf4(x, base.weight))


def test_parts_follow_a_new_weight_a_copy_and_a_move():
    base = NF4Base(_weight(64, 128, torch.float32, 3), None, block_size=64, scaler_block_size=16)
    before = base.__dict__["_parts"]
    base.add_delta_(torch.full((64, 128), 0.05))
    assert base.__dict__["_parts"].codes.data_ptr() == base.weight.quantized_data.data_ptr() != before.codes.data_ptr()
    x = torch.randn(2, 128)
    assert torch.equal(base(x), linear_nf4(x, base.weight))  # the new weight, not the old parts

    twin = copy.deepcopy(base)
    assert twin.__dict__["_parts"].codes.data_ptr() == twin.weight.quantized_data.data_ptr()
    assert twin.weight.quantized_data.data_ptr() != base.weight.quantized_data.data_ptr()
    assert torch.equal(twin(x), base(x))

    base.to("meta")
    assert base.__dict__["_parts"].codes.device.type == "meta"


def test_registered_as_a_parameter_it_uses_torchao_and_holds_no_parts():
    base = NF4Base(_weight(64, 128, torch.float32, 4), None, block_size=64, scaler_block_size=16)
    x = torch.randn(2, 128)
    y = base(x)
    base.as_parameter()
    assert "weight" in base._parameters and base.__dict__["_parts"] is None
    assert torch.equal(base(x), y)
    base._set_weight(base.weight.detach())  # stays a parameter (FSDP2 keeps its registration)
    assert "weight" in base._parameters and base.__dict__["_parts"] is None
