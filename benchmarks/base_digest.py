"""Throughput of the base digest that ``leanlora.save`` records and ``leanlora.load`` checks.

Hashes ``--gib`` GiB of random weights in tensors of a 7B model's typical size (4096 x 4096),
once as bf16 (one xxh3-128 pass over the bytes) and once as fp32 (the bytes plus the bf16 and
fp16 roundings: the extra cost of a float32 base), and prints GB/s and the time a 7B model's
weights (6.74e9 parameters) in that dtype would take at that rate.

    python benchmarks/base_digest.py --gib 2 --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch

from leanlora.artifact.identity import tensor_digest

SEVEN_B_PARAMS = 6.74e9


def _rate(dtype: torch.dtype, gib: float) -> float:
    n = int(gib * 2 ** 30 / torch.finfo(dtype).bits * 8)
    tensors = [torch.randn(4096, 4096).to(dtype) for _ in range(max(1, n // (4096 * 4096)))]
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    tensor_digest(tensors[0])  # warm up
    start = time.perf_counter()
    for t in tensors:
        tensor_digest(t)
    return nbytes / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="GiB of weights per dtype")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (the fp32 roundings); 0: default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for dtype in (torch.bfloat16, torch.float32):
        rate = _rate(dtype, args.gib)
        size = SEVEN_B_PARAMS * torch.finfo(dtype).bits / 8 / 1e9
        print(f"{str(dtype).removeprefix('torch.'):>9}: {rate:6.2f} GB/s of weights; "
              f"a 7B model in {str(dtype).removeprefix('torch.')} ({size:.1f} GB) at this rate: {size / rate:5.1f} s")


if __name__ == "__main__":
    main()
