"""FP8 base (float8 e4m3 codes, per-channel scales): numerics against float64 references, every
strategy on it, save/load/export/merge, and the errors of modules it cannot hold."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

import leanlora
from leanlora.base.fp8 import FP8Base
from leanlora.base.fp8_linear import E4M3, dequantize_weight, linear_fp8, quantize_weight
from conftest import randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama, token_batch

ALL_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# e4m3: 3 mantissa bits, so a normal value rounds to within 2^-4 of itself; subnormals (below
# 2^-6 of the scale) to within half their spacing, 2^-10 of the scale
REL, SUB = 2.0 ** -4, 2.0 ** -10


def e4m3_step(v: torch.Tensor) -> torch.Tensor:
    """The e4m3fn grid step at each value, in float64: 2^(e-3) for |v| in [2^e, 2^(e+1)), e >= -6."""
    return torch.exp2(torch.floor(torch.log2(v.double().abs().clamp(min=2.0 ** -6))) - 3)


def e4m3_round(v: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest-even onto the e4m3fn grid (saturating at ±448), in float64: an independent
    reference of the cast."""
    v = v.double().clamp(-448, 448)
    step = e4m3_step(v)
    return torch.round(v / step) * step


def reference_quant(x: torch.Tensor, w: torch.Tensor):
    """(x̂, ŵ) in float64: rows of x scaled by a power of two >= amax/448, rows of w by amax/448."""
    x, w = x.double(), w.double()
    t = torch.exp2(torch.ceil(torch.log2(x.abs().amax(1, keepdim=True) / 448)))
    s = w.abs().amax(1, keepdim=True).float().double() / 448  # the scale the base keeps is fp32
    s = s.float().double()
    return e4m3_round(x / t) * t, e4m3_round(w / s) * s, t, s


