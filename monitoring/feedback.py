"""Live quality from label feedback: the champion's accuracy and macro-F1 on the predictions whose
true labels arrived in a window, with 95% intervals, beside its accuracy on the test split when it
was promoted (the reference)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from monitoring.stats import bootstrap_macro_f1, macro_f1, wilson_interval

# The evaluation's columns in the reference (tasks.evaluate's predictions.parquet, copied into the
# reference at promotion): the true class index and the predicted one.
TRUE_COLUMN, PREDICTED_COLUMN = "label", "prediction"
BOOTSTRAP_DRAWS = 1000


def live_quality(rows: pd.DataFrame, labels: Sequence[str], draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> dict:
    """Accuracy (95% Wilson interval) and macro-F1 (95% bootstrap interval) of labelled predictions.

    Args:
        rows: predictions with the served ``label`` and the ``true_label`` from feedback
            (``prediction_log.read_labelled``).
        labels: the model's labels (macro-F1 averages over those that occur).

    Returns:
        ``{"labelled": n}``, plus ``accuracy``, ``accuracy_low``, ``accuracy_high``, ``macro_f1``,
        ``macro_f1_low`` and ``macro_f1_high`` when n > 0.
    """
    labelled = len(rows)
    if not labelled:
        return {"labelled": 0}
    truth = rows["true_label"].astype(str).tolist()
    predicted = rows["label"].astype(str).tolist()
    correct = sum(1 for true, served in zip(truth, predicted, strict=True) if true == served)
    low, high = wilson_interval(correct, labelled)
    f1_low, f1_high = bootstrap_macro_f1(truth, predicted, labels, draws=draws, seed=seed)
    return {"labelled": labelled, "accuracy": correct / labelled, "accuracy_low": low, "accuracy_high": high,
            "macro_f1": macro_f1(truth, predicted, labels), "macro_f1_low": f1_low, "macro_f1_high": f1_high}


def reference_accuracy(reference: pd.DataFrame) -> float | None:
    """The champion's accuracy on its test split, from its reference (the evaluation's ``label`` and
    ``prediction`` columns); None when the reference lacks them (written by an earlier release) or
    has no rows."""
    if TRUE_COLUMN not in reference or PREDICTED_COLUMN not in reference or not len(reference):
        return None
    return float((reference[TRUE_COLUMN] == reference[PREDICTED_COLUMN]).mean())


def read_reference_accuracy(path: Path) -> float | None:
    """``reference_accuracy`` of the reference file at ``path`` (None when there is none)."""
    if not path.exists():
        return None
    import pyarrow.parquet as pq

    present = set(pq.read_schema(path).names)
    columns = [name for name in (TRUE_COLUMN, PREDICTED_COLUMN) if name in present]
    return reference_accuracy(pd.read_parquet(path, columns=columns))


def feedback_evidence(quality: dict, reference: float | None) -> dict:
    """The window's evidence from feedback: ``labelled`` (how many of the champion's predictions got a
    true label in the window), ``live_accuracy`` / ``_low`` / ``_high`` and ``live_macro_f1`` / ``_low``
    / ``_high`` (absent without feedback), from ``live_quality``'s ``quality``, and
    ``reference_accuracy`` (the champion's test accuracy; None when unknown)."""
    evidence = {"labelled": quality.get("labelled", 0), "reference_accuracy": reference}
    return evidence | {f"live_{name}": value for name, value in quality.items() if name != "labelled"}
