"""Cost of one AdamW step over each method's trainable parameters, against PEFT LoRA's, in one process.

The adapters of the methods hold about the same number of values (11.3M at the 1b shape), but in
very different numbers of tensors: LoRA has two per adapted module, B-LoRA ten (A, B, E, the rank
gates and three quantizers' gates and ranges, several of them a handful of values or a scalar).
An optimizer step is memory-bound (about 28 bytes of traffic per fp32 value: param, grad and two
moments read, param and moments written), so its floor is the same for every method; what
differs is how many launches the per-tensor work takes. This measures it, for torch's default
AdamW (foreach), ``fused=True``, leanlora's (:func:`leanlora.optim.adamw`) and a compiled step, with random gradients on the model of ``speed.py``:
device time per step (CUDA events) and the host's time to issue one.

    python -u benchmarks/optimizer_step.py --preset 1b --out $OUT/optimizer.jsonl
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from adapters import ADAMW_IMPLS as IMPLS, METHODS, Shape, adamw_step, apply, unavailable  # noqa: E402
from speed import TARGETS, add_shape_args, add_timing_args, apply_preset, build_model, record  # noqa: E402

DEFAULT_ROWS = "peft_lora,lean_lora,lean_vblora,lean_blora,lean_combo"
BYTES_PER_VALUE = 28  # fp32: read param, grad, exp_avg, exp_avg_sq; write param, exp_avg, exp_avg_sq


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(ap)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--rows", default=DEFAULT_ROWS, help="comma list of methods (keys of adapters.METHODS)")
    ap.add_argument("--bank-vectors", type=int, default=256, help="VB-LoRA bank size h, as in speed.py")
    ap.add_argument("--bank-length", type=int, default=256, help="VB-LoRA vector length b (must divide every dim)")
    ap.add_argument("--impls", default="foreach,fused",
                    help="comma list of AdamW implementations: foreach, fused, leanlora (leanlora.optim.adamw), "
                         "compiled (torch.compile of the "
                         "step: 53 s to compile for LoRA's 224 tensors at the 1b shape, minutes for B-LoRA's 1,120)")
    add_timing_args(ap, steps=20)
    return apply_preset(ap.parse_args(argv))


def time_steps(step, device: torch.device, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            step()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        else:
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
    return times


def host_time(step, steps: int) -> float:
    """Median host seconds to issue one step, without waiting for the device between steps: the
    share of a training step the optimizer costs a host-bound loop."""
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return statistics.median(times)


def run_row(name: str, impls: list[str], args, device) -> list[dict]:
    method = METHODS[name]
    why = unavailable(method)
    if why:
        return [{"row": name, "method": method.name, "skipped": why}]
    shape = Shape(targets=TARGETS, r=args.r, bank_vectors=args.bank_vectors, bank_length=args.bank_length)
    model = build_model(args, device)
    model, groups, _ = apply(method, model, shape, "CAUSAL_LM", torch.bfloat16)
    params = [p for g in groups for p in g["params"]]
    g = torch.Generator(device=device).manual_seed(0)
    for p in params:  # a gradient of the parameter's own dtype and shape, as backward leaves it
        p.grad = torch.randn(p.shape, generator=g, device=device, dtype=p.dtype) * 1e-3
    values = sum(p.numel() for p in params)
    out = []
    for impl in impls:
        opt, step = adamw_step(groups, impl)
        t = time.perf_counter()
        step()  # the first step: compilation for "compiled", state allocation for all
        if device.type == "cuda":
            torch.cuda.synchronize()
        first_s = time.perf_counter() - t
        times = time_steps(step, device, args.warmup, args.steps)
        med = statistics.median(times)
        out.append({"row": name, "impl": impl, "method": method.name, "tensors": len(params), "values": values,
                    "groups": len(groups), "step_ms": med * 1e3, "step_ms_min": min(times) * 1e3,
                    "step_ms_max": max(times) * 1e3, "gbps": BYTES_PER_VALUE * values / med / 1e9,
                    "host_ms": 1e3 * host_time(step, args.steps), "first_step_s": first_s})
        del opt, step
    del model, params, groups
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def table(rows: list[dict]) -> str:
    anchor = {r["impl"]: r["step_ms"] for r in rows if r["row"] == "peft_lora" and "step_ms" in r}
    lines = ["| method | AdamW | tensors | values | step ms median (min–max) | × PEFT LoRA (same AdamW) | GB/s | "
             "host ms | first step s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['method']} | {r.get('impl', '')} | skipped: {r['skipped']} | | | | | | |")
            continue
        ratio = f"{r['step_ms'] / anchor[r['impl']]:.2f}" if r["impl"] in anchor else "–"
        lines.append(f"| {r['method']} | {r['impl']} | {r['tensors']:,} | {r['values']:,} | {r['step_ms']:.2f} "
                     f"({r['step_ms_min']:.2f}–{r['step_ms_max']:.2f}) | {ratio} | {r['gbps']:.0f} | {r['host_ms']:.2f} | "
                     f"{r['first_step_s']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    for impl in impls:
        if impl not in IMPLS:
            raise SystemExit(f"--impls: {impl!r} is not an AdamW implementation; allowed: {', '.join(IMPLS)}")
    out = Path(args.out) if args.out else None
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"info": {"torch": torch.__version__, "device": torch.cuda.get_device_name()
                                            if device.type == "cuda" else "cpu", "args": vars(args)}}) + "\n")
    rows = []
    for name in [r.strip() for r in args.rows.split(",") if r.strip()]:
        for res in run_row(name, impls, args, device):
            record(res, rows, out)
    print(table(rows), flush=True)
    return rows


if __name__ == "__main__":
    main()