def data(m=24, k=64, n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.logspace(-2, 1, m)[:, None]   # rows of very different size
    w = torch.randn(n, k, generator=g) * 0.02
    w[torch.rand(n, k, generator=g) < 0.02] *= 10                             # outliers set some row scales
    return x, w


def test_weight_codes_and_scales():
    _, w = data()
    codes, scale = quantize_weight(w)
    assert codes.dtype == E4M3 and scale.dtype == torch.float32 and scale.shape == (48,)
    assert torch.equal(codes.float().abs().amax(1), torch.full((48,), 448.0))  # every row uses the full range
    _, w_ref, _, s = reference_quant(torch.ones(1, 64), w)
    torch.testing.assert_close(dequantize_weight(codes, scale).double(), w_ref, rtol=1e-6, atol=0)
    err = (dequantize_weight(codes, scale).double() - w.double()).abs()
    assert (err <= torch.maximum(REL * w.double().abs(), SUB * s) * (1 + 1e-6)).all()


def test_forward_matches_float64_reference_of_the_same_quantization():
    x, w = data()
    codes, scale = quantize_weight(w)
    y = linear_fp8(x, codes, scale, fast=False)
    x_hat, w_hat, _, _ = reference_quant(x, w)
    ref = x_hat @ w_hat.T
    # what is left is fp32 accumulation over 64 products: a few ulps of the row's magnitude
    tol = 1e-6 * (x_hat.abs() @ w_hat.abs().T)
    assert ((y.double() - ref).abs() <= tol).all()


def test_forward_error_within_e4m3_bound_of_the_exact_product():
    """|x̂ŵ - xw| <= e_x |ŵ| + |x| e_w per product, e = max(2^-4 |v|, 2^-10 scale): with no subnormals
    this is (1 + 2^-4)^2 - 1 < 13% of Σ|x||w|, the bound :mod:`leanlora.base.fp8_linear` states."""
    x, w = data()
    codes, scale = quantize_weight(w)
    y = linear_fp8(x, codes, scale, fast=False).double()
    _, w_hat, t, s = reference_quant(x, w)
    xd, wd = x.double(), w.double()
    e_x = torch.maximum(REL * xd.abs(), SUB * t)
    e_w = torch.maximum(REL * wd.abs(), SUB * s)
    bound = e_x @ w_hat.abs().T + xd.abs() @ e_w.T
    exact = xd @ wd.T
    assert ((y - exact).abs() <= bound * (1 + 1e-5)).all()
    assert float((y - exact).norm() / exact.norm()) < 0.13


def test_autocast_does_not_change_the_fallback():
    """The training loop runs under autocast; the fallback's fp32 GEMM must stay fp32 there."""
    x, w = data()
    codes, scale = quantize_weight(w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = linear_fp8(x, codes, scale, fast=False)
    assert torch.equal(y, linear_fp8(x, codes, scale, fast=False))


def test_input_gradient_matches_float64_reference_and_bound():
    x, w = data()
    codes, scale = quantize_weight(w)
    x = x.requires_grad_()
    g = torch.randn(24, 48, generator=torch.Generator().manual_seed(3))
    linear_fp8(x, codes, scale, fast=False).backward(g)
    # dx = (g diag(s)) Wq with g diag(s) quantized per row, the codes of W exact (scale 1)
    s = scale.double()
    gs = g.double() * s
    u = torch.exp2(torch.ceil(torch.log2(gs.abs().amax(1, keepdim=True) / 448)))
    g_hat = e4m3_round(gs / u) * u
    ref = g_hat @ codes.double()
    assert ((x.grad.double() - ref).abs() <= 1e-6 * (g_hat.abs() @ codes.double().abs())).all()
    exact = g.double() @ w.double()
    assert float((x.grad.double() - exact).norm() / exact.norm()) < 0.13


def test_scaled_mm_path_agrees_with_the_fallback():
    """The torch._scaled_mm call (rowwise scales, column-major weight) as the GPU makes it; CPU
    torch runs it too, so the layouts and scale shapes are checked here (bf16 output)."""
    x, w = data()
    codes, scale = quantize_weight(w)
    try:
        y_fast = linear_fp8(x.bfloat16(), codes, scale, fast=True)
    except (RuntimeError, NotImplementedError) as err:
        pytest.skip(f"torch._scaled_mm does not run on this device: {err}")
    y = linear_fp8(x.bfloat16(), codes, scale, fast=False)
    torch.testing.assert_close(y_fast.float(), y.float(), rtol=2 ** -7, atol=1e-3)
    xg = x.bfloat16().requires_grad_()
    g = torch.randn(24, 48).bfloat16()
    linear_fp8(xg, codes, scale, fast=True).backward(g)
    fast_grad = xg.grad.clone()
    xg.grad = None
    linear_fp8(xg, codes, scale, fast=False).backward(g)
    torch.testing.assert_close(fast_grad.float(), xg.grad.float(), rtol=2 ** -7, atol=1e-3)


def test_base_module_bias_leading_dims_and_dtype_moves():
    _, w = data()
    bias = nn.Parameter(torch.randn(48), requires_grad=False)
    base = FP8Base(w, bias, name="m")
    x = torch.randn(2, 3, 64)
    flat = linear_fp8(x.reshape(6, 64), base.codes, base.scales, fast=False) + bias
    assert torch.equal(base(x), flat.reshape(2, 3, 48))
    assert base.nbytes() == 48 * 64 + 48 * 4
    codes = base.codes
    base.to(torch.bfloat16)                          # model.to(bf16) must not dequantize the codes
    assert base.codes is codes and base.dense_weight().dtype == torch.bfloat16
    assert base(x.bfloat16()).dtype == torch.bfloat16
    assert copy.deepcopy(base).codes.dtype == E4M3


def test_transposed_copy_gives_the_same_values_follows_merge_and_is_dropped_for_fsdp2(monkeypatch):
    """Where _scaled_mm runs the base holds the backward's layout once; CPU torch runs _scaled_mm too,
    so the fast path is forced here and checked bit for bit against transposing in each backward."""
    import leanlora.base.fp8 as fp8

    monkeypatch.setattr(fp8, "fp8_gemm_available", lambda device: True)
    x, w = data()
    kept, made = FP8Base(w, None, name="m"), FP8Base(w, None, name="m", transposed_copy=False)
    assert kept.fast and kept.codes_t.is_contiguous() and made.codes_t is None
    assert torch.equal(kept.codes_t.float(), kept.codes.t().float())
    assert kept.nbytes() == 2 * 48 * 64 + 48 * 4 and made.nbytes() == 48 * 64 + 48 * 4
    g = torch.randn(24, 48).bfloat16()
    grads = []
    for base in (kept, made):
        xg = x.bfloat16().requires_grad_()
        try:
            base(xg).backward(g)
        except (RuntimeError, NotImplementedError) as err:
            pytest.skip(f"torch._scaled_mm does not run on this device: {err}")
        grads.append(xg.grad)
    assert torch.equal(grads[0], grads[1])
    kept.add_delta_(torch.full((48, 64), 0.01))      # merge requantizes: the copy follows the new codes
    assert torch.equal(kept.codes_t.float(), kept.codes.t().float())
    kept.as_parameter()                              # FSDP2: shards are gathered per use, no whole copy
    assert kept.codes_t is None and kept.nbytes() == 48 * 64 + 48 * 4
    assert "transposed copy" not in repr(kept)


def test_fp8_transposed_copy_is_a_config_choice():
    model = tiny_llama()
    leanlora.inject(model, _config(fp8=leanlora.FP8Config(transposed_copy=False)))
    bases = [m for m in model.modules() if isinstance(m, FP8Base)]
    assert bases and all(b.codes_t is None and not b.transposed_copy for b in bases)
    assert leanlora.AdapterConfig.from_dict({"fp8": {"transposed_copy": False}}).fp8.transposed_copy is False
    with pytest.raises(leanlora.ConfigError, match="fp8.transposed_copy"):
        leanlora.FP8Config(transposed_copy="yes")


def test_codes_registered_as_parameters_for_fsdp2_compute_alike_stay_float8_and_refuse_a_cast():
    _, w = data()
    base, plain = FP8Base(w, None, name="m"), FP8Base(w, None, name="m")
    base.as_parameter()                              # what leanlora.distributed.wrap does under FSDP2
    assert dict(base.named_parameters()).keys() == {"codes", "scales"}
    assert not base.codes.requires_grad and base.codes.dtype == E4M3
    x = torch.randn(5, 64)
    assert torch.equal(base(x), plain(x))
    before = base.snapshot()
    base.add_delta_(torch.full((48, 64), 0.01))      # merge rebinds new codes: they stay parameters
    assert isinstance(base.codes, nn.Parameter) and base.codes.dtype == E4M3
    assert not torch.equal(base.codes.float(), before[0].float())
    base.restore_(before)
    assert torch.equal(base(x), plain(x)) and isinstance(base.scales, nn.Parameter)
    base.to("cpu")                                   # a move is allowed
    with pytest.raises(RuntimeError, match=r"m: its codes are parameters for FSDP2 and a cast to torch.bfloat16"):
        base.to(torch.bfloat16)
    assert base.codes.dtype == E4M3


def _config(factors="dense", ranks="fixed", precision="float", **kw):
    kw.setdefault("target_modules", ALL_PROJ)
    kw.setdefault("r", 4)
    return leanlora.AdapterConfig(alpha=8, factors=factors, ranks=ranks, precision=precision, base="fp8",
                                  bank=leanlora.BankConfig(num_vectors=16, vector_length=16, topk=2), **kw)


GRID = list(itertools.product(("dense", "bank"), ("fixed", "nested", "gated"), ("float", "fixed", "learned")))


@pytest.mark.parametrize("factors, ranks, precision", GRID, ids=["-".join(c) for c in GRID])
def test_every_strategy_trains_saves_loads_and_merges_on_fp8(factors, ranks, precision, tmp_path):
    model = tiny_llama()
    config = _config(factors, ranks, precision)
    leanlora.inject(model, config)
    assert all(isinstance(layer.base, FP8Base) for _, layer in leanlora.adapted_layers(model))
    model.train()
    opt = torch.optim.AdamW(leanlora.param_groups(model, lr=1e-2), lr=1e-2)
    x = token_batch()
    leanlora.advance(model, 0)
    loss = model(x, labels=x).loss + leanlora.regularizer(model)
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for _, p in leanlora.trainable_parameters(model))
    opt.step()
    model.eval()
    with torch.no_grad():
        out = model(x).logits
    leanlora.save(model, tmp_path / "ad")
    reloaded = leanlora.load(tiny_llama(), tmp_path / "ad")
    assert all(isinstance(layer.base, FP8Base) for _, layer in leanlora.adapted_layers(reloaded))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, out, rtol=1e-4, atol=1e-4)
    leanlora.finalize(model)                    # pruned and packed; then merged into the fp8 codes
    report = leanlora.merge(model)
    assert all(r["max_abs"] >= r["mean_abs"] >= 0 for r in report.values())
    with torch.no_grad():
        merged = model(x).logits
    assert float((merged - out).norm() / out.norm()) < 0.05


