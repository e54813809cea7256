"""Causal-LM loss without logits (leanlora.train.fused_loss): the chunked path against the plain
loss in float64, the hidden-state and label plumbing, the choice of implementation, and (on CUDA
with liger-kernel) Liger's kernel against the plain loss, eager and with compiled layers."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F

import leanlora
from leanlora.config import ConfigError
from leanlora.train.fused_loss import causal_lm_loss, choose, chunked_linear_cross_entropy, configure
from leanlora.train.runconfig import TrainConfig
from leanlora.train.tasks import CausalLMTask
from conftest import randomize_adapters, tiny_llama, token_batch

ALL_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CPU = torch.device("cpu")


def _grads(*tensors):
    out = [t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    return out


@pytest.mark.parametrize("chunk", [1, 8, 1000])
def test_chunked_loss_and_gradients_equal_the_plain_loss_in_float64(chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(50, 16, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(50, generator=g, dtype=torch.float64).requires_grad_()
    y = torch.randint(0, 50, (37,), generator=g)
    y[::3] = -100
    fused = chunked_linear_cross_entropy(h, w, b, y, chunk=chunk)
    (2.5 * fused).backward()                    # an upstream gradient other than 1
    got = _grads(h, w, b)
    plain = F.cross_entropy(F.linear(h, w, b), y, ignore_index=-100)
    (2.5 * plain).backward()
    want = _grads(h, w, b)
    torch.testing.assert_close(fused, plain, rtol=1e-13, atol=0)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, None])
def test_compiled_chunk_equals_the_eager_chunk(grad_dtype):
    """On CUDA each chunk runs compiled (two fused passes over its logits); the maths is the eager one."""
    from leanlora.train.fused_loss import _chunk_terms

    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(24, 16, generator=g), torch.randn(50, 16, generator=g)
    y = torch.randint(0, 50, (24,), generator=g)
    y[::4] = -100
    torch._dynamo.reset()
    compiled = torch.compile(_chunk_terms, fullgraph=True, dynamic=False)
    loss, d = compiled(h, y, w, None, grad_dtype)
    loss_ref, d_ref = _chunk_terms(h, y, w, None, grad_dtype)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    if grad_dtype is None:
        assert d is None and d_ref is None
    else:
        assert d.dtype == grad_dtype
        torch.testing.assert_close(d, d_ref)
        assert (d[::4] == 0).all()                                  # unlabelled rows: no gradient
        softmax = torch.softmax(h @ w.T, -1)
        onehot = F.one_hot(torch.where(y < 0, 0, y), 50) * (y >= 0)[:, None]
        torch.testing.assert_close(d.float(), (softmax - onehot) * (y >= 0)[:, None],
                                   rtol=1e-2 if grad_dtype == torch.bfloat16 else 1e-5, atol=1e-3)
    torch._dynamo.reset()


def test_chunked_loss_with_a_frozen_weight_and_no_labelled_token():
    h = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(10, 8, dtype=torch.float64)
    chunked_linear_cross_entropy(h, w, None, torch.tensor([1, 2, -100, 3, 4, 5])).backward()
    assert w.grad is None and h.grad is not None and torch.isfinite(h.grad).all()
    none = chunked_linear_cross_entropy(h, w, None, torch.full((6,), -100))
    assert torch.isnan(none) and torch.isnan(F.cross_entropy(h @ w.T, torch.full((6,), -100)))


def _lm_batch():
    ids = token_batch(batch=3, seq=10)
    labels = ids.clone()
    labels[:, :4] = -100                        # the prompt is not scored
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0                             # a padded row
    labels[2, 7:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("axes", [{}, {"ranks": "gated", "precision": "learned", "vectorize": "always"}],
                         ids=["lora", "blora-grouped"])
def test_hidden_state_path_gives_the_plain_task_loss_and_adapter_gradients(axes):
    """The task's plain loss (logits, shift, ignore -100) and the chunked path through the body and
    lm_head weight agree to float64 rounding, loss and every adapter gradient. The grouped pieces
    (a forward pre-hook of the root, which calling the body skips) are computed all the same."""
    model = tiny_llama().double()
    leanlora.inject(model, leanlora.AdapterConfig(target_modules=ALL_PROJ, r=4, **axes))
    randomize_adapters(model)
    model.train()
    layer = model.model.layers[0].mlp.up_proj
    task = object.__new__(CausalLMTask)         # the loss needs no data or tokenizer
    params = [p for _, p in leanlora.trainable_parameters(model)]
    batch = _lm_batch()
    results = {}
    for how in ("off", "chunked"):
        task.fused_loss = how
        torch.manual_seed(0)                    # the same gate noise in both
        loss = task.loss(model, batch) + leanlora.regularizer(model)
        assert layer.pieces is not None                      # every design point groups its pieces
        loss.backward()
        results[how] = (loss.detach(), _grads(*params))
    torch.testing.assert_close(results["chunked"][0], results["off"][0], rtol=1e-12, atol=0)
    for a, e in zip(results["chunked"][1], results["off"][1]):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-14)
    assert any(g.abs().sum() > 0 for g in results["off"][1])


def test_which_implementation_runs():
    model = tiny_llama()
    assert choose("auto", model, CPU) == "off"                 # no CUDA: the plain loss
    cuda = torch.device("cuda")                                 # only compared, never allocated on
    assert choose("auto", model, cuda, cuda_graph=True) == "chunked"   # capturable, unlike Liger
    assert choose("auto", model, cuda, cuda_graph=True, distributed="ddp") == "off"
    assert choose("chunked", model, CPU) == "chunked"
    assert choose("off", model, CPU) == "off"
    with pytest.raises(ConfigError, match=r"fused_loss='liger' cannot run: liger needs a CUDA device"):
        choose("liger", model, CPU)
    with pytest.raises(ConfigError, match=r"train.distributed='ddp'"):
        choose("chunked", model, CPU, distributed="ddp")
    with pytest.raises(ConfigError, match=r"allowed 'auto', 'liger', 'chunked', 'off'"):
        choose("on", model, CPU)
    adapted_head = tiny_llama()
    leanlora.inject(adapted_head, leanlora.AdapterConfig(target_modules=("lm_head",), r=4))
    assert choose("auto", adapted_head, CPU) == "off"
    with pytest.raises(ConfigError, match="output layer is AdaptedLinear"):
        choose("chunked", adapted_head, CPU)
    capped = tiny_llama()
    capped.config.final_logit_softcapping = 30.0
    with pytest.raises(ConfigError, match="final_logit_softcapping=30.0"):
        choose("chunked", capped, CPU)
    with pytest.raises(ConfigError, match="causal_lm only"):
        configure(object(), "chunked", model, CPU)
    with pytest.raises(ConfigError, match="train.fused_loss='fast' is invalid"):
        TrainConfig(fused_loss="fast")


def test_a_training_run_with_the_chunked_loss_logs_the_plain_losses(tmp_path):
    from leanlora.cli import main
    from train_fixtures import tiny_llama_dir, write_addition_jsonl

    model_dir = tiny_llama_dir(tmp_path)
    train_file = write_addition_jsonl(tmp_path / "add" / "train.jsonl", 8, seed=0)
    losses = {}
    for how in ("off", "chunked"):
        out = tmp_path / how
        args = ["train", "--out", str(out), "--no-progress", f"model.path={model_dir}", "data.task=causal_lm",
                f"data.train_file={train_file}", "data.eval_file=", "data.prompt_template={question}",
                "data.response_column=answer", "data.max_length=32", "adapter.target_modules=[q_proj, v_proj]",
                "adapter.modules_to_save=[]", "adapter.r=4", "train.max_steps=3", "train.batch_size=8",
                "train.lr=5e-2", "train.num_threads=1", "train.device=cpu", f"train.fused_loss={how}"]
        assert main(args) == 0
        losses[how] = json.loads((out / "metrics.json").read_text())["train_losses"]
    assert len(losses["off"]) == 3
    torch.testing.assert_close(torch.tensor(losses["chunked"]), torch.tensor(losses["off"]), rtol=1e-5, atol=1e-6)


GPU = torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None


@pytest.mark.skipif(not GPU, reason="needs CUDA and liger-kernel")
@pytest.mark.parametrize("compiled", [False, True])
def test_liger_loss_and_gradients_match_the_plain_loss_on_cuda(compiled):
    """bf16 model: Liger against the plain loss (logits in bf16, CE in fp32). Its loss agrees to
    bf16 rounding of the logits; the gradients of the hidden states and of all adapter tensors
    together within 2% of their norm (each tensor within 10%). ``compiled``: each decoder layer
    compiled (the training loop's default), the loss outside them as the loop runs it."""
    from leanlora.train.compiled import CompiledRegions

    cuda = torch.device("cuda")
    model = tiny_llama(vocab_size=4096, hidden_size=256, intermediate_size=512).to(cuda, torch.bfloat16)
    leanlora.inject(model, leanlora.AdapterConfig(target_modules=ALL_PROJ, r=8, base="fp8"))
    randomize_adapters(model)
    model.train()
    if compiled:
        CompiledRegions(model)
    assert choose("auto", model, cuda) == "liger"
    task = object.__new__(CausalLMTask)
    batch = {k: v.to(cuda) for k, v in _lm_batch().items()}
    batch["input_ids"] = batch["input_ids"] * 31 % 4096
    params = [p for _, p in leanlora.trainable_parameters(model)]
    hidden = {}

    def keep_hidden(module, inputs, output):  # the lm_head input, its gradient kept
        output.retain_grad()
        hidden["h"] = output

    model.model.norm.register_forward_hook(keep_hidden)
    results = {}
    for how in ("off", "liger"):
        task.fused_loss = how
        loss = task.loss(model, batch)
        loss.backward()
        results[how] = (loss.detach().float(), hidden["h"].grad.float(), [g.float() for g in _grads(*params)])
    (loss_l, h_l, g_l), (loss_p, h_p, g_p) = results["liger"], results["off"]
    torch.testing.assert_close(loss_l, loss_p, rtol=1e-2, atol=1e-2)
    assert float((h_l - h_p).norm() / h_p.norm()) < 0.02
    flat_l, flat_p = torch.cat([g.flatten() for g in g_l]), torch.cat([g.flatten() for g in g_p])
    assert float((flat_l - flat_p).norm() / flat_p.norm()) < 0.02      # all adapter gradients together
    for a, e in zip(g_l, g_p):                                        # and each within bf16 backprop noise
        assert float((a - e).norm()) <= 0.1 * float(e.norm()) + 1e-6


@pytest.mark.skipif(not GPU, reason="needs CUDA and liger-kernel")
def test_liger_loss_under_torch_compile_gives_the_eager_values():
    """torch.compile of the fused loss itself (Liger reads the token count back: a graph break, not a failure)."""
    from leanlora.train.fused_loss import liger_linear_cross_entropy

    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    w = torch.randn(4096, 256, device="cuda", dtype=torch.bfloat16, generator=g) * 0.05
    y = torch.randint(0, 4096, (512,), device="cuda", generator=g)
    y[:100] = -100
    eager = liger_linear_cross_entropy(h, w, None, y)
    eager.backward()
    grad = _grads(h)[0]
    compiled = torch.compile(liger_linear_cross_entropy)(h, w, None, y)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(h.grad, grad, rtol=2e-2, atol=1e-3)
    chunked = chunked_linear_cross_entropy(h.detach().float(), w.float(), None, y)
    torch.testing.assert_close(eager.float(), chunked, rtol=1e-2, atol=1e-2)
