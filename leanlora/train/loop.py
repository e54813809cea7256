"""One plain PyTorch training loop for every adapter method.

Per optimizer step::

    leanlora.advance(model, step)                      # nested-rank sample, gate temperature
    for each micro-batch:  loss = task_loss + leanlora.regularizer(model);  (loss / n_micro).backward()
    clip_grad_norm_;  AdamW(leanlora.param_groups(...)).step();  scheduler.step()
    every log_every steps: a record of loss, lr, grad norm, rank, bits and cost (step_log), to report_to

The forward runs under train.precision's autocast (precision.py; fp16 with a gradient scaler), the
schedule is transformers' (lr_schedule.py), the trackers are tracking.py's.

The data order of epoch e is a permutation seeded by (train.seed, e), so the batches of any
step are known without replaying the run; with the RNG states in the checkpoint this makes a
resumed CPU run bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

import leanlora
from leanlora import budget
from leanlora import distributed as dist
from leanlora.train.compiled import CompiledRegions, shape_advice, wants_compile
from leanlora.config import ConfigError
from leanlora.artifact.io import atomic_write_bytes, read_adapter_tensors
from leanlora.optim import adamw
from leanlora.train.checkpoint import clean_leftovers, latest_checkpoint, load_checkpoint, save_checkpoint
from leanlora.train.finite import FiniteGuard, TrainingDiverged, advice
from leanlora.train.fused_loss import configure as configure_fused_loss
from leanlora.train.head import require_saved_head
from leanlora.train.lr_schedule import advance_schedule, build_scheduler
from leanlora.train.guard import stall_warning, task_verdict
from leanlora.train.models import load_model, load_tokenizer
from leanlora.train.precision import check_trainable_dtype, optimizer_step, resolve_precision
from leanlora.train.resume import check_total, resume_config, retune
from leanlora.train.preflight import check_adapter
from leanlora.train.runconfig import RunConfig, to_commented_yaml
from leanlora.train.step_log import last_logged_step, step_record, tracked
from leanlora.train.tasks import batches, build_task
from leanlora.train.tracking import open_trackers, resolve_backends
from leanlora.train.whole_step import graphed_training_step

RUN_CONFIG = "run.yaml"


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


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order of the ``n`` training examples in ``epoch``: a permutation seeded by (seed, epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def load_for_run(run: RunConfig, need_train: bool = True, sources: dict[str, Any] | None = None):
    """(model on its device, tokenizer, task) for ``run``, before any adapter is injected.
    ``sources`` hands over data in Python (see :func:`leanlora.train.tasks.build_task`)."""
    tokenizer = load_tokenizer(run.model)
    task = build_task(run.data, tokenizer, need_train=need_train, sources=sources)
    model = load_model(run.model, run.data.task, task.num_labels, tokenizer)
    return model.to(resolve_device(run.train.device)), tokenizer, task


def _better(metric: str, new: float, old: float | None) -> bool:
    if old is None:
        return True
    return new < old if metric == "loss" else new > old


def train(run: RunConfig | None, run_dir: str | Path, *, resume: bool = False, progress: bool = True,
          log=print, overrides: Sequence[str] = (), sources: dict[str, Any] | None = None) -> TrainResult:
    """Train ``run`` into ``run_dir`` (or continue the run saved there with ``resume=True``, with
    ``overrides`` of the settings :data:`leanlora.train.resume.RESUMABLE`).

    ``run_dir`` receives ``run.yaml``, ``checkpoints/``, ``best/`` (the best adapter so far),
    ``adapter/`` (the final adapter: the best one when there is an eval set) and ``metrics.json``.
    ``sources={"train_file": dataset, "eval_file": dataset}`` trains on ``datasets.Dataset`` objects
    (or lists of dicts) instead of the files of ``run.data``; a resume needs them again.
    """
    run_dir = Path(run_dir)
    if not dist.is_main_process():
        log = lambda *args, **kwargs: None  # noqa: E731  (rank 0 speaks for the run)
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if resume:
        if not (run_dir / RUN_CONFIG).is_file():
            raise ConfigError(f"--resume {run_dir}: no {RUN_CONFIG} there; is it a leanlora run folder?")
        if dist.is_main_process():  # the one process that writes the run folder
            clean_leftovers(run_dir)  # temporary files of a write that a kill interrupted
        run = resume_config(run_dir / RUN_CONFIG, overrides)
    elif latest_checkpoint(run_dir) is not None:
        raise ConfigError(f"{run_dir} already holds a run with checkpoints; continue it with --resume {run_dir} "
                          "or choose another --out folder")
    assert run is not None
    tc = run.train
    backends = resolve_backends(tc.report_to) if dist.is_main_process() else []  # refused before loading
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
    precision = resolve_precision(tc, device, log)
    check_adapter(run)  # a pattern that matches nothing fails here, before weights and data load
    model, tokenizer, task = load_for_run(run, sources=sources)
    run = run.replace(data=task.resolved_config())
    if not resume and dist.is_main_process():
        atomic_write_bytes(run_dir / RUN_CONFIG, to_commented_yaml(run).encode())
    budget.check_run(run.adapter.budget, tc.distributed, tc.cuda_graph)
    leanlora.inject(model, run.adapter)
    require_saved_head(model, run.adapter, run.data.task)  # after inject: a modules_to_save typo is named there
    model.train()
    dist.sync_rank_sampler(model)              # the same nested rank b on every rank in a step
    wrapped = dist.wrap(model, tc.distributed)  # DDP wrapper, or the model itself sharded by FSDP2
    fused = configure_fused_loss(task, tc.fused_loss, model, device, distributed=tc.distributed,
                                 cuda_graph=tc.cuda_graph)
    if fused != "off":
        log(f"causal-LM loss: fused linear cross-entropy ({fused}), no logits tensor")
    if dist.is_distributed():
        torch.manual_seed(dist.rank_seed(tc.seed))  # same init everywhere; gate noise differs per rank

    n = len(task.train)
    micro_per_epoch = math.ceil(n / tc.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / tc.grad_accum)
    total = tc.max_steps or tc.epochs * steps_per_epoch
    # the budget's schedule is in fractions of the run; "auto" steps aside where it cannot run
    budget.start(model, total, auto=budget.supported(tc.distributed, tc.cuda_graph))
    if budget.resolved(run.adapter) is not None and budget.controller(model) is None:
        log(f"adapter.budget=auto: no budget with train.distributed={tc.distributed!r} / cuda_graph={tc.cuda_graph}; "
            "the gates follow their prior alone")
    optimizer = adamw(leanlora.param_groups(model, tc.lr, tc.weight_decay), lr=tc.lr)
    check_trainable_dtype(precision, optimizer)
    scheduler = build_scheduler(optimizer, tc, total, log)
    # compiled per decoder layer on CUDA by default; the first step falls back to eager if inductor fails
    compiled = CompiledRegions(model, log=log, mode=tc.compile_mode) if wants_compile(tc.compile, device) else None
    advice = shape_advice(tc.compile_mode, run.data.pad_to_multiple_of, run.data.max_length) if compiled else None
    if advice:
        log(advice)
    # the prior of grouped layers comes with their pieces (leanlora.speed.vectorize, compiled with them);
    # the rest stays eager: stacked model-wide (leanlora.gates.priors) it is a dozen kernels, and
    # compiling it would cost a graph as large as the model's gate count for nothing
    prior = dist.regularizer
    autocast, scaler = precision.autocast(), precision.grad_scaler()

    step = 0
    loop_state = {"best_step": None, "best_score": None, "best_metrics": {}, "history": [], "train_losses": [],
                  "log_history": []}
    if checkpoint is not None:
        base_lrs = list(scheduler.base_lrs)  # this run's, before the checkpoint's replace them
        restored = load_checkpoint(checkpoint, model, optimizer, scheduler)
        retune(optimizer, scheduler, base_lrs)  # a changed train.lr or schedule reaches the restored step
        step, loop_state = restored["step"], {"log_history": [], **restored["loop"]}
        check_total(total, step)
        if scaler is not None and "grad_scaler" in loop_state:
            scaler.load_state_dict(loop_state["grad_scaler"])
        if dist.is_distributed():  # every rank restored rank 0's generator: split the noise again
            torch.manual_seed(dist.rank_seed(tc.seed + step))
        log(f"resumed {run_dir} at step {step} of {total}" + (f" with {' '.join(overrides)}" if overrides else ""))
    if resume and overrides and dist.is_main_process():  # run.yaml: the settings now in effect
        atomic_write_bytes(run_dir / RUN_CONFIG, to_commented_yaml(run).encode())
    # after the checkpoint: the graph's warm-up steps must see the restored optimizer state
    guard = FiniteGuard(model.named_parameters(), device)  # no NaN/inf weight is evaluated or saved
    graphed = graphed_training_step(wrapped, task, optimizer, prior, autocast, tc.max_grad_norm, log,
                                    after_update=guard.update) if tc.cuda_graph else None
    result = TrainResult(run_dir=run_dir, steps=step, history=list(loop_state["history"]))
    trackers = open_trackers(backends, run_dir, resumed_at=step, model=model)
    metric = task.metric

    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=step, disable=not progress or not dist.is_main_process(), desc="train",
               dynamic_ncols=True, file=sys.stderr)
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
                (loss / len(micro) if scaler is None else scaler.scale(loss / len(micro))).backward()
                step_loss += loss.detach().float() / len(micro)
            value = guard.fold(step_loss).item()  # NaN too when the last update broke a weight
            if dist.all_reduce_mean(float(math.isfinite(value))) < 1.0:  # every rank stops together
                bar.close()
                guard.raise_if_tripped(step, run_dir, tc.lr)
                raise _diverged(value, step, epoch, run_dir, tc.lr, updated=False)
            return value

        def graphed_step() -> float:
            """The same step, optimizer included, as one CUDA-graph replay (train.cuda_graph: one
            micro-batch per step, one process)."""
            nonlocal grad_norm
            out = graphed(micro_batch(k))  # [loss, grad norm], read after the replay: the update has run
            value, grad_norm = float(guard.fold(out[0])), out[1]
            if not math.isfinite(value):
                bar.close()
                guard.raise_if_tripped(step + 1, run_dir, tc.lr)
                raise _diverged(value, step, epoch, run_dir, tc.lr, updated=True)
            return value

        end_of_epoch = (step + 1) % steps_per_epoch == 0
        evaluate = bool(task.eval) and ((tc.eval_every and (step + 1) % tc.eval_every == 0)
                                        or (not tc.eval_every and end_of_epoch) or step + 1 == total)
        logging = (step + 1) % tc.log_every == 0 or evaluate or step + 1 == total
        grad_norm = None
        run_step = forward_backward if graphed is None else graphed_step
        if compiled is not None:
            compiled.begin_step()
            step_loss = compiled.run_step(run_step, lambda: optimizer.zero_grad(set_to_none=True))
        else:
            step_loss = run_step()
        if graphed is None:
            step_loss = dist.all_reduce_mean(step_loss)
            grad_norm = optimizer_step(optimizer, scaler, tc.max_grad_norm, want_norm=logging,
                                       after_update=guard.update)
        advance_schedule(scheduler)
        result.step_seconds.append(time.perf_counter() - started)
        step += 1
        result.losses.append(step_loss)
        loop_state["train_losses"].append(step_loss)
        bar.update(1)

        if logging:
            with dist.full_params(wrapped) as plain:
                logged = step_record(step, loop_state["train_losses"], last_logged_step(loop_state["log_history"]),
                                     optimizer, grad_norm, plain, scaler)
            loop_state["log_history"].append(logged)
            for tracker in trackers:
                tracker.log(tracked(logged), step)
            bar.set_postfix(loss=f"{logged['loss']:.4f}", score=_fmt(loop_state["best_score"]),
                            rank=f"{logged['leanlora/rank']:.2f}", bits=f"{logged['leanlora/bits']:.1f}",
                            **budget.postfix({k[len("leanlora/"):]: v for k, v in logged.items()
                                              if k.startswith("leanlora/")}), refresh=False)
        save = (tc.save_every and step % tc.save_every == 0) or (not tc.save_every and evaluate) or step == total
        if evaluate or save:
            guard.raise_if_tripped(step, run_dir, tc.lr)
        if evaluate:
            scores = task.evaluate(model, tc.eval_batch_size, device, precision.autocast())
            with dist.full_params(wrapped) as plain:
                record = {"step": step, "epoch": step / steps_per_epoch, **scores, **leanlora.gate_summary(plain)}
            loop_state["history"].append(record)
            result.history.append(record)
            # with a budget, only the final structure may become the adapter
            if budget.structure_ready(model) and _better(metric, scores[metric], loop_state["best_score"]):
                loop_state.update(best_step=step, best_score=scores[metric], best_metrics=scores)
                dist.save_adapter(wrapped, run_dir / "best")
            bar.set_postfix(loss=f"{step_loss:.4f}", score=_fmt(scores[metric]), rank=f"{record['rank']:.2f}",
                            bits=f"{record['bits']:.1f}", **budget.postfix(record), refresh=True)
            log(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in scores.items()))
            for tracker in trackers:
                tracker.log({f"eval_{k}": float(v) for k, v in scores.items()}, step)
        if save:
            if scaler is not None:
                loop_state["grad_scaler"] = scaler.state_dict()
            save_checkpoint(run_dir, step, model, optimizer, scheduler, loop_state)
    bar.close()
    for tracker in trackers:
        tracker.close()

    result.steps = step
    result.best_step, result.best_metrics = loop_state["best_step"], loop_state["best_metrics"]
    if loop_state["best_step"] is not None:
        _load_adapter_tensors(model, run_dir / "best")
    dist.save_adapter(wrapped, run_dir / "adapter")
    with dist.full_params(wrapped) as plain:
        cost = budget.cost_summary(plain)
    summary = {"steps": step, "best_step": result.best_step, "best_metrics": result.best_metrics,
               "metric": metric, "cost": cost, "history": loop_state["history"],
               "train_losses": loop_state["train_losses"], "log_history": loop_state["log_history"]}
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


def _diverged(value: float, step: int, epoch: int, run_dir: Path, lr: float, updated: bool) -> TrainingDiverged:
    return TrainingDiverged(
        f"loss is {value} at step {step + 1} (epoch {epoch + 1}); training stopped"
        + (" (the captured step had already applied its update to the weights in memory)" if updated else "")
        + ". " + advice(run_dir, lr))


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _load_adapter_tensors(model: nn.Module, directory: Path) -> None:
    dist.load_adapter_state(model, read_adapter_tensors(directory))  # whole tensors, or this rank's shard


def cost_table(model: nn.Module) -> str:
    """The adapter's cost table (``leanlora.cost_report``), or a one-line note when it is unavailable."""
    report = getattr(leanlora, "cost_report", None)
    if report is None:
        try:
            from leanlora.reports.cost import cost_report as report  # type: ignore[no-redef]
        except ImportError:
            return "(cost report skipped: leanlora.cost_report is not available in this install)"
    return report(model).format_table()
