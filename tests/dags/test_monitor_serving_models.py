"""One monitor DAG per served model, generated from PIPELINE_EXTRA_MODELS at parse time."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.served_models import ServedModel, model_params
from tasks.settings import PipelineSettings

DAG_FILE = Path(__file__).resolve().parents[2] / "dags" / "monitor_serving.py"


def _dagbag(monkeypatch, extra: str | None):
    from airflow.dag_processing.dagbag import DagBag

    if extra is None:
        monkeypatch.delenv("PIPELINE_EXTRA_MODELS", raising=False)
    else:
        monkeypatch.setenv("PIPELINE_EXTRA_MODELS", extra)
    monkeypatch.setenv("PIPELINE_SERVING_MODEL", "sentiment")
    return DagBag(dag_folder=str(DAG_FILE))


def test_each_extra_model_gets_its_own_monitor_dag(monkeypatch):
    dagbag = _dagbag(monkeypatch, "topics=topic-clf,news=news-clf")
    assert dagbag.import_errors == {}
    assert set(dagbag.dag_ids) == {"monitor_serving", "monitor_serving__topics", "monitor_serving__news"}
    topics = dagbag.dags["monitor_serving__topics"]
    assert "model:topics" in topics.tags and "`topics` (registered model `topic-clf`)" in topics.doc_md
    assert "model:sentiment" in dagbag.dags["monitor_serving"].tags
    assert sorted(task.task_id for task in topics.tasks) == ["check_window", "should_trigger", "trigger_optimize_model"]
    assert set(topics.params) == set(dagbag.dags["monitor_serving"].params)


def test_the_topic_model_is_monitored_by_default_and_an_empty_list_monitors_only_the_default(monkeypatch):
    assert set(_dagbag(monkeypatch, None).dag_ids) == {"monitor_serving", "monitor_serving__topic_classifier"}
    assert set(_dagbag(monkeypatch, "").dag_ids) == {"monitor_serving"}


def test_a_bad_model_list_is_an_import_error_that_says_what_is_wrong(monkeypatch):
    errors = _dagbag(monkeypatch, "topics").import_errors
    assert len(errors) == 1 and "is not served=registered" in next(iter(errors.values()))


def test_an_extra_monitor_watches_its_model_in_its_own_state_folder_and_retrains_it(tmp_path):
    settings = PipelineSettings.from_env({
        "PIPELINE_RUNS_DIR": str(tmp_path / "runs"), "PIPELINE_MLFLOW_TRACKING_URI": "http://127.0.0.1:5000",
        "PIPELINE_TRITON_URL": "127.0.0.1:8000", "PIPELINE_TRITON_MODEL_REPOSITORY": str(tmp_path / "models"),
        "PIPELINE_HOME": str(tmp_path), "PIPELINE_PREDICTION_LOG_URL": "sqlite://"})
    default, topics = settings.monitor_settings(), settings.monitor_settings("topics")
    assert (default.serving_model, default.state_dir) == ("text_classifier", tmp_path / "monitoring")
    assert (topics.serving_model, topics.state_dir) == ("topics", tmp_path / "monitoring" / "topics")
    assert model_params(ServedModel("topics", "topic-clf")) == {"registered_model": "topic-clf",
                                                                "triton_model": "topics"}


@pytest.mark.parametrize("name", ["registered_model", "triton_model"])
def test_the_model_params_are_optimize_model_params(name):
    from tasks.pipeline import PARAM_PATHS

    assert name in PARAM_PATHS
