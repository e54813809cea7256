"""Adapter pieces computed per group of layers (one vmap) equal the pieces computed layer by layer."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch

import leanlora
from leanlora.gates import hardconcrete as hc
from leanlora.speed import vectorize
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
]


def _config(factors, ranks, precision, base, vectorize_mode):
    return leanlora.AdapterConfig(
        target_modules=TARGETS, r=4, alpha=8, factors=factors, ranks=ranks, precision=precision, base=base,
        bank=leanlora.BankConfig(num_vectors=16, vector_length=16, topk=2),
        nf4=leanlora.NF4Config(block_size=32, scaler_block_size=32), vectorize=vectorize_mode)


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


def test_groups_are_the_layers_of_one_shape():
    model = _model(POINTS[0], "auto", layers=3)
    layers = [m for m in model.modules() if isinstance(m, AdaptedLinear)]
    found = vectorize.groups(layers, "auto")
    leaves = sorted(tuple(sorted({m.name.rsplit(".", 1)[-1] for m in g})) for g in found)
    # q and o are 64 -> 64, k and v 64 -> 32, gate and up 64 -> 128, down 128 -> 64
    assert leaves == [("down_proj",), ("gate_proj", "up_proj"), ("k_proj", "v_proj"), ("o_proj", "q_proj")]
    assert sorted(len(g) for g in found) == [3, 6, 6, 6]


def test_plain_lora_is_left_alone_in_auto_and_batched_when_asked():
    x = token_batch()
    for mode, expect in (("auto", False), ("always", True)):
        model = _model(("dense", "fixed", "float", "dense"), mode)
        model(x)
        assert all((m.pieces is not None) == expect for m in model.modules() if isinstance(m, AdaptedLinear))


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
    model.gradient_checkpointing_enable()
    model(x, labels=x).loss.backward()
    assert all(m.pieces is None for m in layers)


def test_a_layer_group_vmap_cannot_batch_warns_once_and_runs_layer_by_layer(monkeypatch):
    x = token_batch()
    model = _model(POINTS[0], "auto")

    def refuse(*args, **kwargs):
        raise RuntimeError("no batching rule for this op")

    monkeypatch.setattr(torch.func, "vmap", lambda fn, **kw: refuse)
    with pytest.warns(RuntimeWarning, match="could not be computed together.*no batching rule"):
        model(x, labels=x).loss.backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x, labels=x).loss.backward()   # said once per group, not per step
    assert all(m.pieces is None for m in model.modules() if isinstance(m, AdaptedLinear))


def test_regrouping_follows_pruning_and_the_hook_goes_with_unload():
    x = token_batch()
    model = _model(POINTS[0], "auto")
    model(x, labels=x).loss.backward()
    first = next(m for m in model.modules() if isinstance(m, AdaptedLinear))
    first.prune_(2)                               # now unlike its group: computes its own
    model(x, labels=x).loss.backward()
    assert first.pieces is None
    others = [m for m in model.modules() if isinstance(m, AdaptedLinear) and m is not first]
    assert all(m.pieces is not None for m in others)
    twin = copy.deepcopy(model)
    twin(x)
    assert all(m.pieces is not None for m in twin.modules() if isinstance(m, AdaptedLinear) and m.name != first.name)
    leanlora.unload(model)
    assert not model._forward_pre_hooks


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


def test_config_rejects_an_unknown_mode():
    with pytest.raises(leanlora.ConfigError, match="vectorize.*'auto', 'always', 'never'"):
        dataclasses.replace(leanlora.AdapterConfig(), vectorize="sometimes")


def test_compiled_grouped_pieces_equal_eager_ones_and_compile_once(monkeypatch):
    import torch._dynamo.testing

    monkeypatch.setattr(hc, "sample", _fixed_noise)
    x = token_batch()
    _, ref = _loss_and_grads(_model(POINTS[1], "auto"), x)
    model = _model(POINTS[1], "auto")
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    vectorize.compile_pieces(model, "default", backend=counter)
    _, got = _loss_and_grads(model, x)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)
    frames = counter.frame_count
    assert frames == len(model.leanlora_shared.vectorizer._groups) == 4   # one graph per group
    for step in range(2):
        model.zero_grad()
        _loss_and_grads(model, x)
    assert counter.frame_count == frames                                # and none per step
    dense = _model(POINTS[0], "auto")   # (deepcopy of torchao's NF4 tensors re-quantizes with its defaults)
    vectorize.compile_pieces(dense, "default", backend=counter)
    dense(x)
    twin = copy.deepcopy(dense)                                         # copies regroup, eagerly
    twin(x)
    assert twin.leanlora_shared.vectorizer.batched is vectorize.batched_lowrank
    assert all(m.pieces is not None for m in twin.modules() if isinstance(m, AdaptedLinear))
    torch._dynamo.reset()


def test_a_failing_compiler_for_the_pieces_falls_back_to_eager_vmap():
    def broken(gm, example_inputs):
        raise RuntimeError("PassManager::run failed")

    x = token_batch()
    model = _model(POINTS[0], "auto")
    torch._dynamo.reset()
    vectorize.compile_pieces(model, "default", backend=broken)
    with pytest.warns(RuntimeWarning, match="compiling the grouped adapter pieces failed"):
        model(x, labels=x).loss.backward()
    assert all(m.pieces is not None for m in model.modules() if isinstance(m, AdaptedLinear))
    assert model.leanlora_shared.vectorizer.batched is vectorize.batched_lowrank
    torch._dynamo.reset()


def test_cuda_graph_mode_leaves_the_pieces_to_the_layers():
    x = token_batch()
    model = _model(POINTS[0], "auto")
    vectorize.compile_pieces(model, "reduce-overhead", backend="eager")
    model(x)
    assert all(m.pieces is None for m in model.modules() if isinstance(m, AdaptedLinear))
    vectorize.compile_pieces(model, None)
    model(x)
    assert all(m.pieces is not None for m in model.modules() if isinstance(m, AdaptedLinear))



def test_a_model_with_nothing_to_group_gets_no_hook():
    assert not _model(("dense", "nested", "float", "dense"), "auto")._forward_pre_hooks
    assert _model(("dense", "nested", "float", "dense"), "always")._forward_pre_hooks
    assert _model(POINTS[0], "auto")._forward_pre_hooks


def _gated_modules(model):
    from leanlora.gates.schedule import HasPrior, implements

    return {id(m) for m in model.modules() if implements(m, HasPrior)}


def test_the_forward_evaluates_the_grouped_priors_and_the_backward_spends_them(monkeypatch):
    monkeypatch.setattr(hc, "sample", _fixed_noise)
    x = token_batch()
    model = _model(POINTS[0], "auto")
    vectorizer = model.leanlora_shared.vectorizer
    loss = model(x, labels=x).loss
    terms, covered = vectorizer.prior_for(model)
    assert len(terms) == 4 and covered == _gated_modules(model)   # 4 groups: every gate covered
    with OpCount() as after_forward:
        prior = leanlora.regularizer(model)
    vectorizer.pending_prior = None                               # as if evaluated module by module
    with OpCount() as module_by_module:
        reference = leanlora.regularizer(model)
    torch.testing.assert_close(prior, reference, rtol=1e-5, atol=1e-7)
    assert after_forward.n < module_by_module.n / 3, (after_forward.n, module_by_module.n)
    model(x, labels=x)                                            # a new forward: pending again
    loss = model(x, labels=x).loss
    assert vectorizer.prior_for(model)[0]
    assert vectorizer.prior_for(model.model)[0] == []             # another module's call: its own walk
    (loss + leanlora.regularizer(model)).backward()
    assert vectorizer.prior_for(model)[0] == []                   # spent by the backward
    leanlora.regularizer(model).backward()                        # evaluated afresh: a graph of its own
    with torch.no_grad():
        model(x)
    assert vectorizer.prior_for(model)[0] == []


def test_a_replaced_strategy_module_is_read_from_the_next_forward():
    x = token_batch()
    model = _model(POINTS[0], "auto")
    model(x, labels=x).loss.backward()
    model.zero_grad()
    layer = next(m for m in model.modules() if isinstance(m, AdaptedLinear))
    old = layer.quant_a
    layer.quant_a = copy.deepcopy(old, {id(old.prior_scale): old.prior_scale})   # new tensors, same kind
    (model(x, labels=x).loss + leanlora.regularizer(model)).backward()
    assert layer.pieces is not None
    assert layer.quant_a.log_alpha.grad is not None and old.log_alpha.grad is None


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
    assert vectorize.activation_dtype(next(m for m in model.modules() if isinstance(m, AdaptedLinear))) is None


def test_a_base_cast_to_another_dtype_regroups():
    model = _model(POINTS[0], "always")
    _loss_and_grads(model, token_batch())
    model.zero_grad()
    model.to(torch.bfloat16)  # same Parameter objects, new data: the strategies' tensors keep their ids
    for m in model.modules():  # the adapter's master weights back to fp32, as leanlora builds them
        if isinstance(m, AdaptedLinear):
            for part in vectorize._PARTS:
                getattr(m, part).float()
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


def _leaves(tensor):
    """The leaf tensors the autograd graph of ``tensor`` accumulates into."""
    found, todo, seen = [], [tensor.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            found.append(node.variable)
        todo.extend(n for n, _ in node.next_functions)
    return found


def test_the_stacks_are_leaves_fed_by_a_hook_unless_torch_distributed_runs(monkeypatch):
    x = token_batch()
    model = _model(POINTS[0], "always")
    leanlora.advance(model, 0)
    model(x, labels=x)
    layer = next(m for m in model.modules() if isinstance(m, AdaptedLinear))
    params = {id(p) for p in model.parameters()}
    assert not any(id(t) in params for t in _leaves(layer.pieces[0]))  # the stacks, not the parameters

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)  # as under DDP
    model(x, labels=x)
    assert id(layer.factors.lora_A) in {id(t) for t in _leaves(layer.pieces[0])}  # DDP's hooks see each parameter
