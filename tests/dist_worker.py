"""One process of the 2-process CPU checks of tests/test_distributed.py (run under torchrun, gloo).

For every method it trains the adapter of a tiny Llama with N processes (each on its share of
the global batch) and, in the same process, a single-process reference on the whole global
batch from the same initialisation, then compares. Rank 0 alone writes ``results.json``; the
ranks' own views (digests of the trained and finalized adapters) travel to it by all_gather.

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py --mode fsdp2 --out DIR
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import leanlora  # noqa: E402
from leanlora import distributed as D  # noqa: E402
from leanlora.config import AdapterConfig, BankConfig, GatesConfig, NF4Config, NestedConfig, PriorConfig  # noqa: E402
from leanlora.artifact.finalize import finalize  # noqa: E402
from leanlora.artifact.io import adapter_state_dict  # noqa: E402


def _conftest():
    spec = importlib.util.spec_from_file_location("leanlora_tests_conftest", ROOT / "tests" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CONFTEST = _conftest()
TARGETS = ("q_proj", "v_proj", "down_proj")
GLOBAL_BATCH, SEQ, STEPS, LR = 4, 8, 3, 1e-2


def method_configs(have_gated: bool) -> dict[str, AdapterConfig]:
    configs = {
        "lora": AdapterConfig(target_modules=TARGETS, r=4, alpha=8.0),
        "vblora": AdapterConfig(target_modules=TARGETS, r=4, factors="bank",
                                bank=BankConfig(num_vectors=16, vector_length=16, topk=2)),
        # QDyLoRA: nested ranks over an NF4 base; scaler groups of 8 blocks so that 2 ranks can shard it
        "qdylora": AdapterConfig(target_modules=TARGETS, r=4, alpha=8.0, ranks="nested", base="nf4",
                                 nested=NestedConfig(seed=3), nf4=NF4Config(block_size=64, scaler_block_size=8)),
        # the same base with float8 GEMMs: under FSDP2 the layer rebuilds its codes from the gathered weight
        "qlora_f8": AdapterConfig(target_modules=TARGETS, r=4, alpha=8.0, base="nf4",
                                  nf4=NF4Config(block_size=64, scaler_block_size=8, gemm="fp8")),
        # an FP8 base: FSDP2 shards its codes and scales by rows
        "fp8": AdapterConfig(target_modules=TARGETS, r=4, alpha=8.0, base="fp8"),
    }
    if have_gated:
        configs["blora"] = AdapterConfig(target_modules=TARGETS, r=4, alpha=8.0, ranks="gated",
                                         precision="learned", prior=PriorConfig(lmbda=0.05))
    return configs


def fix_gates(model) -> None:
    """B-LoRA comparison: gates and bit gates deterministic (eval), the rest in train mode."""
    from leanlora.gates.schedule import HasPrior

    for m in model.modules():
        if isinstance(m, HasPrior):
            m.eval()


def build(config: AdapterConfig, init_seed: int = 0):
    model = CONFTEST.tiny_llama(seed=0)
    torch.manual_seed(init_seed)
    leanlora.inject(model, config)
    CONFTEST.randomize_adapters(model, seed=init_seed)
    model.train()
    fix_gates(model)
    return model


def global_batches(steps: int) -> list[torch.Tensor]:
    return [CONFTEST.token_batch(batch=GLOBAL_BATCH, seq=SEQ, seed=100 + s) for s in range(steps)]


def train(model, call, batches, start: int = 0, optimizer=None, shard: bool = False, reseed: bool = False):
    """AdamW steps on ``batches`` (global); ``call`` is the model to run (wrapped or not). ``reseed``:
    each step's gate noise from (rank, step) alone, so that a resumed run draws what an uninterrupted one does."""
    inner = D.unwrap(call)
    if optimizer is None:
        optimizer = torch.optim.AdamW(leanlora.param_groups(inner, LR), lr=LR)
    for step, batch in enumerate(batches, start=start):
        if reseed:
            torch.manual_seed(D.rank_seed(1000 + step))
        leanlora.advance(inner, step)
        x = batch[D.shard(range(len(batch)))] if shard else batch
        loss = call(input_ids=x, labels=x).loss + D.regularizer(call)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 0.5)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return optimizer


def digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def gather(obj):
    out = [None] * D.world_size()
    dist.all_gather_object(out, obj)
    return out


