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

Variants: ``fp8`` / ``fp8_transposed`` make everything from the parts in the call; ``fp8_kept*``
is what the NF4 base runs (an fp32 factor a block, the row scales and the pair table kept, so a
weight costs one lookup, one product and one rounding); ``fp8_divide*`` is the arithmetic it
replaced (the block scales undone in the call, a rounding to the weight's dtype and a division a
weight), kept for comparison; ``fp8_packed`` (candidate, forward layout) stores a byte's two codes
as one int16. ``fp8_kept*`` run the torch operators and ``fp8_triton*`` the Triton kernels on the
same kept state (CUDA only); ``fp8*`` are whatever ``nf4_to_fp8`` runs on the device.

    python -u benchmarks/nf4_rebuild.py --preset 1b --out nf4_rebuild.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from leanlora.base.nf4 import _torchao_nf4  # noqa: E402
from leanlora.base.fp8_linear import E4M3, E4M3_MAX  # noqa: E402
from leanlora.base.nf4_linear import (NF4Parts, _block_scales, byte_pair_table, dequantize_nf4,  # noqa: E402
                                      fp8_codes_by_operators, fp8_rebuild_state, nf4_to_fp8)
from leanlora.base.nf4_triton import TRITON_REBUILD, nf4_fp8_codes  # noqa: E402

PRESETS = {  # (out, in) of the adapted projections of one decoder layer, and the layer count
    "1b": dict(shapes={"q": (2048, 2048), "k": (512, 2048), "v": (512, 2048), "o": (2048, 2048),
                       "gate": (8192, 2048), "up": (8192, 2048), "down": (2048, 8192)}, layers=16),
    "tiny": dict(shapes={"q": (64, 64), "down": (64, 128)}, layers=2),
}


def dequant_bf16(parts: NF4Parts, kept: dict) -> torch.Tensor:
    return dequantize_nf4(*parts)


