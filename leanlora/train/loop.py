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

import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Sequence

import numpy as np
import torch
from torch import nn

import leanlora
from leanlora import budget, distributed as dist
from leanlora.train.compiled import CompiledRegions, shape_advice, wants_compile
from leanlora.config import ConfigError
from leanlora.artifact.io import RUN_ADAPTER, atomic_write_bytes, read_adapter_tensors
from leanlora.optim import adamw
from leanlora.train.checkpoint import clean_leftovers, latest_checkpoint, load_checkpoint, save_checkpoint
from leanlora.train.finite import FiniteGuard, TrainingDiverged, advice
from leanlora.train.fused_loss import configure as configure_fused_loss
from leanlora.train.head import require_saved_head
from leanlora.train.lr_schedule import advance_schedule, build_scheduler
from leanlora.train.guard import base_weights, short_run_notice, small_base_notice, stall_warning, task_verdict
from leanlora.train.models import load_model, load_tokenizer
from leanlora.train.precision import check_trainable_dtype, optimizer_step, resolve_precision
from leanlora.train.resume import resume_config, retune
from leanlora.train.preflight import check_adapter, check_max_length, skeleton
from leanlora.train.runconfig import RunConfig, to_commented_yaml
from leanlora.train.step_log import step_record
from leanlora.train.tasks import batches, build_task
from leanlora.train.tracking import open_trackers, resolve_backends
from leanlora.base.choice import float8_note
from leanlora.inject import shared_state
from leanlora.train.graph_choice import plan_step_graph
from leanlora.train.padded_attention import require_sdpa
from leanlora.train.whole_step import graphed_training_step

RUN_CONFIG = "run.yaml"


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)       # mean task loss of each step run here (no prior)
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
    run, checkpoint = _open_run_dir(run, run_dir, resume, overrides)
    backends = resolve_backends(run.train.report_to) if dist.is_main_process() else []  # refused before loading
    device = _start_processes(run)
    precision = resolve_precision(run.train, device, log)
    # refuses train.cuda_graph=true where it cannot run; before the data: it sets the padding
    run, graphed = plan_step_graph(run, device, precision.name, log)
    shape = skeleton(run)  # the model without weights: a mismatch fails here, before weights and data load
    check_adapter(run, shape)
    check_max_length(run, shape)
    model, _, task = load_for_run(run, sources=sources)
    graphed = graphed and _takes_a_graph(run, model, log)  # before the adapter: the fused loss follows it
    run = run.replace(data=task.resolved_config())
    if not resume and dist.is_main_process():
        atomic_write_bytes(run_dir / RUN_CONFIG, to_commented_yaml(run).encode())
    wrapped = _adapt(run, model, task, device, log, graphed)
    loop = _plan(run, run_dir, model, wrapped, task, device, precision, log)
    loop.capture = graphed
    if checkpoint is not None:
        _restore(loop, checkpoint, overrides)
    if resume and overrides and dist.is_main_process():  # run.yaml: the settings now in effect
        atomic_write_bytes(run_dir / RUN_CONFIG, to_commented_yaml(run).encode())
    _arm(loop, backends, progress)
    return _finish(loop, _run_steps(loop))


def _open_run_dir(run: RunConfig | None, run_dir: Path, resume: bool,
                  overrides: Sequence[str]) -> tuple[RunConfig, Path | None]:
    """(the run's config, the checkpoint to continue from or None); refuses a folder that holds a run."""
    if not resume:
        if latest_checkpoint(run_dir) is not None:
            raise ConfigError(f"{run_dir} already holds a run with checkpoints; continue it with --resume {run_dir} "
                              "or choose another --out folder")
        assert run is not None
        return run, None
    checkpoint = latest_checkpoint(run_dir)
    if not (run_dir / RUN_CONFIG).is_file():
        raise ConfigError(f"--resume {run_dir}: no {RUN_CONFIG} there; is it a leanlora run folder?")
    if dist.is_main_process():  # the one process that writes the run folder
        clean_leftovers(run_dir)  # temporary files of a write that a kill interrupted
    return resume_config(run_dir / RUN_CONFIG, overrides), checkpoint


def _start_processes(run: RunConfig) -> torch.device:
    """Threads, seeds and the process group; the device this process trains on."""
    tc = run.train
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    seed_everything(tc.seed)
    return dist.init_run(tc.distributed, resolve_device(tc.device))  # cuda:LOCAL_RANK under torchrun


