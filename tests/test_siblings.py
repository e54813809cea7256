"""Sibling layers (q/k/v, gate/up) run their first GEMM as one: the same values and gradients as
each layer alone, fewer GEMMs, nothing held after a forward, and a plain result whenever a member
does not read the shared input."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import leanlora
from leanlora.gates import hardconcrete as hc
from leanlora.groups.siblings import unlink_siblings
from leanlora.layer import AdaptedLinear
from conftest import OpCount, randomize_adapters, tiny_bert, tiny_llama, token_batch
from test_groups import POINTS, TARGETS, _fixed_noise

POINT_IDS = ["-".join(p) for p in POINTS]


def _model(point=("dense", "fixed", "float", "dense"), dropout=0.0, layers=2):
    factors, ranks, precision, base = point
    torch.manual_seed(0)
    config = leanlora.AdapterConfig(
        target_modules=TARGETS, r=4, alpha=8, factors=factors, ranks=ranks, precision=precision, base=base,
        dropout=dropout, bank=leanlora.BankConfig(num_vectors=16, vector_length=16, topk=2),
        nf4=leanlora.NF4Config(block_size=32, scaler_block_size=32))
    model = leanlora.inject(tiny_llama(num_hidden_layers=layers), config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # B non-zero and gates half open, so every piece matters
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * (1.5 if "log_alpha" in name else 0.05))
    return model.train()


def _layers(model):
    return [m for m in model.modules() if isinstance(m, AdaptedLinear)]


def _loss_and_grads(model, x):
    leanlora.advance(model, 0)
    loss = model(x, labels=x).loss + leanlora.regularizer(model)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _same_steps(model, reference, x, steps: int, rtol: float, atol: float) -> None:
    """``steps`` training steps' losses and gradients of ``model`` equal ``reference``'s."""
    for _ in range(steps):
        for m in (model, reference):
            m.zero_grad(set_to_none=True)
        loss_ref, ref = _loss_and_grads(reference, x)
        loss, got = _loss_and_grads(model, x)
        torch.testing.assert_close(loss, loss_ref, rtol=rtol / 10, atol=atol / 10)
        assert got.keys() == ref.keys()
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=rtol, atol=atol, msg=name)


def test_sets_are_the_layers_that_read_one_input():
    model = _model()
    names = {layer.name: layer for layer in _layers(model)}
    attn, mlp = "model.layers.0.self_attn.", "model.layers.0.mlp."
    qkv = names[attn + "q_proj"].siblings
    assert qkv is not None and qkv.members == tuple(names[attn + p] for p in ("q_proj", "k_proj", "v_proj"))
    assert names[mlp + "gate_proj"].siblings.members == (names[mlp + "gate_proj"], names[mlp + "up_proj"])
    assert names[attn + "o_proj"].siblings is None and names[mlp + "down_proj"].siblings is None
    # never across blocks: layer 1's q has its own set
    assert names["model.layers.1.self_attn.q_proj"].siblings is not qkv

    bert = leanlora.inject(tiny_bert(), leanlora.AdapterConfig(target_modules=["query", "key", "value", "dense"], r=4))
    sets = bert.leanlora_shared.__dict__["sibling_sets"]
    assert [tuple(m.name.rsplit(".", 1)[1] for m in s.members) for s in sets] == [("query", "key", "value")] * 2


@pytest.mark.parametrize("point", POINTS, ids=POINT_IDS)
def test_shared_gemm_equals_each_layer_alone_in_value_and_gradient(point, monkeypatch):
    if point[3] == "nf4":
        pytest.importorskip("torchao")
    monkeypatch.setattr(hc, "sample", _fixed_noise)
    x = token_batch()
    linked, alone = _model(point), _model(point)
    unlink_siblings(_layers(alone))
    _same_steps(linked, alone, x, steps=1, rtol=1e-5, atol=1e-7)


def _gemms(model, x):
    """aten GEMM calls of one training forward and backward."""
    with OpCount() as count:
        model(x, labels=x).loss.backward()
    return sum(op.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm) for op in count.ops)


def test_shared_gemm_runs_fewer_gemms():
    x = token_batch()
    linked, alone = _model(), _model()
    unlink_siblings(_layers(alone))
    # per block, forward: q, k, v's and gate, up's x A^T as 2 GEMMs, not 5; backward: their A
    # gradients and input gradients as 2 + 2, not 5 + 5. The first block's q, k, v input (frozen
    # embeddings, normalised) needs no gradient: 7 fewer there, 9 in the second block
    assert _gemms(alone, x) - _gemms(linked, x) == 7 + 9


def test_nothing_is_held_after_a_forward_and_a_fresh_forward_starts_clean():
    model = _model()
    x = token_batch()
    model(x, labels=x).loss.backward()
    sets = model.leanlora_shared.__dict__["sibling_sets"]
    assert all(s._input is None and not s._narrow for s in sets)
    # a member the model skipped would leave its result: the next forward drops it
    sets[0]._input, sets[0]._narrow = x, {0: torch.zeros(1)}
    model(x)
    assert sets[0]._input is None and not sets[0]._narrow


def _alone(layer):
    """A shallow copy of ``layer`` that computes its own narrow result."""
    ref = copy.copy(layer)
    ref.__dict__["siblings"] = None
    return ref


def test_a_member_called_with_another_input_computes_its_own():
    model = _model()
    model(token_batch())                                   # pieces of a training forward
    attn = model.model.layers[0].self_attn
    x, other = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    siblings = attn.q_proj.siblings
    q = attn.q_proj(x)                                     # computes q, k and v's narrow results on x
    assert siblings._input is x
    k_other = attn.k_proj(other)                           # not x (a cross-attention's k): its own
    assert not siblings.sharing and siblings._input is None   # and the set stops sharing for good
    v_other = attn.v_proj(other)
    torch.testing.assert_close(q, _alone(attn.q_proj)(x))
    torch.testing.assert_close(k_other, _alone(attn.k_proj)(other))
    torch.testing.assert_close(v_other, _alone(attn.v_proj)(other))
    assert not torch.allclose(v_other, _alone(attn.v_proj)(x))
    model(token_batch())
    assert siblings._input is None                         # the next forward shares nothing in this set


def test_an_encoder_decoder_cross_attention_stops_sharing_and_trains_the_same():
    """BART's decoder cross-attention: q reads the decoder's states, k and v the encoder's."""
    from transformers import BartConfig, BartForConditionalGeneration

    def bart():
        torch.manual_seed(0)
        cfg = BartConfig(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                         decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32,
                         dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)  # no draws: both runs alike
        model = leanlora.inject(BartForConditionalGeneration(cfg),
                                leanlora.AdapterConfig(target_modules=["q_proj", "k_proj", "v_proj"], r=4))
        randomize_adapters(model)
        return model.train()

    x = token_batch(vocab=64)
    linked, alone = bart(), bart()
    unlink_siblings(_layers(alone))
    _same_steps(linked, alone, x, steps=2, rtol=1e-5, atol=1e-7)
    sets = {s.members[0].name.rsplit(".", 1)[0]: s for s in linked.leanlora_shared.__dict__["sibling_sets"]}
    cross = [s for name, s in sets.items() if "encoder_attn" in name]
    assert cross and all(not s.sharing for s in cross)
    assert all(s.sharing for name, s in sets.items() if "encoder_attn" not in name)


