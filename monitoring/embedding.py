"""Pooled input embeddings for drift monitoring, cheap enough to compute for every prediction.

At promotion, the champion's token-embedding matrix (vocabulary x hidden, read from its ONNX file)
is reduced to ``DIMS`` whitened principal components, fitted on the mean-pooled embeddings of its
training texts. Not on the reference (test) texts: a projection fitted on the reference makes the
reference look tighter than any later window (whitening divides by the variances it measured on
those very texts), and windows of the same distribution would then drift. Mean pooling and the projection are both linear, so the result
is one table (vocabulary x ``DIMS``, ``TABLE_FILE``): a text's embedding is the mean of the table's
rows over its tokens. The Triton tokenizer model does that lookup for every request (no second
model pass), the gateway logs it as ``DIMS`` float16 values (``encode``), and the monitor compares a
window's embeddings with the reference's (``monitoring.drift``). Serving owns the names both sides
share (the table's file name and size, the log's encoding); they are re-exported here.

These are the model's input (token) embeddings, not its contextual ones: they see which words a
window uses (a new topic, domain or language), not what the model makes of them; output drift
(confidence, predicted label) covers the latter.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from serving.model_repository import EMBEDDING_DIMS as DIMS
from serving.model_repository import EMBEDDING_TABLE_FILE as TABLE_FILE  # beside the tokenizer's tokenizer.json
from serving.prediction_log import decode_embedding as decode
from serving.prediction_log import encode_embedding as encode
from serving.truncation import DEFAULT_TRUNCATION, kept_positions

__all__ = ["COLUMNS", "COLUMN_PREFIX", "DIMS", "TABLE_FILE", "EmbeddingUnavailable", "decode", "encode",
           "fit_table", "fit_table_for", "mean_pooled", "pool_padded", "reference_embeddings", "token_embeddings", "token_ids"]

COLUMN_PREFIX = "embedding_"
COLUMNS = tuple(f"{COLUMN_PREFIX}{i}" for i in range(DIMS))


class EmbeddingUnavailable(ValueError):
    """The model file has no token-embedding matrix this module can read (the reason says why)."""


FLOATING = (1, 10, 16)  # onnx.TensorProto.FLOAT, FLOAT16, BFLOAT16
INTEGER = (2, 3)  # onnx.TensorProto.UINT8, INT8: a quantized matrix, read through its DequantizeLinear


def token_embeddings(onnx_file: Path, vocab_size: int) -> np.ndarray:
    """The token-embedding matrix (``vocab_size`` x hidden, float32) among the ONNX model's
    initializers: the 2-D initializer with ``vocab_size`` rows (the widest, when several), floating,
    or INT8/UINT8 with the DequantizeLinear that reads it (dynamic INT8 quantizes the embedding's
    Gather and dequantizes its output; QDQ models dequantize the matrix itself), dequantized here."""
    import onnx

    model = onnx.load(str(onnx_file), load_external_data=True)
    found = [init for init in model.graph.initializer if len(init.dims) == 2 and init.dims[0] == vocab_size
             and init.data_type in FLOATING + INTEGER]
    if not found:
        raise EmbeddingUnavailable(f"{onnx_file.name} has no initializer of {vocab_size} rows (the tokenizer's "
                                   "vocabulary): no token-embedding matrix to pool")
    widest = max(found, key=lambda init: (init.dims[1], init.data_type in FLOATING))
    if widest.data_type in FLOATING:
        return onnx.numpy_helper.to_array(widest).astype(np.float32)
    return _dequantized(model.graph, widest, onnx_file.name)


def _dequantized(graph, matrix, file_name: str) -> np.ndarray:
    """An integer embedding matrix as float32: ``(q - zero_point) * scale``, with the scale and zero
    point of the DequantizeLinear that reads it (directly, or the output of a Gather on it), or else
    those ONNX Runtime's quantizer names after it (``<name>_quantized``: ``<name>_scale``,
    ``<name>_zero_point``; its output may go straight into an integer MatMul)."""
    from onnx import numpy_helper

    constants = {init.name: init for init in graph.initializer}
    scale_name, zero_name, axis, direct = _quantization_of(graph, matrix.name, constants)
    if scale_name not in constants or (zero_name and zero_name not in constants):
        raise EmbeddingUnavailable(f"{file_name}: the quantized embedding matrix {matrix.name} has no DequantizeLinear "
                                   "with constant scale and zero point to read it through")
    values = numpy_helper.to_array(matrix).astype(np.float64)
    scale = numpy_helper.to_array(constants[scale_name]).astype(np.float64)
    zero = numpy_helper.to_array(constants[zero_name]).astype(np.float64) if zero_name else np.zeros_like(scale)
    # Per-tensor: scalars. Per-axis: along the rows (axis 0 of the matrix itself) or the hidden units
    # (the last axis, of the matrix or of what the Gather returns).
    if scale.ndim == 1 and direct and axis == 0 and len(scale) == values.shape[0]:
        scale, zero = scale[:, None], zero[:, None]
    elif scale.ndim > 1 or (scale.ndim == 1 and len(scale) != values.shape[1]):
        raise EmbeddingUnavailable(f"{file_name}: cannot apply scales of shape {scale.shape} to the embedding "
                                   f"matrix {matrix.name} of shape {values.shape}")
    return ((values - zero) * scale).astype(np.float32)


def _quantization_of(graph, name: str, constants: dict) -> tuple[str, str, int, bool]:
    """(scale, zero point or "", axis, whether the matrix itself is dequantized) of matrix ``name``."""
    gathered = {node.output[0] for node in graph.node if node.op_type == "Gather" and node.input[0] == name}
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and (node.input[0] == name or node.input[0] in gathered):
            attributes = {attribute.name: attribute.i for attribute in node.attribute}
            if attributes.get("block_size"):
                raise EmbeddingUnavailable(f"block-quantized embeddings ({name}) are not read")
            zero = node.input[2] if len(node.input) > 2 else ""
            return node.input[1], zero, attributes.get("axis", 1), node.input[0] == name
    base = name.removesuffix("_quantized")
    zero = f"{base}_zero_point" if f"{base}_zero_point" in constants else ""
    return f"{base}_scale", zero, 1, False


def fit_table_for(model_file: Path, tokenizer_file: Path, texts: Sequence[str], max_length: int,
                  truncation: str = DEFAULT_TRUNCATION) -> np.ndarray:
    """The projection table of a served ONNX model, fitted on ``texts`` (its training texts, not the
    reference's: see the module's docstring). ``EmbeddingUnavailable`` when the model has no
    readable token-embedding matrix (a TensorRT engine, an unrecognised quantization)."""
    from tokenizers import Tokenizer

    if model_file.suffix != ".onnx" or not model_file.exists():
        raise EmbeddingUnavailable(f"{model_file} is not an ONNX file: its token embeddings cannot be read")
    vocab = Tokenizer.from_file(str(tokenizer_file)).get_vocab_size()
    return fit_table(token_embeddings(model_file, vocab), token_ids(tokenizer_file, texts, max_length, truncation))


def token_ids(tokenizer_file: Path, texts: Sequence[str], max_length: int,
              truncation: str = DEFAULT_TRUNCATION) -> list[np.ndarray]:
    """Each text's token ids as the serving tokenizer makes them (cut to ``max_length`` by
    ``truncation``, special tokens kept): the served model's embeddings pool these tokens, so the
    reference's and the fitted table's must too."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    tokenizer.no_padding()
    if truncation == "head":
        tokenizer.enable_truncation(max_length=max_length)
        return [np.asarray(encoding.ids, dtype=np.int64) for encoding in tokenizer.encode_batch(list(texts))]
    tokenizer.no_truncation()
    encodings = tokenizer.encode_batch(list(texts))
    return [np.asarray(encoding.ids, dtype=np.int64)[kept_positions(encoding.special_tokens_mask, max_length,
                                                                    truncation)] for encoding in encodings]


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
    if embeddings.ndim != 2 or embeddings.shape[1] < dims:
        raise EmbeddingUnavailable(f"token embeddings of shape {embeddings.shape} cannot give {dims} components")
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


def reference_embeddings(table: np.ndarray, tokenizer_file: Path, texts: Sequence[str], max_length: int,
                         truncation: str = DEFAULT_TRUNCATION) -> np.ndarray:
    """The reference texts' embeddings through the table, rounded through float16 as logged."""
    pooled = mean_pooled(table, token_ids(tokenizer_file, texts, max_length, truncation))
    return pooled.astype(np.float16).astype(np.float64)