def _takes_a_graph(run: RunConfig, model: nn.Module, log) -> bool:
    """Whether the loaded model can run a captured step; ``train.cuda_graph=true`` refuses one that cannot."""
    try:
        require_sdpa(model, "train.cuda_graph")
    except ConfigError as err:
        if run.train.cuda_graph is True:
            raise
        log(f"train.cuda_graph=auto: the step is not captured ({err})")
        return False
    return True


def _adapt(run: RunConfig, model: nn.Module, task, device: torch.device, log, graphed: bool) -> nn.Module:
    """Inject the adapter and hand the model to DDP/FSDP2; returns the model the steps call."""
    tc = run.train
    budget.check_run(run.adapter.budget, tc.distributed)
    leanlora.inject(model, run.adapter)
    require_saved_head(model, run.adapter, run.data.task)  # after inject: a modules_to_save typo is named there
    if note := float8_note(run.adapter, shared_state(model).config):
        log(note)
    model.train()
    dist.sync_rank_sampler(model)              # the same nested rank b on every rank in a step
    wrapped = dist.wrap(model, tc.distributed)  # DDP wrapper, or the model itself sharded by FSDP2
    fused = configure_fused_loss(task, tc.fused_loss, model, device, distributed=tc.distributed,
                                 cuda_graph=graphed)
    if fused != "off":
        log(f"causal-LM loss: fused linear cross-entropy ({fused}), no logits tensor")
    if dist.is_distributed():
        torch.manual_seed(dist.rank_seed(tc.seed))  # same init everywhere; gate noise differs per rank
    return wrapped


@dataclass
class _Loop:
    """What every step of one run reads and updates."""

    run: RunConfig
    run_dir: Path
    model: nn.Module
    wrapped: nn.Module          # what the steps call: the model, or its DDP wrapper
    task: Any
    device: torch.device
    log: Any
    micro_per_epoch: int        # micro-batches of an epoch (of len(task.train) examples)
    steps_per_epoch: int
    total: int                  # optimizer steps of the whole run
    optimizer: torch.optim.Optimizer
    scheduler: Any
    compiled: CompiledRegions | None
    autocast: Any               # train.precision's autocast (reusable), for training and evaluation
    scaler: Any
    step: int = 0
    state: dict[str, Any] = field(default_factory=lambda: {
        "best_step": None, "best_score": None, "best_metrics": {}, "history": [], "train_losses": [],
        "train_priors": [], "log_history": []})
    guard: FiniteGuard | None = None
    graphed: Any = None
    capture: bool = False       # the step runs as CUDA graphs (train.cuda_graph, leanlora.train.graph_choice)
    result: TrainResult | None = None
    trackers: list = field(default_factory=list)
    bar: Any = None


def _plan(run: RunConfig, run_dir: Path, model: nn.Module, wrapped: nn.Module, task, device: torch.device,
          precision, log) -> _Loop:
    """The run's length, the budget's schedule, the optimizer and its schedule, the compiled regions."""
    tc = run.train
    micro_per_epoch = math.ceil(len(task.train) / tc.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / tc.grad_accum)
    total = tc.max_steps or tc.epochs * steps_per_epoch
    # the budget's schedule is in fractions of the run; "auto" steps aside where it cannot run
    budget.start(model, total, auto=budget.supported(tc.distributed))
    if budget.resolved(run.adapter) is not None and budget.controller(model) is None:
        log(f"adapter.budget=auto: no budget with train.distributed={tc.distributed!r}; "
            "the gates follow their prior alone")
    if run.adapter.ranks == "nested" and tc.max_grad_norm <= 0:
        log("warning: train.max_grad_norm=0 with adapter.ranks=nested: steps that draw a small rank scale "
            "the update by alpha / b and can throw gradient spikes that stall a short run; "
            "train.max_grad_norm=1.0 (the default) clips them")
    # batch_size: all ranks together
    if notice := short_run_notice(run.adapter, total, tc.batch_size * tc.grad_accum):
        log(notice)
    if notice := small_base_notice(run.adapter, base_weights(model)):
        log(notice)
    for notice in task.notices:
        log(notice)
    groups = leanlora.param_groups(model, tc.lr, tc.weight_decay)
    check_trainable_dtype(precision, groups)
    optimizer = adamw(groups, lr=tc.lr)
    scheduler = build_scheduler(optimizer, tc, total, log)
    # compiled per decoder layer on CUDA by default; the first step falls back to eager if inductor fails
    compiled = CompiledRegions(model, log=log, mode=tc.compile_mode, activation_budget=tc.activation_budget) \
        if wants_compile(tc.compile, device) else None
    if compiled and (advice := shape_advice(tc.compile_mode, run.data.pad_to_multiple_of, run.data.max_length)):
        log(advice)
    # the prior (dist.regularizer: λ · Σ priors) stays eager: stated by group as stacked rows
    # (leanlora.gates.priors) it is a dozen kernels, and compiling it would cost a graph as large as the
    # model's gate count for nothing
    return _Loop(run, run_dir, model, wrapped, task, device, log, micro_per_epoch, steps_per_epoch, total,
                 optimizer, scheduler, compiled, autocast=precision.autocast(), scaler=precision.grad_scaler())


