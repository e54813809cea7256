"""``nf4.gemm: fp8``: a 4-bit base whose GEMMs run in float8. The rebuilt W0's codes must be the NF4
values rounded once to e4m3 (a float64 reference) with the FP8 base's row scales, the result must
match a float64 reference of that quantization, and
every path a 4-bit base has (inject, train, save, load, merge, compile, deepcopy, the run config)
must carry the setting."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import leanlora
from leanlora.base.fp8_linear import fp8_gemm_available, linear_fp8, quantize_weight
from leanlora.base.nf4 import NF4Base
from leanlora.base.nf4_linear import _block_scales, dequantize_nf4, fp8_rebuild_state, nf4_to_fp8
from conftest import randomize_adapters, tiny_llama, token_batch
from test_fp8_base import (FP8_GPU, REL, SUB, check_fullgraph_equals_eager, check_inductor_layers_train_like_eager,
                           check_scaled_mm_against_fallback, e4m3_round, e4m3_step, reference_quant)

pytest.importorskip("torchao")

ALL_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _base(out_f=48, in_f=128, dtype=torch.float32, seed=0, gemm="fp8"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.02
    w[torch.rand(out_f, in_f, generator=g) < 0.02] *= 15  # outliers spread the block and row scales
    return NF4Base(w.to(dtype), None, block_size=64, scaler_block_size=8, gemm=gemm)


def _config(**kw):
    kw.setdefault("target_modules", ALL_PROJ)
    return leanlora.AdapterConfig(r=4, alpha=8, base="nf4", nf4=leanlora.NF4Config(block_size=32, gemm="fp8"), **kw)


def _float64_codes(parts):
    """(the NF4 values over the row scale, in float64; their e4m3 rounding): the reference of the rebuild."""
    cb = parts.codebook.double()
    codes = parts.codes.long()
    values = torch.stack([cb[codes >> 4], cb[codes & 0b1111]], -1).view(-1, parts.block_size)
    scales = _block_scales(*parts[1:4], parts.codebook.dtype, parts.scaler_group).double()  # s_j as torchao holds it
    row_scale = fp8_rebuild_state(*parts[1:5], parts.shape[0], parts.scaler_group).row_scale.double()
    exact = ((values * scales[:, None]).view(parts.shape) / row_scale[:, None]).clamp(-448, 448)
    return exact, e4m3_round(exact)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(48, 128), (256, 64), (16, 512)])
def test_the_float8_codes_are_the_nf4_values_rounded_once(dtype, shape):
    """Each e4m3 code is the NF4 value (codebook entry times block scale) over the row scale rounded
    to nearest-even, against a float64 reference; fp32's own rounding can move a value only across
    an exact tie. The row scales are the FP8 base's of the dequantized weight (its row maximum is
    always a block scale), and the codes stay within one e4m3 step of that base's codes, which round
    the weight to its dtype first."""
    for seed in range(3):
        parts = _base(*shape, dtype=dtype, seed=seed).__dict__["_parts"]
        codes, scale = nf4_to_fp8(*parts)
        exact, ref = _float64_codes(parts)
        got = codes.double()
        off = got != ref
        assert (exact[off] - (got[off] + ref[off]) / 2).abs().le(2.0 ** -20 * exact[off].abs()).all()
        base_codes, base_scale = quantize_weight(dequantize_nf4(*parts))
        assert codes.dtype == base_codes.dtype and torch.equal(scale, base_scale)
        assert ((base_codes.double() - got).abs() <= e4m3_step(got) + 1e-12).all()


def _same_state(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_the_backward_layout_and_the_kept_rebuild_state():
    """The transposed rebuild is the same codes laid out (in, out); the base keeps the row scales,
    block factors and pair table its rebuilds use, makes them anew whenever its weight changes and
    counts them in its bytes."""
    base = _base(out_f=96, in_f=192, dtype=torch.bfloat16, seed=3)
    parts = base.__dict__["_parts"]
    state = fp8_rebuild_state(*parts[1:5], 96, parts.scaler_group)
    codes, scale = nf4_to_fp8(*parts)
    codes_t, scale_t = nf4_to_fp8(*parts, state, transposed=True)
    assert codes_t.shape == (192, 96) and codes_t.is_contiguous() and scale_t is state.row_scale
    assert torch.equal(codes_t.view(torch.uint8), codes.t().contiguous().view(torch.uint8))
    assert _same_state(base.__dict__["_rebuild"], state) and torch.equal(state.row_scale, scale)
    assert state.block_factor.shape == (96 * 192 // 64,) and state.pairs.shape == (256, 2)
    assert base.nbytes() == _base(out_f=96, in_f=192, dtype=torch.bfloat16, seed=3, gemm="dequant").nbytes() \
        + sum(t.nbytes for t in state)
    base.add_delta_(torch.full((96, 192), 0.01))
    parts = base.__dict__["_parts"]
    assert _same_state(base.__dict__["_rebuild"], fp8_rebuild_state(*parts[1:5], 96, parts.scaler_group))
    assert _same_state(copy.deepcopy(base).__dict__["_rebuild"], base.__dict__["_rebuild"])
    base.as_parameter()                              # FSDP2: each call uses the gathered weight's own
    assert base.__dict__["_rebuild"] is None
    assert _base(gemm="dequant").__dict__["_rebuild"] is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_values_and_input_gradient_are_the_fp8_gemms_of_the_rebuilt_codes(dtype):
    """Bit for bit: the FP8 GEMMs of the codes and scales the rebuild makes."""
    base = _base(dtype=dtype)
    parts = base.__dict__["_parts"]
    codes, scale = nf4_to_fp8(*parts)
    x = (torch.randn(3, 5, 128) * torch.logspace(-2, 1, 5)[:, None]).to(dtype).requires_grad_()
    grad_y = torch.randn(3, 5, 48).to(dtype)
    y = base(x)
    (got,) = torch.autograd.grad(y, x, grad_y)
    ref = linear_fp8(x, codes, scale, fast=False)
    (ref_grad,) = torch.autograd.grad(ref, x, grad_y)
    assert y.dtype == dtype and torch.equal(y, ref)
    assert torch.equal(got, ref_grad)


def test_forward_matches_a_float64_reference_of_the_same_quantization():
    base = _base(seed=3)
    w = dequantize_nf4(*base.__dict__["_parts"])                     # the 4-bit weight, as rebuilt
    x = torch.randn(24, 128) * torch.logspace(-2, 1, 24)[:, None]
    xq, wq, _, _ = reference_quant(x, w)
    exact = xq @ wq.t()
    bound = 1e-5 * (xq.abs() @ wq.abs().t())                          # fp32 accumulation of 128 terms
    assert ((base(x).double() - exact).abs() <= bound + 1e-12).all()
    # and the float8 rounding on top of the 4-bit weight stays within e4m3's bound of x W0^T
    direct = x.double() @ w.double().t()
    spread = x.double().abs() @ w.double().abs().t()
    assert ((base(x).double() - direct).abs() <= (2 * REL + REL ** 2) * spread + 2 * SUB * spread.amax()).all()


def test_only_the_four_bit_parts_are_saved_for_backward():
    base = _base(out_f=256, in_f=256)
    x = torch.randn(2, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        base(x)
    assert saved and all(t.numel() <= 256 * 256 // 2 for t in saved)  # never a float8 or dense copy of W0


def test_compiles_whole_and_gives_the_eager_values():
    check_fullgraph_equals_eager(_base(seed=5))


def test_deepcopy_moves_and_a_new_weight_keep_the_setting():
    base = _base(seed=6)
    x = torch.randn(2, 128)
    twin = copy.deepcopy(base)
    assert twin.gemm == "fp8" and torch.equal(twin(x), base(x))
    base.add_delta_(torch.full((48, 128), 0.01))                      # merge's path: requantized to 4 bits
    codes, scale = nf4_to_fp8(*base.__dict__["_parts"])
    assert torch.equal(base(x), linear_fp8(x, codes, scale, fast=False))
    base.to("meta")
    assert base.gemm == "fp8" and not base.fast
    assert "gemm=fp8 (fp32 fallback)" in repr(twin)


def test_a_model_trains_saves_loads_and_merges_with_fp8_gemms(tmp_path):
    model = tiny_llama()
    leanlora.inject(model, _config())
    layers = dict(leanlora.adapted_layers(model))
    assert all(isinstance(layer.base, NF4Base) and layer.base.gemm == "fp8" for layer in layers.values())
    randomize_adapters(model)
    model.train()
    x = token_batch()
    loss = model(x, labels=x).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in leanlora.trainable_parameters(model))
    model.eval()
    with torch.no_grad():
        out = model(x).logits
        dequant = copy.deepcopy(model)
        for layer in dict(leanlora.adapted_layers(dequant)).values():
            layer.base.gemm = "dequant"
        # the float8 GEMMs differ from the dequantized ones by e4m3's roundings, not more
        fp8_error = float((dequant(x).logits - out).norm() / out.norm())
        assert 0 < fp8_error < 0.1
    leanlora.save(model, tmp_path / "ad")
    reloaded = leanlora.load(tiny_llama(), tmp_path / "ad")
    assert all(layer.base.gemm == "fp8" for _, layer in leanlora.adapted_layers(reloaded))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, out, rtol=1e-4, atol=1e-4)
    report = leanlora.merge(model)          # requantized to 4 bits (reported), still multiplied in float8
    assert report == leanlora.merge(dequant)
    assert all(r["max_abs"] >= r["mean_abs"] > 0 for r in report.values())
    assert all(layer.base.gemm == "fp8" for _, layer in leanlora.adapted_layers(model))
    with torch.no_grad():
        merged, merged_dequant = model(x).logits, dequant(x).logits
        assert 0 < float((merged - merged_dequant).norm() / merged_dequant.norm()) < 2 * fp8_error


def test_shapes_and_values_it_cannot_take_are_refused_by_name():
    odd = tiny_llama(hidden_size=40, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
    config = leanlora.AdapterConfig(target_modules=("q_proj",), base="nf4",
                                    nf4=leanlora.NF4Config(block_size=8, scaler_block_size=5, gemm="fp8"))
    with pytest.raises(leanlora.ConfigError, match=r"'model\.layers\.0\.self_attn\.q_proj' has in_features=40.*"
                                                   r"multiples of 16"):
        leanlora.inject(odd, config)
    assert not any(True for _ in leanlora.adapted_layers(odd))
    leanlora.inject(odd, dataclasses.replace(config, nf4=leanlora.NF4Config(block_size=8, scaler_block_size=5)))  # dequant: fine
    with pytest.raises(leanlora.ConfigError, match=r"nf4\.gemm.*allowed: 'auto', 'dequant', 'fp8'"):
        leanlora.NF4Config(gemm="bf16")


def test_run_config_reads_the_setting():
    from leanlora.train.runconfig import load_run_config

    run = load_run_config(None, ["data.task=causal_lm", "adapter.base=nf4", "adapter.nf4.gemm=fp8",
                                 "adapter.target_modules=[q_proj]"])
    assert run.adapter.nf4.gemm == "fp8"


@pytest.mark.skipif(not FP8_GPU, reason="needs a CUDA GPU of compute capability 8.9+ (float8 GEMMs)")
def test_cuda_scaled_mm_path_and_inductor_compiled_layers():
    """On the GPU the layer takes torch._scaled_mm and matches the fp32 fallback to bf16 rounding;
    under inductor (the rebuild and the cast fused) a model gives the eager model's loss."""
    check_scaled_mm_against_fallback(_base(out_f=384, in_f=512).cuda(), torch.randn(256, 512))
    check_inductor_layers_train_like_eager(_config())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the Triton rebuild)")
