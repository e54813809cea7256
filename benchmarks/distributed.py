"""Multi-GPU training speed and memory: 1 vs N processes, DDP and FSDP2, NF4 base, QDyLoRA / B-LoRA.

One step = forward + backward + AdamW of the adapter on a randomly initialised Llama-style causal
LM whose 7 projection types are adapted at rank r over an NF4 base (bf16 compute on CUDA). Each
process runs ``--batch`` sequences of ``--seq`` random tokens per step (weak scaling: the global
batch grows with N), so ``scaling = tokens/s(N) / tokens/s(1)`` and the ideal is N. Reported per
row: global tokens/s (median step), every rank's peak memory in training and after the build,
and the NF4 base bytes each rank holds (FSDP2 shards them; DDP replicates them).

Building a model bigger than one GPU in bf16: the decoder layers' linear weights are drawn once
(layer 0) and every other layer aliases them until ``leanlora.inject`` quantizes each layer's own
NF4 copy, so the dense peak is one layer, whatever the depth. Values are random either way; the
speed and memory of a step do not depend on them.

    # the 2xH200 machine (NVLink multicast off); one line per row, appended to --out
    OUT=results/distributed.jsonl
    for m in qdylora blora; do
      torchrun --nproc_per_node 1 benchmarks/distributed.py --size 7b --method $m --mode none --out $OUT
      torchrun --nproc_per_node 2 benchmarks/distributed.py --size 7b --method $m --mode ddp --out $OUT
      torchrun --nproc_per_node 2 benchmarks/distributed.py --size 7b --method $m --mode fsdp2 --out $OUT
    done
    # 70B: 138 GB in bf16 does not fit one H200; NF4 + FSDP2 over 2 GPUs trains it
    torchrun --nproc_per_node 2 benchmarks/distributed.py --size 70b --method qdylora --mode fsdp2 \\
        --checkpointing --batch 1 --out $OUT
    # CPU check of the script itself (gloo)
    torchrun --nproc_per_node 2 benchmarks/distributed.py --size tiny --mode fsdp2 --device cpu --steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import leanlora  # noqa: E402
from leanlora import distributed as D  # noqa: E402
from leanlora.config import AdapterConfig, NF4Config, PriorConfig  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SIZES = {  # Llama-2 geometries (70B: grouped-query attention), 32k vocabulary
    "tiny": dict(hidden=64, inter=128, layers=2, heads=4, kv_heads=2, vocab=256),
    "1b": dict(hidden=2048, inter=5632, layers=22, heads=32, kv_heads=4, vocab=32000),
    "7b": dict(hidden=4096, inter=11008, layers=32, heads=32, kv_heads=32, vocab=32000),
    "13b": dict(hidden=5120, inter=13824, layers=40, heads=40, kv_heads=40, vocab=32000),
    "70b": dict(hidden=8192, inter=28672, layers=80, heads=64, kv_heads=8, vocab=32000),
}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="7b")
    ap.add_argument("--layers", type=int, default=None, help="override the size's decoder layer count")
    ap.add_argument("--method", choices=("qdylora", "blora"), default="qdylora")
    ap.add_argument("--mode", choices=D.MODES, default="fsdp2")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--batch", type=int, default=4, help="sequences per process per step")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--checkpointing", action="store_true", help="recompute decoder layers in backward")
    ap.add_argument("--out", type=Path, default=None, help="append one JSON line per run (rank 0)")
    return ap.parse_args(argv)


def adapter_config(method: str, r: int, scaler_block_size: int) -> AdapterConfig:
    nf4 = NF4Config(block_size=64, scaler_block_size=scaler_block_size)
    if method == "qdylora":
        return AdapterConfig(target_modules=TARGETS, r=r, alpha=2.0 * r, ranks="nested", base="nf4", nf4=nf4)
    return AdapterConfig(target_modules=TARGETS, r=r, alpha=2.0 * r, ranks="gated", precision="learned",
                         base="nf4", nf4=nf4, prior=PriorConfig(lmbda=1e-3))


def build_model(shape: dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A random Llama on ``device`` whose decoder linears alias layer 0's until NF4 quantization."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["inter"],
                      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                      num_key_value_heads=shape["kv_heads"], max_position_embeddings=4096)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(dtype)
    g = torch.Generator(device=device).manual_seed(seed)  # the same draws on every rank

    def rand(*size):
        return torch.nn.Parameter(torch.randn(*size, generator=g, device=device, dtype=dtype) * 0.02,
                                  requires_grad=False)

    model.model.embed_tokens.weight = rand(cfg.vocab_size, cfg.hidden_size)
    model.lm_head.weight = rand(cfg.vocab_size, cfg.hidden_size)
    first = None
    for layer in model.model.layers:
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        if first is None:
            first = {n: rand(*m.weight.shape) for n, m in linears.items()}
        for n, m in linears.items():
            m.weight = first[n]
    for name, module in model.named_modules():
        if "norm" in type(module).__name__.lower() and getattr(module, "weight", None) is not None:
            module.weight = torch.nn.Parameter(torch.ones(module.weight.shape, device=device, dtype=dtype),
                                               requires_grad=False)
    with torch.device(device):  # its inverse frequencies are computed at construction
        model.model.rotary_emb = LlamaRotaryEmbedding(config=cfg)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"build_model left tensors on the meta device: {left[:5]}")
    return model


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # CPU: the process's peak RSS


def nf4_local_bytes(model) -> int:
    from torch.distributed.tensor import DTensor

    from leanlora.base.nf4 import NF4Base

    total = 0
    for m in model.modules():
        if isinstance(m, NF4Base):
            w = m.weight.to_local() if isinstance(m.weight, DTensor) else m.weight
            total += sum(t.numel() * t.element_size() for t in (w.quantized_data, w.quantized_scalers,
                                                                 w.quantization_factor))
    return total


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off on the lent machines
    device = D.init(args.device)
    mode = args.mode if D.world_size() > 1 else "none"
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    shape = dict(SIZES[args.size])
    if args.layers:
        shape["layers"] = args.layers
    # NF4 scaler groups must split evenly over the ranks: tiny layers need small groups
    config = adapter_config(args.method, args.r, 256 if shape["hidden"] >= 1024 else 8)

    t0 = time.perf_counter()
    model = build_model(shape, device, dtype)
    leanlora.inject(model, config)        # quantizes every adapted base to NF4; the aliases go
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    D.sync_rank_sampler(model)
    wrapped = D.wrap(model, mode)
    torch.manual_seed(D.rank_seed(0))
    build_s = time.perf_counter() - t0
    build_peak = peak_bytes(device)
    optimizer = torch.optim.AdamW(leanlora.param_groups(model, 1e-4), lr=1e-4)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    g = torch.Generator(device=device).manual_seed(1000 + D.rank())
    times = []
    for step in range(args.warmup + args.steps):
        x = torch.randint(0, shape["vocab"], (args.batch, args.seq), device=device, generator=g)
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        leanlora.advance(model, step)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = wrapped(input_ids=x, labels=x).loss + D.regularizer(wrapped).to(device)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        D.barrier()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)

    step_s = statistics.median(times)
    peaks = [None] * D.world_size()
    mine = {"train_peak_gib": peak_bytes(device) / 2**30, "build_peak_gib": build_peak / 2**30,
            "nf4_base_gib": nf4_local_bytes(model) / 2**30}
    if D.is_distributed():
        torch.distributed.all_gather_object(peaks, mine)
    else:
        peaks = [mine]
    n_params = sum(p.numel() for p in model.parameters()) if mode != "fsdp2" else None
    row = {
        "size": args.size, "layers": shape["layers"], "method": args.method, "mode": mode,
        "processes": D.world_size(), "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "batch_per_process": args.batch, "seq": args.seq, "r": args.r, "checkpointing": args.checkpointing,
        "step_s_median": step_s, "tokens_per_s": D.world_size() * args.batch * args.seq / step_s,
        "per_rank": peaks, "build_s": build_s, "loss_last": float(loss.detach()),
        "local_params": n_params, "torch": torch.__version__,
    }
    if D.is_main_process():
        print(json.dumps(row))
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    return row


if __name__ == "__main__":
    main()
    D.end_process(0)  # not interpreter teardown, where gloo's threads can abort a finished run