def _restore(loop: _Loop, checkpoint: Path, overrides: Sequence[str]) -> None:
    """Continue from ``checkpoint``: weights, optimizer, schedule, loop state and random streams."""
    base_lrs = list(loop.scheduler.base_lrs)  # this run's, before the checkpoint's replace them
    restored = load_checkpoint(checkpoint, loop.model, loop.optimizer, loop.scheduler)
    retune(loop.optimizer, loop.scheduler, base_lrs)  # a changed train.lr or schedule reaches the restored step
    loop.step, loop.state = restored["step"], {"log_history": [], **restored["loop"]}
    # a checkpoint written before priors were kept apart: its losses held them, so count them as 0
    loop.state.setdefault("train_priors", [0.0] * len(loop.state["train_losses"]))
    if loop.total < loop.step:  # the run's new length must not end before the step it resumes at
        raise ConfigError(f"train.max_steps / train.epochs give {loop.total} steps in all, but the run resumes at "
                          f"step {loop.step}; set train.max_steps >= {loop.step}")
    if loop.scaler is not None and "grad_scaler" in loop.state:
        loop.scaler.load_state_dict(loop.state["grad_scaler"])
    if dist.is_distributed():  # every rank restored rank 0's generator: split the noise again
        torch.manual_seed(dist.rank_seed(loop.run.train.seed + loop.step))
    loop.log(f"resumed {loop.run_dir} at step {loop.step} of {loop.total}"
             + (f" with {' '.join(overrides)}" if overrides else ""))


def _arm(loop: _Loop, backends: list[str], progress: bool) -> None:
    """The finite-weight guard, the captured step, the trackers and the progress bar."""
    from tqdm.auto import tqdm

    from leanlora.groups.stacking import row_names
    from leanlora.inject import shared_state

    # no NaN/inf weight is evaluated or saved; a stack's message names the layer whose row it is
    loop.guard = FiniteGuard(loop.model.named_parameters(), loop.device, row_names(shared_state(loop.model)))
    if loop.capture:  # after the checkpoint: the warm-up steps see the restored optimizer state
        loop.graphed = graphed_training_step(loop.wrapped, loop.task, loop.optimizer, dist.regularizer, loop.autocast,
                                             loop.run.train.max_grad_norm, loop.log, after_update=loop.guard.update)
    loop.result = TrainResult(run_dir=loop.run_dir, steps=loop.step, history=list(loop.state["history"]))
    loop.trackers = open_trackers(backends, loop.run_dir, resumed_at=loop.step, model=loop.model)
    loop.bar = tqdm(total=loop.total, initial=loop.step, disable=not progress or not dist.is_main_process(),
                    desc="train", dynamic_ncols=True, file=sys.stderr)


