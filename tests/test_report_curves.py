"""``leanlora report``'s curves come from the run's metrics.json: loss per step and per log record,
eval loss, the prior, cost as a share of LoRA-16, rank and bits; a run without log records still plots."""

from __future__ import annotations

from leanlora.reports.report import curves, plot_curves

METRICS = {
    "train_losses": [0.9, 0.8, 0.7, 0.65],
    "history": [{"step": 2, "loss": 0.85, "accuracy": 0.5, "rank": 3.5, "bits": 8.0},
                {"step": 4, "loss": 0.6, "accuracy": 0.75, "rank": 3.0, "bits": 6.0}],
    "log_history": [{"step": 2, "loss": 0.85, "leanlora/rank": 3.5, "leanlora/bits": 8.0,
                     "leanlora/bops_vs_lora16": 0.5, "leanlora/bytes_vs_lora16": 0.4},
                    {"step": 4, "loss": 0.675, "leanlora/rank": 3.0, "leanlora/bits": 6.0,
                     "leanlora/bops_vs_lora16": 0.25, "leanlora/bytes_vs_lora16": 0.2}],
}


def test_the_curves_are_the_runs_logged_values():
    drawn = curves(METRICS)
    assert drawn["loss"] == {"train (each step)": ([1, 2, 3, 4], [0.9, 0.8, 0.7, 0.65]),
                             "train (mean)": ([2, 4], [0.85, 0.675]), "eval": ([2, 4], [0.85, 0.6])}
    assert drawn["cost"] == {"BOPs": ([2, 4], [50.0, 25.0]), "bytes": ([2, 4], [40.0, 20.0])}
    assert drawn["rank"] == {"rank": ([2, 4], [3.5, 3.0])} and drawn["bits"] == {"bits": ([2, 4], [8.0, 6.0])}
    assert drawn["prior"] == {}  # a run without a prior draws none


def test_a_runs_prior_is_its_own_curve(tmp_path):
    gated = {**METRICS, "train_priors": [0.5, 7.5, 0.0, 0.0]}
    assert curves(gated)["prior"] == {"prior (each step)": ([1, 2, 3, 4], [0.5, 7.5, 0.0, 0.0])}
    assert curves(gated)["loss"] == curves(METRICS)["loss"]
    assert plot_curves(gated, tmp_path / "gated.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_without_log_records_plots_loss_rank_and_bits(tmp_path):
    old = {k: v for k, v in METRICS.items() if k != "log_history"}
    drawn = curves(old)
    assert drawn["cost"] == {} and drawn["rank"] == {"rank": ([2, 4], [3.5, 3.0])}
    for name, metrics in (("new", METRICS), ("old", old)):
        path = plot_curves(metrics, tmp_path / f"{name}.png")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
