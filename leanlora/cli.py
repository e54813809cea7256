"""``leanlora`` command line: train | eval | sweep | report | export | demo.

    leanlora demo                                    # MiniLM + B-LoRA on a BoolQ subset, CPU, minutes
    leanlora train run.yaml adapter.r=8 train.lr=2e-4 --out runs/a
    leanlora train --resume runs/a                   # continue after a crash or a kill
    leanlora train --print-config > run.yaml         # every option, commented
    leanlora eval runs/a                             # score runs/a/adapter on data.eval_file
    leanlora export runs/a --out peft/ --format peft # a PEFT LoRA adapter (per-module ranks)
    leanlora sweep runs/a --ranks 1,2,4,8            # nested ranks: score at each rank
    leanlora report runs/a                           # cost table and rank/bit plot
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class CLIError(RuntimeError):
    """A command cannot run as asked; printed without a traceback."""


def _split_args(items: list[str]) -> tuple[str | None, list[str]]:
    """(config path or None, dotted overrides) from positional arguments."""
    paths = [a for a in items if "=" not in a]
    if len(paths) > 1:
        raise CLIError(f"expected at most one config file, got {paths}; overrides look like section.key=value")
    return (paths[0] if paths else None), [a for a in items if "=" in a]


# --- train / eval ----------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from leanlora.train.loop import cost_table, train
    from leanlora.train.runconfig import load_run_config, to_commented_yaml

    config, overrides = _split_args(args.args)
    if args.print_config:
        sys.stdout.write(to_commented_yaml(load_run_config(config, overrides)))
        return 0
    if args.resume:
        if config or overrides:
            raise CLIError("--resume continues the run saved in the folder with its own run.yaml; "
                           "give no config file or overrides")
        result = train(None, args.resume, resume=True, progress=not args.no_progress)
    else:
        if args.out is None:
            raise CLIError("name the run folder with --out DIR (checkpoints, best/ and adapter/ go there)")
        result = train(load_run_config(config, overrides), args.out, progress=not args.no_progress)
    from leanlora import distributed

    with distributed.full_params(result.model) as plain:  # whole adapter tensors under FSDP2
        table = cost_table(plain)
    if distributed.is_main_process():  # under torchrun, rank 0 speaks for the run
        _print_result(result)
        print(table)
        if result.warning:  # the dev score is no better than a constant prediction (leanlora.train.guard)
            print(f"leanlora: {result.warning}", file=sys.stderr)
    return 0


def _print_result(result) -> None:
    first = result.losses[0] if result.losses else float("nan")
    last = result.losses[-1] if result.losses else float("nan")
    print(f"trained {result.steps} steps into {result.run_dir} (loss {first:.4f} -> {last:.4f} in this process)")
    if result.best_step is not None:
        scores = ", ".join(f"{k}={v:.4f}" for k, v in result.best_metrics.items())
        print(f"best at step {result.best_step}: {scores}; adapter: {result.run_dir / 'adapter'}")


def load_trained(run_dir: str | Path, overrides: list[str] = (), adapter: str | None = None, need_train=False):
    """(run config, model with the trained adapter, tokenizer, task) of a finished run folder."""
    import leanlora
    from leanlora.train.loop import RUN_CONFIG, load_for_run
    from leanlora.train.runconfig import load_run_config

    run_dir = Path(run_dir)
    if not (run_dir / RUN_CONFIG).is_file():
        raise CLIError(f"{run_dir}: no {RUN_CONFIG}; pass the --out folder of `leanlora train`")
    run = load_run_config(run_dir / RUN_CONFIG, overrides)
    model, tokenizer, task = load_for_run(run, need_train=need_train)
    leanlora.load(model, adapter or run_dir / "adapter")
    return run, model, tokenizer, task


def cmd_eval(args: argparse.Namespace) -> int:
    from leanlora.train.loop import resolve_device

    run, model, _, task = load_trained(args.run_dir, args.overrides, args.adapter)
    if not task.eval:
        raise CLIError("data.eval_file is empty; pass data.eval_file=PATH")
    scores = task.evaluate(model, run.train.eval_batch_size, resolve_device(run.train.device))
    print(f"{len(task.eval)} examples from {run.data.eval_file}")
    for k, v in scores.items():
        print(f"  {k:>12}: {v:.4f}")
    return 0


# --- export / sweep / report -----------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    import leanlora

    _, model, tokenizer, _ = load_trained(args.run_dir, args.overrides, args.adapter)
    finalize = getattr(leanlora, "finalize", None)
    if finalize is not None:
        finalize(model)  # prune closed gates, fix learned bit-widths before writing
    out = Path(args.out)
    if args.format == "peft":
        leanlora.export_peft(model, out)
    elif args.format == "leanlora":
        leanlora.save(model, out)
    else:
        merged = leanlora.merge_and_unload(model)
        merged.save_pretrained(out)
        tokenizer.save_pretrained(out)
    print(f"wrote a {args.format} {'model' if args.format == 'merged' else 'adapter'} to {out}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    import leanlora
    from leanlora.train.loop import resolve_device

    sweep_ranks = getattr(leanlora, "sweep_ranks", None)
    if sweep_ranks is None:
        raise CLIError("leanlora.sweep_ranks is not available in this install (it comes with nested ranks, "
                       "QDyLoRA); `leanlora sweep` needs it")
    run, model, _, task = load_trained(args.run_dir, args.overrides, args.adapter)
    if run.adapter.ranks != "nested":
        raise CLIError(f"{args.run_dir} trained adapter.ranks={run.adapter.ranks!r}; a rank sweep needs one "
                       "adapter trained with adapter.ranks=nested")
    if not task.eval:
        raise CLIError("data.eval_file is empty; the sweep scores the eval set at each rank")
    device = resolve_device(run.train.device)

    def eval_fn(m) -> float:
        return task.evaluate(m, run.train.eval_batch_size, device)[task.metric]

    ranks = [int(r) for r in args.ranks.split(",")] if args.ranks else None
    result = sweep_ranks(model, eval_fn, ranks, tolerance=args.tolerance,
                         higher_is_better=task.metric != "loss", metric=task.metric)
    print(result.table())
    print(f"best rank {result.best_rank}, chosen rank {result.chosen_rank} (tolerance {args.tolerance})")
    run_dir = Path(args.run_dir)
    result.save_json(run_dir / "sweep.json")
    plot_sweep = getattr(leanlora, "plot_sweep", None)
    if plot_sweep is not None:
        print(f"plot: {plot_sweep(result, args.plot or run_dir / 'sweep.png')}")
    if args.export:
        path = leanlora.export_rank(model, result.chosen_rank, args.export, peft=args.peft)
        print(f"rank {result.chosen_rank} adapter written to {path}{' (PEFT LoRA)' if args.peft else ''}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    try:
        from leanlora.report import write_report
    except ImportError:
        raise CLIError("leanlora.report.write_report is not available in this install; "
                       "`leanlora report` needs it") from None
    # The report needs the adapter only (shapes, ranks, bits), not the base model.
    folder = Path(args.adapter or args.run_dir)
    if not (folder / "adapter_config.json").is_file():
        folder = folder / "adapter"
    if not (folder / "adapter_config.json").is_file():
        raise CLIError(f"{args.run_dir}: neither it nor its adapter/ holds adapter_config.json")
    paths = write_report(folder, args.out or Path(args.run_dir) / "report")
    print(Path(paths["table"]).read_text().rstrip())
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from leanlora.demo import run_demo

    return run_demo(data=args.data, out=args.out, method=args.method, max_train=args.train_examples,
                    max_eval=args.eval_examples, epochs=args.epochs, progress=not args.no_progress)


# --- parser ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leanlora", description="Self-sizing low-rank adapters.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train an adapter from a YAML run config")
    p.add_argument("args", nargs="*", metavar="CONFIG|KEY=VALUE",
                   help="a run YAML and/or dotted overrides such as adapter.r=8 train.lr=2e-4")
    p.add_argument("--out", help="run folder (run.yaml, checkpoints/, best/, adapter/, metrics.json)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    p.add_argument("--print-config", action="store_true", help="print the complete commented YAML and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    def trained(name: str, help: str) -> argparse.ArgumentParser:
        q = sub.add_parser(name, help=help)
        q.add_argument("run_dir", help="the --out folder of `leanlora train`")
        q.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. data.eval_file=test.tsv")
        q.add_argument("--adapter", help="adapter folder (default: RUN_DIR/adapter)")
        return q

    p = trained("eval", "score a trained adapter on the eval set")
    p.set_defaults(func=cmd_eval)
    p = trained("export", "write the adapter as PEFT LoRA, leanlora, or a merged model")
    p.add_argument("--out", required=True)
    p.add_argument("--format", choices=("peft", "leanlora", "merged"), default="peft")
    p.set_defaults(func=cmd_export)
    p = trained("sweep", "score one nested-rank adapter at several ranks")
    p.add_argument("--ranks", help="comma-separated ranks (default 1..r)")
    p.add_argument("--plot", help="PNG path (default RUN_DIR/sweep.png)")
    p.add_argument("--tolerance", type=float, default=0.0,
                   help="choose the smallest rank within this much (absolute) of the best score")
    p.add_argument("--export", metavar="DIR", help="write the adapter at the chosen rank to DIR")
    p.add_argument("--peft", action="store_true", help="with --export: a PEFT LoRA adapter")
    p.set_defaults(func=cmd_sweep)
    p = trained("report", "cost table and learned rank/bit plot of a trained adapter (RUN_DIR or an adapter folder)")
    p.add_argument("--out", help="report folder (default RUN_DIR/report)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="fine-tune MiniLM with B-LoRA on a BoolQ subset (CPU, minutes)")
    p.add_argument("--data", help="a GLUE task folder (train.tsv, dev.tsv) instead of BoolQ, e.g. glue/SST-2")
    p.add_argument("--out", help="run folder (default: a temporary folder)")
    p.add_argument("--method", choices=("blora", "lora"), default="blora")
    p.add_argument("--train-examples", type=int, default=None, help="training subset size")
    p.add_argument("--eval-examples", type=int, default=None, help="eval subset size")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from leanlora.config import ConfigError
    from leanlora.io import AdapterLoadError

    parser = build_parser()
    # Positionals may follow options (`train --out d cfg.yaml train.lr=1e-4`): collect the leftovers.
    args, extra = parser.parse_known_args(argv)
    bad = [e for e in extra if e.startswith("-") or ("=" not in e and args.command != "train")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        if args.command == "train":
            args.args = list(args.args) + extra
        else:
            args.overrides = list(args.overrides) + extra
    try:
        return args.func(args)
    except (CLIError, ConfigError, AdapterLoadError) as err:
        print(f"leanlora {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        from leanlora.train.checkpoint import CheckpointError
        from leanlora.train.loop import TrainingDiverged

        if isinstance(err, (TrainingDiverged, CheckpointError)):
            print(f"leanlora {args.command}: error: {err}", file=sys.stderr)
            return 3
        raise


def entry() -> None:
    """The ``leanlora`` console command and ``python -m leanlora``: main, then a clean exit."""
    from leanlora import distributed

    code = main()
    distributed.end_process(code)  # under torchrun / accelerate launch; returns otherwise
    sys.exit(code)


if __name__ == "__main__":
    entry()
