"""Serving parity of head+tail truncation: the Triton tokenizer model (run with a stand-in for Triton's
python-backend utilities) cuts long raw texts as training's HF tokenizer helper does; the model
repository carries the strategy and ships the rule; the serving bundle keeps it; the drift reference
counts the tokens the served model reads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from monitoring import embedding as emb
from monitoring.features import reference_features
from serving import model_repository as repo
from serving.text import normalise_text
from tasks import modeling
from tasks.modeling import load_tokenizer
from tasks.serving_bundle import SERVING_FILE, ServingBundle, read_bundle, write_bundle
from tasks.tokens import encode
from tests.python_backend import loaded_tokenizer_model

MAX_LENGTH = 24


@pytest.fixture(scope="module")
def tokenizer_model():
    with loaded_tokenizer_model("tokenizer_model_truncation") as module:
        yield module


def _raw_long_texts() -> list[str]:
    """Raw reviews (HTML breaks, runs of spaces) several times longer than MAX_LENGTH, and short ones."""
    texts, _ = modeling.generate_texts(12, seed=5)
    return ["<br /><br />".join(texts[:4]) + "  the verdict: awful", "ok", "  ".join(texts[4:9]) + " great end",
            texts[9]]


def _served(module, tiny_model: Path, tmp_path: Path, parameters: dict[str, str]):
    """The tokenizer model loaded from a version folder the repository wrote for ``tiny_model``."""
    ensemble = repo.ClassifierEnsemble("clf", ("negative", "positive"), max_length=MAX_LENGTH,
                                       truncation=parameters.get("truncation", "head"))
    model_dir = tmp_path / "model"
    model_dir.mkdir(parents=True)
    (model_dir / "model.onnx").write_bytes(b"onnx")
    (model_dir / "tokenizer.json").write_bytes((tiny_model / "tokenizer.json").read_bytes())
    version = repo.write_component_versions(tmp_path / "repo", ensemble, model_dir)
    config = {"parameters": {key: {"string_value": value} for key, value in parameters.items()},
              "output": [{"name": spec.name, "dims": list(spec.dims)} for spec in repo.TOKENIZER_OUTPUTS
                         if spec.name != "embedding"]}
    model = module.TritonPythonModel()
    model.initialize({"model_config": json.dumps(config), "model_repository": str(tmp_path / "repo" / "clf_tokenizer"),
                      "model_version": str(version)})
    return model


def _run(model, texts: list[str]) -> dict[str, np.ndarray]:
    request = {"TEXT": np.array([text.encode() for text in texts], dtype=object).reshape(-1, 1)}
    (response,) = model.execute([request])
    return response.outputs


@pytest.mark.parametrize("strategy", ["head", "head_tail"])
def test_the_served_tokenizer_gives_the_ids_training_and_evaluation_used(tokenizer_model, tiny_model, tmp_path,
                                                                          strategy):
    texts = _raw_long_texts()
    model = _served(tokenizer_model, tiny_model, tmp_path,
                    {"max_length": str(MAX_LENGTH), "pad_token": "[PAD]", "truncation": strategy})
    served = _run(model, texts)
    expected = encode(load_tokenizer(tiny_model), [normalise_text(text) for text in texts], MAX_LENGTH, strategy)
    assert served["input_ids"].tolist() == expected["input_ids"].tolist()
    assert served["attention_mask"].tolist() == expected["attention_mask"].tolist()
    assert served["token_count"].ravel().tolist() == expected["attention_mask"].sum(axis=1).tolist()
    assert served["input_ids"].shape[1] == MAX_LENGTH  # the long texts were cut, the short ones padded
    for index, text in enumerate(texts):  # a text sent alone is not padded: the evaluation's batch-1 inputs
        alone = encode(load_tokenizer(tiny_model), [normalise_text(text)], MAX_LENGTH, strategy)
        assert _run(model, [text])["input_ids"].tolist() == alone["input_ids"].tolist()
        row = expected["input_ids"][index][expected["attention_mask"][index] == 1]
        assert alone["input_ids"][0].tolist() == row.tolist()


def test_head_tail_serves_the_end_of_a_long_text_that_head_drops(tokenizer_model, tiny_model, tmp_path):
    texts = _raw_long_texts()[:1]
    head = _run(_served(tokenizer_model, tiny_model, tmp_path / "head",
                        {"max_length": str(MAX_LENGTH), "pad_token": "[PAD]"}), texts)  # a config from before
    tail = _run(_served(tokenizer_model, tiny_model, tmp_path / "tail",
                        {"max_length": str(MAX_LENGTH), "pad_token": "[PAD]", "truncation": "head_tail"}), texts)
    full = load_tokenizer(tiny_model)(normalise_text(texts[0]))["input_ids"]
    assert tail["input_ids"][0].tolist()[-6:] == full[-6:] != head["input_ids"][0].tolist()[-6:]
    assert head["input_ids"][0].tolist() == full[:MAX_LENGTH - 1] + full[-1:]


def test_the_repository_writes_the_strategy_beside_max_length_and_ships_the_rule(tmp_path):
    ensemble = repo.ClassifierEnsemble("clf", ("negative", "positive"), max_length=64, truncation="head_tail")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.onnx").write_bytes(b"onnx")
    (model_dir / "tokenizer.json").write_text("{}")
    repo.write_ensemble_version(tmp_path / "repo", ensemble, model_dir)
    config = (tmp_path / "repo" / "clf_tokenizer" / "config.pbtxt").read_text()
    assert 'key: "truncation" value: { string_value: "head_tail" }' in config
    assert 'key: "max_length" value: { string_value: "64" }' in config
    shipped = tmp_path / "repo" / "clf_tokenizer" / "1" / "truncation.py"
    assert shipped.read_text() == repo.TRUNCATION_FILE.read_text()
    with pytest.raises(repo.RepositoryError, match="truncation must be one of"):
        repo.ClassifierEnsemble("clf", ("negative", "positive"), max_length=64, truncation="tail")


def _bundle(tmp_path: Path, truncation: str) -> ServingBundle:
    model_dir = tmp_path / "model_src"
    model_dir.mkdir(exist_ok=True)
    (model_dir / "tokenizer.json").write_text("{}")
    reference = tmp_path / "reference.parquet"
    pd.DataFrame({"label": [0]}).to_parquet(reference)
    return ServingBundle(model_dir=model_dir, labels=("negative", "positive"), max_length=32, reference=reference,
                         smoke_texts=("good",), smoke_logits=np.array([[0.1, 0.9]]), truncation=truncation)


def test_the_bundle_keeps_the_strategy_and_an_older_bundle_reads_as_head(tmp_path):
    folder = write_bundle(_bundle(tmp_path, "head_tail"), tmp_path / "serving")
    assert read_bundle(folder).truncation == "head_tail"
    serving = json.loads((folder / SERVING_FILE).read_text())
    del serving["truncation"]  # what a promotion before head_tail logged
    (folder / SERVING_FILE).write_text(json.dumps(serving))
    assert read_bundle(folder).truncation == "head"


def test_the_drift_reference_and_embeddings_read_the_served_tokens(tokenizer_model, tiny_model, tmp_path):
    texts = [normalise_text(text) for text in _raw_long_texts()]
    served = _run(_served(tokenizer_model, tiny_model, tmp_path,
                          {"max_length": str(MAX_LENGTH), "pad_token": "[PAD]", "truncation": "head_tail"}), texts)
    ids = emb.token_ids(tiny_model / "tokenizer.json", texts, MAX_LENGTH, "head_tail")
    assert [row.tolist() for row in ids] == [row[mask == 1].tolist()
                                            for row, mask in zip(served["input_ids"], served["attention_mask"])]
    assert [row.tolist() for row in ids] != [row.tolist() for row in emb.token_ids(tiny_model / "tokenizer.json",
                                                                                   texts, MAX_LENGTH)]
    logits = np.zeros((len(texts), 2))
    features = reference_features(logits, texts, ["negative", "positive"], tiny_model / "tokenizer.json", MAX_LENGTH,
                                  truncation="head_tail")
    assert features["token_count"].tolist() == served["token_count"].ravel().astype(float).tolist()
