"""Does an FP8 frozen base train like the dense one? Two `leanlora train` runs of one config, paired.

The runs differ only in the base (``--pair dense-fp8``: ``adapter.base`` dense and fp8;
``--pair nf4-gemm``: an NF4 base multiplied as QLoRA does and with float8 GEMMs; one after the
other, or at once with ``--parallel``): same seed, data order, schedule and adapter. Because every
step sees the same batch in both runs, the per-step losses are paired, and the comparison is of
the loss curves:

* ``tail``: mean loss over the last tenth of the run, and the float8 run's relative difference;
* ``max_rel_window``: the largest relative gap between the two curves' moving averages
  (``--window`` steps), over the whole run: the curves agree within this fraction everywhere;
* the final eval metrics of each run.

    python -u benchmarks/fp8_guard.py configs/qdylora-asdiv-smollm2.yaml --out /tmp/fp8_guard \
        adapter.ranks=fixed train.max_steps=300 train.batch_size=4 train.grad_accum=1

Overrides are `leanlora train`'s ``section.key=value``. On a CPU the FP8 base runs torch's float8
quantization with an fp32 matmul (the numerics of ``_scaled_mm`` on the GPU, not its speed).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# each pair: the reference run, then the float8 one, by name, with the overrides that make it
PAIRS = {
    "dense-fp8": {"dense": ["adapter.base=dense"], "fp8": ["adapter.base=fp8"]},
    "nf4-gemm": {"nf4": ["adapter.base=nf4", "adapter.nf4.gemm=dequant"],
                 "nf4_fp8": ["adapter.base=nf4", "adapter.nf4.gemm=fp8"]},
}


def moving_average(values: list[float], window: int) -> list[float]:
    window = max(1, min(window, len(values)))
    sums = [0.0, *itertools.accumulate(values)]
    return [(sums[i + window] - sums[i]) / window for i in range(len(values) - window + 1)]


def compare(reference: list[float], float8: list[float], window: int,
            names: tuple[str, str] = ("dense", "fp8")) -> dict[str, float]:
    """The paired curves' agreement: tail means and the largest relative gap of their moving
    averages; ``names`` name the two tail means."""
    n = min(len(reference), len(float8))
    reference, float8 = reference[:n], float8[:n]
    tail = max(1, n // 10)
    d_tail, f_tail = sum(reference[-tail:]) / tail, sum(float8[-tail:]) / tail
    gaps = [abs(f - d) / abs(d)
            for d, f in zip(moving_average(reference, window), moving_average(float8, window))]
    return {"steps": n, "tail_steps": tail, f"{names[0]}_tail": d_tail, f"{names[1]}_tail": f_tail,
            "tail_rel": (f_tail - d_tail) / abs(d_tail), "window": window, "max_rel_window": max(gaps),
            "mean_rel_window": sum(gaps) / len(gaps)}


def start_run(config: str, overrides: list[str], name: str, out: Path,
              settings: list[str]) -> tuple[subprocess.Popen, float]:
    """`leanlora train` of ``config`` with ``settings`` (the base's) into ``out/name``, as a child process."""
    cmd = [sys.executable, "-m", "leanlora", "train", str(Path(config).resolve()), "--out", str(out / name),
           "--no-progress", *overrides, *settings]
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # what the child prints reaches its log at once
    with (out / f"{name}.log").open("w") as log:  # the child keeps its own handle
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    return proc, time.perf_counter()


def finish_run(proc: subprocess.Popen, started: float, base: str, out: Path) -> dict:
    if proc.wait() != 0:
        sys.exit(f"fp8_guard: the {base} run failed (exit {proc.returncode}); see {out / f'{base}.log'}")
    metrics = json.loads((out / base / "metrics.json").read_text())
    return {"base": base, "seconds": time.perf_counter() - started, "losses": metrics["train_losses"],
            "best_metrics": metrics.get("best_metrics"), "cost": metrics.get("cost")}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="a `leanlora train` run YAML")
    ap.add_argument("overrides", nargs="*", help="section.key=value, applied to both runs")
    ap.add_argument("--out", required=True, help="folder: the two run folders and fp8_guard.json")
    ap.add_argument("--window", type=int, default=25, help="moving-average window of the curve comparison")
    ap.add_argument("--parallel", action="store_true", help="run the two trainings at the same time")
    ap.add_argument("--pair", choices=sorted(PAIRS), default="dense-fp8",
                    help="dense-fp8: a dense base against an FP8 one; nf4-gemm: NF4 as QLoRA computes it against "
                         "NF4 with float8 GEMMs (adapter.nf4.gemm)")
    args = ap.parse_intermixed_args(argv)  # overrides before or after the options
    out = Path(args.out).resolve()
    import torch

    pair = PAIRS[args.pair]
    if args.parallel:  # both at once (e.g. one CPU core each, with OMP_NUM_THREADS=1)
        started = {name: start_run(args.config, args.overrides, name, out, settings) for name, settings in pair.items()}
        runs = {name: finish_run(*started[name], name, out) for name in pair}
    else:
        runs = {name: finish_run(*start_run(args.config, args.overrides, name, out, settings), name, out)
                for name, settings in pair.items()}
    ref, new = pair
    report = {"config": args.config, "pair": args.pair, "overrides": args.overrides, "torch": torch.__version__,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "comparison": compare(runs[ref]["losses"], runs[new]["losses"], args.window, (ref, new)), "runs": runs}
    (out / "fp8_guard.json").write_text(json.dumps(report, indent=1))
    c = report["comparison"]
    print(f"{c['steps']} steps: last {c['tail_steps']} mean loss {ref} {c[ref + '_tail']:.4f}, "
          f"{new} {c[new + '_tail']:.4f} "
          f"({100 * c['tail_rel']:+.2f} %); {c['window']}-step moving averages within "
          f"{100 * c['max_rel_window']:.2f} % everywhere (mean {100 * c['mean_rel_window']:.2f} %)")
    for base, r in runs.items():
        print(f"{base}: {r['seconds']:.0f} s, eval {r['best_metrics']}")


if __name__ == "__main__":
    main()