def test_export_peft_merge_and_unmerge(tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    leanlora.inject(model, _config())
    randomize_adapters(model)
    x = token_batch(seed=7)
    with torch.no_grad():
        out = model(x).logits
        dense = tiny_llama()(x).logits
    # PEFT serves the adapter on the dense original base: the difference is the fp8 rounding alone
    leanlora.export_peft(model, tmp_path / "peft")
    served = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft").eval()
    with torch.no_grad():
        one_rounding = float((out - served(x).logits).norm() / out.norm())
    assert 0 < one_rounding < 0.1
    codes = {n: layer.base.codes for n, layer in leanlora.adapted_layers(model)}
    report = leanlora.merge(model)
    # requantizing W0 + ΔW: the error is reported per module, and it is one e4m3 rounding
    assert set(report) == set(codes)
    assert all(0 < r["mean_abs"] < r["max_abs"] for r in report.values())
    with torch.no_grad():
        merged = model(x).logits
    assert float((merged - out).norm() / out.norm()) < 2 * one_rounding
    leanlora.unmerge(model)
    assert all(layer.base.codes is codes[n] for n, layer in leanlora.adapted_layers(model))
    plain = leanlora.merge_and_unload(model)        # dense weights: deq(W0) + ΔW, rounded once
    assert isinstance(plain.model.layers[0].mlp.up_proj, nn.Linear)
    with torch.no_grad():
        assert float((plain(x).logits - served(x).logits).norm() / dense.norm()) < 0.1


def test_base_identity_is_checked_against_the_unquantized_weights(tmp_path):
    model = tiny_llama()
    leanlora.inject(model, _config())
    leanlora.save(model, tmp_path / "ad")
    with pytest.raises(leanlora.BaseMismatchError):
        leanlora.load(tiny_llama(seed=1), tmp_path / "ad")


def test_bert_and_gpt2_conv1d_targets():
    bert = tiny_bert()
    leanlora.inject(bert, _config(target_modules=("query", "value"), modules_to_save=("classifier",)))
    bert.train()
    loss = bert(token_batch(), labels=torch.tensor([0, 1])).loss
    loss.backward()
    assert torch.isfinite(loss)
    gpt2 = tiny_gpt2()
    leanlora.inject(gpt2, _config(target_modules=("c_attn", "c_fc")))
    base = gpt2.transformer.h[0].attn.c_attn.base
    assert isinstance(base, FP8Base) and base.transposed and (base.out_features, base.in_features) == (192, 64)
    gpt2(token_batch(), labels=token_batch()).loss.backward()
    assert type(leanlora.unload(gpt2).transformer.h[0].attn.c_attn).__name__ == "Conv1D"


def test_shapes_that_scaled_mm_cannot_take_are_refused_by_name():
    model = tiny_llama(hidden_size=40, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
    q_proj = r"model\.layers\.0\.self_attn\.q_proj"
    with pytest.raises(leanlora.ConfigError, match=q_proj + r".*in_features=40.*multiples of 16"):
        leanlora.inject(model, _config())
    assert not any(True for _ in leanlora.adapted_layers(model))  # checked before anything changed
    with pytest.raises(leanlora.ConfigError, match="allowed: 'auto', 'dense', 'nf4', 'fp8'"):
        leanlora.AdapterConfig(base="fp16")


@pytest.mark.parametrize("fast", [False, True])
def test_compiles_whole_and_gives_the_eager_values(fast):
    """One graph, no break, for both GEMM paths (aot_eager: the traced graph without building kernels)."""
    if fast:
        try:
            linear_fp8(torch.randn(2, 64).bfloat16(), *quantize_weight(torch.randn(48, 64)), fast=True)
        except (RuntimeError, NotImplementedError) as err:
            pytest.skip(f"torch._scaled_mm does not run on this device: {err}")
    base = FP8Base(torch.randn(48, 64), None)
    base.fast = fast
    check_fullgraph_equals_eager(base)


def check_fullgraph_equals_eager(base) -> None:
    """``base`` compiled whole (aot_eager) gives its eager values and input gradient, bit for bit."""
    compiled = torch.compile(base, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 5, base.in_features, dtype=torch.bfloat16, requires_grad=True)
    y = compiled(x)
    y.float().square().sum().backward()
    x_eager = x.detach().clone().requires_grad_()
    y_eager = base(x_eager)
    y_eager.float().square().sum().backward()
    assert torch.equal(y, y_eager) and torch.equal(x.grad, x_eager.grad)


FP8_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def check_scaled_mm_against_fallback(base, x: torch.Tensor) -> None:
    """``base`` (``fast``, on CUDA) against its own fp32 fallback: values and input gradient to bf16 rounding."""
    assert base.fast
    x = x.cuda().bfloat16().requires_grad_()
    g = torch.randn(x.shape[0], base.out_features, device="cuda", dtype=torch.bfloat16)  # one upstream gradient
    y = base(x)
    (fast_grad,) = torch.autograd.grad(y, x, g)
    base.fast = False
    y_ref = base(x)
    (ref_grad,) = torch.autograd.grad(y_ref, x, g)
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2 ** -7, atol=1e-2)
    torch.testing.assert_close(fast_grad.float(), ref_grad.float(), rtol=2 ** -6, atol=1e-2)


def check_inductor_layers_train_like_eager(config) -> None:
    """A bf16 Llama on CUDA with ``config`` injected: the loss with inductor-compiled decoder layers
    equals the eager one to bf16 noise."""
    from leanlora.train.compiled import CompiledRegions

    losses = {}
    for compiled in (False, True):
        model = tiny_llama(hidden_size=256, intermediate_size=512).cuda().to(torch.bfloat16)
        leanlora.inject(model, config)
        randomize_adapters(model)
        model.train()
        if compiled:
            CompiledRegions(model)
        ids = token_batch(batch=4, seq=64).cuda()
        loss = model(ids, labels=ids).loss
        loss.backward()
        losses[compiled] = float(loss)
    assert abs(losses[True] - losses[False]) < 2e-2 * abs(losses[False])


@pytest.mark.skipif(not FP8_GPU, reason="needs a CUDA GPU of compute capability 8.9+ (float8 GEMMs)")
def test_cuda_scaled_mm_path_and_inductor_compiled_layers():
    """On the GPU the base takes torch._scaled_mm; its values match the fp32 fallback to bf16
    rounding, and a model whose decoder layers are compiled by inductor trains like the eager one."""
    x, w = data(m=256, k=512, n=384)
    check_scaled_mm_against_fallback(FP8Base(w.cuda(), None), x)
    check_inductor_layers_train_like_eager(_config(r=8))


def test_run_config_and_preflight_take_the_fp8_base():
    from leanlora.train.preflight import PreflightError, check_adapter
    from leanlora.train.runconfig import load_run_config

    run = load_run_config(None, ["data.task=causal_lm", "adapter.base=fp8", "adapter.target_modules=[q_proj]",
                                 "train.fused_loss=off"])
    assert run.adapter.base == "fp8" and run.train.fused_loss == "off"
    check_adapter(run, tiny_llama())
    odd = tiny_llama(hidden_size=40, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(PreflightError, match=r"adapter: module 'model\.layers\.0\.self_attn\.q_proj' "
                                             r"has in_features=40"):
        check_adapter(run, odd)
