"""Training-step speed and memory of leanlora methods against PEFT, in one run, on one GPU.

One step = forward + backward + AdamW on a randomly initialised Llama-style causal LM (bf16),
every one of the 7 projection types adapted at rank r. Each row builds a fresh model from the
same seed, runs ``--warmup`` steps (compilation included), then times ``--steps`` steps with CUDA
events and reports the median. Every row runs in a fresh process of its own (``--same-process``
runs them all in this one): a host-bound step is sensitive to what ran before it (isolation.py).

The floor: a frozen-base adapter step does about 4·N FLOPs per token (forward 2N, input-gradient
backward 2N; N = parameters of the matmuls, lm_head included; attention scores and the adapter
path come on top), so ``floor tokens/s = rate / (4 N)`` with the bf16 matmul rate measured here.

    python -u benchmarks/speed.py --preset 1b --out $OUT/speed.jsonl       # issue 7's shape
    python -u benchmarks/speed.py --preset small --rows peft_lora,lean_lora  # quick check

The strongest PEFT setups are ``peft_lora_bf16@compiled`` (bf16 adapters, per-layer compile) and
``peft_lora_bf16_liger`` (bf16 adapters, Liger-Kernel's RMSNorm, SwiGLU, RoPE and fused linear
cross-entropy; its patches are process-wide, so run it in its own process, the default). leanlora
rows take their loss as ``leanlora train`` does (``--lean-fused-loss auto``: Liger's fused loss on
CUDA when installed); ``lean_*_fp8`` rows hold the frozen base in float8 (``base: fp8``), and
``lean_*_f8`` rows hold it in NF4 with float8 GEMMs (``nf4.gemm: fp8``). The table gives each
row's speed over ``peft_lora_bf16@compiled`` and its step time over the floor's.
"""

from __future__ import annotations

import argparse
import collections
import functools
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._functorch.config as functorch_config
import torch._inductor.config as inductor_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from adapters import ADAMW_IMPLS, METHODS, Shape, adamw_step, apply, trainable_count, unavailable  # noqa: E402
from isolation import row_in_fresh_process  # noqa: E402
from leanlora.train.runconfig import TrainConfig  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PRESETS = {  # Llama-3.2-1B geometry with a 32k vocabulary: 1.10e9 parameters
    "1b": dict(hidden=2048, inter=8192, layers=16, heads=32, kv_heads=8, vocab=32000, batch=8, seq=1024),
    "small": dict(hidden=1024, inter=4096, layers=4, heads=16, kv_heads=4, vocab=32000, batch=4, seq=512),
    "tiny": dict(hidden=64, inter=128, layers=2, heads=4, kv_heads=2, vocab=256, batch=2, seq=32),
}
# Rows in the order they run; each name is "<method>", "<method>@compiled" or "<method>@graphed"
# (compiled, and the whole step captured as one CUDA graph: leanlora.train.step_graph).
DEFAULT_ROWS = ("base@eager,base@compiled,peft_lora,peft_lora@compiled,lean_lora,lean_lora@compiled,"
                "lean_qdylora@compiled,lean_vblora@compiled,lean_blora@compiled,lean_combo@compiled,"
                "peft_vblora,peft_adalora,peft_qlora")


def add_timing_args(ap: argparse.ArgumentParser, steps: int) -> None:
    """Warm-up and timed steps, the JSONL output and the device: the same in every step benchmark."""
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--out", default=None, help="JSONL file; one line per row, written as each row ends")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def add_shape_args(ap: argparse.ArgumentParser) -> None:
    """--preset and an override of each of its numbers (filled in by :func:`apply_preset`)."""
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    for k in PRESETS["small"]:
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=None, help=f"override the preset's {k}")


