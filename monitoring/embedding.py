"""Pooled input embeddings for drift monitoring, cheap enough to compute for every prediction.

At promotion, the champion's token-embedding matrix (vocabulary x hidden, read from its ONNX file)
is reduced to ``DIMS`` whitened principal components, fitted on the mean-pooled embeddings of its
training texts. Not on the reference (test) texts: a projection fitted on the reference makes the
reference look tighter than any later window (whitening divides by the variances it measured on
those very texts), and windows of the same distribution would then drift. Mean pooling and the projection are both linear, so the result
is one table (vocabulary x ``DIMS``, ``TABLE_FILE``): a text's embedding is the mean of the table's
rows over its tokens. The Triton tokenizer model does that lookup for every request (no second
model pass), the gateway logs it as ``DIMS`` float16 values (``encode``), and the monitor compares a
window's embeddings with the reference's (``monitoring.drift``).

These are the model's input (token) embeddings, not its contextual ones: they see which words a
window uses (a new topic, domain or language), not what the model makes of them; output drift
(confidence, predicted label) covers the latter.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

TABLE_FILE = "embedding_projection.npy"  # beside tokenizer.json in the Triton tokenizer model's version
DIMS = 16
COLUMN_PREFIX = "embedding_"
COLUMNS = tuple(f"{COLUMN_PREFIX}{i}" for i in range(DIMS))


class EmbeddingUnavailable(ValueError):
    """The model file has no token-embedding matrix this module can read (the reason says why)."""


def token_embeddings(onnx_file: Path, vocab_size: int) -> np.ndarray:
    """The token-embedding matrix (``vocab_size`` x hidden, float32) among the ONNX model's
    initializers: the floating 2-D initializer with ``vocab_size`` rows (the widest, when several)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_file), load_external_data=True)
    found = [init for init in model.graph.initializer
             if len(init.dims) == 2 and init.dims[0] == vocab_size
             and init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)]
    if not found:
        raise EmbeddingUnavailable(f"{onnx_file.name} has no floating initializer of {vocab_size} rows "
                                   "(the tokenizer's vocabulary): no token-embedding matrix to pool")
    widest = max(found, key=lambda init: init.dims[1])
    return numpy_helper.to_array(widest).astype(np.float32)


def token_ids(tokenizer_file: Path, texts: Sequence[str], max_length: int) -> list[np.ndarray]:
    """Each text's token ids as the serving tokenizer makes them (truncated, special tokens kept)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.no_padding()
    return [np.asarray(encoding.ids, dtype=np.int64) for encoding in tokenizer.encode_batch(list(texts))]


def mean_pooled(matrix: np.ndarray, ids: Sequence[np.ndarray]) -> np.ndarray:
    """Per text, the mean of ``matrix``'s rows over its token ids (a text without tokens: zeros)."""
    out = np.zeros((len(ids), matrix.shape[1]), dtype=np.float64)
    for row, text_ids in enumerate(ids):
        if len(text_ids):
            out[row] = matrix[text_ids].mean(axis=0)
    return out


def fit_table(embeddings: np.ndarray, ids: Sequence[np.ndarray], dims: int = DIMS) -> np.ndarray:
    """The projection table (vocabulary x ``dims``, float32): the token embeddings centred on the
    reference texts' mean pooled embedding and projected on its ``dims`` principal components, each
    scaled to unit variance over the reference texts."""
    pooled = mean_pooled(embeddings, ids)
    if len(pooled) <= dims:
        raise EmbeddingUnavailable(f"{len(pooled)} reference texts cannot fit {dims} components")
    centre = pooled.mean(axis=0)
    _, singular, components = np.linalg.svd(pooled - centre, full_matrices=False)
    spread = singular[:dims] / np.sqrt(len(pooled) - 1)
    weights = components[:dims].T / np.maximum(spread, 1e-12)
    return ((embeddings.astype(np.float64) - centre) @ weights).astype(np.float32)


def pool_padded(table: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Embeddings of a padded batch (what the Triton tokenizer model computes): the mean of the
    table's rows over each row's unmasked tokens."""
    mask = attention_mask.astype(np.float32)[..., None]
    total = (table[input_ids] * mask).sum(axis=1)
    return total / np.maximum(mask.sum(axis=1), 1.0)


def encode(vector: Sequence[float]) -> bytes:
    """The prediction log's form of one embedding: float16 bytes."""
    return np.asarray(vector, dtype=np.float16).tobytes()


def decode(blob: bytes | None, dims: int = DIMS) -> np.ndarray:
    """One logged embedding as float64 (NaN when absent or of another size)."""
    if blob is None:
        return np.full(dims, np.nan)
    values = np.frombuffer(bytes(blob), dtype=np.float16)
    return values.astype(np.float64) if len(values) == dims else np.full(dims, np.nan)


def reference_embeddings(table: np.ndarray, tokenizer_file: Path, texts: Sequence[str], max_length: int) -> np.ndarray:
    """The reference texts' embeddings through the table, rounded through float16 as logged."""
    pooled = mean_pooled(table, token_ids(tokenizer_file, texts, max_length))
    return pooled.astype(np.float16).astype(np.float64)
