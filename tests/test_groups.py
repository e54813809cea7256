"""Layers grouped at inject share stacked parameters; a group's pieces equal each layer's own.

"never" (``AdapterConfig.vectorize``) has every layer compute its pieces from its rows, which is
the reference the grouped computation must equal in value and gradient.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import leanlora
from leanlora.gates import hardconcrete as hc
from leanlora.groups import stacking
from leanlora.layer import AdaptedLinear
from conftest import OpCount, tiny_llama, token_batch

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
POINTS = [  # (factors, ranks, precision, base)
    ("dense", "gated", "learned", "dense"),   # B-LoRA
    ("bank", "gated", "learned", "nf4"),      # the combination row of the benchmarks
    ("bank", "fixed", "float", "dense"),      # VB-LoRA
    ("dense", "fixed", "fixed", "dense"),
    ("dense", "nested", "learned", "dense"),
    ("bank", "nested", "fixed", "dense"),
    ("dense", "gated", "float", "dense"),
    ("dense", "fixed", "float", "dense"),     # LoRA
]


def _config(factors, ranks, precision, base, vectorize_mode):
    return leanlora.AdapterConfig(
        target_modules=TARGETS, r=4, alpha=8, factors=factors, ranks=ranks, precision=precision, base=base,
        bank=leanlora.BankConfig(num_vectors=16, vector_length=16, topk=2),
        nf4=leanlora.NF4Config(block_size=32, scaler_block_size=32), vectorize=vectorize_mode,
        gated=leanlora.GatedConfig(diag=True))  # E and its quantizer: the gated form with the most stacks


def _model(point, mode, layers=2, dtype=torch.float32):
    torch.manual_seed(0)
    model = leanlora.inject(tiny_llama(num_hidden_layers=layers).to(dtype), _config(*point, mode))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # move every strategy off its initial values: gates half open, B non-zero
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * (1.5 if "log_alpha" in name else 0.05))
    return model.train()


def _fixed_noise(log_alpha, u=None):
    """A hard-concrete draw with fixed u per gate position: the same in both paths, under vmap too."""
    u = torch.linspace(0.05, 0.95, log_alpha.shape[-1], device=log_alpha.device).expand_as(log_alpha)
    return _real_sample(log_alpha, u)


_real_sample = hc.sample


def _loss_and_grads(model, x):
    leanlora.advance(model, 0)
    loss = model(x, labels=x).loss + leanlora.regularizer(model)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("point", POINTS, ids=["-".join(p) for p in POINTS])
def test_grouped_pieces_equal_layer_by_layer_in_value_and_gradient(point, monkeypatch):
    if point[3] == "nf4":
        pytest.importorskip("torchao")
    monkeypatch.setattr(hc, "sample", _fixed_noise)
    x = token_batch()
    per_layer, grouped = _model(point, "never"), _model(point, "always")
    loss_ref, ref = _loss_and_grads(per_layer, x)
    loss, got = _loss_and_grads(grouped, x)
    assert all(m.pieces is not None for m in grouped.modules() if isinstance(m, AdaptedLinear))
    assert all(m.pieces is None for m in per_layer.modules() if isinstance(m, AdaptedLinear))
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert got.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)


def _ops_per_step(model, x):
    with OpCount() as count:
        leanlora.advance(model, 0)
        (model(x, labels=x).loss + leanlora.regularizer(model)).backward()
    return count.n


def test_grouping_cuts_the_operators_of_a_b_lora_step():
    x = token_batch()
    per_layer = _ops_per_step(_model(POINTS[0], "never", layers=4), x)
    grouped = _ops_per_step(_model(POINTS[0], "auto", layers=4), x)
    # 28 layers' gates and quantizers in 4 groups: the per-layer work is done 4 times, not 28
    assert grouped < per_layer / 3, (grouped, per_layer)


def test_eval_no_grad_and_checkpointing_compute_per_layer():
    x = token_batch()
    model = _model(POINTS[0], "auto")
    layers = [m for m in model.modules() if isinstance(m, AdaptedLinear)]
    model(x)
    assert all(m.pieces is not None for m in layers)
    with torch.no_grad():
        model(x)
    assert all(m.pieces is None for m in layers)
    model(x)
    model.eval()
    model(x)
    assert all(m.pieces is None for m in layers)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model(x, labels=x).loss.backward()
    assert all(m.pieces is None for m in layers)


def test_non_reentrant_checkpointing_uses_the_groups_with_the_same_gradients(monkeypatch):
    monkeypatch.setattr(hc, "sample", _fixed_noise)
    x = token_batch()
    plain, checkpointed = _model(POINTS[0], "auto"), _model(POINTS[0], "auto")
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss_ref, ref = _loss_and_grads(plain, x)
    loss, got = _loss_and_grads(checkpointed, x)
    assert all(m.pieces is not None for m in checkpointed.modules() if isinstance(m, AdaptedLinear))
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=1e-7)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-7, msg=name)


def test_compiled_layers_do_not_recompile_for_new_pieces():
    import torch._dynamo.testing

    x = token_batch()
    model = _model(POINTS[0], "auto")
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    for layer in model.model.layers:
        layer.compile(backend=counter)
    for step in range(3):
        leanlora.advance(model, step)
        model(x, labels=x).loss.backward()
    # layer 0's input needs no grad and the others' does: two graphs, then none per step
    assert counter.frame_count <= 2, counter.frame_count
    torch._dynamo.reset()


def test_compiled_grouped_pieces_equal_eager_ones_and_compile_once(monkeypatch):
    import torch._dynamo.testing

    monkeypatch.setattr(hc, "sample", _fixed_noise)
    x = token_batch()
    _, ref = _loss_and_grads(_model(POINTS[1], "auto"), x)
    model = _model(POINTS[1], "auto")
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    stacking.compile_pieces(model, "default", backend=counter)
    _, got = _loss_and_grads(model, x)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)
    frames = counter.frame_count
    assert len(model.leanlora_shared.groups) == 4 and frames == 1       # one graph for every group
    for step in range(2):
        model.zero_grad()
        _loss_and_grads(model, x)
    assert counter.frame_count == frames                                # and none per step
    dense = _model(POINTS[0], "auto")   # (deepcopy of torchao's NF4 tensors re-quantizes with its defaults)
    stacking.compile_pieces(dense, "default", backend=counter)
    dense(x)
    twin = copy.deepcopy(dense)                                         # copies regroup, eagerly
    twin(x)
    assert all(g.compiled is None for g in twin.leanlora_shared.groups)
    assert all(m.pieces is not None for m in twin.modules() if isinstance(m, AdaptedLinear))
    torch._dynamo.reset()


def test_a_failing_compiler_for_the_pieces_falls_back_to_eager():
    def broken(gm, example_inputs):
        raise RuntimeError("PassManager::run failed")

    x = token_batch()
    model = _model(POINTS[0], "auto")
    torch._dynamo.reset()
    stacking.compile_pieces(model, "default", backend=broken)
    with pytest.warns(RuntimeWarning, match="compiling the grouped adapter pieces failed"):
        model(x, labels=x).loss.backward()
    assert all(m.pieces is not None for m in model.modules() if isinstance(m, AdaptedLinear))
    assert all(g.compiled is None for g in model.leanlora_shared.groups)
    torch._dynamo.reset()


def test_cuda_graph_mode_leaves_the_pieces_to_the_layers():
    x = token_batch()
    model = _model(POINTS[0], "auto")
    stacking.compile_pieces(model, "reduce-overhead", backend="eager")
    model(x)
    assert all(m.pieces is None for m in model.modules() if isinstance(m, AdaptedLinear))
    stacking.compile_pieces(model, None)
    model(x)
    assert all(m.pieces is not None for m in model.modules() if isinstance(m, AdaptedLinear))



@pytest.mark.parametrize("point", POINTS[:3], ids=["-".join(p) for p in POINTS[:3]])
def test_on_a_bf16_base_the_group_hands_out_bf16_pieces_with_the_layers_values(point, monkeypatch):
    if point[3] == "nf4":
        pytest.importorskip("torchao")
    monkeypatch.setattr(hc, "sample", _fixed_noise)
    x = token_batch()
    per_layer, grouped = _model(point, "never", dtype=torch.bfloat16), _model(point, "always", dtype=torch.bfloat16)
    loss_ref, ref = _loss_and_grads(per_layer, x)
    loss, got = _loss_and_grads(grouped, x)
    layers = [m for m in grouped.modules() if isinstance(m, AdaptedLinear)]
    assert all(m.pieces[0].dtype == m.pieces[1].dtype == torch.bfloat16 for m in layers)
    assert all(m.pieces[2] is None or m.pieces[2].dtype == torch.bfloat16 for m in layers)
    torch.testing.assert_close(loss, loss_ref, rtol=2e-2, atol=1e-3)
    assert got.keys() == ref.keys()
    for name in ref:  # fp32 master gradients; the bf16 products round the same way in both paths
        assert got[name].dtype == ref[name].dtype
        torch.testing.assert_close(got[name], ref[name], rtol=2e-2, atol=1e-3, msg=name)


def test_an_fp32_base_keeps_fp32_pieces():
    model = _model(POINTS[0], "always")
    _loss_and_grads(model, token_batch())
    assert all(m.pieces[0].dtype == torch.float32 for m in model.modules() if isinstance(m, AdaptedLinear))
    assert stacking.activation_dtype(next(m for m in model.modules() if isinstance(m, AdaptedLinear))) is None


def test_a_base_cast_to_another_dtype_casts_the_pieces_to_it():
    model = _model(POINTS[0], "always")
    _loss_and_grads(model, token_batch())
    model.zero_grad()
    model.to(torch.bfloat16)  # same Parameter objects, new data: the strategies' tensors keep their ids
    model.leanlora_shared.groups.float()  # the adapter's master weights back to fp32, as leanlora builds them
    _loss_and_grads(model, token_batch())
    assert all(m.pieces[0].dtype == torch.bfloat16 for m in model.modules() if isinstance(m, AdaptedLinear))


def _accumulated(model, x, zero_in_place=False):
    _loss_and_grads(model, x)
    if zero_in_place:
        model.zero_grad(set_to_none=False)
        _loss_and_grads(model, x)
    _loss_and_grads(model, x)  # a second micro-batch: gradients add up
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("zero_in_place", [False, True])
def test_gradients_accumulate_over_micro_batches_as_layer_by_layer(zero_in_place, monkeypatch):
    monkeypatch.setattr(hc, "sample", _fixed_noise)
    x = token_batch()
    ref = _accumulated(_model(POINTS[0], "never"), x, zero_in_place)
    got = _accumulated(_model(POINTS[0], "always"), x, zero_in_place)
    assert got.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)




def test_groups_are_the_layers_of_one_shape_and_hold_every_trainable_tensor():
    model = _model(POINTS[0], "auto", layers=3)
    groups = model.leanlora_shared.groups
    leaves = sorted(tuple(sorted({m.name.rsplit(".", 1)[-1] for m in g.members})) for g in groups)
    # q and o are 64 -> 64, k and v 64 -> 32, gate and up 64 -> 128, down 128 -> 64
    assert leaves == [("down_proj",), ("gate_proj", "up_proj"), ("k_proj", "v_proj"), ("o_proj", "q_proj")]
    assert sorted(len(g.members) for g in groups) == [3, 6, 6, 6]
    layers = [m for m in model.modules() if isinstance(m, AdaptedLinear)]
    assert not any(p.requires_grad for layer in layers for p in layer.parameters())
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    # B-LoRA: A, B, rank gates, E, and the bit gates and range of A, B and E: 10 stacks per group
    assert len(trained) == 10 * len(groups) and all(n.startswith("leanlora_shared.groups.") for n in trained)
    layer = groups[1].members[2]
    stack = groups[1].factors.lora_A
    assert layer.factors.lora_A.shape == stack.shape[1:]
    assert layer.factors.lora_A.data_ptr() == stack[2].data_ptr()      # a row of the stack, not a copy


def test_the_state_dict_stays_per_module_and_loads_into_the_rows():
    model = _model(POINTS[0], "auto")
    layer = model.leanlora_shared.groups[0].members[1]
    state = layer.state_dict()
    assert {"factors.lora_A", "factors.lora_B", "ranks.log_alpha", "ranks.E", "quant_a.log_alpha",
            "quant_a.log_scale", "ranks.quant_e.log_scale"} <= set(state)
    assert not any(k.startswith("leanlora_shared.groups") for k in model.state_dict())
    state["factors.lora_A"] = torch.full_like(state["factors.lora_A"], 0.25)
    layer.load_state_dict(state)
    assert torch.equal(model.leanlora_shared.groups[0].factors.lora_A[1], state["factors.lora_A"])
    del state["ranks.E"]
    result = layer.load_state_dict(state, strict=False)
    assert result.missing_keys == ["ranks.E"]
    with pytest.raises(RuntimeError, match="size mismatch for factors.lora_B"):
        layer.load_state_dict({**state, "factors.lora_B": torch.zeros(3, 3)}, strict=False)


def test_a_row_cannot_be_replaced_while_grouped_and_pruning_takes_the_layer_out():
    x = token_batch()
    model = _model(POINTS[0], "auto")
    layer = model.leanlora_shared.groups[0].members[0]
    with pytest.raises(AttributeError, match="row of its group's stacked parameter"):
        layer.factors.lora_A = torch.nn.Parameter(torch.zeros(4, 64))
    before = layer.delta_weight()
    layer.prune_(4)                                   # the full rank: the update is unchanged
    assert layer.group is None and model.leanlora_shared.groups[0].members[0] is None
    assert isinstance(layer.factors.lora_A, torch.nn.Parameter)
    torch.testing.assert_close(layer.delta_weight(), before)
    (model(x, labels=x).loss + leanlora.regularizer(model)).backward()
    assert layer.pieces is None and layer.factors.lora_A.grad is not None
    assert model.leanlora_shared.groups[0].members[1].pieces is not None


def test_the_regularizer_of_the_stacks_equals_the_sum_of_every_layers_own_prior():
    model = _model(POINTS[0], "auto")
    got = leanlora.regularizer(model)
    want = sum(m.prior() for layer in model.modules() if isinstance(layer, AdaptedLinear)
               for m in layer.modules() if m is not layer and hasattr(m, "prior_terms"))
    torch.testing.assert_close(got, model.leanlora_shared.config.prior.lmbda * want)


def test_a_copy_trains_on_stacks_of_its_own():
    x = token_batch()
    model = _model(POINTS[0], "auto")
    twin = copy.deepcopy(model)
    _loss_and_grads(twin, x)
    assert all(p.grad is None for p in model.parameters())
    row = twin.leanlora_shared.groups[0].members[0].factors.lora_A
    assert row.data_ptr() == twin.leanlora_shared.groups[0].factors.lora_A.data_ptr()


def test_optimizer_state_of_per_layer_parameters_is_refused_by_name(tmp_path):
    from leanlora.train.checkpoint import CheckpointError, _check_layout

    model = _model(POINTS[0], "auto")
    from leanlora.optim import adamw

    optimizer = adamw(leanlora.param_groups(model, 1e-3), lr=1e-3)
    per_layer = {"param_groups": [{"params": list(range(10 * 14))}], "state": {}}  # ten tensors a layer
    with pytest.raises(CheckpointError, match="holds 140 tensors, this run trains 40.*one stacked tensor per group"):
        _check_layout(tmp_path, per_layer, optimizer)
    _check_layout(tmp_path, optimizer.state_dict(), optimizer)  # this version's own state passes


@pytest.mark.parametrize("point, warned", [(POINTS[0], True), (POINTS[-1], False)])
def test_reentrant_checkpointing_says_once_why_it_is_slower(point, warned):
    """Re-entrant checkpointing falls back to per-layer pieces: a gated adapter is told once how to
    keep the grouped path; LoRA, whose pieces are its stacks, is not told anything."""
    import warnings

    x = token_batch()
    model = _model(point, "auto")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            model(x, labels=x).loss.backward()
    said = [w for w in caught if "re-entrant gradient checkpointing" in str(w.message)]
    assert len(said) == (1 if warned else 0)
    if warned:
        assert "use_reentrant': False" in str(said[0].message)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(x, labels=x).loss.backward()
    assert not [w for w in caught if "re-entrant" in str(w.message)]