def apply_preset(args: argparse.Namespace) -> argparse.Namespace:
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(ap)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--rows", default=DEFAULT_ROWS, help="comma list of method[@eager|@compiled|@graphed]; 'base' = "
                    "frozen model with input-gradient backward and no adapter (the base-model share)")
    ap.add_argument("--compile", choices=("layers", "model"), default="layers",
                    help="layers: torch.compile each decoder layer (compiled once, reused); model: the whole model")
    ap.add_argument("--compile-mode", choices=("default", "reduce-overhead", "max-autotune-no-cudagraphs"),
                    default="default", help="torch.compile mode of compiled rows (reduce-overhead = CUDA graphs), "
                    "the same for PEFT and leanlora rows")
    ap.add_argument("--bank-vectors", type=int, default=256, help="VB-LoRA bank size h (PEFT and leanlora)")
    ap.add_argument("--bank-length", type=int, default=256, help="VB-LoRA vector length b (must divide every dim)")
    ap.add_argument("--adapter-dtype", choices=("float32", "bfloat16"), default="float32",
                    help="leanlora adapter dtype (PEFT keeps fp32 adapters on a bf16 model by default)")
    ap.add_argument("--optimizer", choices=ADAMW_IMPLS, default="foreach",
                    help="AdamW implementation for every row: foreach (torch's default on GPU), fused, leanlora "
                         "(leanlora.optim.adamw), or compiled (torch.compile of the step; see optimizer_step.py)")
    ap.add_argument("--lean-optimizer", choices=ADAMW_IMPLS, default=None,
                    help="AdamW implementation for leanlora rows only (default: --optimizer's); leanlora is what "
                         "leanlora's training loop builds")
    ap.add_argument("--lean-fused-loss", choices=("auto", "liger", "chunked", "off"), default="auto",
                    help="causal-LM loss of leanlora rows, as train.fused_loss (leanlora.train.fused_loss): auto = "
                         "Liger's fused linear cross-entropy on CUDA when liger-kernel is installed, as `leanlora "
                         "train` does; PEFT rows use the model's own loss (Liger's for the +Liger row)")
    ap.add_argument("--lean-liger-kernels", action="store_true",
                    help="leanlora rows: Liger-Kernel's RMSNorm, SwiGLU and RoPE on the base model before inject "
                         "(the loss stays --lean-fused-loss's): to measure whether they beat inductor's fusions")
    ap.add_argument("--lean-activation-budget", type=float, default=TrainConfig.activation_budget,
                    help="leanlora rows: torch._functorch.config.activation_memory_budget for the compiled layers "
                         "(default: leanlora train's train.activation_budget; 1.0: save what the partitioner "
                         "saves by default; lower recomputes more in the backward)")
    ap.add_argument("--lean-siblings", choices=("on", "off"), default="on",
                    help="leanlora rows: sibling layers (q/k/v, gate/up) share their first GEMM "
                         "(leanlora.groups.siblings; on, as in training) or each runs its own (off)")
    ap.add_argument("--budget-phase", choices=("frozen", "ramp"), default="frozen",
                    help="leanlora rows with a budget: time the steps after its freeze or during its ramp")
    ap.add_argument("--profile", default="", help="comma list of row-name substrings to profile for one extra step")
    ap.add_argument("--profile-top", type=int, default=12,
                    help="kernels listed by a profile, by device time and by launch count (the sums by kind "
                         "cover every kernel)")
    ap.add_argument("--cprofile", default="",
                    help="comma list of row-name substrings: run --steps more steps of those rows under cProfile "
                         "and write the host time per Python function beside --out (<out>_<row>.prof.txt). At a "
                         "tiny batch (--batch 1 --seq 128) a GPU step is host time alone, whatever the shape's layers")
    ap.add_argument("--lean-inductor", default="",
                    help="leanlora rows: inductor config settings KEY=INT,... (bool or int settings) for their "
                         "compiled code, e.g. combo_kernels=1; recorded in the row's method")
    ap.add_argument("--nf4-rebuild", choices=("triton", "torch"), default=None,
                    help="leanlora rows on an NF4 base with float8 GEMMs: the e4m3 rebuild's kernels on CUDA "
                         "(Triton, or the compiled torch operators; default: the library's); recorded in the row")
    ap.add_argument("--same-process", action="store_true",
                    help="run every row in this process (default: each in a fresh one, see isolation.py; "
                         "the tables of BENCHMARKS.md 1-1f were measured with every row in one process)")
    add_timing_args(ap, steps=12)
    ap.add_argument("--timing", choices=("step", "window", "late"), default="step",
                    help="step: each step timed alone, its loss read back (the host work before a step's first "
                         "kernel leaves the device idle); window: the steps back to back with the losses read "
                         "once at the end, as a training loop that logs every few steps runs them (the host "
                         "prepares the next step while the device finishes this one); late: back to back, each "
                         "loss read once the next step is issued, as leanlora train reads them")
    args = apply_preset(ap.parse_args(argv))
    args.inductor_settings = inductor_settings(args.lean_inductor)  # refused before any row runs
    return args


