"""Mask-free SDPA attention for batches without padding: the same outputs, no host reads for masks."""

from __future__ import annotations

import pytest
import torch

import leanlora
from leanlora.train.unpadded_attention import NAME, use_unpadded_attention
from conftest import tiny_bert, tiny_llama, token_batch


def _packed_checks(monkeypatch) -> list:
    import transformers.masking_utils as masking

    calls = []
    real = masking.find_packed_sequence_indices
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    return calls


def test_a_causal_lm_gives_the_same_loss_and_gradients_without_the_mask_checks(monkeypatch):
    calls = _packed_checks(monkeypatch)
    x = token_batch(batch=3, seq=16)
    runs = []
    for unpadded in (False, True):
        model = leanlora.inject(tiny_llama(use_cache=False), leanlora.AdapterConfig(
            target_modules=("q_proj", "v_proj", "down_proj"), r=4, ranks="gated", precision="learned")).train()
        model.config._attn_implementation = "sdpa"
        if unpadded:
            use_unpadded_attention(model)
        calls.clear()
        torch.manual_seed(3)
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        runs.append((out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
                     len(calls)))
    (ref_logits, ref_grads, ref_checks), (logits, grads, checks) = runs
    assert ref_checks == 1 and checks == 0  # the packed-sequence check (a host read on a GPU) is gone
    assert torch.equal(logits, ref_logits)
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=0, atol=0, msg=name)


def test_an_encoder_without_padding_gives_the_same_outputs():
    model = tiny_bert().eval()
    x = token_batch(batch=2, seq=10)
    ref = model(input_ids=x).logits
    use_unpadded_attention(model)
    assert model.config._attn_implementation == NAME
    torch.testing.assert_close(model(input_ids=x).logits, ref)


def test_an_attention_mask_is_refused_not_ignored():
    model = use_unpadded_attention(tiny_llama())
    use_unpadded_attention(model)  # twice: one hook
    x = token_batch()
    with pytest.raises(ValueError, match="would ignore the attention_mask passed"):
        model(input_ids=x, attention_mask=torch.ones_like(x))
    model(input_ids=x)


def test_a_module_that_is_not_a_transformers_model_is_refused():
    with pytest.raises(TypeError, match="Linear is not a transformers model"):
        use_unpadded_attention(torch.nn.Linear(2, 2))
