"""The per-prediction features that drift monitoring compares, computed the same way for the
champion's reference (its evaluation on the test split, stored at promotion) and for a window of
served predictions (the prediction log). Beside the five scalar features, the pooled input
embedding (``monitoring.embedding``) is ``DIMS`` columns ``embedding_0``.. when there is one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from monitoring import embedding as emb
from serving.truncation import DEFAULT_TRUNCATION

# Written beside each served Triton version at promotion; read by every monitoring window.
REFERENCE_FILE = "reference_predictions.parquet"
FEATURES = ("confidence", "predicted", "text_chars", "token_count", "unknown_share")
NUMERICAL = ("confidence", "text_chars", "token_count", "unknown_share")
CATEGORICAL = ("predicted",)


def window_features(log_rows: pd.DataFrame) -> pd.DataFrame:
    """Features of predictions read from the prediction log (``prediction_log.read_window``), with
    the embedding columns when any row of the window was logged with an embedding (rows without
    one are NaN there, and drift judges the rows that have one)."""
    tokens = log_rows["token_count"].astype(float)
    unknown = log_rows["unknown_tokens"].astype(float)
    features = pd.DataFrame({
        "confidence": log_rows["confidence"].astype(float),
        "predicted": log_rows["label"].astype(str),
        "text_chars": log_rows["text_chars"].astype(float),
        "token_count": tokens,
        "unknown_share": (unknown / tokens.where(tokens > 0)).fillna(0.0),
    })
    embeddings = logged_embeddings(log_rows)
    if embeddings is None:
        return features
    return pd.concat([features, pd.DataFrame(embeddings, columns=list(emb.COLUMNS), index=features.index)], axis=1)


def logged_embeddings(log_rows: pd.DataFrame) -> np.ndarray | None:
    """The log rows' embeddings (rows x ``DIMS``, NaN where a row has none), or None when no row has
    one (a log of an earlier release, or a version served without an embedding table)."""
    if "embedding" not in log_rows or log_rows.empty:
        return None
    matrix = np.stack([emb.decode(blob if isinstance(blob, (bytes, bytearray, memoryview)) else None)
                       for blob in log_rows["embedding"]])
    return matrix if np.isfinite(matrix).all(axis=1).any() else None


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def reference_features(logits: np.ndarray, texts: list[str], labels: list[str], tokenizer_file: Path,
                       max_length: int, embedding_table: np.ndarray | None = None,
                       truncation: str = DEFAULT_TRUNCATION) -> pd.DataFrame:
    """Features of the champion's evaluation outputs on its test texts (one text per row, in order),
    with their embeddings through ``embedding_table`` (rounded through float16, as logged) if given.
    Token counts, unknown tokens and embeddings are of the tokens the served tokenizer keeps
    (``max_length`` of them, chosen by ``truncation``), as the gateway logs them."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    unknown_token = getattr(tokenizer.model, "unk_token", None)
    unknown_id = tokenizer.token_to_id(unknown_token) if unknown_token else None
    ids = emb.token_ids(tokenizer_file, texts, max_length, truncation)
    tokens = np.array([len(text_ids) for text_ids in ids], dtype=float)
    unknown = np.array([int((text_ids == unknown_id).sum()) if unknown_id is not None else 0 for text_ids in ids],
                       dtype=float)
    probabilities = softmax(logits.astype(np.float64))
    features = pd.DataFrame({
        "confidence": probabilities.max(axis=1),
        "predicted": [labels[i] for i in probabilities.argmax(axis=1)],
        "text_chars": [float(len(text)) for text in texts],
        "token_count": tokens,
        "unknown_share": np.where(tokens > 0, unknown / np.maximum(tokens, 1), 0.0),
    })
    if embedding_table is None:
        return features
    vectors = emb.reference_embeddings(embedding_table, tokenizer_file, texts, max_length, truncation)
    return features.join(pd.DataFrame(vectors, columns=list(emb.COLUMNS)))