def build_model(args, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.inter,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=max(args.seq, 128),
                      tie_word_embeddings=False, use_cache=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    return model.train()


def matmul_params(model) -> int:
    """N: weights that take part in a matmul (every nn.Linear, lm_head included; not embeddings)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def measure_ceilings(device) -> dict:
    """bf16 matmul rate (8192^3, random data) and device-to-device copy bandwidth, medians."""
    if device.type != "cuda":
        return {"matmul_tflops": float("nan"), "copy_tbps": float("nan")}
    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    mm = _time_fn(lambda: a @ b, 5, 20)
    src = torch.randn(1 << 30, device=device, dtype=torch.bfloat16)  # 2 GiB
    dst = torch.empty_like(src)
    cp = _time_fn(lambda: dst.copy_(src), 3, 10)
    del a, b, src, dst
    torch.cuda.empty_cache()
    return {"matmul_tflops": 2 * n**3 / mm / 1e12, "copy_tbps": 2 * 2 * (1 << 30) / cp / 1e12}


def _time_fn(fn, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return statistics.median(times)


def compile_model(model, how: str, mode: str = "default"):
    import torch._dynamo

    from leanlora.groups.stacking import compile_pieces

    torch._dynamo.config.cache_size_limit = 64  # regional compile: one entry per distinct layer guard set
    compile_pieces(model, mode)  # leanlora's grouped adapter pieces, as its training loop does (no-op for PEFT)
    if how == "model":
        return torch.compile(model, mode=mode)
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    for layer in layers:
        layer.compile(mode=mode)
    return model


def run_row(row: str, args, device, ids, floor_tps: float) -> dict:
    name, _, mode = row.partition("@")
    mode = mode or "eager"
    shape = Shape(targets=TARGETS, r=args.r, adapter_dtype=args.adapter_dtype,
                  bank_vectors=args.bank_vectors, bank_length=args.bank_length)
    if mode not in ("eager", "compiled", "graphed"):
        raise SystemExit(f"row {row!r}: mode {mode!r} is unknown; allowed eager, compiled, graphed")
    compiled = mode in ("compiled", "graphed")
    result = {"row": row, "mode": mode, "timing": args.timing, "compile": args.compile if compiled else None,
              "compile_mode": args.compile_mode if compiled else None}
    if name != "base":
        method = METHODS[name]
        result["method"] = method.name
        why = unavailable(method)
        if why:
            result["skipped"] = why
            return result
    else:
        result["method"] = "frozen base, no adapter"
    torch._dynamo.reset()
    gc.collect()  # what the compiler's caches held of the last row is garbage now
    if device.type == "cuda":
        torch.cuda.empty_cache()
        result["allocated_gib_at_start"] = torch.cuda.memory_allocated() / 2**30  # leftovers of earlier rows
    torch.manual_seed(0)
    model = build_model(args, device)
    if mode == "graphed":
        from leanlora.train.unpadded_attention import use_unpadded_attention

        # transformers' mask creation reads position ids back to the host outside a capture and
        # builds a 4D mask inside one; these batches have no padding, so no mask is needed at all
        use_unpadded_attention(model)
    result["n_matmul"] = matmul_params(model)
    hook, prior = None, False
    if name == "base":
        model.requires_grad_(False)
        model.enable_input_require_grads()  # backward through every layer, no weight gradient
        opt = opt_step = None
    else:
        if method.library == "leanlora" and args.lean_activation_budget < 1.0:
            # the min-cut partitioner recomputes what it can in the backward to save at most this share
            functorch_config.activation_memory_budget = args.lean_activation_budget
            result["activation_memory_budget"] = args.lean_activation_budget
            result["method"] += f", activation budget {args.lean_activation_budget:g}"
        if method.library == "leanlora":
            import leanlora.base.nf4_linear as nf4_linear

            nf4_linear.REBUILD_KERNEL = args.nf4_rebuild or nf4_linear.REBUILD_KERNEL
            result["nf4_rebuild"] = nf4_linear.REBUILD_KERNEL
        if method.library == "leanlora" and args.lean_inductor:
            for key, value in args.inductor_settings.items():  # an experiment's knob
                setattr(inductor_config, key, value)
            result["method"] += f", inductor {args.lean_inductor}"
        if method.library == "leanlora" and args.lean_liger_kernels:
            from liger_kernel.transformers import apply_liger_kernel_to_llama

            apply_liger_kernel_to_llama(model=model, fused_linear_cross_entropy=False)  # rope, rms_norm, swiglu
            result["liger_base_kernels"] = True
            result["method"] += " + Liger RMSNorm, SwiGLU, RoPE"
        model, groups, hook = apply(method, model, shape, "CAUSAL_LM", torch.bfloat16)
        if method.library == "leanlora":  # what the base became (an "_auto" row leaves it to the library)
            from leanlora.inject import shared_state

            chosen = shared_state(model).config
            result["base"] = chosen.base + (f" ({chosen.nf4.gemm} GEMMs)" if chosen.base == "nf4" else "")
        if method.library == "leanlora" and args.lean_siblings == "off":
            from leanlora.groups.siblings import unlink_siblings
            from leanlora.layer import AdaptedLinear

            unlink_siblings([m for m in model.modules() if isinstance(m, AdaptedLinear)])
            result["method"] += ", no shared sibling GEMM"
        prior = method.library == "leanlora" and method.has_prior
        impl = args.lean_optimizer if method.library == "leanlora" and args.lean_optimizer else args.optimizer
        result["optimizer"] = impl
        opt, opt_step = adamw_step(groups, impl)
    model.train()
    result["trainable"] = trainable_count(model)
    fused = lean_fused_loss(args, method if name != "base" else None, model, device, mode)
    result["fused_loss"] = fused if name != "base" and method.library == "leanlora" else (
        "liger (patched forward)" if name != "base" and method.liger else "off")
    if mode == "graphed" and (opt is None or hook is not None or args.compile_mode == "reduce-overhead"):
        result["skipped"] = "a whole-step CUDA graph needs an optimizer, no per-step host hook (AdaLoRA) and " \
                            "no per-region CUDA graphs"
        return result
    fwd = compile_model(model, args.compile, args.compile_mode) if compiled else model
    graphs = compiled and args.compile_mode == "reduce-overhead"
    if name != "base" and method.library == "leanlora":
        import leanlora

        # as `leanlora train` does: "auto" gives a gated adapter its budget controller. The run length
        # puts every timed step after the freeze (where a run spends three quarters of its steps; the
        # one-off projection falls in the warm-up, before a graphed row's capture), or, with
        # --budget-phase ramp, before it (λ acting every step).
        ran = args.warmup + 2 + args.steps
        total = 2 * args.warmup + 2 if args.budget_phase == "frozen" else 5 * ran  # freeze at a quarter of it
        leanlora.budget.start(model, total)
    if prior:
        import leanlora

        # as the training loop does: eager, stated by group as stacked rows
        regularize = leanlora.regularizer
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    if hasattr(torch._dynamo.utils, "counters"):
        torch._dynamo.utils.counters.clear()

    host = HostClock()
    pre_hooks = model._forward_pre_hooks
    for key, pre_hook in list(pre_hooks.items()):  # the grouped pieces' host time, inside the forward's
        if getattr(pre_hook, "__name__", "") == "refresh_pieces":
            pre_hooks[key] = functools.wraps(pre_hook)(lambda m, a, fn=pre_hook: host.timed("pieces", fn, m, a))

    def loss_of(batch: dict):
        if fused == "off":
            return fwd(**batch).loss
        from leanlora.train.fused_loss import causal_lm_loss

        return causal_lm_loss(model, batch, fused)  # the body's compiled layers, no logits tensor

    whole = None
    if mode == "graphed":
        from leanlora.train.step_graph import StepGraph

        def captured_step(batch):
            loss = loss_of(batch)
            if prior:
                loss = loss + regularize(model).to(loss.device)
            loss.backward()
            opt_step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        # a compiled model may compile again in its first calls (a guard on a changed value): the
        # graphed rows run two more warm-up steps, the last of them the one captured (and replayed)
        whole = StepGraph(captured_step, opt, warmup=args.warmup + 1)

    def step(i: int) -> float:
        from torch.profiler import record_function

        if graphs:  # a new iteration: CUDA-graph outputs of the last one may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        if name != "base" and method.library == "leanlora":
            import leanlora

            with record_function("phase: advance"):
                host.timed("advance", leanlora.advance, model, i)
        if whole is not None:
            with record_function("phase: whole step (CUDA graph)"):
                return read(host.timed("step", whole, {"input_ids": ids, "labels": ids}))
        with record_function("phase: forward"):
            loss = host.timed("forward", lambda: loss_of({"input_ids": ids, "labels": ids}))
        if prior:
            with record_function("phase: prior"):
                loss = loss + host.timed("prior", regularize, model).to(loss.device)
        with record_function("phase: backward"):
            host.timed("backward", loss.backward)
        if opt is not None:
            with record_function("phase: optimizer"):
                host.timed("optimizer", opt_step)
                if hook is not None:
                    hook(i)
                opt.zero_grad(set_to_none=True)
        return read(loss.detach())

    # --timing step reads each loss back (the step ends on the host); window leaves it on the device
    read = float if args.timing == "step" else (lambda loss: loss)

    t0 = time.perf_counter()
    warmup = args.warmup + (2 if whole is not None else 0)
    for i in range(warmup):
        step(i)
    result["warmup_s"] = time.perf_counter() - t0
    result["gc_objects"] = len(gc.get_objects())
    times, last_loss = [], float("nan")
    collector = GcTimer()
    gc.callbacks.append(collector)
    host.clear()
    try:
        if args.timing in ("window", "late"):
            seconds, last = _window(step, range(warmup, warmup + args.steps), device, late=args.timing == "late")
            times, last_loss = [seconds], float(last)
        else:
            for i in range(warmup, warmup + args.steps):
                if device.type == "cuda":
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record()
                    last_loss = step(i)
                    e.record()
                    e.synchronize()
                    times.append(s.elapsed_time(e) / 1e3)
                else:
                    t = time.perf_counter()
                    last_loss = step(i)
                    times.append(time.perf_counter() - t)
    finally:  # a failing row must not leave its collector timing the next rows
        gc.callbacks.remove(collector)
    result.update(gc_ms_per_step=collector.seconds * 1e3 / args.steps, gc_full_collections=collector.full,
                  host_ms=host.medians())
    if whole is not None:
        result.update(graph_replays=whole.replays, graph_uncaptured_calls=whole.uncaptured_calls,
                      graph_failure=whole.failure, graph_failure_trace=whole.failure_trace)
    med = statistics.median(times)
    tokens = ids.numel()
    result.update(step_ms=med * 1e3, step_ms_min=min(times) * 1e3, step_ms_max=max(times) * 1e3,
                  tokens_per_s=tokens / med, loss=last_loss,
                  peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan"),
                  pct_floor=100 * tokens / med / floor_tps if floor_tps == floor_tps else float("nan"))
    if args.profile and any(p in row for p in args.profile.split(",")):
        result["profile"] = profile_step(step, warmup + args.steps, args.profile_top)
    if args.cprofile and any(p in row for p in args.cprofile.split(",")):
        result["cprofile"] = cprofile_steps(step, warmup + args.steps, args.steps, args.out, row)
    counters = getattr(torch._dynamo.utils, "counters", {})
    result["graph_breaks"] = sum(counters.get("graph_break", {}).values()) if counters else None
    result["unique_graphs"] = counters.get("stats", {}).get("unique_graphs") if counters else None
    del model, fwd, opt, opt_step
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def _window(step, steps: range, device, late: bool = False) -> tuple[float, torch.Tensor]:
    """(seconds a step, the last loss) over ``steps`` run back to back, the device waited on once at the
    end; ``late``: each step's loss read back once the next step is issued."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t, unread = time.perf_counter(), None
    for i in steps:
        loss = step(i)
        if late and unread is not None:
            float(unread)
        unread = loss
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / len(steps), loss


def lean_fused_loss(args, method, model, device, mode: str) -> str:
    """The loss implementation of a leanlora row (``--lean-fused-loss`` resolved as the training loop
    resolves train.fused_loss); "off" for PEFT and base rows and for a whole-model compile (the
    fused loss calls the body, which would bypass the compiled wrapper)."""
    if method is None or method.library != "leanlora" or (mode != "eager" and args.compile == "model"):
        return "off"
    from leanlora.train.fused_loss import choose

    return choose(args.lean_fused_loss, model, device, cuda_graph=mode == "graphed")


class HostClock:
    """Host wall time of each phase of a step, without synchronising: how long Python takes to issue it.

    When the GPU runs ahead of the host these are the host's own costs; when the host waits on the
    GPU (a full launch queue, a synchronising call) they include that wait.
    """

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = {}

    def timed(self, phase: str, fn, *args):
        t = time.perf_counter()
        out = fn(*args)
        self.samples.setdefault(phase, []).append(time.perf_counter() - t)
        return out

    def clear(self) -> None:
        self.samples.clear()

    def medians(self) -> dict[str, float]:
        return {k: round(1e3 * statistics.median(v), 3) for k, v in self.samples.items()}


class GcTimer:
    """A ``gc.callbacks`` entry: host time spent in the garbage collector, and its full collections.

    A host-bound step pays for every collection; a process that compiled from scratch holds many
    more objects than one that loaded its code from the cache, so its full collections cost more.
    """

    def __init__(self) -> None:
        self.seconds, self.full, self._t = 0.0, 0, 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._t
            self.full += info["generation"] == 2


def save_failed_kernel(message: str, folder: Path, row: str) -> str | None:
    """Copy the Triton source of a kernel that failed to compile (named in ``message``) next to the results."""
    import glob
    import re
    import shutil
    import tempfile

    m = re.search(r"Name=(triton_\w+)", message)
    if not m:
        return None
    for path in glob.glob(os.path.join(tempfile.gettempdir(), "torchinductor_*", "**", "*.py"), recursive=True):
        try:
            if m.group(1) in Path(path).read_text(errors="ignore"):
                dest = folder / f"failed_kernel_{row.replace('@', '_')}.py"
                shutil.copy(path, dest)
                return str(dest)
        except OSError:
            continue
    return None


KERNEL_KINDS = (  # (kind, substrings of a kernel's name), first match wins: inductor names its kernels
    ("inductor", ("triton_",)),  # after the operators they fuse, "_scaled_mm" and "silu" among them
    ("attention", ("flash", "fmha", "attention", "attn")),
    ("gemm", ("gemm", "cutlass", "nvjet", "sm90_xmma", "sm80_xmma", "cublas", "matmul", "scaled_mm")),
    ("liger", ("_kernel",)),
    ("copy", ("copy", "Memcpy", "memcpy", "fill", "Memset")),
)


def kernel_kind(name: str) -> str:
    """The coarse kind of a CUDA kernel, from its name: where a step's device time goes."""
    lowered = name.lower()
    for kind, marks in KERNEL_KINDS:
        if any(m.lower() in lowered for m in marks):
            return kind
    return "other"


def profile_step(step, i: int, top: int = 12) -> list[dict]:
    """One profiled step: launch count, host and device time per phase, the largest kernels.

    Phases are the ``record_function`` ranges of ``step`` (advance, forward, prior, backward,
    optimizer); "host ms" is the CPU time inside the range, "cuda ms" the kernel time it launched.
    Kernels are listed twice: the ``top`` by device time and the ``top`` by launch count.
    """
    from torch.profiler import ProfilerActivity, profile

    on_gpu = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])) as prof:
        step(i)
        if on_gpu:
            torch.cuda.synchronize()
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx"))
    phases = [{"phase": e.key.removeprefix("phase: "), "host_ms": e.cpu_time_total / 1e3,
               "cuda_ms": e.device_time_total / 1e3} for e in events
              if e.key.startswith(("phase: ", "leanlora: ")) and e.device_type == torch.autograd.DeviceType.CPU]
    kernels = [(e.key, e.device_time_total, e.count) for e in events  # not the ranges' GPU-side copies
               if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time_total > 0
               and not e.key.startswith(("phase: ", "leanlora: ", "Optimizer.", "## Call"))]
    by_kind: dict[str, list[float]] = {}
    for name, t, c in kernels:
        ms_count = by_kind.setdefault(kernel_kind(name), [0.0, 0])
        ms_count[0] += t / 1e3
        ms_count[1] += c
    by_time = sorted(kernels, key=lambda r: -r[1])[:top]
    by_count = sorted(kernels, key=lambda r: -r[2])[:top]
    launched = kernel_launchers(prof.events(), {k for k, _, _ in by_count})
    return ([{"launches": launches, "kernels": len(kernels),
              "kernel_ms": sum(t for _, t, _ in kernels) / 1e3}] + phases
            + [{"kind": k, "cuda_ms": ms, "count": c} for k, (ms, c) in sorted(by_kind.items(), key=lambda r: -r[1][0])]
            + [{"name": k[:120], "cuda_ms": t / 1e3, "count": c, "by": "time"} for k, t, c in by_time]
            + [{"name": k[:120], "cuda_ms": t / 1e3, "count": c, "by": "count"} for k, t, c in by_count]
            + [{"name": k[:120], "launched_by": chain, "count": c} for (k, chain), c in launched.most_common(top)])


