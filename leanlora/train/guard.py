"""Did the adapter learn anything? The dev score against a constant predictor's.

A run that ends at the score of always answering the majority class (classification) or always
predicting the mean label (regression) has learned nothing a one-line rule would not, whatever
its loss curve says. The check:

    chance  = metric(constant predictions, labels)        majority class / mean label
    se      = standard error of the run's score on n dev examples
              accuracy, F1:                  sqrt(s (1 - s) / n)        (a proportion)
              matthews, pearson, spearman:   sqrt((1 - s^2) / (n - 2))  (a correlation)
    stalled = score <= chance + se

so a score within one standard error of the constant predictor's (or below it) is flagged. The
standard error is the score's own sampling error on a dev set of this size: a 400-example dev set
cannot tell 1.5 points of accuracy from chance, a 10,000-example one can. Metrics with no
constant-predictor reading (a language model's loss or exact match) are not checked.

The warning names the likely cause for the method the adapter uses and the setting to try;
:func:`stall_warning` builds it from the adapter config. A method known to need longer runs than
LoRA is named when the run starts (:func:`short_run_notice`), before any step is spent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from leanlora import budget
from leanlora.config import AdapterConfig

PROPORTIONS = ("accuracy", "f1")
CORRELATIONS = ("matthews", "pearson", "spearman")


@dataclass(frozen=True)
class Verdict:
    """The run's score beside the constant predictor's; ``stalled`` when within one standard error."""

    metric: str
    score: float
    chance: float
    standard_error: float
    n: int
    constant: str  # what the constant predictor answers, in words

    @property
    def stalled(self) -> bool:
        return self.score <= self.chance + self.standard_error


def chance_score(metric: str, labels: Sequence[float], regression: bool, num_labels: int = 2) -> tuple[float, str]:
    """(metric of the constant predictor, what it predicts): the majority class, or the mean label."""
    from leanlora.train.metrics import classification_metrics, regression_metrics

    if regression:
        mean = sum(labels) / len(labels)
        return regression_metrics([mean] * len(labels), list(labels))[metric], f"the mean label {mean:.3g}"
    ys = [int(y) for y in labels]
    top = max(sorted(set(ys)), key=ys.count)
    scores = classification_metrics([top] * len(ys), ys, max(num_labels, 2))
    return scores[metric], f"class {top} ({ys.count(top) / len(ys):.1%} of the dev set)"


def standard_error(metric: str, score: float, n: int) -> float:
    """Sampling error of ``score`` on ``n`` examples (proportion or correlation, see the module doc)."""
    if metric in PROPORTIONS:
        s = min(max(score, 0.0), 1.0)
        return math.sqrt(s * (1.0 - s) / max(n, 1))
    if metric in CORRELATIONS:
        return math.sqrt(max(1.0 - score * score, 0.0) / max(n - 2, 1))
    raise ValueError(f"no standard error for metric {metric!r}; allowed: {PROPORTIONS + CORRELATIONS}")


def check(metric: str, score: float, labels: Sequence[float], regression: bool,
          num_labels: int = 2) -> Verdict | None:
    """The verdict for a dev ``score`` on ``labels``; None where the metric has no constant predictor."""
    if metric not in PROPORTIONS + CORRELATIONS or len(labels) < 3:
        return None
    chance, constant = chance_score(metric, labels, regression, num_labels)
    return Verdict(metric, float(score), float(chance), standard_error(metric, score, len(labels)),
                   len(labels), constant)


BANK_EXAMPLES_NEEDED = 1600 * 32
"""Training examples (optimizer steps x examples a step) below which VB-LoRA with its default bank
is not expected to reach a LoRA trained half as long. Both factors are composed from a bank that
starts near zero, so the update grows more slowly than LoRA's, and a short run ends before the
model moves; on some tasks a longer run does not close the gap either."""


def likely_cause(config: AdapterConfig) -> str:
    """The cause most likely for this adapter, and the setting to try, in one sentence."""
    if config.factors == "bank":
        return ("VB-LoRA builds every factor from one small shared bank, and its update grows from "
                "near zero through the product of two bank-made factors, so it needs more steps than "
                f"LoRA before the model moves: train longer (train.epochs / train.max_steps; about "
                f"{BANK_EXAMPLES_NEEDED:,} examples), or use adapter.factors=dense")
    if config.ranks == "nested":
        # on a small encoder the 4-bit base alone costs some tasks as much as the nesting does
        base = ("; on a small model the 4-bit base itself costs accuracy on some tasks: use adapter.base=dense "
                "if the model fits in memory without it" if config.base == "nf4" else "")
        return ("nested ranks train the full rank only in the steps that draw it, so it sees fewer "
                "updates than a LoRA of the same length: train longer (train.epochs / train.max_steps), "
                "give the full rank a larger share of the steps (raise adapter.nested.full_share), or compare the "
                "smaller ranks with `leanlora sweep`" + base)
    if config.is_gated and (fraction := budget.resolved(config)) is not None:
        # under a budget the controller, not the prior's weight or the gate lr, decides how much is kept
        return (f"the budget (adapter.budget={fraction:g} of LoRA-16's BOPs) may keep too little of the adapter "
                "for this task, or fix its structure too late in the run: raise adapter.budget (1.0: the full rank "
                "at 16 bits), fix the structure earlier (adapter.budget_schedule), or train longer")
    if config.is_gated:
        return ("the rank and bit gates may have closed before the task was learned: lower the prior's "
                "weight (adapter.prior.lmbda) or the gate learning rate (adapter.gates.lr), or train longer")
    return ("the adapter moved too little for this data in this many steps: train longer "
            "(train.epochs / train.max_steps) or raise train.lr")


SMALL_FOR_4BIT = 1_000_000_000
"""Base weights below which a 4-bit base is not known to be harmless: QLoRA (arXiv:2305.14314) found
NF4 level with 16-bit bases on models of billions of parameters, and on small encoders the 4-bit
rounding itself costs some tasks accuracy that neither a longer run nor finer blocks win back."""


def base_weights(model) -> int:
    """Weights of the model without its adapters: an adapted layer counts in x out whatever its
    base stores (4-bit codes pack two to a byte), every other parameter as it is."""
    from leanlora.inject import adapted_layers

    adapted = [m for _, m in adapted_layers(model)]
    shared = getattr(model, "leanlora_shared", None)
    inside = {id(p) for m in adapted + ([shared] if shared is not None else []) for p in m.parameters()}
    rest = sum(p.numel() for p in model.parameters() if id(p) not in inside)
    return rest + sum(m.in_features * m.out_features for m in adapted)


def small_base_notice(config: AdapterConfig, base_weights: int) -> str | None:
    """The notice printed when a run quantizes the base of a model too small for 4 bits to be known
    harmless; None for other bases or larger models."""
    if config.base != "nf4" or base_weights >= SMALL_FOR_4BIT:
        return None
    return (f"note: adapter.base=nf4 rounds the frozen weights of this {base_weights / 1e6:.1f}M-parameter model to "
            "4 bits. A 4-bit base is known to match a 16-bit one on models of billions of parameters; on small "
            "models it costs some tasks accuracy that more steps do not recover. If the model fits in memory "
            "unquantized, adapter.base=dense trains the same adapter without that cost")


def short_run_notice(config: AdapterConfig, steps: int, examples_per_step: int) -> str | None:
    """The notice printed when a run starts that is shorter than its method is known to need; None
    when it is long enough or the method has no known need."""
    if config.factors != "bank" or steps * examples_per_step >= BANK_EXAMPLES_NEEDED:
        return None
    need = math.ceil(BANK_EXAMPLES_NEEDED / max(examples_per_step, 1))
    return (f"note: adapter.factors=bank (VB-LoRA) learns more slowly than LoRA: this run trains {steps} steps "
            f"of {examples_per_step} examples; VB-LoRA needs about {BANK_EXAMPLES_NEEDED:,} examples ({need} steps "
            "here) to come within 2 points of a LoRA trained half as long, and on some tasks more steps do not "
            "close the gap. Set train.max_steps / train.epochs higher, or adapter.factors=dense for LoRA")


def stall_warning(verdict: Verdict, config: AdapterConfig | None, steps: int) -> str:
    """The warning printed at the end of a run whose verdict is ``stalled``."""
    cause = likely_cause(config) if config is not None else "too few steps for this data"
    return (f"warning: the adapter did not learn. Dev {verdict.metric} {verdict.score:.4f} is within one "
            f"standard error ({verdict.standard_error:.4f}, {verdict.n} examples) of always predicting "
            f"{verdict.constant}, which scores {verdict.chance:.4f}. After {steps} steps the likely cause: {cause}.")


def task_verdict(task, scores: dict[str, float]) -> Verdict | None:
    """:func:`check` for a training task (leanlora.train.tasks) and its dev scores; None without a dev set."""
    metric = getattr(task, "metric", None)
    if not getattr(task, "eval", None) or metric not in scores or getattr(task, "num_labels", 0) == 0:
        return None
    return check(metric, scores[metric], [e["label"] for e in task.eval], task.regression, task.num_labels)
