"""Read the per-text evaluation outputs (``predictions.parquet``: label, prediction, ``logit_<class>``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def read_logits(predictions_path: Path) -> np.ndarray:
    frame = pd.read_parquet(predictions_path)
    columns = sorted((c for c in frame.columns if c.startswith("logit_")), key=lambda c: int(c.split("_")[1]))
    return frame[columns].to_numpy(dtype=np.float32)


def read_correct(predictions_path: Path) -> tuple[bool, ...]:
    """Whether the model got each test text right, in the split's order."""
    frame = pd.read_parquet(predictions_path, columns=["label", "prediction"])
    return tuple(bool(value) for value in (frame["label"] == frame["prediction"]))


def majority_share(predictions_path: Path) -> float:
    """The share of the most common true label in the evaluated split: what always answering it scores."""
    labels = pd.read_parquet(predictions_path, columns=["label"])["label"]
    return float(labels.value_counts(normalize=True).max()) if len(labels) else 0.0