def _run_steps(loop: _Loop) -> int:
    """Every remaining optimizer step, with its logging, evaluation and checkpoint; the last step."""
    tc, step = loop.run.train, loop.step
    order_epoch, order = -1, []
    unread = None  # (step, loss) of the step before, its loss still on the device (see _train_step)
    while step < loop.total:
        started = time.perf_counter()
        epoch = step // loop.steps_per_epoch
        if epoch != order_epoch:  # drawn once per epoch: a permutation of a large set costs ms per step
            order_epoch, order = epoch, epoch_order(len(loop.task.train), tc.seed, epoch)
        _advance(loop, step)
        end_of_epoch = (step + 1) % loop.steps_per_epoch == 0
        evaluate = bool(loop.task.eval) and ((tc.eval_every and (step + 1) % tc.eval_every == 0)
                                             or (not tc.eval_every and end_of_epoch) or step + 1 == loop.total)
        logging = (step + 1) % tc.log_every == 0 or evaluate or step + 1 == loop.total
        step_loss, grad_norm = _train_step(loop, step, order, want_norm=logging)
        advance_schedule(loop.scheduler)
        loop.result.step_seconds.append(time.perf_counter() - started)
        if unread is not None:  # the last step's loss: the device finished it while this step was issued
            _settle(loop, *unread)
        unread = (step, step_loss)
        step += 1
        loop.bar.update(1)
        save = (tc.save_every and step % tc.save_every == 0) or (not tc.save_every and evaluate) or step == loop.total
        if logging or evaluate or save:  # what is logged, scored or saved has every loss read
            _settle(loop, *unread)
            unread = None
        if logging:
            _log_step(loop, step, grad_norm)
        if evaluate or save:
            loop.guard.raise_if_tripped(step, loop.run_dir, tc.lr)
        if evaluate:
            _evaluate(loop, step, loop.result.losses[-1])
        if save:
            if loop.scaler is not None:
                loop.state["grad_scaler"] = loop.scaler.state_dict()
            save_checkpoint(loop.run_dir, step, loop.model, loop.optimizer, loop.scheduler, loop.state)
    return step


def _advance(loop: _Loop, step: int) -> None:
    """The adapter's schedules to ``step`` (leanlora.advance); a captured step is captured again
    when the budget's freeze changed what it computes (pinned gates, no penalty)."""
    frozen = budget.frozen(loop.model)
    leanlora.advance(loop.model, step)
    if loop.graphed is not None and budget.frozen(loop.model) != frozen:
        loop.graphed.reset()
        # a pause a user would otherwise take for a hang: the layers compile again for pinned gates
        loop.log(f"step {step}: the budget fixed the adapter's structure; the step is compiled and captured "
                 "again for it (once)")


def _train_step(loop: _Loop, step: int, order: list[int], want_norm: bool) -> tuple[torch.Tensor | tuple, Any]:
    """One optimizer step over its micro-batches: ((mean task loss, mean prior) over every rank, gradient
    norm or None); the pair is a device tensor when it is to be read a step later, else numbers."""
    tc = loop.run.train
    k = step % loop.steps_per_epoch
    micro = range(k * tc.grad_accum, min((k + 1) * tc.grad_accum, loop.micro_per_epoch))
    grad_norm = None

    def micro_batch(m: int) -> dict:
        idx = dist.shard(order[m * tc.batch_size:(m + 1) * tc.batch_size])  # this rank's share
        return next(batches(loop.task.train, tc.batch_size, loop.task.collate, loop.device, idx))

    def forward_backward() -> torch.Tensor | tuple[float, float]:
        """Forward and backward of every micro-batch of this optimizer step; its task loss and prior,
        means over ranks.

        Nothing is read back per micro-batch: that would make the host wait for the GPU with the
        backward still to launch. Where the optimizer can skip an update on the device
        (:meth:`FiniteGuard.hold`), the loss stays there and is read a step later (:func:`_settle`), so
        the host issues the next step while the GPU finishes this one; else it is read here. Either way
        the update of a non-finite loss never lands.
        """
        step_loss = torch.zeros(2, device=loop.device)  # task loss, prior (λ·R, or the budget's penalty)
        for m in micro:
            batch = micro_batch(m)
            with loop.autocast:
                task_loss = loop.task.loss(loop.wrapped, batch)
                prior = dist.regularizer(loop.wrapped).to(loop.device)
            loss = (task_loss + prior) / len(micro)
            (loss if loop.scaler is None else loop.scaler.scale(loss)).backward()
            step_loss += torch.stack([task_loss.detach().float(), prior.detach().float().reshape(())]) / len(micro)
        step_loss = dist.all_reduce_mean(_folded(loop, step_loss))
        if loop.scaler is None and loop.guard.hold(step_loss[0], loop.optimizer):
            return step_loss
        return _read_loss(loop, step, step_loss, updated=False)

    def graphed_step() -> tuple[float, float]:
        """The same step, optimizer included, as one CUDA-graph replay (train.cuda_graph: one
        micro-batch per step, one process)."""
        nonlocal grad_norm
        out = loop.graphed(micro_batch(k))  # [loss, prior, grad norm], read after the replay: the update has run
        grad_norm = out[2]
        # the captured step folded a non-finite prior into the task loss already; the weights' flag is folded here
        return _read_loss(loop, step, torch.stack([loop.guard.fold(out[0]), out[1]]), updated=True)

    run_step = forward_backward if loop.graphed is None else graphed_step
    if loop.compiled is not None:
        loop.compiled.begin_step()
        step_loss = loop.compiled.run_step(run_step, lambda: loop.optimizer.zero_grad(set_to_none=True))
    else:
        step_loss = run_step()
    if loop.graphed is None:
        grad_norm = optimizer_step(loop.optimizer, loop.scaler, tc.max_grad_norm, want_norm=want_norm,
                                   after_update=loop.guard.update)
    return step_loss, grad_norm


