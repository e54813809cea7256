"""One plain PyTorch training loop for every adapter method.

Per optimizer step::

    leanlora.advance(model, step)                      # nested-rank sample, gate temperature
    for each micro-batch:  loss = task_loss + leanlora.regularizer(model);  (loss / n_micro).backward()
    clip_grad_norm_;  AdamW(leanlora.param_groups(...)).step();  scheduler.step()

The data order of epoch e is a permutation seeded by (train.seed, e), so the batches of any
step are known without replaying the run; with the RNG states in the checkpoint this makes a
resumed CPU run bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import leanlora
from leanlora import distributed as dist
from leanlora.train.compiled import CompiledRegions, shape_advice, wants_compile
from leanlora.config import ConfigError
from leanlora.io import atomic_write_bytes, read_adapter_tensors
from leanlora.optim import adamw
from leanlora.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from leanlora.train.guard import stall_warning, task_verdict
from leanlora.train.models import load_model, load_tokenizer
from leanlora.train.runconfig import RunConfig, to_commented_yaml
from leanlora.train.tasks import batches, build_task
from leanlora.train.whole_step import graphed_training_step

RUN_CONFIG = "run.yaml"


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the message names the step and the last good checkpoint."""


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)       # mean training loss of each step run here
    step_seconds: list[float] = field(default_factory=list)  # wall time of each step run here (no eval)
    history: list[dict[str, Any]] = field(default_factory=list)   # every evaluation: step + metrics
    best_step: int | None = None
    best_metrics: dict[str, float] = field(default_factory=dict)
    model: nn.Module | None = None      # the trained model (final adapter loaded), for reports
    task: Any = None                    # the task (data, metric) it was trained and scored on
    verdict: Any = None                 # leanlora.train.guard.Verdict of the kept adapter, or None
    warning: str | None = None          # set when the verdict says the adapter did not learn


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available; use 'auto' or 'cpu'")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based)."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return max(0.0, 1.0 - progress)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order of the ``n`` training examples in ``epoch``: a permutation seeded by (seed, epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def load_for_run(run: RunConfig, need_train: bool = True):
    """(model on its device, tokenizer, task) for ``run``, before any adapter is injected."""
    tokenizer = load_tokenizer(run.model)
    task = build_task(run.data, tokenizer, need_train=need_train)
    model = load_model(run.model, run.data.task, task.num_labels, tokenizer)
    return model.to(resolve_device(run.train.device)), tokenizer, task


def _autocast(device: torch.device, bf16: bool):
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _better(metric: str, new: float, old: float | None) -> bool:
    if old is None:
        return True
    return new < old if metric == "loss" else new > old


def train(run: RunConfig | None, run_dir: str | Path, *, resume: bool = False, progress: bool = True,
          log=print) -> TrainResult:
    """Train ``run`` into ``run_dir`` (or continue the run saved there with ``resume=True``).

    ``run_dir`` receives ``run.yaml``, ``checkpoints/``, ``best/`` (the best adapter so far),
    ``adapter/`` (the final adapter: the best one when there is an eval set) and ``metrics.json``.
    """
    run_dir = Path(run_dir)
    if not dist.is_main_process():
        log = lambda *args, **kwargs: None  # noqa: E731  (rank 0 speaks for the run)
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if resume:
        if not (run_dir / RUN_CONFIG).is_file():
            raise ConfigError(f"--resume {run_dir}: no {RUN_CONFIG} there; is it a leanlora run folder?")
        from leanlora.train.runconfig import load_run_config

        run = load_run_config(run_dir / RUN_CONFIG)
    elif latest_checkpoint(run_dir) is not None:
        raise ConfigError(f"{run_dir} already holds a run with checkpoints; continue it with --resume {run_dir} "
                          "or choose another --out folder")
    assert run is not None
    tc = run.train
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    seed_everything(tc.seed)
    device = dist.init_run(tc.distributed, resolve_device(tc.device))  # cuda:LOCAL_RANK under torchrun
    if tc.cuda_graph:
        if device.type != "cuda":
            raise ConfigError(f"train.cuda_graph=true needs a CUDA device; this run's device is {device} "
                              "(train.device); set train.cuda_graph=false")
        if run.data.pad_to_multiple_of != run.data.max_length:
            # one batch shape, one graph: every batch padded to max_length
            run = run.replace(data=dataclasses.replace(run.data, pad_to_multiple_of=run.data.max_length))
            log(f"train.cuda_graph: batches are padded to data.max_length={run.data.max_length}, so that every "
                "full batch has one shape")
    model, tokenizer, task = load_for_run(run)
    run = run.replace(data=task.resolved_config())
    if not resume and dist.is_main_process():
        atomic_write_bytes(run_dir / RUN_CONFIG, to_commented_yaml(run).encode())
    leanlora.inject(model, run.adapter)
    model.train()
    dist.sync_rank_sampler(model)              # the same nested rank b on every rank in a step
    wrapped = dist.wrap(model, tc.distributed)  # DDP wrapper, or the model itself sharded by FSDP2
    if dist.is_distributed():
        torch.manual_seed(dist.rank_seed(tc.seed))  # same init everywhere; gate noise differs per rank

    n = len(task.train)
    micro_per_epoch = math.ceil(n / tc.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / tc.grad_accum)
    total = tc.max_steps or tc.epochs * steps_per_epoch
    warmup = math.ceil(tc.warmup_ratio * total)
    optimizer = adamw(leanlora.param_groups(model, tc.lr, tc.weight_decay), lr=tc.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, warmup, tc.schedule))
    # compiled per decoder layer on CUDA by default; the first step falls back to eager if inductor fails
    compiled = CompiledRegions(model, log=log, mode=tc.compile_mode) if wants_compile(tc.compile, device) else None
    advice = shape_advice(tc.compile_mode, run.data.pad_to_multiple_of, run.data.max_length) if compiled else None
    if advice:
        log(advice)
    # the prior of grouped layers comes with their pieces (leanlora.vectorize, compiled with them);
    # the rest stays eager: stacked model-wide (leanlora.priors) it is a dozen kernels, and
    # compiling it would cost a graph as large as the model's gate count for nothing
    prior = dist.regularizer
    autocast = _autocast(device, tc.bf16)

    step = 0
    loop_state = {"best_step": None, "best_score": None, "best_metrics": {}, "history": [], "train_losses": []}
    if checkpoint is not None:
        restored = load_checkpoint(checkpoint, model, optimizer, scheduler)
        step, loop_state = restored["step"], restored["loop"]
        if dist.is_distributed():  # every rank restored rank 0's generator: split the noise again
            torch.manual_seed(dist.rank_seed(tc.seed + step))
        log(f"resumed {run_dir} at step {step} of {total}")
    # after the checkpoint: the graph's warm-up steps must see the restored optimizer state
    graphed = graphed_training_step(wrapped, task, optimizer, prior, autocast, tc.max_grad_norm, log) \
        if tc.cuda_graph else None
    result = TrainResult(run_dir=run_dir, steps=step, history=list(loop_state["history"]))
    metric = task.metric

    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=step, disable=not progress or not dist.is_main_process(), desc="train",
               dynamic_ncols=True, file=sys.stderr)
    window: list[float] = []
    order_epoch, order = -1, []
    while step < total:
        started = time.perf_counter()
        epoch, k = divmod(step, steps_per_epoch)
        if epoch != order_epoch:  # drawn once per epoch: a permutation of a large set costs ms per step
            order_epoch = epoch
            order = epoch_order(n, tc.seed, epoch)
        micro = range(k * tc.grad_accum, min((k + 1) * tc.grad_accum, micro_per_epoch))
        leanlora.advance(model, step)

        def micro_batch(m: int) -> dict:
            idx = dist.shard(order[m * tc.batch_size:(m + 1) * tc.batch_size])  # this rank's share
            return next(batches(task.train, tc.batch_size, task.collate, device, idx))

        def forward_backward() -> float:
            """Forward and backward of every micro-batch of this optimizer step; the mean loss.

            The loss is read back once per step, after the last backward: reading it per
            micro-batch (or before its backward) makes the host wait for the GPU with the
            backward still to launch, which on a launch-bound model costs a large share of a step.
            A non-finite loss still stops the run before the optimizer touches the weights.
            """
            step_loss = torch.zeros((), device=device)
            for m in micro:
                batch = micro_batch(m)
                with autocast:
                    loss = task.loss(wrapped, batch) + prior(wrapped).to(device)
                (loss / len(micro)).backward()
                step_loss += loss.detach().float() / len(micro)
            value = step_loss.item()
            if dist.all_reduce_mean(float(math.isfinite(value))) < 1.0:  # every rank stops together
                bar.close()
                raise _diverged(value, step, epoch, run_dir, updated=False)
            return value

        def graphed_step() -> float:
            """The same step, optimizer included, as one CUDA-graph replay (train.cuda_graph: one
            micro-batch per step, one process)."""
            value = float(graphed(micro_batch(k)))  # read after the replay: the update has run
            if not math.isfinite(value):
                bar.close()
                raise _diverged(value, step, epoch, run_dir, updated=True)
            return value

        run_step = forward_backward if graphed is None else graphed_step
        if compiled is not None:
            compiled.begin_step()
            step_loss = compiled.run_step(run_step, lambda: optimizer.zero_grad(set_to_none=True))
        else:
            step_loss = run_step()
        if graphed is None:
            step_loss = dist.all_reduce_mean(step_loss)
            if tc.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                               tc.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        result.step_seconds.append(time.perf_counter() - started)
        step += 1
        result.losses.append(step_loss)
        loop_state["train_losses"].append(step_loss)
        window.append(step_loss)
        bar.update(1)

        end_of_epoch = step % steps_per_epoch == 0
        evaluate = bool(task.eval) and ((tc.eval_every and step % tc.eval_every == 0)
                                        or (not tc.eval_every and end_of_epoch) or step == total)
        if step % tc.log_every == 0 or evaluate or step == total:
            with dist.full_params(wrapped) as plain:
                gates = leanlora.gate_summary(plain)
            bar.set_postfix(loss=f"{sum(window) / len(window):.4f}", score=_fmt(loop_state["best_score"]),
                            rank=f"{gates['rank']:.2f}", bits=f"{gates['bits']:.1f}", refresh=False)
            window.clear()
        if evaluate:
            scores = task.evaluate(model, tc.eval_batch_size, device, _autocast(device, tc.bf16))
            with dist.full_params(wrapped) as plain:
                record = {"step": step, "epoch": step / steps_per_epoch, **scores, **leanlora.gate_summary(plain)}
            loop_state["history"].append(record)
            result.history.append(record)
            if _better(metric, scores[metric], loop_state["best_score"]):
                loop_state.update(best_step=step, best_score=scores[metric], best_metrics=scores)
                dist.save_adapter(wrapped, run_dir / "best")
            bar.set_postfix(loss=f"{step_loss:.4f}", score=_fmt(scores[metric]), rank=f"{record['rank']:.2f}",
                            bits=f"{record['bits']:.1f}", refresh=True)
            log(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in scores.items()))
        if (tc.save_every and step % tc.save_every == 0) or (not tc.save_every and evaluate) or step == total:
            save_checkpoint(run_dir, step, model, optimizer, scheduler, loop_state)
    bar.close()

    result.steps = step
    result.best_step, result.best_metrics = loop_state["best_step"], loop_state["best_metrics"]
    if loop_state["best_step"] is not None:
        _load_adapter_tensors(model, run_dir / "best")
    dist.save_adapter(wrapped, run_dir / "adapter")
    summary = {"steps": step, "best_step": result.best_step, "best_metrics": result.best_metrics,
               "metric": metric, "history": loop_state["history"], "train_losses": loop_state["train_losses"]}
    result.verdict = task_verdict(task, result.best_metrics)
    if result.verdict is not None:
        summary["constant_predictor"] = {"score": result.verdict.chance, "standard_error": result.verdict.standard_error,
                                         "stalled": result.verdict.stalled}
        if result.verdict.stalled:
            result.warning = stall_warning(result.verdict, run.adapter, step)
    if dist.is_main_process():
        atomic_write_bytes(run_dir / "metrics.json", json.dumps(summary, indent=2).encode())
    result.model, result.task = model, task
    return result


def _diverged(value: float, step: int, epoch: int, run_dir: Path, updated: bool) -> TrainingDiverged:
    last = latest_checkpoint(run_dir)
    return TrainingDiverged(
        f"loss is {value} at step {step + 1} (epoch {epoch + 1}); training stopped"
        + (" (the captured step had already applied its update to the weights in memory)" if updated else "")
        + ". " + (f"The last good checkpoint is {last} (resume with `leanlora train --resume {run_dir}` "
                  "after lowering train.lr)" if last else "No checkpoint was written before it."))


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _load_adapter_tensors(model: nn.Module, directory: Path) -> None:
    dist.load_adapter_state(model, read_adapter_tensors(directory))  # whole tensors, or this rank's shard


def cost_table(model: nn.Module) -> str:
    """The adapter's cost table (``leanlora.cost_report``), or a one-line note when it is unavailable."""
    report = getattr(leanlora, "cost_report", None)
    if report is None:
        try:
            from leanlora.cost import cost_report as report  # type: ignore[no-redef]
        except ImportError:
            return "(cost report skipped: leanlora.cost_report is not available in this install)"
    return report(model).format_table()
