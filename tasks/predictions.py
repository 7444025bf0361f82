"""Read the per-text evaluation outputs (``predictions.parquet``: label, prediction, ``logit_<class>``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from tasks.champion import TestAnswers


def read_logits(predictions_path: Path) -> np.ndarray:
    frame = pd.read_parquet(predictions_path)
    columns = sorted((c for c in frame.columns if c.startswith("logit_")), key=lambda c: int(c.split("_")[1]))
    return frame[columns].to_numpy(dtype=np.float32)


def read_correct(predictions_path: Path) -> tuple[bool, ...]:
    """Whether the model got each test text right, in the split's order."""
    frame = pd.read_parquet(predictions_path, columns=["label", "prediction"])
    return tuple(bool(value) for value in (frame["label"] == frame["prediction"]))


def read_answers(predictions_path: Path) -> TestAnswers:
    """The true label id and the model's answer of each test text, in the split's order."""
    frame = pd.read_parquet(predictions_path, columns=["label", "prediction"])
    return TestAnswers(tuple(int(value) for value in frame["label"]), tuple(int(value) for value in frame["prediction"]))


def class_shares(predictions_path: Path, classes: int) -> tuple[float, ...]:
    """The share of each label id (0 .. classes - 1) among the evaluated split's true labels."""
    labels = pd.read_parquet(predictions_path, columns=["label"])["label"]
    counts = labels.value_counts().reindex(range(classes), fill_value=0)
    return tuple(float(value) for value in counts / max(1, len(labels)))


def majority_share(predictions_path: Path) -> float:
    """The share of the most common true label in the evaluated split: what always answering it scores."""
    labels = pd.read_parquet(predictions_path, columns=["label"])["label"]
    return float(labels.value_counts(normalize=True).max()) if len(labels) else 0.0
