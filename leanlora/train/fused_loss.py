"""Causal-LM cross-entropy without a logits tensor: the output layer and the loss in one step.

The plain loss builds logits (tokens × vocab) and their fp32 copy, then holds them for the
backward: at batch 8×1024 and a 32k vocabulary that is over 1 GiB each, more than anything
else in a LoRA step. A fused linear cross-entropy takes the final hidden states h (N, H) and
the output weight W (V, H) instead, and for each chunk of tokens computes

    loss_i = logsumexp(W h_i) - (W h_i)[y_i]          over tokens with y_i != -100
    dL/dh_i = (softmax(W h_i) - onehot(y_i)) W / n,   n = number of such tokens

at once, keeping only dL/dh (N, H) (and dL/dW when the output layer trains) for the backward.
The labels are shifted as in the plain loss (position t predicts token t+1).

``train.fused_loss`` picks the implementation:
  * ``liger``: Liger-Kernel's Triton kernel (arXiv:2410.10989; needs CUDA and ``liger-kernel``);
  * ``chunked``: the same computation in plain PyTorch, chunk by chunk, on any device (each
    chunk's log-sum-exp and gradient compiled on CUDA);
  * ``off``: the plain loss on ``model(...).logits``;
  * ``auto``: ``liger`` where it can run (CUDA, the package installed, one process, no
    whole-step CUDA graph: the kernel reads the token count back to the host); under a
    whole-step CUDA graph, ``chunked`` (its chunks compiled, it is faster than the plain loss
    there and can be captured); else ``off``.

Either fused path calls the model's body (``model.model`` for Llama) and the output layer's
weight directly, so it needs a plain ``nn.Linear`` output layer whose logits are used as they
are: not adapted, no logit soft-capping or scaling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from leanlora.config import ConfigError

MODES = ("auto", "liger", "chunked", "off")
IGNORE_INDEX = -100
# config fields of architectures that transform the output layer's logits before the loss
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _chunk_terms(hc: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 grad_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk: the sum of CE over its labelled tokens, and (unless ``grad_dtype`` is None)
    dCE/dlogits = softmax - onehot(y), zero on unlabelled rows, computed in fp32 (fp64 for fp64
    inputs) and returned in ``grad_dtype``.

    Functional (no in-place scatter), so that compiled it is two fused passes over the chunk's
    logits, as a hand-written kernel would make: the log-sum-exp, then the gradient."""
    acc = torch.float64 if hc.dtype == torch.float64 else torch.float32
    logits = F.linear(hc, weight, bias).to(acc)                                    # (c, V)
    valid = y != IGNORE_INDEX
    y_safe = torch.where(valid, y, 0)
    lse = torch.logsumexp(logits, dim=-1)                                          # (c,)
    picked = logits.gather(1, y_safe[:, None]).squeeze(1)
    loss = torch.where(valid, lse - picked, 0).sum()
    if grad_dtype is None:
        return loss, None
    onehot = torch.arange(logits.shape[1], device=y.device)[None, :] == y_safe[:, None]
    d = (torch.exp(logits - lse[:, None]) - onehot.to(acc)) * valid[:, None]       # (c, V)
    return loss, d.to(grad_dtype)


_compiled_chunk_terms = None