def rebuild_fp8(parts: NF4Parts, kept: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward's rebuild, row scales computed from the parts in the call."""
    return nf4_to_fp8(*parts)


def rebuild_fp8_transposed(parts: NF4Parts, kept: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward's rebuild: the codes laid out as ``fp8_input_grad`` hands them to ``_scaled_mm``."""
    return nf4_to_fp8(*parts, transposed=True)


def rebuild_fp8_kept(parts: NF4Parts, kept: dict, transposed: bool = False):
    """The NF4 base's kept rebuild state (row scales, block factors, pair table), in torch operators
    (``REBUILD_KERNEL = "torch"``)."""
    return fp8_codes_by_operators(parts.codes, kept["rebuild"], parts.shape, parts.block_size, transposed)


def rebuild_fp8_triton(parts: NF4Parts, kept: dict, transposed: bool = False):
    """The same codes from the Triton kernels, as the NF4 base runs them on CUDA."""
    st = kept["rebuild"]
    return nf4_fp8_codes(parts.codes, st.block_factor, st.pairs, parts.shape, parts.block_size, transposed)


def rebuild_fp8_divide(parts: NF4Parts, kept: dict, transposed: bool = False):
    """The rebuild before the block factors were kept: row scales kept, the block scales undone in
    the call, each weight rounded to its dtype, then divided by its row scale."""
    scales = _block_scales(*parts[1:4], parts.codebook.dtype, parts.scaler_group)
    w = (byte_pair_table(parts.codebook)[parts.codes.to(torch.long)].view(-1, parts.block_size)
         * scales[:, None]).view(parts.shape)
    w8 = (w.float() / kept["rebuild"].row_scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return w8.t().contiguous() if transposed else w8


def rebuild_fp8_packed(parts: NF4Parts, kept: dict):
    """Candidate for the forward layout: the library's arithmetic, but a byte's two e4m3 codes are
    packed into one int16 and stored together, so the kernel runs one element a 4-bit byte instead
    of one a weight (the same codes; the backward layout cannot pair them, its neighbours come from
    different bytes)."""
    st = kept["rebuild"]
    w = st.pairs[parts.codes.to(torch.long)].view(-1, parts.block_size // 2, 2) * st.block_factor[:, None, None]
    b = w.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).view(torch.uint8).to(torch.int16)
    return (b[..., 0] | (b[..., 1] << 8)).view(parts.shape[0], -1).view(E4M3)  # little-endian: high code first


def kept_state(parts: NF4Parts) -> dict:
    """What an NF4 base with float8 GEMMs keeps beside a frozen weight."""
    return dict(rebuild=fp8_rebuild_state(*parts[1:5], parts.shape[0], parts.scaler_group))


VARIANTS = {  # name: (function, bytes written a weight)
    "dequant_bf16": (dequant_bf16, 2),
    "fp8": (rebuild_fp8, 1),
    "fp8_transposed": (rebuild_fp8_transposed, 1),
    "fp8_kept": (rebuild_fp8_kept, 1),
    "fp8_kept_transposed": (partial(rebuild_fp8_kept, transposed=True), 1),
    "fp8_packed": (rebuild_fp8_packed, 1),
    "fp8_triton": (rebuild_fp8_triton, 1),
    "fp8_triton_transposed": (partial(rebuild_fp8_triton, transposed=True), 1),
    "fp8_divide": (rebuild_fp8_divide, 1),
    "fp8_divide_transposed": (partial(rebuild_fp8_divide, transposed=True), 1),
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
    ap.add_argument("--variants", default="", help=f"comma list (default: all): {', '.join(VARIANTS)}")
    ap.add_argument("--code-out", type=Path, default=None, help="CUDA: append inductor's code of each variant here")
    ap.add_argument("--code-for", default="gate", help="the projection whose code --code-out gets")
    args = ap.parse_args(argv)
    device, preset = torch.device(args.device), PRESETS[args.preset]
    compile_kw = dict(dynamic=False) if device.type == "cuda" else dict(backend="eager")
    gbps = copy_gbps(device)
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "copy_gbps": round(gbps, 1), "preset": args.preset}
    print(json.dumps(info))
    triton_here = device.type == "cuda" and TRITON_REBUILD
    names = args.variants.split(",") if args.variants else [n for n in VARIANTS if triton_here or "triton" not in n]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; allowed: {', '.join(VARIANTS)}")
    if not triton_here and any("triton" in n for n in names):
        raise SystemExit("--variants: the fp8_triton variants need CUDA and Triton")
    rows, step = [], {name: [0.0, 0.0] for name in names}  # per variant: ms, floor ms of one step
    for proj, (out_f, in_f) in preset["shapes"].items():
        parts = parts_of(out_f, in_f, device, args.block_size, args.scaler_block_size)
        kept = kept_state(parts)
        n = out_f * in_f
        # the 4-bit parts; the kept variants read an fp32 factor a block of 64 instead of its int8 scale
        read = parts.codes.nbytes + parts.block_scales.nbytes + parts.group_factors.nbytes
        for name in names:
            fn, per_weight = VARIANTS[name]
            compiled = torch.compile(fn, **compile_kw)
            if args.code_out is not None and proj == args.code_for and device.type == "cuda":
                from torch._inductor.utils import run_and_get_code
                _, code = run_and_get_code(compiled, parts, kept)
                with args.code_out.open("a") as f:
                    f.write(f"\n# ===== {name} ({proj} {out_f}x{in_f}) =====\n" + "\n\n".join(code))
            ms = timed_ms(lambda: compiled(parts, kept), device, args.calls, args.repeats)
            written = n * per_weight + (out_f * 4 if per_weight == 1 else 0)
            floor = (read + written) / gbps / 1e6
            row = {"proj": proj, "out": out_f, "in": in_f, "variant": name, "ms": round(ms, 5),
                   "bytes": read + written, "floor_ms": round(floor, 5), "x_floor": round(ms / floor, 2), **info}
            rows.append(row)
            step[name][0] += ms * preset["layers"]
            step[name][1] += floor * preset["layers"]
            print(f"{proj:>5} {out_f:>5}x{in_f:<5} {name:>30} {ms:9.4f} ms  floor {floor:8.4f} ms  "
                  f"x{ms / floor:6.2f}", flush=True)
    # layers_*: one rebuild of every weight of a step's layers in that variant's layout; step_*: the
    # step's two, forward (row-major) and backward (transposed, as _scaled_mm takes it; bf16 alike)
    summary = {}
    for name in names:
        summary[f"layers_{name}_ms"], summary[f"layers_{name}_floor_ms"] = (round(t, 3) for t in step[name])
        pair = name + "_transposed" if name != "dequant_bf16" else name
        if not name.endswith("_transposed") and pair in step:
            both = [step[name][i] + step[pair][i] for i in range(2)]
            summary[f"step_{name}_ms"], summary[f"step_{name}_floor_ms"] = (round(t, 3) for t in both)
            print(f"one step of {preset['layers']} layers, forward + backward rebuilds, {name}: {both[0]:.3f} ms "
                  f"(floor {both[1]:.3f})", flush=True)
    summary.update(info)
    rows.append(summary)
    if args.out is not None:
        with args.out.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


if __name__ == "__main__":
    main()