@pytest.mark.parametrize("shape", [(48, 128), (130, 192), (512, 2048), (2048, 8192)])
def test_the_triton_rebuild_gives_the_compiled_operators_codes_in_both_layouts(shape, monkeypatch):
    """The Triton kernels are the torch path's arithmetic: equal codes bit for bit, forward and
    transposed, on shapes that fill no tile evenly and on the 1B preset's; compiled, they trace as
    custom ops and give the same codes again."""
    import leanlora.base.nf4_linear as nl
    from leanlora.base.nf4_triton import TRITON_REBUILD
    if not TRITON_REBUILD:
        pytest.skip("Triton without float8")
    parts = _base(*shape, dtype=torch.bfloat16).cuda().__dict__["_parts"]
    state = fp8_rebuild_state(*parts[1:5], parts.shape[0], parts.scaler_group)
    for transposed in (False, True):
        monkeypatch.setattr(nl, "REBUILD_KERNEL", "torch")
        ref, ref_scale = nf4_to_fp8(*parts, state, transposed=transposed)
        monkeypatch.setattr(nl, "REBUILD_KERNEL", "triton")
        got, scale = nf4_to_fp8(*parts, state, transposed=transposed)
        compiled, _ = torch.compile(nf4_to_fp8, fullgraph=True)(*parts, state, transposed=transposed)
        assert got.shape == ref.shape and got.is_contiguous() and torch.equal(scale, ref_scale)
        assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8))
        assert torch.equal(compiled.view(torch.uint8), ref.view(torch.uint8))
    x = torch.randn(64, shape[1], device="cuda", dtype=torch.bfloat16, requires_grad=True)
    outs = []
    for kernel in ("torch", "triton"):  # the layer's forward and input gradient, each way
        monkeypatch.setattr(nl, "REBUILD_KERNEL", kernel)
        y = nl.linear_nf4_fp8(x, parts, fp8_gemm_available(x.device), state)
        outs.append((y, torch.autograd.grad(y.float().square().sum(), x)[0]))
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_without_cuda_the_rebuild_runs_the_torch_operators(monkeypatch):
    """On the CPU the Triton kernels are never reached, whatever the setting."""
    import leanlora.base.nf4_linear as nl
    monkeypatch.setattr(nl, "nf4_fp8_codes", lambda *a, **k: pytest.fail("Triton rebuild on the CPU"))
    parts = _base().__dict__["_parts"]
    codes, _ = nf4_to_fp8(*parts)
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == parts.shape
