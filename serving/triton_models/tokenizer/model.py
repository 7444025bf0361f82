"""Triton python-backend model: raw texts -> ``input_ids`` / ``attention_mask`` for the classifier.

Ships in each version folder next to ``tokenizer.json`` (the fast tokenizer the classifier was
trained with). A request's texts are padded to the longest of them; a single text is not padded,
which reproduces the evaluation's batch-1 inputs exactly. ``max_length`` comes from the config's
``parameters``. Texts are normalised first by ``text.py`` beside this file (a copy of
``serving/text.py``, the function training cleaned its texts with), so the served model reads what
the evaluated one read. A text longer than ``max_length`` tokens is cut by the ``truncation``
parameter (``head``, the default and what a config without it means, or ``head_tail``) with
``kept_positions`` from ``truncation.py`` beside this file (a copy of ``serving/truncation.py``, the rule
training and evaluation cut their texts with). Also returns, per text, its token count (after
truncation, special tokens included) and how many of those are the unknown token, for the prediction
log and drift monitoring.

And each text's pooled input embedding (``embedding``): the mean of the rows of the projection
table ``embedding_projection.npy`` (vocabulary x dims, fitted at promotion by
``monitoring.embedding``) over the text's unmasked tokens. A version without the table returns NaN
rows, which the gateway logs as no embedding. The output is returned only when the config the
model was loaded with declares it (a config is shared by all loaded versions of the model).
"""

import importlib.util
import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer

TABLE_FILE = "embedding_projection.npy"  # serving.model_repository.EMBEDDING_TABLE_FILE
EMBEDDING = "embedding"


def pooled_embeddings(table: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per row of a padded batch, the mean of ``table``'s rows over its unmasked tokens (float32;
    zeros for a row without tokens). The same as ``monitoring.embedding.pool_padded``."""
    weights = mask.astype(np.float32)[..., None]
    total = (table[ids] * weights).sum(axis=1)
    return (total / np.maximum(weights.sum(axis=1), 1.0)).astype(np.float32)


def load_table(folder: str, vocab_size: int, dims: int) -> np.ndarray | None:
    """The version's projection table, or None when the version has none (promoted without one)."""
    path = os.path.join(folder, TABLE_FILE)
    if not os.path.exists(path):
        return None
    table = np.load(path).astype(np.float32)
    if table.shape != (vocab_size, dims):
        raise pb_utils.TritonModelException(
            f"{path} has shape {table.shape}, expected ({vocab_size}, {dims}): the tokenizer's vocabulary by the "
            f"config's {EMBEDDING} dims; promote the model again to refit it")
    return table


def load_beside(folder: str, filename: str):
    """The module ``filename`` in ``folder``, loaded by path: the version folder is not a package, and
    another model's module of the same name must not be picked up."""
    name = f"{filename.removesuffix('.py')}_{abs(hash(folder))}"
    spec = importlib.util.spec_from_file_location(name, os.path.join(folder, filename))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_normaliser(folder: str):
    """``normalise_text`` from the ``text.py`` in ``folder``."""
    return load_beside(folder, "text.py").normalise_text


def cut_encodings(encodings: list, max_length: int, strategy: str, kept_positions) -> tuple[list, list]:
    """Ids and attention masks of untruncated, unpadded ``encodings`` cut to ``max_length`` by
    ``kept_positions(special_tokens_mask, max_length, strategy)`` (``serving/truncation.py``)."""
    ids, masks = [], []
    for encoding in encodings:
        positions = kept_positions(encoding.special_tokens_mask, max_length, strategy)
        ids.append([encoding.ids[position] for position in positions])
        masks.append([encoding.attention_mask[position] for position in positions])
    return ids, masks


def padded(rows: list, value: int) -> np.ndarray:
    """``rows`` right-padded with ``value`` to the longest (int64), as the tokenizer's own padding does."""
    width = max((len(row) for row in rows), default=0)
    return np.array([row + [value] * (width - len(row)) for row in rows], dtype=np.int64).reshape(len(rows), width)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        parameters = config.get("parameters", {})
        self._max_length = int(parameters["max_length"]["string_value"])
        self._truncation = parameters.get("truncation", {}).get("string_value", "head")
        folder = os.path.join(args["model_repository"], args["model_version"])
        self._normalise = load_normaliser(folder)
        path = os.path.join(folder, "tokenizer.json")
        self._tokenizer = Tokenizer.from_file(path)
        pad_token = parameters.get("pad_token", {}).get("string_value", "[PAD]")
        self._pad_id = self._tokenizer.token_to_id(pad_token)
        if self._pad_id is None:
            raise pb_utils.TritonModelException(f"pad token {pad_token!r} is not in {path}")
        self._kept_positions = None
        if self._truncation == "head":  # the tokenizer's own truncation and padding, as before head_tail
            self._tokenizer.enable_truncation(max_length=self._max_length)
            self._tokenizer.enable_padding(pad_id=self._pad_id, pad_token=pad_token)
        else:
            truncation = load_beside(folder, "truncation.py")
            self._kept_positions = truncation.kept_positions
            self._kept_positions([], self._max_length, self._truncation)  # an unknown strategy fails the load
            self._tokenizer.no_truncation()
            self._tokenizer.no_padding()
        unknown = self._tokenizer.model.unk_token if hasattr(self._tokenizer.model, "unk_token") else None
        self._unknown_id = self._tokenizer.token_to_id(unknown) if unknown else None
        declared = {output["name"]: output for output in config.get("output", [])}
        self._embedding_dims = int(declared[EMBEDDING]["dims"][-1]) if EMBEDDING in declared else None
        self._table = load_table(folder, self._tokenizer.get_vocab_size(), self._embedding_dims) \
            if self._embedding_dims else None

    def _tokenize(self, texts: list) -> tuple[np.ndarray, np.ndarray]:
        """Padded ``input_ids`` and ``attention_mask`` of normalised ``texts``, cut by the truncation."""
        encodings = self._tokenizer.encode_batch(texts)
        if self._kept_positions is None:
            return (np.array([encoding.ids for encoding in encodings], dtype=np.int64),
                    np.array([encoding.attention_mask for encoding in encodings], dtype=np.int64))
        ids, masks = cut_encodings(encodings, self._max_length, self._truncation, self._kept_positions)
        return padded(ids, self._pad_id), padded(masks, 0)

    def _outputs(self, texts: list) -> list:
        ids, mask = self._tokenize([self._normalise(text) for text in texts])
        counts = mask.sum(axis=1, keepdims=True).astype(np.int64)
        unknown = ((ids == self._unknown_id) & (mask == 1)).sum(axis=1, keepdims=True).astype(np.int64) \
            if self._unknown_id is not None else np.zeros_like(counts)
        outputs = [pb_utils.Tensor("input_ids", ids), pb_utils.Tensor("attention_mask", mask),
                   pb_utils.Tensor("token_count", counts), pb_utils.Tensor("unknown_count", unknown)]
        if self._embedding_dims:
            embedding = pooled_embeddings(self._table, ids, mask) if self._table is not None \
                else np.full((len(texts), self._embedding_dims), np.nan, dtype=np.float32)
            outputs.append(pb_utils.Tensor(EMBEDDING, embedding))
        return outputs

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            raw = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)
            try:
                texts = [item.decode("utf-8") if isinstance(item, bytes) else str(item) for item in raw]
            except UnicodeDecodeError as error:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"TEXT is not UTF-8: {error}")))
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=self._outputs(texts)))
        return responses