def test_dropout_disabled_and_merged_members_compute_their_own():
    x = token_batch()
    model = _model(dropout=0.1)
    torch.manual_seed(5)
    model(x, labels=x).loss.backward()                     # every member has dropout: none joins
    for s in model.leanlora_shared.__dict__["sibling_sets"]:
        assert s._input is None
    model = _model()
    attn = model.model.layers[0].self_attn
    attn.k_proj.enabled = False
    alone = _model()
    alone.model.layers[0].self_attn.k_proj.enabled = False
    unlink_siblings(_layers(alone))
    torch.testing.assert_close(model(x, labels=x).loss, alone(x, labels=x).loss, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("point", [POINTS[0], ("dense", "fixed", "float", "fp8")], ids=["blora", "lora-fp8"])
def test_compiled_block_has_no_graph_break_and_the_same_gradients(point, monkeypatch):
    import torch._dynamo.testing

    monkeypatch.setattr(hc, "sample", _fixed_noise)
    x = token_batch()
    compiled, eager = _model(point), _model(point)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    for layer in compiled.model.layers:
        layer.compile(backend=counter, fullgraph=True)
    _same_steps(compiled, eager, x, steps=3, rtol=1e-4, atol=1e-6)   # later steps reuse the graphs
    # fullgraph: no break; block 0's input needs no gradient and block 1's does: two graphs, then none
    assert counter.frame_count == 2, counter.frame_count
    assert all(s._input is None and not s._narrow for s in compiled.leanlora_shared.__dict__["sibling_sets"])
    torch._dynamo.reset()


def test_copies_and_pickles_keep_the_sets_and_drop_results():
    model = _model()
    x = token_batch()
    model(x)
    copied = copy.deepcopy(model)
    q = copied.model.layers[0].self_attn.q_proj
    assert q.siblings is not model.model.layers[0].self_attn.q_proj.siblings
    assert q.siblings.members[1] is copied.model.layers[0].self_attn.k_proj
    restored = pickle.loads(pickle.dumps(model))
    torch.testing.assert_close(restored(x, labels=x).loss, model(x, labels=x).loss)
