"""Read the per-text evaluation outputs (``predictions.parquet``: label, prediction, ``logit_<class>``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def read_logits(predictions_path: Path) -> np.ndarray:
    frame = pd.read_parquet(predictions_path)
    columns = sorted((c for c in frame.columns if c.startswith("logit_")), key=lambda c: int(c.split("_")[1]))
    return frame[columns].to_numpy(dtype=np.float32)