def _folded(loop: _Loop, step_loss: torch.Tensor) -> torch.Tensor:
    """[task loss, prior] with the task loss NaN when the prior is or the last update broke a weight
    (:meth:`FiniteGuard.fold`), so that the one check of the task loss sees all three. The prior is
    kept apart because it is no measure of fit: under a budget it is λ_t · E[cost], which runs far
    above the task loss while the budget's ramp holds the cost to its target."""
    task_loss, prior = step_loss.unbind()
    return torch.stack([loop.guard.fold(task_loss + prior * 0), prior])


def _read_loss(loop: _Loop, step: int, step_loss: torch.Tensor, updated: bool) -> tuple[float, float]:
    """(task loss, prior) of 0-based ``step`` as numbers, one host read; a non-finite task loss stops the
    run (:func:`_stop`)."""
    value, prior = host_values(step_loss)
    if not math.isfinite(value):
        _stop(loop, value, step, updated)
    return value, prior


def host_values(values: torch.Tensor) -> list[float]:
    """A small device tensor's values on the host: one copy, so one wait for the device."""
    return values.cpu().tolist()


def _settle(loop: _Loop, step: int, step_loss: torch.Tensor | tuple[float, float]) -> None:
    """Keep the task loss and prior of 0-based ``step``, reading them first when they are still on the
    device: a non-finite loss stops the run (its update, and every later one, were skipped on the
    device: :meth:`FiniteGuard.hold`)."""
    value, prior = step_loss if isinstance(step_loss, tuple) else _read_loss(loop, step, step_loss, updated=False)
    loop.result.losses.append(value)
    loop.state["train_losses"].append(value)
    loop.state["train_priors"].append(prior)


def _log_step(loop: _Loop, step: int, grad_norm) -> None:
    """A log record (loss, lr, grad norm, rank, bits, cost) to the trackers and the progress bar."""
    with dist.full_params(loop.wrapped) as plain:
        logged = step_record(step, loop.state["train_losses"], loop.state["log_history"], loop.optimizer, grad_norm,
                             plain, loop.scaler, loop.state["train_priors"])
    loop.state["log_history"].append(logged)
    for tracker in loop.trackers:  # the record's scalars; the step travels separately
        tracker.log({k: float(v) for k, v in logged.items() if k != "step"}, step)
    summary = {k[len("leanlora/"):]: v for k, v in logged.items() if k.startswith("leanlora/")}
    fields = _bar_fields(logged["loss"], loop.state["best_score"], summary)
    loop.bar.set_postfix(**fields, refresh=False)
    if loop.bar.disable and dist.is_main_process():  # --no-progress: the same fields as lines (logs, CI)
        loop.log(f"step {step}/{loop.total}: " + ", ".join(f"{k}={v}" for k, v in fields.items()))


def _bar_fields(loss: float, score: float | None, summary: dict[str, float]) -> dict[str, str]:
    """The progress bar's fields (and a --no-progress step line's): task loss, prior (when the run has
    one), best score, rank, bits, cost."""
    prior = {} if "prior" not in summary else {"prior": f"{summary['prior']:.4g}"}
    return dict(loss=f"{loss:.4f}", **prior, score="-" if score is None else f"{score:.4f}",
                rank=f"{summary['rank']:.2f}", bits=f"{summary['bits']:.1f}", **budget.postfix(summary))