def fp8_shards(model) -> dict[str, list[int]]:
    """{name: [local code bytes, full code bytes]} of every FP8 base's codes (FSDP2 only)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name in getattr(model, "_leanlora_fp8_params", []):
        p = model.get_parameter(name)
        assert isinstance(p, DTensor), f"{name} is {type(p).__name__}, not sharded"
        out[name] = [p.to_local().numel(), p.numel()]
    return out


def nf4_shards(model) -> dict[str, list[int]]:
    """{name: [local code bytes, full code bytes]} of every NF4 base weight (FSDP2 only)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name in getattr(model, "_leanlora_nf4_params", []):
        p = model.get_parameter(name)
        assert isinstance(p, DTensor), f"{name} is {type(p).__name__}, not sharded"
        local = p.to_local()
        out[name] = [local.quantized_data.numel(), p.shape[0] * p.shape[1] // 2]
    return out


def run_method(name: str, config: AdapterConfig, mode: str, out: Path) -> dict:
    batches = global_batches(STEPS)
    reference = build(config)
    init = {k: t.clone() for k, t in adapter_state_dict(reference).items()}  # per layer: rows of the stacks
    train(reference, reference, batches)
    ref_state = {k: v.detach().clone() for k, v in adapter_state_dict(reference).items()}
    # how far training moved each trainable tensor: the comparison below must be far tighter
    moved = {n: float((ref_state[n] - t).abs().max()) for n, t in init.items()}

    model = build(config)
    D.sync_rank_sampler(model)
    call = D.wrap(model, mode)
    result = {"nf4": nf4_shards(model) if mode == "fsdp2" else {}, "fp8": fp8_shards(model) if mode == "fsdp2" else {},
              "moved": sorted(moved.values())}
    train(model, call, batches, shard=True)
    layers = [m for m in model.modules() if isinstance(m, leanlora.layer.AdaptedLinear)]
    result["grouped"] = [sum(m.pieces is not None for m in layers), len(layers)]  # pieces of the last forward
    state = D.full_adapter_state(call)
    result["max_abs_diff"] = max_diff(state, ref_state)
    result["ranks_trained"] = gather(digest(state))

    # finalize a plain replica on every rank from the gathered state: the same artifact everywhere
    replica = build(config)
    D.load_adapter_state(replica, state)
    finalize(replica)
    result["ranks_finalized"] = gather(digest(adapter_state_dict(replica)))

    # rank 0 alone writes: every rank asks, only rank 0's folder may exist afterwards
    with D.full_params(call) as plain:
        D.main_process_only(leanlora.save)(plain, out / f"{name}-adapter-rank{D.rank()}")
    return result


def run_resume(config: AdapterConfig, mode: str, out: Path) -> dict:
    """2 steps, checkpoint written by rank 0, a fresh model on every rank resumes: = 3 steps at once."""
    from safetensors.torch import load_file, save_file

    batches = global_batches(STEPS)
    reference = build(config)
    train(reference, reference, batches)
    ref_state = adapter_state_dict(reference)

    model = build(config)
    call = D.wrap(model, mode)
    opt = train(model, call, batches[:2], shard=True)
    adapter, optim = D.full_adapter_state(call), D.full_optimizer_state(opt)
    flat = {f"{i}/{k}": v for i, s in optim["state"].items() for k, v in s.items()}

    @D.main_process_only
    def write():
        save_file({k: v.contiguous() for k, v in adapter.items()}, str(out / "ckpt-adapter.safetensors"))
        save_file({k: v.contiguous() for k, v in flat.items()}, str(out / "ckpt-optim.safetensors"))
        (out / "ckpt-groups.json").write_text(json.dumps(optim["param_groups"]))
    write()

    fresh = build(config, init_seed=7)           # different init: only the checkpoint can make it right
    call2 = D.wrap(fresh, mode)
    D.load_adapter_state(call2, load_file(str(out / "ckpt-adapter.safetensors")))
    opt2 = torch.optim.AdamW(leanlora.param_groups(D.unwrap(call2), LR), lr=LR)
    state: dict = {}
    for key, value in load_file(str(out / "ckpt-optim.safetensors")).items():
        i, k = key.split("/", 1)
        state.setdefault(int(i), {})[k] = value
    D.load_full_optimizer_state(opt2, {"state": state,
                                       "param_groups": json.loads((out / "ckpt-groups.json").read_text())})
    train(fresh, call2, batches[2:], start=2, optimizer=opt2, shard=True)
    return {"max_abs_diff": max_diff(D.full_adapter_state(call2), ref_state)}


def run_gate_noise(mode: str) -> dict:
    """B-LoRA in training mode: gate samples differ per rank, the trained and finalized adapter do not."""
    from leanlora.inject import adapted_layers

    config = AdapterConfig(target_modules=TARGETS, r=4, alpha=8.0, ranks="gated", precision="learned",
                           gates=GatesConfig(rank_init_log_alpha=0.0), prior=PriorConfig(lmbda=0.05))
    model = build(config)
    model.train()                                  # stochastic gates this time
    call = D.wrap(model, mode)
    torch.manual_seed(D.rank_seed(0))              # one noise stream per rank after the common init
    with D.full_params(call) as plain:
        ranks = next(layer.ranks for _, layer in adapted_layers(plain))
        samples = ranks.gates().detach().tolist()
        prior = float(leanlora.regularizer(plain).detach())  # whole gate parameters, any mode
    train(model, call, global_batches(STEPS), shard=True)
    state = D.full_adapter_state(call)
    replica = build(config)
    D.load_adapter_state(replica, state)
    finalize(replica)
    return {"gate_samples": gather(samples), "prior": gather(prior), "ranks_trained": gather(digest(state)),
            "ranks_finalized": gather(digest(adapter_state_dict(replica)))}


def run_budget(mode: str) -> dict:
    """adapter.budget under DDP: every rank holds the same controller and adapter, the budget is met,
    and a run resumed from a step-4 state (adapter, optimizer, controller) ends where the
    uninterrupted one does."""
    import copy

    from leanlora import budget
    from leanlora.reports.cost import cost_report

    config = AdapterConfig(target_modules=TARGETS, r=4, alpha=8.0, ranks="gated", precision="learned", budget=0.25)
    batches = global_batches(8)

    def fresh(seed: int):
        model = build(config, init_seed=seed)
        model.train()                                  # sampled gates: their noise differs per rank
        budget.start(model, len(batches))
        return model, D.wrap(model, mode)

    model, call = fresh(0)
    train(model, call, batches, shard=True, reseed=True)
    state = D.full_adapter_state(call)
    ctl = budget.controller(model).state_dict()

    first, call1 = fresh(0)
    opt = train(first, call1, batches[:4], shard=True, reseed=True)
    saved = (D.full_adapter_state(call1), copy.deepcopy(D.full_optimizer_state(opt)),
             copy.deepcopy(budget.controller(first).state_dict()))
    second, call2 = fresh(7)                           # different init: only the saved state can make it right
    D.load_adapter_state(call2, saved[0])
    opt2 = torch.optim.AdamW(leanlora.param_groups(D.unwrap(call2), LR), lr=LR)
    D.load_full_optimizer_state(opt2, saved[1])
    budget.controller(second).load_state_dict(saved[2])
    train(second, call2, batches[4:], start=4, optimizer=opt2, shard=True, reseed=True)
    return {"ranks_trained": gather(digest(state)), "controller": gather(json.dumps(ctl, sort_keys=True)),
            "frozen": ctl["frozen"], "bops_vs_lora16": cost_report(model).total["bops_vs_lora"],
            "resumed_max_abs_diff": max_diff(D.full_adapter_state(call2), state),
            "resumed_controller_equal": budget.controller(second).state_dict() == ctl}


def run_reentrant_checkpointing(config: AdapterConfig) -> float:
    """Max |gradient difference| of the stacks between one process and DDP with re-entrant
    checkpointing, every rank on the same batch: each block's recompute accumulates into a stack
    that other blocks share, which DDP must still reduce once and right."""
    x = global_batches(1)[0]
    reference = build(config)
    reference(input_ids=x, labels=x).loss.backward()
    model = build(config)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    D.wrap(model, "ddp")(input_ids=x, labels=x).loss.backward()
    pairs = zip(model.leanlora_shared.groups.parameters(), reference.leanlora_shared.groups.parameters())
    return max(float((a.grad - b.grad).abs().max()) for a, b in pairs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["ddp", "fsdp2"], required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--methods", default="")
    args = parser.parse_args()
    torch.set_num_threads(1)
    D.init("cpu")
    have_gated = importlib.util.find_spec("leanlora.ranks.gated") is not None
    configs = method_configs(have_gated)
    wanted = [m for m in args.methods.split(",") if m] or list(configs)
    results: dict = {"world_size": D.world_size(), "mode": args.mode, "methods": {}}
    for name in wanted:
        results["methods"][name] = run_method(name, configs[name], args.mode, args.out)
    results["resume"] = run_resume(configs["lora"], args.mode, args.out)
    if have_gated:
        results["gate_noise"] = run_gate_noise(args.mode)
    if args.mode == "ddp" and importlib.util.find_spec("leanlora.budget") is not None:
        results["budget"] = run_budget(args.mode)
    if args.mode == "ddp":
        results["reentrant_checkpointing_diff"] = run_reentrant_checkpointing(configs["lora"])
    results["mean_of_ranks"] = D.all_reduce_mean(float(D.rank()))
    results["sync_seed"] = gather(D.sync_seed(1234 + D.rank()))
    if D.is_main_process():
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
    D.end_process(0)


if __name__ == "__main__":
    main()
