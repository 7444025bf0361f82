"""The pieces of registry-driven serving that need no server: the serving bundle's layout, the markers
that say which registered version an ensemble version's files are, how the reconcile loop finds a
version's files, what it refuses, the repository lock, and the loop's arguments."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from serving import model_repository as repo
from tasks.errors import PromotionFailed
from tasks.promote import SERVING_ERROR_TAG, serving_lock
from tasks.reconcile import _refusal, files_of, parse_args
from tasks.serving_bundle import ServingBundle, read_bundle, write_bundle


def _bundle(tmp_path: Path, table: bool = True) -> ServingBundle:
    model_dir = tmp_path / "model_src"
    model_dir.mkdir()
    (model_dir / "model.onnx").write_bytes(b"onnx")
    (model_dir / "tokenizer.json").write_text("{}")
    reference = tmp_path / "reference.parquet"
    pd.DataFrame({"label": [0, 1]}).to_parquet(reference)
    embedding = tmp_path / "table.npy"
    np.save(embedding, np.eye(3))
    return ServingBundle(model_dir=model_dir, labels=("negative", "positive"), max_length=32, reference=reference,
                         smoke_texts=("good", "bad film"), smoke_logits=np.array([[0.1, 0.9], [0.8, -0.2]]),
                         embedding_table=embedding if table else None, intra_op_threads=2)


@pytest.mark.parametrize("table", [True, False])
def test_a_bundle_reads_back_as_written(tmp_path, table):
    written = _bundle(tmp_path, table)
    read = read_bundle(write_bundle(written, tmp_path / "serving"))
    assert (read.labels, read.max_length, read.intra_op_threads) == (("negative", "positive"), 32, 2)
    assert read.smoke_texts == written.smoke_texts
    assert np.allclose(read.smoke_logits, written.smoke_logits)
    assert (read.model_dir / "model.onnx").read_bytes() == b"onnx"
    assert pd.read_parquet(read.reference)["label"].tolist() == [0, 1]
    assert (read.embedding_table is not None) == table
    if table:
        assert np.array_equal(np.load(read.embedding_table), np.eye(3))


def test_an_incomplete_bundle_says_what_it_lacks(tmp_path):
    folder = write_bundle(_bundle(tmp_path), tmp_path / "serving")
    (folder / "smoke.json").unlink()
    with pytest.raises(PromotionFailed, match=r"lacks \['smoke.json'\]"):
        read_bundle(folder)
    with pytest.raises(PromotionFailed, match="3 smoke texts but 2 rows"):
        ServingBundle(model_dir=tmp_path, labels=("a",), max_length=8, reference=tmp_path,
                      smoke_texts=("x", "y", "z"), smoke_logits=np.zeros((2, 1)))


def _ensemble_version(repository: Path, name: str, version: int, marker: tuple[str, str] | None) -> None:
    for model in repo.ensemble_models(name):
        (repository / model / str(version)).mkdir(parents=True)
    if marker is not None:
        repo.write_registered_version(repository / name / str(version), *marker)


def test_a_versions_files_are_found_by_marker_then_by_tag(tmp_path):
    _ensemble_version(tmp_path, "m", 1, None)  # written before markers
    _ensemble_version(tmp_path, "m", 2, ("reg", "5"))
    _ensemble_version(tmp_path, "m", 3, ("reg", "6"))
    _ensemble_version(tmp_path, "m", 4, ("reg", "5"))  # v5 served again (rolled back to)
    assert repo.registered_version(tmp_path, "m", 3) == ("reg", "6")
    assert repo.registered_version(tmp_path, "m", 1) is None
    assert files_of(tmp_path, "m", "reg", "5", {}) == 4  # the newest copy
    assert files_of(tmp_path, "m", "other-reg", "5", {}) is None
    # An unmarked folder is the version's files when its tags say so; a marked one never by a tag.
    assert files_of(tmp_path, "m", "reg", "3", {"triton_model": "m", "triton_version": "1"}) == 1
    assert files_of(tmp_path, "m", "reg", "3", {"triton_model": "m", "triton_version": "2"}) is None
    assert files_of(tmp_path, "m", "reg", "3", {"triton_model": "other", "triton_version": "1"}) is None
    assert files_of(tmp_path, "m", "reg", "7", {}) is None


def test_the_reference_teacher_and_a_version_that_failed_are_refused():
    assert "never served" in _refusal("reg", "3", {"role": "reference"})
    refused = _refusal("reg", "4", {SERVING_ERROR_TAG: "smoke test failed"})
    assert "smoke test failed" in refused and "delete its version tag 'serving_error'" in refused
    assert _refusal("reg", "5", {"role": "candidate"}) == ""


def test_a_rebuilt_version_is_numbered_above_what_triton_holds(tmp_path):
    from tasks.onnx_model import MODEL_FILENAME

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / MODEL_FILENAME).write_bytes(b"onnx")
    (model_dir / "tokenizer.json").write_text('{"model": {"vocab": {"[PAD]": 0}}}')
    ensemble = repo.ClassifierEnsemble("m", ("a", "b"), 16)
    assert repo.write_component_versions(tmp_path / "repo", ensemble, model_dir, min_version=7) == 7
    assert repo.write_component_versions(tmp_path / "repo", ensemble, model_dir, min_version=2) == 8


def _hold_lock(repository: str, ready, release) -> None:
    with serving_lock(Path(repository), "m"):
        ready.set()
        release.wait(30)


def test_one_switch_at_a_time(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(tmp_path), ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(PromotionFailed, match="held .* for over 0 s"):
            with serving_lock(tmp_path, "m", timeout_s=0.3):
                pass
        with serving_lock(tmp_path, "other", timeout_s=0.3):  # another model's lock is free
            pass
    finally:
        release.set()
        holder.join(30)
    with serving_lock(tmp_path, "m", timeout_s=5):  # free again once released
        pass


def test_the_loop_reads_its_services_from_the_pipeline_environment(tmp_path):
    env = {"PIPELINE_MLFLOW_TRACKING_URI": "http://127.0.0.1:5000", "PIPELINE_TRITON_URL": "127.0.0.1:8000",
           "PIPELINE_TRITON_MODEL_REPOSITORY": str(tmp_path)}
    args = parse_args(["--once"], env)
    assert (args.mlflow, args.triton, args.repository, args.once) == ("http://127.0.0.1:5000", "127.0.0.1:8000",
                                                                      tmp_path, True)
    assert (args.registered_model, args.triton_model) == ("text-classifier", "text_classifier")
    with pytest.raises(SystemExit):
        parse_args([], {})


def test_the_loop_reconciles_every_served_model_from_its_own_registered_model(tmp_path, capsys):
    env = {"PIPELINE_MLFLOW_TRACKING_URI": "http://127.0.0.1:5000", "PIPELINE_TRITON_MODEL_REPOSITORY": str(tmp_path)}
    args = parse_args(["--model", "text_classifier=text-classifier", "--model", "topics=topic-clf"], env)
    assert [(config.triton_model, config.registered_model) for config in args.configs] == [
        ("text_classifier", "text-classifier"), ("topics", "topic-clf")]
    assert [(c.triton_model, c.registered_model) for c in parse_args([], env | {"PIPELINE_TRITON_URL": "x"}).configs] \
        == [("text_classifier", "text-classifier")]
    for bad, message in ((["--model", "topics"], "is not served=registered"),
                         (["--model", "a=m", "--model", "b=m"], "registered model names ['m']")):
        with pytest.raises(SystemExit):
            parse_args(bad, env)
        assert message in capsys.readouterr().err
