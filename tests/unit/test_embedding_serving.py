"""Pooled input embeddings through serving: the Triton tokenizer model's pooling (run with a stand-in
for Triton's python-backend utilities), the repository's configs and files, the gateway's view of a
response and its log rows, the log's encoding, and the monitor's decoding of a window."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from monitoring import embedding as emb
from serving import model_repository as repo
from serving import prediction_log as plog
from tests.python_backend import StubModelException, loaded_tokenizer_model


@pytest.fixture(scope="module")
def tokenizer_model():
    with loaded_tokenizer_model("tokenizer_model") as module:
        yield module


def _version_folder(tmp_path: Path, tiny_model: Path, table: np.ndarray | None) -> Path:
    folder = tmp_path / "tok" / "1"
    folder.mkdir(parents=True)
    (folder / "tokenizer.json").write_bytes((tiny_model / "tokenizer.json").read_bytes())
    (folder / "text.py").write_bytes(repo.NORMALISER_FILE.read_bytes())
    if table is not None:
        np.save(folder / emb.TABLE_FILE, table)
    return folder


def _loaded(module, folder: Path, outputs=repo.TOKENIZER_OUTPUTS):
    config = {"parameters": {"max_length": {"string_value": "16"}, "pad_token": {"string_value": "[PAD]"}},
              "output": [{"name": spec.name, "dims": list(spec.dims)} for spec in outputs]}
    model = module.TritonPythonModel()
    model.initialize({"model_config": json.dumps(config), "model_repository": str(folder.parent),
                      "model_version": folder.name})
    return model


def _run(model, texts: list[str]) -> dict[str, np.ndarray]:
    request = {"TEXT": np.array([text.encode() for text in texts], dtype=object).reshape(-1, 1)}
    (response,) = model.execute([request])
    return response.outputs


def _vocab(tiny_model: Path) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tiny_model / "tokenizer.json")).get_vocab_size()


TEXTS = ["good great film", "an awful boring plot that went on and on and on without end", "ok"]


def test_the_tokenizer_model_pools_the_table_over_each_texts_own_tokens(tokenizer_model, tiny_model, tmp_path):
    table = np.random.default_rng(0).normal(size=(_vocab(tiny_model), repo.EMBEDDING_DIMS)).astype(np.float32)
    model = _loaded(tokenizer_model, _version_folder(tmp_path, tiny_model, table))
    outputs = _run(model, TEXTS)
    assert outputs["embedding"].shape == (3, repo.EMBEDDING_DIMS) and outputs["embedding"].dtype == np.float32
    # The padded batch's rows are each text's own mean (padding excluded), as computed offline.
    assert np.allclose(outputs["embedding"], emb.pool_padded(table, outputs["input_ids"], outputs["attention_mask"]),
                       atol=1e-6)
    offline = emb.mean_pooled(table, emb.token_ids(tiny_model / "tokenizer.json", TEXTS, 16))
    assert np.allclose(outputs["embedding"], offline, atol=1e-5)
    assert outputs["attention_mask"][2].sum() < outputs["attention_mask"].shape[1]  # "ok" was padded
    single = _run(model, TEXTS[2:])["embedding"]
    assert np.allclose(single, outputs["embedding"][2:], atol=1e-6)


def test_the_tokenizer_model_normalises_texts_as_training_did(tokenizer_model, tiny_model, tmp_path):
    """HTML breaks and runs of whitespace are read as training read them (serving.text)."""
    model = _loaded(tokenizer_model, _version_folder(tmp_path, tiny_model, None))
    raw = _run(model, ["good<br /><br />film \t\n  ok "])
    clean = _run(model, ["good film ok"])
    assert raw["input_ids"].tolist() == clean["input_ids"].tolist()


def test_a_version_without_a_table_answers_nan_rows(tokenizer_model, tiny_model, tmp_path):
    outputs = _run(_loaded(tokenizer_model, _version_folder(tmp_path, tiny_model, None)), TEXTS[:2])
    assert outputs["embedding"].shape == (2, repo.EMBEDDING_DIMS) and np.isnan(outputs["embedding"]).all()
    assert outputs["token_count"].reshape(-1).tolist() == outputs["attention_mask"].sum(axis=1).tolist()


def test_loaded_with_a_config_without_the_output_it_returns_none(tokenizer_model, tiny_model, tmp_path):
    table = np.zeros((_vocab(tiny_model), repo.EMBEDDING_DIMS), dtype=np.float32)
    older = tuple(spec for spec in repo.TOKENIZER_OUTPUTS if spec.name != "embedding")
    outputs = _run(_loaded(tokenizer_model, _version_folder(tmp_path, tiny_model, table), older), TEXTS)
    assert set(outputs) == {"input_ids", "attention_mask", "token_count", "unknown_count"}


def test_a_table_of_the_wrong_shape_is_refused_with_the_reason(tokenizer_model, tiny_model, tmp_path):
    folder = _version_folder(tmp_path, tiny_model, np.zeros((7, repo.EMBEDDING_DIMS), dtype=np.float32))
    with pytest.raises(StubModelException, match="promote the model again"):
        _loaded(tokenizer_model, folder)


# -- the repository ---------------------------------------------------------------------------------

def _parsed(text: str):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def _exported(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"onnx")
    (folder / "tokenizer.json").write_text("{}")
    return folder


def test_the_ensemble_maps_the_tokenizers_embedding_to_its_embedding_output(tmp_path):
    ensemble = repo.ClassifierEnsemble("clf", ("negative", "positive"), max_length=32)
    table = tmp_path / repo.EMBEDDING_TABLE_FILE
    np.save(table, np.zeros((5, repo.EMBEDDING_DIMS), dtype=np.float32))
    repository = tmp_path / "repo"
    version = repo.write_component_versions(repository, ensemble, _exported(tmp_path / "m"), tokenizer_files=(table,))
    repo.write_ensemble_step(repository, "clf", version, repo.render_ensemble_config(ensemble, version))
    tokenizer = _parsed((repository / "clf_tokenizer" / "config.pbtxt").read_text())
    assert {(out.name, tuple(out.dims)) for out in tokenizer.output} >= {("embedding", (repo.EMBEDDING_DIMS,))}
    ensemble_config = _parsed((repository / "clf" / "config.pbtxt").read_text())
    assert ("EMBEDDING", (repo.EMBEDDING_DIMS,)) in {(out.name, tuple(out.dims)) for out in ensemble_config.output}
    step = ensemble_config.ensemble_scheduling.step[0]
    assert step.model_name == "clf_tokenizer" and step.output_map["embedding"] == "EMBEDDING"
    assert (repository / "clf_tokenizer" / str(version) / repo.EMBEDDING_TABLE_FILE).exists()
    assert (repository / "clf_tokenizer" / str(version) / "tokenizer.json").exists()
    with pytest.raises(repo.RepositoryError, match="missing.npy"):
        repo.write_component_versions(repository, ensemble, tmp_path / "m", tokenizer_files=(tmp_path / "missing.npy",))


def test_a_copy_of_a_version_from_before_embeddings_keeps_declaring_the_output(tmp_path):
    """The tokenizer's config is shared by its loaded versions: the copy must not take the output away
    from the serving version, whose ensemble maps it."""
    ensemble = repo.ClassifierEnsemble("clf", ("negative", "positive"), max_length=32)
    repository = tmp_path / "repo"
    old = repo.write_ensemble_version(repository, ensemble, _exported(tmp_path / "m"))
    snapshot = repository / "clf_tokenizer" / str(old) / repo.CONFIG_SNAPSHOT
    before = snapshot.read_text().replace(',\n  { name: "embedding" data_type: TYPE_FP32 dims: [ 16 ] }', "")
    assert "embedding" not in before
    snapshot.write_text(before)
    repo.write_ensemble_version(repository, ensemble, _exported(tmp_path / "n"))
    copy = repo.copy_ensemble_components(repository, "clf", old)
    config = _parsed((repository / "clf_tokenizer" / "config.pbtxt").read_text())
    assert [out.name for out in config.output] == [spec.name for spec in repo.TOKENIZER_OUTPUTS]
    assert _parsed((repository / "clf_tokenizer" / str(copy) / repo.CONFIG_SNAPSHOT).read_text()) == config
    assert repo.with_outputs(before, repo.TOKENIZER_OUTPUTS) == (repository / "clf_tokenizer" / "config.pbtxt").read_text()
    current = repo.with_outputs(before, repo.TOKENIZER_OUTPUTS)
    assert repo.with_outputs(current, repo.TOKENIZER_OUTPUTS) == current  # nothing to add


# -- the gateway and the log -----------------------------------------------------------------------

class _Result:
    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.arrays = arrays

    def as_numpy(self, name: str):
        return self.arrays.get(name)


def _response(embedding: np.ndarray | None) -> _Result:
    arrays = {"LABEL": np.array([b"positive", b"negative"], dtype=object).reshape(-1, 1),
              "PROBABILITIES": np.array([[0.2, 0.8], [0.9, 0.1]], dtype=np.float32),
              "TOKENS": np.array([[5], [7]]), "UNKNOWN_TOKENS": np.array([[0], [1]])}
    return _Result(arrays | ({"EMBEDDING": embedding} if embedding is not None else {}))


def test_the_gateway_logs_each_texts_embedding_as_float16_and_nan_rows_as_none():
    from serving.gateway import GatewaySettings, _logged_predictions, classified

    vector = np.linspace(-2, 2, repo.EMBEDDING_DIMS, dtype=np.float32)
    embedding = np.stack([vector, np.full(repo.EMBEDDING_DIMS, np.nan, dtype=np.float32)])
    result = classified(_response(embedding), "3", ["negative", "positive"])
    assert result["tokens"] == [5, 7] and result["unknown"] == [0, 1] and result["label"] == ["positive", "negative"]
    rows = list(_logged_predictions(["a b", "c d e"], result, 4.0, GatewaySettings(), ["id1", "id2"]))
    assert len(rows[0].embedding) == 2 * repo.EMBEDDING_DIMS and rows[1].embedding is None
    assert [row.prediction_id for row in rows] == ["id1", "id2"]
    assert np.allclose(plog.decode_embedding(rows[0].embedding), vector, atol=2e-3)
    without = classified(_response(None), "1", ["negative", "positive"])
    assert without["embeddings"] is None
    assert [row.embedding for row in _logged_predictions(["a", "b"], without, 4.0, GatewaySettings(), ["id3", "id4"])] == [None, None]


def test_the_gateway_drops_an_output_the_serving_version_lacks_until_another_version_serves():
    from tritonclient.utils import InferenceServerException

    from serving.gateway import TritonClassifier

    classifier = TritonClassifier("127.0.0.1:1", "m", 1.0)
    asked: list[tuple[str, ...]] = []

    async def infer(_texts, names):
        asked.append(names)
        if "EMBEDDING" in names:
            raise InferenceServerException("unexpected inference output 'EMBEDDING' for model 'm'")
        return "result"

    classifier._infer = infer
    assert asyncio.run(classifier._infer_available(["x"])) == "result"
    assert asked == [("LABEL", "PROBABILITIES", "TOKENS", "UNKNOWN_TOKENS", "EMBEDDING"),
                     ("LABEL", "PROBABILITIES", "TOKENS", "UNKNOWN_TOKENS")]
    classifier.note_version("1")
    assert "EMBEDDING" not in classifier.requested_outputs()
    classifier.note_version("1")
    assert "EMBEDDING" not in classifier.requested_outputs()
    classifier.note_version("2")  # a promotion: ask again
    assert "EMBEDDING" in classifier.requested_outputs()

    async def broken(_texts, _names):
        raise InferenceServerException("model 'm' is not ready")

    classifier._infer = broken
    with pytest.raises(InferenceServerException, match="not ready"):
        asyncio.run(classifier._infer_available(["x"]))


def test_the_logs_embedding_encoding_round_trips_through_float16():
    vector = np.random.default_rng(1).normal(size=repo.EMBEDDING_DIMS)
    blob = plog.encode_embedding(vector)
    assert isinstance(blob, bytes) and len(blob) == 2 * repo.EMBEDDING_DIMS
    assert np.allclose(plog.decode_embedding(blob), vector, rtol=1e-3, atol=1e-3)
    assert plog.encode_embedding([np.nan] * repo.EMBEDDING_DIMS) is None
    assert plog.encode_embedding([1.0, np.inf] + [0.0] * 14) is None
    assert np.isnan(plog.decode_embedding(None)).all() and np.isnan(plog.decode_embedding(b"\x00\x01")).all()
    # monitoring.embedding's names are serving's
    assert (emb.encode, emb.decode, emb.DIMS, emb.TABLE_FILE) == \
        (plog.encode_embedding, plog.decode_embedding, repo.EMBEDDING_DIMS, repo.EMBEDDING_TABLE_FILE)


# -- the monitor's side ------------------------------------------------------------------------------

def _log_rows(embeddings: list) -> pd.DataFrame:
    count = len(embeddings)
    return pd.DataFrame({"confidence": [0.9] * count, "label": ["positive"] * count, "text_chars": [10] * count,
                         "token_count": [5] * count, "unknown_tokens": [0] * count, "embedding": embeddings})


def test_window_features_decode_logged_embeddings():
    from monitoring.features import window_features

    vectors = np.random.default_rng(2).normal(size=(2, repo.EMBEDDING_DIMS))
    features = window_features(_log_rows([plog.encode_embedding(vectors[0]), None,
                                          plog.encode_embedding(vectors[1])]))
    matrix = features[list(emb.COLUMNS)].to_numpy()
    assert np.allclose(matrix[[0, 2]], vectors, atol=5e-3) and np.isnan(matrix[1]).all()
    assert features["confidence"].tolist() == [0.9] * 3
    # No row with an embedding (an older version, or a log of an earlier release): no columns at all.
    assert not set(emb.COLUMNS) & set(window_features(_log_rows([None, None])).columns)
    assert not set(emb.COLUMNS) & set(window_features(_log_rows([None]).drop(columns="embedding")).columns)


def test_reference_features_take_the_table(tiny_model):
    from monitoring.features import reference_features

    table = np.random.default_rng(3).normal(size=(_vocab(tiny_model), repo.EMBEDDING_DIMS)).astype(np.float32)
    logits = np.array([[0.1, 0.9], [2.0, -1.0]])
    plain = reference_features(logits, TEXTS[:2], ["negative", "positive"], tiny_model / "tokenizer.json", 16)
    assert not set(emb.COLUMNS) & set(plain.columns)
    features = reference_features(logits, TEXTS[:2], ["negative", "positive"], tiny_model / "tokenizer.json", 16,
                                  embedding_table=table)
    expected = emb.reference_embeddings(table, tiny_model / "tokenizer.json", TEXTS[:2], 16)
    assert np.array_equal(features[list(emb.COLUMNS)].to_numpy(), expected)
    assert features.drop(columns=list(emb.COLUMNS)).equals(plain)
