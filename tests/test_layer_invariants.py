"""Invariants of the adapted layer on tiny random models (litgpt-style)."""

from __future__ import annotations

import pytest
import torch

import leanlora
from conftest import randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama, token_batch

ALL_LLAMA = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _adapted_llama(dtype=torch.float32, **kw):
    model = tiny_llama().to(dtype)
    leanlora.inject(model, leanlora.AdapterConfig(target_modules=ALL_LLAMA, r=4, **kw))
    randomize_adapters(model)
    return model


def test_fresh_adapter_is_a_no_op():
    model = tiny_llama()
    x = token_batch()
    ref = model(x).logits
    leanlora.inject(model, leanlora.AdapterConfig(target_modules=ALL_LLAMA, r=4))
    torch.testing.assert_close(model(x).logits, ref, rtol=0, atol=0)  # B starts at zero


def test_base_weight_unchanged_by_optimizer_step():
    model = _adapted_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    x = token_batch()
    loss = model(x, labels=x).loss
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        if n in before:
            assert p.grad is None, n
            assert torch.equal(p, before[n]), n
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".factors.lora_" in n for n in trainable)


def test_merge_equals_unmerged_and_is_idempotent_and_unmerge_restores_exactly():
    model = _adapted_llama()
    x = token_batch()
    w0 = {n: l.base.dense_weight().detach().clone() for n, l in leanlora.adapted_layers(model)}
    out = model(x).logits
    leanlora.merge(model)
    merged = model(x).logits
    torch.testing.assert_close(merged, out, rtol=1e-5, atol=1e-5)
    leanlora.merge(model)  # second merge must not add the update twice
    torch.testing.assert_close(model(x).logits, merged, rtol=0, atol=0)
    leanlora.unmerge(model)
    for n, layer in leanlora.adapted_layers(model):
        assert torch.equal(layer.base.dense_weight(), w0[n]), n  # bit-exact in fp32
    torch.testing.assert_close(model(x).logits, out, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_bases_keep_fp32_adapters(dtype):
    model = _adapted_llama(dtype)
    x = token_batch()
    out = model(x).logits
    assert out.dtype == dtype and torch.isfinite(out).all()
    for _, layer in leanlora.adapted_layers(model):
        assert layer.factors.lora_A.dtype == torch.float32
        assert layer.base.dense_weight().dtype == dtype
    w0 = {n: l.base.dense_weight().detach().clone() for n, l in leanlora.adapted_layers(model)}
    leanlora.merge(model, keep_unmerge_copy=False)
    leanlora.unmerge(model)  # without a copy: within dtype rounding
    for n, layer in leanlora.adapted_layers(model):
        torch.testing.assert_close(layer.base.dense_weight(), w0[n], rtol=2e-2, atol=2e-2)


def test_adapter_dtype_is_configurable():
    model = _adapted_llama(torch.bfloat16, adapter_dtype="bfloat16")
    layer = next(l for _, l in leanlora.adapted_layers(model))
    assert layer.factors.lora_A.dtype == torch.bfloat16
    assert torch.isfinite(model(token_batch()).logits).all()


def test_disabled_adapters_equal_original_model():
    ref_model = tiny_llama()
    x = token_batch()
    ref = ref_model(x).logits
    model = _adapted_llama()
    assert not torch.allclose(model(x).logits, ref)
    with leanlora.disable_adapters(model):
        torch.testing.assert_close(model(x).logits, ref, rtol=0, atol=0)
    assert not torch.allclose(model(x).logits, ref)


def test_merge_refuses_nan():
    model = _adapted_llama()
    layer = next(l for _, l in leanlora.adapted_layers(model))
    with torch.no_grad():
        layer.factors.lora_B[0, 0] = float("nan")
    w0 = layer.base.dense_weight().clone()
    with pytest.raises(leanlora.MergeError, match=r"factors\.lora_B' holds NaN; refusing to merge"):
        layer.merge()
    assert torch.equal(layer.base.dense_weight(), w0) and not layer.merged


def test_unload_returns_original_modules_and_flags():
    model = tiny_llama()
    originals = {n: m for n, m in model.named_modules() if n.endswith("q_proj")}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    leanlora.inject(model, leanlora.AdapterConfig(target_modules=("q_proj",), r=2))
    leanlora.unload(model)
    for n, m in originals.items():
        assert model.get_submodule(n) is m
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not hasattr(model, "leanlora_shared")


def test_merge_and_unload_gives_plain_model_with_same_outputs():
    model = _adapted_llama()
    x = token_batch()
    out = model(x).logits
    plain = leanlora.merge_and_unload(model)
    assert not any(isinstance(m, leanlora.AdaptedLinear) for m in plain.modules())
    torch.testing.assert_close(plain(x).logits, out, rtol=1e-5, atol=1e-5)


def test_rslora_scaling():
    model = _adapted_llama(rslora=True)
    layer = next(l for _, l in leanlora.adapted_layers(model))
    *_, scale = layer.lowrank()
    assert scale == pytest.approx(16 / 4 ** 0.5)


def test_dropout_only_in_training():
    model = _adapted_llama(dropout=0.5)
    x = token_batch()
    model.eval()
    torch.testing.assert_close(model(x).logits, model(x).logits, rtol=0, atol=0)
    model.train()
    assert not torch.allclose(model(x).logits, model(x).logits)


def test_gpt2_conv1d_is_adapted_and_merges():
    model = tiny_gpt2()
    x = token_batch()
    leanlora.inject(model, leanlora.AdapterConfig(target_modules=("c_attn", "c_proj"), r=4))
    randomize_adapters(model)
    out = model(x).logits
    leanlora.merge(model)
    torch.testing.assert_close(model(x).logits, out, rtol=1e-5, atol=1e-5)


def test_bert_modules_to_save_are_trainable():
    model = tiny_bert()
    leanlora.inject(model, leanlora.AdapterConfig(target_modules=("query", "value"), r=4,
                                                  modules_to_save=("classifier",)))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= trainable
    assert not any(n.startswith("bert.embeddings") for n in trainable)


def test_extra_repr_shows_rank_and_bits():
    model = _adapted_llama()
    text = repr(next(l for _, l in leanlora.adapted_layers(model)))
    assert "rank=4/4" in text and "bits(A,B)=(32,32)" in text