def kernel_launchers(events, names: set[str], depth: int = 4) -> collections.Counter:
    """(kernel name, the ops that launched it, innermost first) -> count, for the kernels in
    ``names``: where a step's many small kernels (memsets, copies, split-K reductions) come from.
    Only a step that is not one CUDA graph says: a replayed graph's kernels all come from its launch."""
    counts = collections.Counter()
    for event in events:
        for kernel in getattr(event, "kernels", ()):
            if kernel.name not in names:
                continue
            chain, op = [], event
            while op is not None and len(chain) < depth:
                if not op.name.startswith("cu"):  # the runtime call (cudaLaunchKernel, cuLaunchKernel...) says nothing
                    chain.append(op.name[:80])
                op = op.cpu_parent
            counts[(kernel.name, " < ".join(chain))] += 1
    return counts


def cprofile_steps(step, first: int, steps: int, out: str | None, row: str) -> dict:
    """``steps`` more steps under cProfile: their host ms per step, and the report's path.

    The report lists the functions by own time and by cumulative time, per step; the synchronise
    after the steps keeps GPU work still queued out of the last step's time.
    """
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    for i in range(first, first + steps):
        step(i)
    prof.disable()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    host_ms = 1e3 * (time.perf_counter() - t) / steps
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    text.write(f"{row}: {steps} steps, {host_ms:.2f} ms per step (times below are for all {steps} steps)\n")
    stats.sort_stats("tottime").print_stats(60)
    stats.sort_stats("cumtime").print_stats(60)
    stem = Path(out).with_suffix("") if out else Path("speed")
    report = stem.parent / f"{stem.name}_{row.replace('@', '_')}.prof.txt"
    report.write_text(text.getvalue())
    return {"host_ms_per_step": host_ms, "report": str(report)}


