"""NF4 base (torchao) and the bitsandbytes Linear4bit passthrough: numerics, memory, merge, IO."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import leanlora
from leanlora.groups.rows import row_grad
from leanlora.base.nf4 import NF4Base, nf4_codebook
from conftest import randomize_adapters, tiny_llama, token_batch

pytest.importorskip("torchao")

ALL_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def nf4_config(**kw) -> leanlora.AdapterConfig:
    kw.setdefault("target_modules", ALL_PROJ)
    return leanlora.AdapterConfig(r=4, base="nf4", **kw)


def heavy_tailed(out_f: int, in_f: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.02
    w[torch.rand(out_f, in_f, generator=g) < 0.01] *= 20  # outliers make block absmax vary a lot
    return w


def test_reconstruction_error_within_codebook_bound():
    """|w - deq(w)| <= (half the codebook gap around w/s) * s + |s - s_dq| element-wise.

    s is the block's true absmax and s_dq its double-quantized copy; |code| <= 1 turns the
    scale error into at most |s - s_dq| per element.
    """
    w = heavy_tailed(96, 256)
    base = NF4Base(w, None, block_size=64, scaler_block_size=256)
    deq = base.dense_weight()
    codes = nf4_codebook(base.weight)
    assert codes.shape == (16,) and codes[0] == -1 and codes[-1] == 1 and (codes.diff() > 0).all()

    blocks = w.reshape(-1, 64)
    s = blocks.abs().amax(dim=1, keepdim=True)                            # (n_blocks, 1)
    t = base.weight
    s_dq = t.dequantize_scalers(t.quantized_scalers, t.quantization_factor, t.scaler_block_size)
    s_dq = s_dq.reshape(-1, 1).float()
    # Double quantization: 256 int8 steps over 2*max|s - mean|: half a step of error, a whole step
    # for the group's largest scale (it maps to 128, clamped to 127).
    step = (1.0 / t.quantization_factor.float())[:, None]                # (n_groups, 1)
    dq_err = (s - s_dq).abs().reshape(-1, t.scaler_block_size)
    clamped = (t.quantized_scalers == 127).reshape(dq_err.shape)
    assert (dq_err <= torch.where(clamped, step, step / 2) + 1e-7).all()

    v = (blocks / s).clamp(-1, 1)
    hi = torch.searchsorted(codes, v.contiguous()).clamp(1, 15)
    half_gap = (codes[hi] - codes[hi - 1]) / 2
    bound = half_gap * s + (s - s_dq).abs() + 1e-6
    err = (deq.reshape(-1, 64) - blocks).abs()
    assert (err <= bound).all(), float((err - bound).max())
    # The coarse form of the same bound: the widest half gap (between -1 and -0.6962) times absmax.
    assert (err <= 0.1519 * s + (s - s_dq).abs() + 1e-6).all()
    assert 0 < err.mean() < 0.05 * s.mean()


def test_forward_equals_dequantized_dense_forward():
    torch.manual_seed(0)
    w, bias = heavy_tailed(32, 128), torch.randn(32)
    base = NF4Base(w, nn.Parameter(bias, requires_grad=False), block_size=64, scaler_block_size=256)
    x = torch.randn(2, 5, 128)
    assert torch.equal(base(x), F.linear(x, base.dense_weight()) + bias)


def test_model_forward_equals_dense_model_with_dequantized_weights():
    model = tiny_llama()
    leanlora.inject(model, nf4_config())
    dense = tiny_llama()
    modules = dict(dense.named_modules())
    with torch.no_grad():
        for name, layer in leanlora.adapted_layers(model):
            assert isinstance(layer.base, NF4Base)
            modules[name].weight.copy_(layer.base.dense_weight())
    x = token_batch()
    with leanlora.disable_adapters(model):
        torch.testing.assert_close(model(x).logits, dense(x).logits, rtol=1e-5, atol=1e-5)


def _accumulate_grad_leaves(loss: torch.Tensor) -> set[int]:
    """ids of every leaf tensor the backward of ``loss`` would write a .grad into."""
    seen, leaves, stack = set(), set(), [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if type(fn).__name__ == "AccumulateGrad":
            leaves.add(id(fn.variable))
        stack.extend(f for f, _ in fn.next_functions)
    return leaves


@pytest.mark.parametrize("ranks", ["fixed", "nested"])
def test_gradient_reaches_adapters_and_never_the_base(ranks):
    model = tiny_llama()
    leanlora.inject(model, nf4_config(ranks=ranks))
    randomize_adapters(model)
    model.train()
    leanlora.advance(model, 0)
    x = token_batch()
    loss = model(x, labels=x).loss
    adapter = {id(p) for _, p in leanlora.trainable_parameters(model)}
    leaves = _accumulate_grad_leaves(loss)
    assert leaves and leaves <= adapter   # the graph holds no gradient sink for any base tensor
    loss.backward()
    b = model.leanlora_shared.rank_sampler.current if ranks == "nested" else 4
    for name, layer in leanlora.adapted_layers(model):
        assert not layer.base.weight.requires_grad and layer.base.weight.grad is None, name
        assert all(p.grad is None for p in layer.base.parameters()), name
        assert row_grad(layer.factors, "lora_B")[:, :b].abs().sum() > 0, name
        assert row_grad(layer.factors, "lora_A")[:b].abs().sum() > 0, name


def test_base_bytes_drop_to_about_half_a_byte_per_weight():
    model = tiny_llama()
    originals = {n: weakref.ref(m.weight) for n, m in model.named_modules() if n.endswith(ALL_PROJ)}
    dense_bytes = sum(r().numel() * r().element_size() for r in originals.values())
    leanlora.inject(model, nf4_config())
    gc.collect()
    assert all(r() is None for r in originals.values()), "a dense base weight is still referenced"
    numel = sum(l.in_features * l.out_features for _, l in leanlora.adapted_layers(model))
    nf4_bytes = sum(l.base.nbytes() for _, l in leanlora.adapted_layers(model))
    per_param = nf4_bytes / numel
    # Tiny 64-wide layers pay the per-tensor constants (mean, codebook) and 64-block groups.
    assert 0.515 < per_param < 0.535, per_param
    assert dense_bytes / nf4_bytes > 7.4


def test_bytes_per_weight_of_a_large_layer_match_the_qlora_layout():
    out_f, in_f = 1024, 2048
    base = NF4Base(torch.randn(out_f, in_f) * 0.02, None)
    n = out_f * in_f
    # 4-bit codes + int8 absmax per 64 + fp32 factor per 256 blocks + fp32 mean + 16 fp32 codes.
    expected = n / 2 + n / 64 + 4 * n / (64 * 256) + 4 + 16 * 4
    assert base.nbytes() == expected
    assert 0.515 < base.nbytes() / n < 0.517


def test_scaler_group_falls_back_to_a_divisor():
    # 576 x 192 (SmolLM2 k_proj) has 1728 blocks: not a multiple of 256, so groups of 64 blocks.
    base = NF4Base(torch.randn(192, 576) * 0.02, None)
    assert base.weight.scaler_block_size == 64
    assert (base.dense_weight() - base.weight.get_original_weight()).abs().max() == 0


@torch.no_grad()
def test_merge_into_nf4_reports_the_added_error_and_unmerge_is_exact():
    model = tiny_llama()
    leanlora.inject(model, nf4_config())
    randomize_adapters(model, std=0.05)
    x = token_batch()
    w0 = {n: l.base.dense_weight().clone() for n, l in leanlora.adapted_layers(model)}
    want = model(x).logits
    report = leanlora.merge(model)
    assert set(report) == set(w0)
    for name, err in report.items():
        layer = dict(leanlora.adapted_layers(model))[name]
        target = w0[name] + layer.delta_weight()
        got = (layer.base.dense_weight() - target).abs()
        assert err["mean_abs"] == pytest.approx(float(got.mean()), rel=1e-5)
        assert err["max_abs"] == pytest.approx(float(got.max()), rel=1e-5)
        assert 0 < err["mean_abs"] < err["max_abs"] <= 0.1519 * float(target.abs().max()) * 1.01
    merged = model(x).logits
    # Only one more NF4 rounding separates them: compare with what the first rounding did.
    dense = tiny_llama()(x).logits
    with leanlora.disable_adapters(model):
        leanlora.unmerge(model)
        nf4 = model(x).logits
        leanlora.merge(model)
    first = float((nf4 - dense).norm() / dense.norm())
    rel = float((merged - want).norm() / want.norm())
    # (measured: 0.16 vs 0.09; the merged weights are larger, so their NF4 steps are too)
    assert 0 < rel < 2 * first, (rel, first)
    leanlora.unmerge(model)
    for name, layer in leanlora.adapted_layers(model):
        assert torch.equal(layer.base.dense_weight(), w0[name]), name
    assert torch.equal(model(x).logits, want)


def test_nf4_on_in_features_not_a_multiple_of_the_block_is_refused_before_any_change():
    model = tiny_llama(hidden_size=48, intermediate_size=128)
    with pytest.raises(leanlora.ConfigError, match=r"block_size=64.*in_features=48.*model\.layers\.0\.self_attn\.q_proj"):
        leanlora.inject(model, nf4_config())
    assert not hasattr(model, "leanlora_shared")
    assert not any(isinstance(m, leanlora.AdaptedLinear) for m in model.modules())


def test_model_to_dtype_keeps_the_base_in_nf4():
    model = tiny_llama()
    leanlora.inject(model, nf4_config())
    model.to(torch.bfloat16)
    layer = model.model.layers[0].self_attn.q_proj
    assert type(layer.base.weight).__name__ == "NF4Tensor"
    assert model(token_batch()).logits.dtype == torch.bfloat16


def test_save_load_round_trip_with_nf4_base(tmp_path):
    model = tiny_llama()
    leanlora.inject(model, nf4_config(ranks="nested", nested=leanlora.NestedConfig(eval_rank=3)))
    randomize_adapters(model)
    x = token_batch()
    want = model(x).logits
    leanlora.save(model, tmp_path / "adapter")
    fresh = leanlora.load(tiny_llama(), tmp_path / "adapter")
    for name, layer in leanlora.adapted_layers(fresh):
        assert isinstance(layer.base, NF4Base), name
        assert layer.ranks.active_rank() == 3
    assert torch.equal(fresh(x).logits, want)


def test_unload_gives_dense_linears_with_the_dequantized_weight():
    model = tiny_llama()
    leanlora.inject(model, nf4_config())
    x = token_batch()
    with leanlora.disable_adapters(model):
        want = model(x).logits
    leanlora.unload(model)
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    torch.testing.assert_close(model(x).logits, want, rtol=1e-6, atol=1e-6)


# --- bitsandbytes Linear4bit loaded by the user ---------------------------------------------------


def _bnb_model():
    bnb = pytest.importorskip("bitsandbytes")
    model = tiny_llama()
    for name in ("q_proj", "v_proj"):
        for layer in model.model.layers:
            lin = getattr(layer.self_attn, name)
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.float32,
                                  compress_statistics=True, quant_type="nf4")
            q.load_state_dict(lin.state_dict())
            # bnb's lossy CPU inference repacking would make `before` differ from the wrapped
            # layer's output (Bnb4Base turns it off); off here too, for an exact reference.
            q.support_avx512bf16_for_cpu = False
            try:
                q = q.to("cpu")  # bitsandbytes quantizes on the move to a device
                q(torch.zeros(1, lin.in_features))
            except (RuntimeError, NotImplementedError) as err:
                pytest.skip(f"bitsandbytes has no CPU 4-bit backend here: {err}")
            setattr(layer.self_attn, name, q)
    return model.eval()


def test_bnb_linear4bit_is_used_as_the_base_as_it_is():
    from leanlora.base.bnb4 import Bnb4Base

    model = _bnb_model()
    x = token_batch()
    before = model(x).logits
    leanlora.inject(model, leanlora.AdapterConfig(target_modules=("q_proj", "v_proj"), r=4, base="nf4"))
    layers = dict(leanlora.adapted_layers(model))
    assert all(isinstance(l.base, Bnb4Base) for l in layers.values())
    assert torch.equal(model(x).logits, before)   # B = 0: the bnb forward, untouched
    n = sum(l.in_features * l.out_features for l in layers.values())
    # 64-wide layers pay the per-layer code tables (16 + 256 floats); dense fp32 is 4 bytes.
    assert 0.5 < sum(l.base.nbytes() for l in layers.values()) / n < 1.0

    randomize_adapters(model)
    w0 = {k: l.base.dense_weight().clone() for k, l in layers.items()}
    want = model(x).logits
    report = leanlora.merge(model)
    assert all(0 < e["mean_abs"] < e["max_abs"] for e in report.values())
    assert (model(x).logits - want).abs().max() < 0.1
    leanlora.unmerge(model)
    assert all(torch.equal(l.base.dense_weight(), w0[k]) for k, l in layers.items())
    leanlora.unload(model)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"


def test_bnb_bytes_per_weight_of_a_large_layer():
    bnb = pytest.importorskip("bitsandbytes")
    from leanlora.base.bnb4 import Bnb4Base

    q = bnb.nn.Linear4bit(2048, 1024, bias=False, compute_dtype=torch.float32, compress_statistics=True,
                          quant_type="nf4")
    q.load_state_dict(nn.Linear(2048, 1024, bias=False).state_dict())
    try:
        q = q.to("cpu")
    except (RuntimeError, NotImplementedError) as err:
        pytest.skip(f"bitsandbytes has no CPU 4-bit backend here: {err}")
    per_param = Bnb4Base(q).nbytes() / (2048 * 1024)
    assert 0.515 < per_param < 0.518, per_param  # the same QLoRA layout as torchao's


def test_merge_and_unload_on_nf4_rounds_once():
    """The plain model from merge_and_unload holds deq(W0_nf4) + ΔW exactly: no second rounding."""
    import leanlora
    from conftest import randomize_adapters, tiny_llama, token_batch

    model = tiny_llama()
    leanlora.inject(model, leanlora.AdapterConfig(target_modules=("q_proj", "v_proj"), r=4, base="nf4"))
    randomize_adapters(model)
    x = token_batch()
    with torch.no_grad():
        expected = {n: layer.base.dense_weight().float() + layer.delta_weight() for n, layer in leanlora.adapted_layers(model)}
        out = model(x).logits
        plain = leanlora.merge_and_unload(model)
        for name, w in expected.items():
            torch.testing.assert_close(plain.get_submodule(name).weight.float(), w, rtol=0, atol=1e-6)
        torch.testing.assert_close(plain(x).logits, out, rtol=1e-4, atol=1e-4)


def test_a_model_with_nf4_bases_deep_copies_to_the_same_function():
    import copy

    model = leanlora.inject(tiny_llama(), leanlora.AdapterConfig(
        target_modules=("q_proj", "down_proj"), base="nf4",
        nf4=leanlora.NF4Config(block_size=32, scaler_block_size=32))).eval()
    twin = copy.deepcopy(model)
    x = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(twin(x).logits, model(x).logits, rtol=0, atol=0)
    base, twin_base = (m.get_submodule("model.layers.0.self_attn.q_proj.base") for m in (model, twin))
    assert twin_base.weight is not base.weight
    assert twin_base.weight.quantized_data.data_ptr() != base.weight.quantized_data.data_ptr()


def test_inject_builds_the_nf4_base_with_the_plain_weights_digest():
    model = tiny_llama()
    plain = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    leanlora.inject(model, nf4_config())
    for name, layer in leanlora.adapted_layers(model):
        assert isinstance(layer.base, NF4Base), name
        assert layer.base_digest is not None, name      # of the weight before rounding: what load compares
    q = model.model.layers[0].self_attn.q_proj.base.dense_weight()
    assert not torch.equal(q, plain) and torch.allclose(q, plain, atol=0.1)


def test_a_failed_nf4_load_leaves_the_model_untouched(tmp_path, monkeypatch):
    from leanlora.artifact import io

    model = tiny_llama()
    leanlora.inject(model, nf4_config())
    randomize_adapters(model)
    leanlora.save(model, tmp_path / "adapter")
    target = tiny_llama()
    before = {n: p.detach().clone() for n, p in target.state_dict().items()}

    def broken(*args, **kwargs):
        raise io.AdapterLoadError("a tensor failed to load")

    monkeypatch.setattr(io, "_restore_tensors", broken)
    with pytest.raises(io.AdapterLoadError, match="failed to load"):
        leanlora.load(target, tmp_path / "adapter")
    assert not list(leanlora.adapted_layers(target)) and not hasattr(target, "leanlora_shared")
    after = target.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)