def _evaluate(loop: _Loop, step: int, step_loss: float) -> None:
    """Score the eval set; keep the adapter in ``best/`` when it is the best so far."""
    tc, metric = loop.run.train, loop.task.metric
    scores = loop.task.evaluate(loop.model, tc.eval_batch_size, loop.device, loop.autocast)
    with dist.full_params(loop.wrapped) as plain:
        record = {"step": step, "epoch": step / loop.steps_per_epoch, **scores, **leanlora.gate_summary(plain)}
    loop.state["history"].append(record)
    loop.result.history.append(record)
    best, new = loop.state["best_score"], scores[metric]
    better = best is None or (new < best if metric == "loss" else new > best)
    # with a budget, only the final structure may become the adapter
    if budget.structure_ready(loop.model) and better:
        loop.state.update(best_step=step, best_score=new, best_metrics=scores)
        dist.save_adapter(loop.wrapped, loop.run_dir / "best")
    logged = loop.state["log_history"][-1] if loop.state["log_history"] else {}  # this step's, logged first
    prior = {"prior": logged["leanlora/prior"]} if "leanlora/prior" in logged else {}
    loop.bar.set_postfix(**_bar_fields(step_loss, new, {**record, **prior}), refresh=True)
    loop.log(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in scores.items()))
    for tracker in loop.trackers:
        tracker.log({f"eval_{k}": float(v) for k, v in scores.items()}, step)


def _finish(loop: _Loop, step: int) -> TrainResult:
    """The final adapter (the best one when there was an eval set), ``metrics.json``, the result."""
    loop.bar.close()
    for tracker in loop.trackers:
        tracker.close()
    result, state, task = loop.result, loop.state, loop.task
    result.steps, result.best_step, result.best_metrics = step, state["best_step"], state["best_metrics"]
    if state["best_step"] is not None:  # whole tensors, or this rank's shard
        dist.load_adapter_state(loop.model, read_adapter_tensors(loop.run_dir / "best"))
    dist.save_adapter(loop.wrapped, loop.run_dir / RUN_ADAPTER)
    with dist.full_params(loop.wrapped) as plain:
        cost = budget.cost_summary(plain)
    chosen = shared_state(loop.model).config  # what the run's "auto" settings became on this device
    ran_as = {"device": str(loop.device), "base": chosen.base,
              "nf4_gemm": chosen.nf4.gemm if chosen.base == "nf4" else None,
              "cuda_graph": loop.capture, "pad_to_multiple_of": loop.run.data.pad_to_multiple_of}
    summary = {"steps": step, "best_step": result.best_step, "best_metrics": result.best_metrics,
               "metric": task.metric, "cost": cost, "ran_as": ran_as, "history": state["history"],
               "train_losses": state["train_losses"], "log_history": state["log_history"]}
    if any(state["train_priors"]):
        summary["train_priors"] = state["train_priors"]
    verdict = result.verdict = task_verdict(task, result.best_metrics)
    if verdict is not None:
        summary["constant_predictor"] = {"score": verdict.chance, "standard_error": verdict.standard_error,
                                         "stalled": verdict.stalled}
        if verdict.stalled:
            result.warning = stall_warning(verdict, loop.run.adapter, step)
    if dist.is_main_process():
        atomic_write_bytes(loop.run_dir / "metrics.json", json.dumps(summary, indent=2).encode())
    result.model, result.task = loop.model, task
    return result


def _stop(loop: _Loop, value: float, step: int, updated: bool) -> NoReturn:
    """Stop on the non-finite loss of 0-based ``step``: as a weight broken by an update (when the guard's
    flag is up) or else as the loss; ``updated``: the captured step had applied its update already."""
    loop.bar.close()
    loop.guard.raise_if_tripped(step + 1 if updated else step, loop.run_dir, loop.run.train.lr)
    raise TrainingDiverged(
        f"loss is {value} at step {step + 1} (epoch {step // loop.steps_per_epoch + 1}); training stopped"
        + (" (the captured step had already applied its update to the weights in memory)" if updated else "")
        + ". " + advice(loop.run_dir, loop.run.train.lr))


def cost_table(model: nn.Module) -> str:
    """The adapter's cost table (``leanlora.cost_report``)."""
    return leanlora.cost_report(model).format_table()
