"""The compiled training path: regional compile of decoder layers, and the eager fallback."""

from __future__ import annotations

import re

import pytest
import torch

import leanlora
from leanlora.targets import repeated_blocks
from leanlora.train.compiled import CompiledRegions, shape_advice, wants_compile
from conftest import tiny_llama, token_batch


def _blora():
    model = tiny_llama()
    leanlora.inject(model, leanlora.AdapterConfig(target_modules=("q_proj", "v_proj", "down_proj"), r=4,
                                                  ranks="gated", precision="learned"))
    return model.train()


def _step(model, x):
    def run():
        loss = model(x, labels=x).loss + leanlora.regularizer(model)
        loss.backward()
        return float(loss.detach())
    return run


def test_auto_compiles_on_cuda_only():
    assert wants_compile("auto", torch.device("cuda")) and not wants_compile("auto", torch.device("cpu"))
    assert wants_compile(True, torch.device("cpu")) and not wants_compile(False, torch.device("cuda"))
    with pytest.raises(ValueError, match="train.compile='yes' is invalid"):
        wants_compile("yes", torch.device("cpu"))


def test_regions_are_the_decoder_layers():
    model = _blora()
    assert [type(m).__name__ for m in repeated_blocks(model)] == ["LlamaDecoderLayer"] * 2


def test_compiled_step_equals_eager_step():
    x = token_batch()
    torch.manual_seed(0)
    eager = _blora()
    torch.manual_seed(1)
    want = _step(eager, x)()
    torch.manual_seed(0)
    model = _blora()
    regions = CompiledRegions(model, backend="aot_eager", log=lambda *a: None)
    torch.manual_seed(1)
    got = regions.run_step(_step(model, x), lambda: model.zero_grad(set_to_none=True))
    assert regions.compiled and got == pytest.approx(want, rel=1e-6)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for n, p in eager.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-7)


def test_a_compiler_failure_falls_back_to_eager_once_and_says_why():
    def broken_backend(gm, example_inputs):
        raise RuntimeError("PassManager::run failed")  # what Triton raised on the H100

    x = token_batch()
    torch._dynamo.reset()  # graphs cached by earlier tests for these layers would never reach the backend
    torch.manual_seed(0)
    model = _blora()
    said = []
    regions = CompiledRegions(model, backend=broken_backend, log=said.append)
    torch.manual_seed(1)
    with pytest.warns(RuntimeWarning) as record:
        loss = regions.run_step(_step(model, x), lambda: model.zero_grad(set_to_none=True))
    said_by_warnings = " | ".join(str(w.message) for w in record)
    assert re.search("torch.compile failed.*PassManager::run failed.*continues eagerly", said_by_warnings)
    # the grouped adapter pieces go to the same compiler, fail first and say so too
    assert re.search("grouped adapter pieces failed.*PassManager::run failed.*computed eagerly", said_by_warnings)
    assert not regions.compiled and len(said) == 1 and loss == loss
    assert all(getattr(m, "_compiled_call_impl", None) is None for m in repeated_blocks(model))
    # the gradients are those of one eager step, not of a failed half-step plus a retry (the
    # retry starts from the random state the failed attempt started from: same gate noise)
    torch.manual_seed(0)
    eager = _blora()
    torch.manual_seed(1)
    assert _step(eager, x)() == loss
    ref = {n: p.grad for n, p in eager.named_parameters() if p.grad is not None}
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == ref.keys() and all(torch.equal(got[n], ref[n]) for n in ref)


def test_errors_of_the_model_itself_are_not_swallowed():
    model = _blora()
    regions = CompiledRegions(model, backend="eager", log=lambda *a: None)

    def bad_step():
        raise ValueError("a bug in the task, not the compiler")

    with pytest.raises(ValueError, match="a bug in the task"):
        regions.run_step(bad_step, lambda: None)


def test_cuda_graph_mode_is_passed_to_inductor_and_needs_it():
    # On the CPU inductor skips CUDA graphs and compiles as usual, so the mode's plumbing (mode
    # reaches torch.compile, the step marker is harmless) is testable here; its speed is not.
    x = token_batch()
    torch.manual_seed(0)
    eager = tiny_llama().train()
    leanlora.inject(eager, leanlora.AdapterConfig(target_modules=("q_proj", "v_proj"), r=4))
    want = _step(eager, x)()
    torch.manual_seed(0)
    model = tiny_llama().train()
    leanlora.inject(model, leanlora.AdapterConfig(target_modules=("q_proj", "v_proj"), r=4))
    regions = CompiledRegions(model, log=lambda *a: None, mode="reduce-overhead")
    regions.begin_step()
    got = regions.run_step(_step(model, x), lambda: model.zero_grad(set_to_none=True))
    assert regions.compiled and regions.mode == "reduce-overhead" and got == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="compile mode 'reduce-overhead' needs the inductor backend"):
        CompiledRegions(tiny_llama(), backend="aot_eager", mode="reduce-overhead")


def test_cuda_graph_runs_without_padding_to_a_multiple_are_told_how_many_shapes_to_expect():
    note = shape_advice("reduce-overhead", 0, 128)
    assert "one CUDA graph per batch shape" in note and "up to 128 lengths" in note
    assert "data.pad_to_multiple_of=32 leaves 4 shapes" in note
    assert shape_advice("reduce-overhead", 32, 128) is None and shape_advice("default", 0, 128) is None


def test_compiled_layer_adds_the_update_outside_the_gemm():
    """Compiled, the update is a plain add that inductor fuses into the next pointwise kernel: an
    addmm would first copy the base output into its own and run a GEMM that reads it back."""
    model = tiny_llama().to(torch.bfloat16)
    leanlora.inject(model, leanlora.AdapterConfig(target_modules=("q_proj",), r=4))
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 3, layer.in_features, dtype=torch.bfloat16)
    calls = []

    def record(gm, example_inputs):
        calls.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    got = torch.compile(layer, backend=record, fullgraph=True)(x)
    torch.testing.assert_close(got, layer(x), rtol=1e-2, atol=1e-2)  # bf16: one rounding apart
    assert calls and not any("addmm" in c for c in calls), calls


def test_activation_budget_is_in_force_while_the_layers_compile_and_nowhere_else():
    from torch._functorch import config as functorch_config

    from leanlora.config import ConfigError
    from leanlora.train.runconfig import TrainConfig

    seen = []

    def backend(gm, example_inputs):  # dynamo calls its backend when it compiles a layer, inside the step
        seen.append(functorch_config.activation_memory_budget)
        return gm.forward

    before = functorch_config.activation_memory_budget
    model = _blora()
    regions = CompiledRegions(model, backend=backend, log=lambda *a: None, activation_budget=0.6)
    regions.run_step(_step(model, token_batch()), lambda: model.zero_grad(set_to_none=True))
    assert seen and set(seen) == {0.6}
    assert functorch_config.activation_memory_budget == before
    with pytest.raises(ValueError, match=r"activation_budget=0 is invalid: allowed \(0, 1\]"):
        CompiledRegions(tiny_llama(), activation_budget=0)
    assert TrainConfig().activation_budget < 1.0  # on by default wherever layers compile
    with pytest.raises(ConfigError, match="train.activation_budget"):
        TrainConfig(activation_budget=1.5)
