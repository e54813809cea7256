"""Where a float8 frozen base starts to pay: one frozen linear's forward and input gradient, bf16
against the FP8 base's (``leanlora.base.fp8_linear``), each compiled, across layer widths.

The FP8 base quantizes its input per row in the forward and its output gradient per row in the
backward; for a narrow layer those elementwise passes cost more than the float8 GEMM saves. This
measures the crossing, so that ``adapter.base: auto`` can pick float8 only where it is faster.
Each shape runs bf16 first, then float8, in the same process; ratios are bf16 time / float8 time.

    python -u benchmarks/fp8_layer_speed.py --tokens 8192 --out fp8_layer_speed.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from leanlora.base.fp8_linear import fp8_gemm_available, linear_fp8, quantize_weight  # noqa: E402


def timed(fn, x, grad, iters: int) -> float:
    """Median milliseconds of forward + input-gradient backward."""
    for _ in range(3):
        x.grad = None
        fn(x).backward(grad)
    times = []
    for _ in range(iters):
        x.grad = None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(x).backward(grad)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def row(tokens: int, k: int, n: int, iters: int) -> dict:
    torch.manual_seed(0)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
    codes, scales = quantize_weight(w)
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
    bf16 = torch.compile(lambda t: t @ w.t(), dynamic=False)
    fp8 = torch.compile(lambda t: linear_fp8(t, codes, scales, True), dynamic=False)
    ms_bf16, ms_fp8 = timed(bf16, x, grad, iters), timed(fp8, x, grad, iters)
    flops = 4 * tokens * k * n
    return {"tokens": tokens, "in": k, "out": n, "bf16_ms": round(ms_bf16, 4), "fp8_ms": round(ms_fp8, 4),
            "fp8_speedup": round(ms_bf16 / ms_fp8, 3), "bf16_tflops": round(flops / ms_bf16 / 1e9, 1),
            "fp8_tflops": round(flops / ms_fp8 / 1e9, 1), "device": torch.cuda.get_device_name(),
            "torch": torch.__version__}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="8192", help="comma list of tokens per batch")
    ap.add_argument("--widths", default="384,768,1024,1536,2048,3072,4096")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out", type=Path, default=None, help="append one JSON line per shape")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or not fp8_gemm_available(torch.device("cuda")):
        raise SystemExit("fp8_layer_speed needs a CUDA GPU of compute capability 8.9 or newer")
    torch._dynamo.config.cache_size_limit = 256
    print(f"{'tokens':>7} {'in':>5} {'out':>6} {'bf16 ms':>9} {'fp8 ms':>9} {'bf16/fp8':>9}")
    for tokens in map(int, args.tokens.split(",")):
        for d in map(int, args.widths.split(",")):
            for k, n in ((d, d), (d, 4 * d)):
                r = row(tokens, k, n, args.iters)
                print(f"{tokens:>7} {k:>5} {n:>6} {r['bf16_ms']:>9.3f} {r['fp8_ms']:>9.3f} {r['fp8_speedup']:>9.2f}",
                      flush=True)
                if args.out is not None:
                    with args.out.open("a") as f:
                        f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
