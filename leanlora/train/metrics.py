"""Scores as GLUE reports them, computed by scikit-learn and SciPy (not by hand)."""

from __future__ import annotations

import re
from typing import Sequence


def classification_metrics(preds: Sequence[int], labels: Sequence[int], num_labels: int) -> dict[str, float]:
    """accuracy, F1 (binary: of class 1, as GLUE's MRPC; else macro) and Matthews correlation (CoLA)."""
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    average = "binary" if num_labels == 2 else "macro"
    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "f1": float(f1_score(labels, preds, average=average, zero_division=0)),
        "matthews": float(matthews_corrcoef(labels, preds)),
    }


def regression_metrics(preds: Sequence[float], labels: Sequence[float]) -> dict[str, float]:
    """Pearson and Spearman correlation (STS-B); 0 when the predictions are constant."""
    import numpy as np
    from scipy.stats import pearsonr, spearmanr

    p, y = np.asarray(preds, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    if len(p) < 2 or np.ptp(p) == 0 or np.ptp(y) == 0:
        return {"pearson": 0.0, "spearman": 0.0}
    return {"pearson": float(pearsonr(p, y)[0]), "spearman": float(spearmanr(p, y)[0])}


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_answer(text: str, marker: str = "####") -> str:
    """The final answer of a generated or reference text.

    GSM8K writes it after ``####``; a model may not, so without the marker the last number in
    the text is taken. Numbers are compared without thousands separators or trailing ".0".
    """
    if marker and marker in text:
        text = text.rsplit(marker, 1)[1]
    if numbers := _NUMBER.findall(text):
        value = numbers[-1].replace(",", "").rstrip(".")
        if "." in value:
            value = value.rstrip("0").rstrip(".")
        return value
    return " ".join(text.strip().lower().split()).rstrip(".")


def exact_match(predictions: Sequence[str], references: Sequence[str], marker: str = "####") -> dict[str, float]:
    """Share of predictions whose extracted answer equals the reference's."""
    from sklearn.metrics import accuracy_score

    if not references:
        return {"exact_match": 0.0}
    pred = [extract_answer(p, marker) for p in predictions]
    ref = [extract_answer(r, marker) for r in references]
    return {"exact_match": float(accuracy_score(ref, pred))}
