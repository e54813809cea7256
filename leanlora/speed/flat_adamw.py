"""AdamW whose moments live in one flat tensor per bucket of parameters.

B-LoRA holds ten parameter tensors per adapted module, most of them a handful of values, five
times as many as LoRA. torch's AdamW, fused or not, walks its tensors one by one in Python at
every step (state lookup, lists, a step counter per tensor), so its host time grows with the
number of tensors, not with their size, and a small adapter's step can be paced by it. Here the
tensors of one param group, device and dtype form a bucket with one flat first moment, one flat
second moment and one step counter. A step copies the bucket's parameters and gradients into flat
buffers (one foreach copy each), runs torch's own AdamW (``torch.optim.adamw.adamw``, fused on
CUDA) on the flat tensors and copies the parameters back: host work per bucket, not per tensor.
The model's parameters are not touched otherwise: no storage is shared,
nothing in the model's layout changes, and hyperparameters are read from ``param_groups`` at every
step, so learning-rate schedulers, gradient clipping and ``GradScaler`` work as with torch's.

The update is torch's AdamW, value for value. A step where some tensors of a bucket have no
gradient updates only the others, each with its own step count, as torch does; from then on the
bucket's counts differ and it steps tensor by tensor (correct, not fast). The state dict is in
torch.optim.AdamW's per-tensor layout, both ways: a checkpoint of either optimizer loads into the
other (one process, FlatAdamW; FSDP2's sharded parameters, torch's AdamW).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Iterable

import torch
from torch.optim.adamw import adamw as adamw_update


def flattenable(p: torch.Tensor) -> bool:
    """A plain dense floating-point tensor (not a DTensor or other subclass): what a bucket can hold."""
    return type(p) in (torch.Tensor, torch.nn.Parameter) and p.is_floating_point() and not p.is_sparse


class _Bucket:
    """The parameters of one group on one device in one dtype, and the flat buffers they step in."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.params = params
        self.numels = [p.numel() for p in params]
        first = params[0]
        self.flat_param = torch.empty(sum(self.numels), dtype=first.dtype, device=first.device)
        self.flat_grad = torch.empty_like(self.flat_param)
        self.param_views = self.shaped(self.flat_param)
        self.grad_views = self.shaped(self.flat_grad)

    def shaped(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of ``flat`` shaped like the bucket's parameters, in order."""
        return [v.view(p.shape) for v, p in zip(flat.split(self.numels), self.params)]


class FlatAdamW(torch.optim.Optimizer):
    """torch's AdamW (no amsgrad, no maximize) over flat buckets; see the module docstring."""

    def __init__(self, params: Iterable, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, fused: bool | None = None) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        for group in self.param_groups:
            for p in group["params"]:
                if not flattenable(p):
                    raise ValueError(f"FlatAdamW: a parameter of type {type(p).__name__}, dtype {p.dtype} cannot be "
                                     "flattened; allowed: plain dense floating-point tensors (use torch.optim.AdamW)")
        self.fused = fused
        self._buckets: list[list[_Bucket]] | None = None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._buckets = None  # the buckets follow the groups

    # --- buckets and their state -------------------------------------------------------------

    def buckets(self) -> list[list[_Bucket]]:
        """Per param group, its buckets (first appearance order of each device and dtype)."""
        if self._buckets is None:
            self._buckets = []
            for group in self.param_groups:
                by_kind: dict[tuple, list[torch.Tensor]] = {}
                for p in group["params"]:
                    by_kind.setdefault((p.device, p.dtype), []).append(p)
                self._buckets.append([_Bucket(ps) for ps in by_kind.values()])
        return self._buckets

    def _state_of(self, bucket: _Bucket) -> dict[str, Any]:
        state = self.state[bucket.params[0]]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(bucket.flat_param)
            state["exp_avg_sq"] = torch.zeros_like(bucket.flat_param)
            state["step"] = self._step_tensor(0.0, bucket.flat_param.device)
            state["member_steps"] = [0] * len(bucket.params)
        return state

    def _uses_fused(self, device: torch.device) -> bool:
        return device.type == "cuda" if self.fused is None else self.fused

    def _step_tensor(self, value: float, device: torch.device) -> torch.Tensor:
        # the fused kernel reads its step counters on the device; the foreach path wants them on the CPU
        return torch.tensor(value, dtype=torch.float32, device=device if self._uses_fused(device) else "cpu")

    # --- the step ----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, buckets in zip(self.param_groups, self.buckets()):
            for bucket in buckets:
                self._step_bucket(group, bucket)
        return loss

    def _step_bucket(self, group: dict[str, Any], bucket: _Bucket) -> None:
        grads = [p.grad for p in bucket.params]
        have = [g is not None for g in grads]
        if not any(have):
            return
        state = self._state_of(bucket)
        counts = state["member_steps"]
        beta1, beta2 = group["betas"]
        hyper = dict(amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
                     eps=group["eps"], maximize=False)
        device = bucket.flat_param.device
        if all(have) and counts.count(counts[0]) == len(counts):
            torch._foreach_copy_(bucket.param_views, bucket.params)
            torch._foreach_copy_(bucket.grad_views, grads)
            fused = self._uses_fused(device)
            adamw_update([bucket.flat_param], [bucket.flat_grad], [state["exp_avg"]], [state["exp_avg_sq"]], [],
                         [state["step"]], fused=fused, foreach=None if fused else False, **hyper)
            torch._foreach_copy_(bucket.params, bucket.param_views)
            state["member_steps"] = [c + 1 for c in counts]
            return
        # some tensors lack a gradient now, or did at an earlier step: tensor by tensor, own counts
        counts = state["member_steps"] = _member_counts(state)
        index = [i for i, h in enumerate(have) if h]
        moments = bucket.shaped(state["exp_avg"]), bucket.shaped(state["exp_avg_sq"])
        steps = [torch.tensor(float(counts[i])) for i in index]  # the single-tensor path reads them on the CPU
        adamw_update([bucket.params[i] for i in index], [grads[i] for i in index], [moments[0][i] for i in index],
                     [moments[1][i] for i in index], [], steps, foreach=False, **hyper)
        for i in index:
            counts[i] += 1
        state["step"] = self._step_tensor(max(counts), device)

    # --- state dict ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch.optim.AdamW's layout (one entry per tensor that has stepped), so that a checkpoint
        loads into either optimizer: one process steps flat buckets, FSDP2's sharded parameters
        step with torch's AdamW. The moments are copies (safetensors refuses tensors that share
        storage)."""
        flat_state = self.state
        per_tensor: dict[torch.Tensor, dict[str, Any]] = {}
        for buckets in self.buckets():
            for bucket in buckets:
                state = flat_state.get(bucket.params[0], {})
                if "exp_avg" not in state:
                    continue
                moments = zip(bucket.shaped(state["exp_avg"]), bucket.shaped(state["exp_avg_sq"]))
                for p, (m, v), count in zip(bucket.params, moments, _member_counts(state)):
                    if count:  # a tensor that never had a gradient has no state in torch's AdamW either
                        per_tensor[p] = {"step": torch.tensor(float(count)), "exp_avg": m.clone(),
                                         "exp_avg_sq": v.clone()}
        self.state = per_tensor
        try:
            return super().state_dict()
        finally:
            self.state = flat_state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of :meth:`state_dict`'s (torch.optim.AdamW's) layout; the moments are flattened."""
        super().load_state_dict(state_dict)
        per_tensor = self.state
        self.state = defaultdict(dict)
        for group_index, buckets in enumerate(self.buckets()):
            for bucket in buckets:
                saved = [per_tensor.get(p, {}) for p in bucket.params]
                if not any("exp_avg" in s for s in saved):
                    continue  # this bucket never stepped
                for p, s in zip(bucket.params, saved):
                    for key in ("exp_avg", "exp_avg_sq"):
                        if key in s and s[key].numel() != p.numel():
                            raise ValueError(
                                f"FlatAdamW: the loaded {key} of a tensor of param group {group_index} holds "
                                f"{s[key].numel()} values; the parameter has {p.numel()} (shape {tuple(p.shape)})")
                flat = {key: torch.cat([s[key].reshape(-1).to(bucket.flat_param) if key in s
                                        else bucket.flat_param.new_zeros(p.numel())
                                        for p, s in zip(bucket.params, saved)])
                        for key in ("exp_avg", "exp_avg_sq")}
                counts = [int(float(s.get("step", 0))) for s in saved]
                self.state[bucket.params[0]] = dict(flat, member_steps=counts,
                                                    step=self._step_tensor(max(counts), bucket.flat_param.device))


def _member_counts(state: dict[str, Any]) -> list[int]:
    """Each member's step count. While they agree the device counter is the truth: a step replayed
    from a CUDA graph (leanlora.train.step_graph) advances it without running this module's Python."""
    counts = state["member_steps"]
    if counts and counts.count(counts[0]) == len(counts):
        return [int(state["step"].item())] * len(counts)
    return counts
