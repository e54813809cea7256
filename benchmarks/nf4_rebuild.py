"""How far the NF4 base's per-step weight rebuild is from its bytes floor, for each projection shape.

A 4-bit base rebuilds every adapted weight from its parts twice a step, in the forward and again
in the backward (only the parts are kept between them): ``nf4.gemm: dequant`` in bf16, as torchao's
``linear_nf4`` does, ``nf4.gemm: fp8`` as e4m3 codes, transposed in the backward, where
``torch._scaled_mm`` wants them so. Each
rebuild reads the parts (half a byte a weight, one byte a block of scales) and writes the weight
(2 bytes a weight in bf16, 1 in e4m3 plus 4 a row). This times each rebuild compiled, as the
compiled layers run it, against those bytes at the copy bandwidth measured in the same process,
and sums one step of a preset's layers.

On CUDA each timing replays a CUDA graph of ``--calls`` rebuilds, so launches do not count; on
the CPU (a smoke test) the calls run one after another.

    python -u benchmarks/nf4_rebuild.py --preset 1b --out nf4_rebuild.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from leanlora.base.nf4 import _torchao_nf4  # noqa: E402
from leanlora.base.nf4_linear import NF4Parts, dequantize_nf4, nf4_to_fp8  # noqa: E402

PRESETS = {  # (out, in) of the adapted projections of one decoder layer, and the layer count
    "1b": dict(shapes={"q": (2048, 2048), "k": (512, 2048), "v": (512, 2048), "o": (2048, 2048),
                       "gate": (8192, 2048), "up": (8192, 2048), "down": (2048, 8192)}, layers=16),
    "tiny": dict(shapes={"q": (64, 64), "down": (64, 128)}, layers=2),
}


def dequant_bf16(parts: NF4Parts) -> torch.Tensor:
    return dequantize_nf4(*parts)


def rebuild_fp8(parts: NF4Parts) -> tuple[torch.Tensor, torch.Tensor]:
    return nf4_to_fp8(*parts)


def rebuild_fp8_transposed(parts: NF4Parts) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward's rebuild: the codes laid out as ``fp8_input_grad`` hands them to ``_scaled_mm``."""
    return nf4_to_fp8(*parts, transposed=True)


VARIANTS = {  # name: (function, bytes written a weight)
    "dequant_bf16": (dequant_bf16, 2),
    "fp8": (rebuild_fp8, 1),
    "fp8_transposed": (rebuild_fp8_transposed, 1),
}


def timed_ms(call: Callable[[], object], device: torch.device, calls: int, repeats: int) -> float:
    """Median milliseconds of one ``call()``."""
    for _ in range(2):  # compile and warm
        call()
    if device.type != "cuda":
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(calls):
                call()
            times.append((time.perf_counter() - start) * 1e3 / calls)
        return statistics.median(times)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        for _ in range(calls):
            call()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def copy_gbps(device: torch.device) -> float:
    """Bytes moved (read + written) per second by a plain copy, in GB/s."""
    n = (256 if device.type == "cuda" else 16) * 2**20
    src, dst = torch.empty(n, dtype=torch.uint8, device=device), torch.empty(n, dtype=torch.uint8, device=device)
    ms = timed_ms(lambda: dst.copy_(src), device, 10, 5)
    return 2 * n / ms / 1e6


def parts_of(out_f: int, in_f: int, device: torch.device, block_size: int, scaler_block_size: int) -> NF4Parts:
    to_nf4, _ = _torchao_nf4()
    w = torch.randn(out_f, in_f, dtype=torch.bfloat16, device=device) / in_f ** 0.5
    blocks = out_f * in_f // block_size  # the scaler group must divide the blocks, as NF4Base makes it
    return NF4Parts.of(to_nf4(w, block_size, math.gcd(blocks, scaler_block_size)))


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--calls", type=int, default=20, help="rebuilds per timed graph (CUDA) or loop (CPU)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--scaler-block-size", type=int, default=256)
    ap.add_argument("--out", type=Path, default=None, help="append one JSON line per row")
    args = ap.parse_args(argv)
    device, preset = torch.device(args.device), PRESETS[args.preset]
    compile_kw = dict(dynamic=False) if device.type == "cuda" else dict(backend="eager")
    gbps = copy_gbps(device)
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "copy_gbps": round(gbps, 1), "preset": args.preset}
    print(json.dumps(info))
    rows, step = [], {name: [0.0, 0.0] for name in VARIANTS}  # per variant: ms, floor ms of one step
    for proj, (out_f, in_f) in preset["shapes"].items():
        parts = parts_of(out_f, in_f, device, args.block_size, args.scaler_block_size)
        n = out_f * in_f
        read = parts.codes.nbytes + parts.block_scales.nbytes + parts.group_factors.nbytes
        for name, (fn, per_weight) in VARIANTS.items():
            compiled = torch.compile(fn, **compile_kw)
            ms = timed_ms(lambda: compiled(parts), device, args.calls, args.repeats)
            written = n * per_weight + (out_f * 4 if per_weight == 1 else 0)
            floor = (read + written) / gbps / 1e6
            row = {"proj": proj, "out": out_f, "in": in_f, "variant": name, "ms": round(ms, 5),
                   "bytes": read + written, "floor_ms": round(floor, 5), "x_floor": round(ms / floor, 2), **info}
            rows.append(row)
            step[name][0] += ms * preset["layers"]
            step[name][1] += floor * preset["layers"]
            print(f"{proj:>5} {out_f:>5}x{in_f:<5} {name:>15} {ms:9.4f} ms  floor {floor:8.4f} ms  "
                  f"x{ms / floor:6.2f}", flush=True)
    fp8_step = [step["fp8"][i] + step["fp8_transposed"][i] for i in range(2)]
    bf16_step = [2 * t for t in step["dequant_bf16"]]  # forward and backward rebuild alike
    summary = {"step_dequant_bf16_ms": round(bf16_step[0], 3), "step_dequant_bf16_floor_ms": round(bf16_step[1], 3),
               "step_fp8_ms": round(fp8_step[0], 3), "step_fp8_floor_ms": round(fp8_step[1], 3),
               **info}
    print(f"one step of {preset['layers']} layers, forward + backward rebuilds: dequant bf16 "
          f"{summary['step_dequant_bf16_ms']} ms (floor {summary['step_dequant_bf16_floor_ms']}); fp8 "
          f"{summary['step_fp8_ms']} ms (floor {summary['step_fp8_floor_ms']})")
    rows.append(summary)
    if args.out is not None:
        with args.out.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


if __name__ == "__main__":
    main()