def record(res: dict, rows: list[dict], out: Path | None) -> None:
    """Keep a finished row, print it, and append it to the JSONL file at once (a killed run keeps it)."""
    rows.append(res)
    print(json.dumps(res), flush=True)
    if out:
        with out.open("a") as f:
            f.write(json.dumps(res) + "\n")


def table(rows: list[dict]) -> str:
    """Markdown rows; the ratios are speed (tokens/s) over that of the named PEFT row, "floor ×" is
    step time over the bf16 floor's (4·N·tokens / measured bf16 matmul rate)."""
    ref = {r["row"]: r.get("tokens_per_s") for r in rows}
    eager, comp, bf16 = ref.get("peft_lora"), ref.get("peft_lora@compiled"), ref.get("peft_lora_bf16@compiled")
    lines = ["| row | tokens/s | × PEFT LoRA | × compiled PEFT LoRA | × compiled PEFT bf16 | peak GiB | trainable | "
             "% floor | floor × | loss | step ms (min–max) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r or "error" in r:
            lines.append(f"| {r['row']} ({r.get('method', '')}) | {'skipped: ' + r['skipped'] if 'skipped' in r else 'error: ' + r['error']} "
                         "| | | | | | | | | |")
            continue
        tps = r["tokens_per_s"]
        x1 = f"{tps / eager:.2f}" if eager else "–"
        x2 = f"{tps / comp:.2f}" if comp else "–"
        x3 = f"{tps / bf16:.2f}" if bf16 else "–"
        floor_x = f"{100 / r['pct_floor']:.2f}" if r["pct_floor"] == r["pct_floor"] else "–"
        loss = "" if r.get("fused_loss", "off") == "off" else f"fused: {r['fused_loss']}"
        lines.append(f"| {r['row']} ({r['method']}) | {tps:,.0f} | {x1} | {x2} | {x3} | {r['peak_gib']:.1f} | "
                     f"{r['trainable']:,} | {r['pct_floor']:.0f} | {floor_x} | {loss} | "
                     f"{r['step_ms']:.1f} ({r['step_ms_min']:.1f}–{r['step_ms_max']:.1f}) |")
    return "\n".join(lines)


def inductor_settings(text: str) -> dict:
    """``KEY=INT,...`` (--lean-inductor) as inductor config values of each setting's own type."""
    settings = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if not hasattr(inductor_config, key) or not isinstance(getattr(inductor_config, key), (bool, int)):
            raise SystemExit(f"--lean-inductor: {key!r} is no bool or int setting of torch._inductor.config")
        settings[key] = type(getattr(inductor_config, key))(int(value))
    return settings


def _restored(settings: dict) -> dict:
    """The current values of ``settings``' keys, for a patch that puts them back."""
    return {key: getattr(inductor_config, key) for key in settings}


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    info = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "args": vars(args)}
    for lib in ("transformers", "peft", "torchao", "bitsandbytes"):
        try:
            info[lib] = __import__(lib).__version__
        except Exception as err:
            info[lib] = f"absent ({type(err).__name__})"
    info.update(measure_ceilings(device))
    probe = build_model(args, "meta")
    n = matmul_params(probe)
    tokens = args.batch * args.seq
    floor_tps = info["matmul_tflops"] * 1e12 / (4 * n)
    # bytes floor: the bf16 weights read once forward and once backward (4 N bytes) at the copy rate
    info.update(n_matmul=n, n_total=sum(p.numel() for p in probe.parameters()), tokens_per_step=tokens,
                floor_step_ms=1e3 * tokens / floor_tps, floor_tokens_per_s=floor_tps,
                weight_bytes_floor_ms=1e3 * 4 * n / (info["copy_tbps"] * 1e12) if info["copy_tbps"] == info["copy_tbps"] else None)
    del probe
    print(json.dumps(info), flush=True)
    out = Path(args.out) if args.out else None
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:  # appended: several invocations may share one file
            f.write(json.dumps({"info": info}) + "\n")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)
    rows = []
    for row in [r.strip() for r in args.rows.split(",") if r.strip()]:
        t = time.perf_counter()
        if not args.same_process:
            res = row_in_fresh_process(__file__, list(sys.argv[1:] if argv is None else argv), row,
                                       ("--same-process",), out.parent if out else None)
            record(res, rows, out)
            continue
        try:
            # a leanlora row may lower the budget or set inductor options for itself, never for the next row
            with functorch_config.patch(activation_memory_budget=functorch_config.activation_memory_budget), \
                    inductor_config.patch(_restored(args.inductor_settings)):
                res = run_row(row, args, device, ids, floor_tps)
        except Exception as err:  # one failing method must not hide the others' numbers
            import traceback

            traceback.print_exc()
            res = {"row": row, "method": row, "error": f"{type(err).__name__}: {str(err)[:300]}"}
            if out:
                res["kernel_source"] = save_failed_kernel(str(err), out.parent, row)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        res["wall_s"] = time.perf_counter() - t
        record(res, rows, out)
    print(table(rows), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