def _chunk_fn(device: torch.device):
    """:func:`_chunk_terms`, compiled on CUDA (built once; one graph per chunk shape), eager elsewhere."""
    global _compiled_chunk_terms
    if device.type != "cuda":
        return _chunk_terms
    if _compiled_chunk_terms is None:
        _compiled_chunk_terms = torch.compile(_chunk_terms, fullgraph=True, dynamic=False)
    return _compiled_chunk_terms


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (h W^T + b) against y; gradients computed in the forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, h, weight, bias, target, chunk):
        n_valid = (target != IGNORE_INDEX).sum()                       # () int: no host read
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32   # logits, sums, weight gradient
        total = torch.zeros((), device=h.device, dtype=acc)
        grad_h = torch.empty_like(h) if h.requires_grad else None
        grad_w = torch.zeros_like(weight, dtype=acc) if weight.requires_grad else None
        grad_b = torch.zeros_like(bias, dtype=acc) if bias is not None and bias.requires_grad else None
        terms = _chunk_fn(h.device)
        # dlogits in the weight's dtype when only h's gradient needs it (what its GEMM reads), else fp32
        grad_dtype = (None if grad_h is None and grad_w is None and grad_b is None
                      else weight.dtype if grad_w is None and grad_b is None else acc)
        for start in range(0, h.shape[0], chunk):
            hc, y = h[start:start + chunk], target[start:start + chunk]           # (c, H), (c,)
            loss, d = terms(hc, y, weight, bias, grad_dtype)
            total += loss
            if d is None:
                continue
            if grad_h is not None:
                grad_h[start:start + chunk] = (d.to(weight.dtype) @ weight).to(h.dtype)
            if grad_w is not None:
                grad_w += d.T @ hc.to(acc)
            if grad_b is not None:
                grad_b += d.sum(0)
        n = n_valid.to(acc)
        ctx.save_for_backward(*(g / n if g is not None else None for g in (grad_h, grad_w, grad_b)))
        ctx.dtypes = (h.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total / n          # 0/0 = NaN with no labelled token, as F.cross_entropy's mean

    @staticmethod
    def backward(ctx, grad_loss):
        grads = [None if g is None else (g * grad_loss).to(dtype) for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
        return (*grads, None, None)


def chunked_linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                 target: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Mean over labelled tokens of CE(h W^T + b, target): h (N, H), weight (V, H), target (N,) with
    -100 for ignored tokens; never holds more than ``chunk`` rows of logits (by default as many as
    make about 256 MiB of fp32 logits)."""
    return _ChunkedLinearCrossEntropy.apply(h, weight, bias, target, chunk or max(1, (1 << 26) // weight.shape[0]))


def liger_linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                               target: torch.Tensor) -> torch.Tensor:
    """The same loss through Liger-Kernel's fused Triton kernel."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy(h, weight, target, bias=bias, ignore_index=IGNORE_INDEX, reduction="mean")


def unsupported_head(model: nn.Module) -> str | None:
    """None when the model's loss can be taken from its body's hidden states and its output layer."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear:
        return (f"the output layer is {type(head).__name__}, not a plain nn.Linear "
                "(an adapted or quantized lm_head needs the plain loss)")
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if not isinstance(body, nn.Module) or body is model:
        return f"{type(model).__name__} has no body module under base_model_prefix to take hidden states from"
    config = getattr(model, "config", None)
    for key in _LOGIT_TRANSFORMS:
        if (value := getattr(config, key, None)) not in (None, 1, 1.0):
            return f"{type(model).__name__} transforms its logits ({key}={value}) before the loss"
    return None


def choose(mode: str, model: nn.Module, device: torch.device, *, distributed: str = "none",
           cuda_graph: bool = False) -> str:
    """The implementation ``train.fused_loss=mode`` gives on this model and device: liger, chunked or off.

    ``auto`` never fails (it falls back to off); an explicit choice that cannot run raises ConfigError."""
    if mode not in MODES:
        raise ConfigError(f"train.fused_loss={mode!r} is invalid: allowed {', '.join(map(repr, MODES))}")
    if mode == "off":
        return "off"
    reasons = []
    if distributed != "none":  # the fused path calls the body directly, around the DDP/FSDP2 wrapper
        reasons.append(f"train.distributed={distributed!r} (the fused loss runs in one process)")
    reasons.append(unsupported_head(model))
    if mode == "auto" and cuda_graph and device.type == "cuda":
        # Liger cannot be captured; the chunked loss can, and compiled it beats the plain loss
        return "off" if any(reasons) else "chunked"
    if mode in ("auto", "liger"):
        if device.type != "cuda":
            reasons.append(f"liger needs a CUDA device (this run is on {device.type})")
        elif cuda_graph:
            reasons.append("liger reads the token count back to the host, which train.cuda_graph cannot capture "
                           "(train.fused_loss='chunked' can)")
        else:
            try:
                import liger_kernel.transformers.functional  # noqa: F401  (imports triton)
            except Exception as err:  # ImportError, or triton failing to find a driver
                reasons.append(f"liger-kernel is not importable ({type(err).__name__}: {str(err)[:100]}); "
                               "pip install liger-kernel")
    reasons = [r for r in reasons if r]  # each check gives None when it passes
    if not reasons:
        return "liger" if mode == "auto" else mode
    if mode == "auto":
        return "off"
    raise ConfigError(f"train.fused_loss={mode!r} cannot run: {'; '.join(reasons)}; use 'auto' or 'off'")


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a causal LM's forward takes from a collated batch: every entry but the labels (ids, mask,
    and position_ids when the batch is packed)."""
    return {k: v for k, v in batch.items() if k != "labels"}


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], how: str) -> torch.Tensor:
    """Mean next-token cross-entropy of ``batch`` (labels -100 where not scored), with ``how``
    = liger or chunked: hidden states from the body, the output layer's weight, no logits tensor."""
    loss_fn = liger_linear_cross_entropy if how == "liger" else chunked_linear_cross_entropy
    body = getattr(model, model.base_model_prefix)
    head = model.get_output_embeddings()
    # calling the body directly skips the root's hooks: run leanlora's forward pre-hook of the adapted
    # model (the grouped adapter pieces, leanlora.groups.stacking) here
    for hook in list(model._forward_pre_hooks.values()):
        if getattr(hook, "__name__", "") == "refresh_pieces":  # leanlora's, or a profiler's wrapper of it
            hook(model, ())
    hidden = body(**model_inputs(batch))[0]  # (B, T, H)
    # position t predicts token t+1, as in the plain loss
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])                                 # (B·(T-1), H)
    return loss_fn(h, head.weight, head.bias, batch["labels"][:, 1:].reshape(-1))


def configure(task, mode: str, model: nn.Module, device: torch.device, *, distributed: str = "none",
              cuda_graph: bool = False) -> str:
    """Set ``task.fused_loss`` for a training run (after inject) and return it; a classification
    task keeps its own loss and accepts only auto or off."""
    if getattr(task, "fused_loss", None) is None:  # not a causal-LM task
        if mode not in ("auto", "off"):
            raise ConfigError(f"train.fused_loss={mode!r} applies to data.task=causal_lm only; use 'auto' or 'off'")
        return "off"
    task.fused_loss = choose(mode, model, device, distributed=distributed, cuda_graph=cuda_graph)
    return task.fused_loss
