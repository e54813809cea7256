"""A 4D padding mask built on the device: the model's outputs at real positions and the adapter's
gradients are those of transformers' own 2D-mask path, and nothing is checked on the host."""

from __future__ import annotations

import pytest
import torch

import leanlora
from leanlora.train.padded_attention import attends_causally, attention_mask_4d, require_sdpa
from conftest import tiny_bert, tiny_gpt2, tiny_llama, token_batch

PADDING = torch.tensor([[1] * 12, [1] * 7 + [0] * 5, [1] * 3 + [0] * 9])


def _adapted(model, targets):
    model = leanlora.inject(model, leanlora.AdapterConfig(target_modules=targets, r=4, ranks="gated",
                                                          precision="learned")).train()
    model.config._attn_implementation = "sdpa"
    return model


def _host_reads(monkeypatch) -> list:
    """Count transformers' 'is the padding mask all ones?' checks, host reads on a GPU."""
    import transformers.masking_utils as masking

    calls = []
    for name in ("_ignore_causal_mask_sdpa", "_ignore_bidirectional_mask_sdpa"):
        real = getattr(masking, name)
        monkeypatch.setattr(masking, name, lambda *a, real=real, **k: (calls.append(1), real(*a, **k))[1])
    return calls


@pytest.mark.parametrize("build,targets,causal", [
    (lambda: tiny_llama(use_cache=False), ("q_proj", "v_proj", "down_proj"), True),
    (tiny_bert, ("query", "value", "output.dense"), False),
])
def test_the_4d_mask_gives_the_2d_masks_outputs_and_gradients_without_host_checks(monkeypatch, build, targets,
                                                                                   causal):
    reads = _host_reads(monkeypatch)
    x = token_batch(batch=3, seq=12)
    runs = []
    for four_d in (False, True):
        model = _adapted(build(), targets)
        assert attends_causally(model) is causal
        mask = attention_mask_4d(PADDING, causal) if four_d else PADDING
        reads.clear()
        torch.manual_seed(3)  # the same gate noise in both runs
        logits = model(input_ids=x, attention_mask=mask).logits
        real = PADDING.bool()
        # a causal LM's loss reads real positions; the classifier pools the first token
        out = logits[real] if causal else logits
        (out.float().pow(2).mean()).backward()
        runs.append((out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
                     len(reads)))
    (ref_out, ref_grads, ref_reads), (out, grads, n_reads) = runs
    assert n_reads == 0 and ref_reads >= 1
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_the_mask_is_causal_and_padding_aware_and_never_leaves_a_row_empty():
    causal = attention_mask_4d(PADDING, causal=True)
    assert causal.shape == (3, 1, 12, 12) and causal.dtype == torch.bool
    assert causal[0, 0].equal(torch.ones(12, 12).tril().bool())           # no padding: the causal triangle
    assert not causal[1, 0, 9, 8] and causal[1, 0, 9, 9]                   # a padded key is hidden, itself not
    assert causal[1, 0, 6, :7].all() and not causal[1, 0, 6, 7:].any()
    full = attention_mask_4d(PADDING, causal=False)
    assert full[2, 0, 0].tolist() == [True] * 3 + [False] * 9
    assert full.any(-1).all() and causal.any(-1).all()                     # SDPA would give NaN for an empty row
    with pytest.raises(ValueError, match=r"\(batch, seq\) padding mask"):
        attention_mask_4d(PADDING[None], causal=True)


def test_a_model_that_is_not_sdpa_is_refused_by_name():
    model = tiny_gpt2()
    model.config._attn_implementation = "eager"
    with pytest.raises(ValueError, match="train.cuda_graph needs .* 'sdpa'.*GPT2LMHeadModel uses 'eager'"):
        require_sdpa(model, "train.cuda_graph")
    with pytest.raises(ValueError, match="cannot tell whether its attention is causal"):
        attends_causally(torch.nn.Linear(2, 2))
