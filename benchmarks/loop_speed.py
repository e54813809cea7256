"""Step time of whole training loops on a small real model: ``leanlora.train`` against a PEFT loop.

MiniLM (22.7M parameters) is launch-bound on a GPU: a step's time is the host's time to issue
its kernels, so what counts is how many operations a step launches and how often the host
waits for the device. Every row trains ``--steps`` optimizer steps of the same run — the same
tokenised SST-2 examples, the same per-epoch permutation, the same collate and padding, batch
32, bf16 autocast, AdamW, linear warm-up and decay, gradient clipping at 1.0 — and rows differ
only in who runs them:

* ``lean_*`` rows run leanlora's own loop (``leanlora.train.loop.train``, what ``leanlora train``
  runs) with ``train.compile`` false (``@eager``), true (``@compiled``: each BertLayer compiled,
  the default on a GPU), ``train.compile_mode=reduce-overhead`` (``@cudagraphs``) or
  ``train.cuda_graph`` (``@graphed``: compiled, the step captured as one CUDA graph per padded
  length, batches padded to multiples of a quarter of ``--max-length``), or nothing set
  (``@default``: what ``leanlora train`` chooses on the device); ``@graphed`` and ``@default``
  are leanlora rows only;
* ``peft_lora`` rows run the loop a PEFT user writes (``get_peft_model``, then forward, backward,
  clip, AdamW, schedule, the loss read back once per step), eager or with the same regional
  compilation.

Per-step wall time comes from the host clock; both loops read the loss back once per step, so
it is the device's time too. The first ``--warmup`` steps (compilation, new shapes) are left out
of the median and reported apart. Each row runs in a fresh process unless ``--same-process``.

    python -u benchmarks/loop_speed.py --model .carry/minilm --glue .carry/glue --out $OUT/loop.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from adapters import METHODS, Shape, leanlora_config, peft_config, trainable_count, unavailable  # noqa: E402
from isolation import row_in_fresh_process  # noqa: E402
from speed import record  # noqa: E402  (print and append each row at once)

TARGETS = ("query", "key", "value", "output.dense", "intermediate.dense")  # as quality.py
MODES = ("eager", "compiled", "cudagraphs", "graphed", "default")
DEFAULT_ROWS = ("peft_lora@eager,peft_lora@compiled,peft_lora@cudagraphs,lean_lora@eager,lean_lora@compiled,"
                "lean_lora@cudagraphs,lean_blora@eager,lean_blora@compiled,lean_blora@cudagraphs,"
                "lean_vblora@compiled,lean_qdylora@compiled")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="MiniLM folder (config.json, model.safetensors, tokenizer)")
    ap.add_argument("--data", default="", help="a GLUE task folder (train.tsv, dev.tsv); default: <glue>/SST-2")
    ap.add_argument("--glue", default="", help="folder holding the GLUE task folders")
    ap.add_argument("--rows", default=DEFAULT_ROWS, help=f"comma list of method@mode, mode one of {MODES}")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=40, help="first steps left out of the median")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--train-examples", type=int, default=8000,
                    help="data.max_train_examples (a seeded subset; 0: the whole file): tokenising all of "
                         "SST-2 for every row would cost more than its steps")
    ap.add_argument("--pad-to-multiple-of", type=int, default=32,
                    help="data.pad_to_multiple_of of every row (0: each batch to its longest example)")
    ap.add_argument("--profile", default="", help="comma list of rows to run a second time under torch.profiler "
                    "(--profile-steps steps): host-device syncs, copies and launches per step, top host ops")
    ap.add_argument("--profile-steps", type=int, default=30)
    ap.add_argument("--same-process", action="store_true",
                    help="run every row in this process (default: each row in a fresh one; on the GPU the ratio of "
                         "the same two rows swung from 0.70x to 1.34x with their order in one process)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="JSONL file; one line per row, written as each row ends")
    args = ap.parse_args(argv)
    if not args.data:
        if not args.glue:
            ap.error("name --data (a GLUE task folder) or --glue (its parent)")
        args.data = str(Path(args.glue) / "SST-2")
    if args.warmup >= args.steps:
        ap.error(f"--warmup {args.warmup} must be below --steps {args.steps}")
    return args


def run_config(args, method, mode: str):
    """The one run every row trains: leanlora's RunConfig (the PEFT loop reads its data and schedule)."""
    from leanlora.train.runconfig import ModelConfig, RunConfig, TrainConfig
    from leanlora.train.tasks import glue_data

    shape = Shape(targets=TARGETS, r=args.r, alpha=2.0 * args.r, bank_vectors=90, bank_length=128,
                  modules_to_save=("classifier",))
    data = glue_data(args.data, eval_file="", max_length=args.max_length, max_train_examples=args.train_examples,
                     pad_to_multiple_of=args.pad_to_multiple_of)
    chosen = {} if mode == "default" else dict(  # @default: the loop's own choices
        compile=mode != "eager", compile_mode="reduce-overhead" if mode == "cudagraphs" else "default",
        cuda_graph=mode == "graphed")
    train = TrainConfig(max_steps=args.steps, batch_size=args.batch, lr=5e-4, device=args.device,
                        log_every=max(args.steps, 1), **chosen)
    adapter = leanlora_config(method, shape) if method.library == "leanlora" else None
    return RunConfig(model=ModelConfig(path=args.model), data=data, train=train,
                     **({"adapter": adapter} if adapter else {})), shape


