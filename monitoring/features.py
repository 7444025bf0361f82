"""The per-prediction features that drift monitoring compares, computed the same way for the
champion's reference (its evaluation on the test split, stored at promotion) and for a window of
served predictions (the prediction log)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

# Written beside each served Triton version at promotion; read by every monitoring window.
REFERENCE_FILE = "reference_predictions.parquet"
FEATURES = ("confidence", "predicted", "text_chars", "token_count", "unknown_share")
NUMERICAL = ("confidence", "text_chars", "token_count", "unknown_share")
CATEGORICAL = ("predicted",)


def window_features(log_rows: pd.DataFrame) -> pd.DataFrame:
    """Features of predictions read from the prediction log (``prediction_log.read_window``)."""
    tokens = log_rows["token_count"].astype(float)
    unknown = log_rows["unknown_tokens"].astype(float)
    return pd.DataFrame({
        "confidence": log_rows["confidence"].astype(float),
        "predicted": log_rows["label"].astype(str),
        "text_chars": log_rows["text_chars"].astype(float),
        "token_count": tokens,
        "unknown_share": (unknown / tokens.where(tokens > 0)).fillna(0.0),
    })


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def reference_features(logits: np.ndarray, texts: list[str], labels: list[str], tokenizer_file: Path,
                       max_length: int) -> pd.DataFrame:
    """Features of the champion's evaluation outputs on its test texts (one text per row, in order)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.no_padding()
    unknown_token = getattr(tokenizer.model, "unk_token", None)
    unknown_id = tokenizer.token_to_id(unknown_token) if unknown_token else None
    encodings = tokenizer.encode_batch(texts)
    tokens = np.array([len(encoding.ids) for encoding in encodings], dtype=float)
    unknown = np.array([sum(1 for i in encoding.ids if i == unknown_id) for encoding in encodings], dtype=float)
    probabilities = softmax(logits.astype(np.float64))
    return pd.DataFrame({
        "confidence": probabilities.max(axis=1),
        "predicted": [labels[i] for i in probabilities.argmax(axis=1)],
        "text_chars": [float(len(text)) for text in texts],
        "token_count": tokens,
        "unknown_share": np.where(tokens > 0, unknown / np.maximum(tokens, 1), 0.0),
    })