def leanlora_row(run) -> tuple[list[float], float, int]:
    """(step seconds, last loss, trainable) from leanlora's own loop."""
    from leanlora.train.loop import train

    with tempfile.TemporaryDirectory() as folder:
        result = train(run, Path(folder) / "run", progress=False, log=lambda *_: None)
    return result.step_seconds, result.losses[-1], trainable_count(result.model)


def peft_row(run, shape, mode: str) -> tuple[list[float], float, int]:
    """(step seconds, last loss, trainable) from a plain PyTorch loop over a PEFT LoRA model."""
    import peft

    from leanlora.train.compiled import CompiledRegions
    from leanlora.train.loop import epoch_order, load_for_run, seed_everything
    from leanlora.train.lr_schedule import build_scheduler
    from leanlora.train.precision import resolve_precision
    from leanlora.train.tasks import batches

    tc = run.train
    seed_everything(tc.seed)
    model, _, task = load_for_run(run)
    device = next(model.parameters()).device
    model = peft.get_peft_model(model, peft_config(METHODS["peft_lora"], shape, "SEQ_CLS")).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, fused=device.type == "cuda")
    sched = build_scheduler(opt, tc, tc.max_steps, log=lambda *_: None)
    compiled = CompiledRegions(model, mode="reduce-overhead" if mode == "cudagraphs" else "default") \
        if mode != "eager" else None
    autocast = resolve_precision(tc, device).autocast()
    n = len(task.train)
    per_epoch = math.ceil(n / tc.batch_size)
    times, order_epoch, order, value = [], -1, [], float("nan")
    for step in range(tc.max_steps):
        started = time.perf_counter()
        epoch, k = divmod(step, per_epoch)
        if epoch != order_epoch:  # the permutation leanlora's loop draws for this epoch
            order_epoch = epoch
            order = epoch_order(n, tc.seed, epoch)
        batch = next(batches(task.train, tc.batch_size, task.collate, device, order[k * tc.batch_size:(k + 1) * tc.batch_size]))
        if compiled is not None:
            compiled.begin_step()
        with autocast:
            loss = task.loss(model, batch)
        loss.backward()
        value = loss.item()
        torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return times, value, trainable_count(model)


def run_row(row: str, args) -> dict:
    name, _, mode = row.partition("@")
    mode = mode or "eager"
    if name not in METHODS or mode not in MODES:
        raise ValueError(f"row {row!r}: method must be one of {sorted(METHODS)}, mode one of {MODES}")
    method = METHODS[name]
    result = {"row": row, "method": method.name, "mode": mode}
    if method.library == "peft" and mode in ("graphed", "default"):
        return {**result, "skipped": "the PEFT loop here has no whole-step graph and no defaults of its own"}
    if method.library == "peft" and method.kind != "lora":
        return {**result, "skipped": "the PEFT loop here runs LoRA only"}
    why = unavailable(method)
    if why:
        return {**result, "skipped": why}
    torch._dynamo.reset()
    run, shape = run_config(args, method, mode)
    t = time.perf_counter()
    times, loss, trainable = leanlora_row(run) if method.library == "leanlora" else peft_row(run, shape, mode)
    steady = times[args.warmup:]
    result.update(step_ms=1e3 * statistics.median(steady), step_ms_mean=1e3 * statistics.mean(steady),
                  step_ms_min=1e3 * min(steady), step_ms_max=1e3 * max(steady),
                  warmup_s=sum(times[:args.warmup]), wall_s=time.perf_counter() - t, loss=loss,
                  trainable=trainable, steps=len(times))
    return result


SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpyAsync", "cudaMemcpy")
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch")


def profile_row(row: str, args, top: int = 25) -> dict:
    """The row again for ``--profile-steps`` steps under torch.profiler (compilation included, so
    compare counts, not times): per step, the host-device synchronisations and copies, the kernel
    launches, and the ``top`` operators by host self time."""
    from torch.profiler import ProfilerActivity, profile

    name, _, mode = row.partition("@")
    method = METHODS[name]
    short = argparse.Namespace(**{**vars(args), "steps": args.profile_steps})
    run, shape = run_config(short, method, mode or "eager")
    torch._dynamo.reset()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        leanlora_row(run) if method.library == "leanlora" else peft_row(run, shape, mode or "eager")
    events = prof.key_averages()
    n = args.profile_steps
    per_step = {e.key: e.count / n for e in events if e.key in SYNCS + LAUNCHES}
    ops = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CPU),
                 key=lambda e: -e.self_cpu_time_total)[:top]
    return {"row": row, "profile_steps": n, "calls_per_step": per_step,
            "top_host_ops": [{"op": e.key[:100], "self_host_ms_per_step": e.self_cpu_time_total / 1e3 / n,
                              "calls_per_step": e.count / n} for e in ops]}


def table(rows: list[dict]) -> str:
    ref = {r["row"]: r.get("step_ms") for r in rows}
    eager, comp = ref.get("peft_lora@eager"), ref.get("peft_lora@compiled")
    lines = ["| row | step ms median (mean; min–max) | × PEFT LoRA eager | × PEFT LoRA compiled | warm-up s | "
             "trainable | last loss |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "step_ms" not in r:
            lines.append(f"| {r['row']} ({r['method']}) | {r.get('skipped') or r.get('error')} | | | | | |")
            continue
        speed = lambda ref_ms: f"{ref_ms / r['step_ms']:.2f}" if ref_ms else "–"  # noqa: E731 (speed-up)
        lines.append(f"| {r['row']} ({r['method']}) | {r['step_ms']:.2f} ({r['step_ms_mean']:.2f}; "
                     f"{r['step_ms_min']:.2f}–{r['step_ms_max']:.2f}) | {speed(eager)} | {speed(comp)} | "
                     f"{r['warmup_s']:.1f} | {r['trainable']:,} | {r['loss']:.4f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = True
    info = {"torch": torch.__version__, "args": vars(args),
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"}
    for lib in ("transformers", "peft"):
        info[lib] = __import__(lib).__version__
    print(json.dumps(info), flush=True)
    out = Path(args.out) if args.out else None
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"info": info}) + "\n")
    rows = []
    for row in [r.strip() for r in args.rows.split(",") if r.strip()]:
        res = run_row_guarded(row, args) if args.same_process else \
            row_in_fresh_process(__file__, list(sys.argv[1:] if argv is None else argv), row, ("--same-process",),
                                 parent_only=("--profile",))
        record(res, rows, out)
    profiles: list[dict] = []
    for row in [r.strip() for r in args.profile.split(",") if r.strip()]:
        record(profile_row(row, args), profiles, out)
    print(table(rows), flush=True)


def run_row_guarded(row: str, args) -> dict:
    try:
        return run_row(row, args)
    except ValueError:  # a malformed row name: the caller's mistake, not a measurement
        raise
    except Exception as err:  # one failing row must not hide the others' numbers
        import traceback

        traceback.print_exc()
        return {"row": row, "method": row, "error": f"{type(err).__name__}: {str(err)[:300]}"}


if __name__ == "__main__":
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
