"""Label feedback in a monitoring window (``run_window`` on a real SQLite prediction log): the live
accuracy and macro-F1 of the champion's predictions whose labels arrived in the window go into the
evidence and MLflow, and an accuracy drop that persists triggers optimize_model for ``accuracy``."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from monitoring import monitor
from monitoring.drift import DriftConfig
from monitoring.features import REFERENCE_FILE
from monitoring.monitor import MonitorConfig, MonitorSettings, run_window
from monitoring.policy import PolicyConfig
from serving import prediction_log as plog

CONFIG = MonitorConfig(drift=DriftConfig(min_rows=100),
                       policy=PolicyConfig(persist_windows=2, cooldown_minutes=60, min_feedback=50))
VERSION = "3"
LABELS = ("neg", "pos")


def _settings(tmp_path, with_accuracy: bool = True) -> MonitorSettings:
    """The champion's reference: 400 test texts, 90% right (``label``/``prediction`` as evaluate writes them)."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(80, 120, 400).astype(float)
    predicted = rng.integers(0, 2, 400)
    reference = pd.DataFrame({"confidence": rng.uniform(0.8, 1.0, 400), "predicted": [LABELS[i] for i in predicted],
                              "text_chars": tokens * 5, "token_count": tokens, "unknown_share": 0.0})
    if with_accuracy:
        reference["prediction"] = predicted
        reference["label"] = np.where(np.arange(400) < 360, predicted, 1 - predicted)
    folder = tmp_path / "models" / "model" / VERSION
    folder.mkdir(parents=True)
    reference.to_parquet(folder / REFERENCE_FILE)
    return MonitorSettings(f"sqlite:///{tmp_path / 'predictions.db'}", tmp_path / "models", "model",
                           f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "state", gateway_url="http://gateway")


def _serve_and_label(settings: MonitorSettings, window_end: float, right: int, wrong: int, version: str = VERSION,
                     served_end: float | None = None) -> None:
    """150 predictions like the reference's in the window (or the one ending at ``served_end``), and
    true labels arriving in the window for the first ``right + wrong`` of them (``right`` agree with
    the served label)."""
    served_end = window_end if served_end is None else served_end
    rng = np.random.default_rng(abs(int(served_end)))
    ids = [f"{int(served_end)}-{version}-{i}" for i in range(150)]
    rows = [plog.Prediction(served_at=served_end - 890 + i, model="model", model_version=version,
                            text_chars=int(count) * 5, token_count=int(count), unknown_tokens=0,
                            label=LABELS[i % 2], probabilities=(1 - p, p) if i % 2 else (p, 1 - p), latency_ms=5.0,
                            prediction_id=ids[i]).row()
            for i, (count, p) in enumerate(zip(rng.integers(80, 120, 150), rng.uniform(0.8, 1.0, 150)))]
    engine = plog.create_engine(settings.prediction_log_url)
    with engine.begin() as connection:
        connection.execute(plog.PREDICTIONS.insert(), rows)
    feedback = [(ids[i], LABELS[i % 2] if i < right else LABELS[1 - i % 2]) for i in range(right + wrong)]
    assert plog.record_feedback(engine, feedback, received_at=window_end - 60) == (right + wrong, [])


def _window(settings: MonitorSettings, monkeypatch, end: float, log_to_mlflow: bool = False) -> dict:
    monkeypatch.setattr(monitor, "gateway_counts", lambda url, model=None: {"http://gateway/metrics": {"200": end}})
    monkeypatch.setattr(monitor, "triton_counts", lambda url, model: None)
    return run_window(settings, CONFIG, end, False, settings.state_dir / "windows" / str(int(end)),
                      log_to_mlflow=log_to_mlflow)


def test_a_persistent_significant_accuracy_drop_triggers_for_accuracy(tmp_path, monkeypatch):
    settings = _settings(tmp_path)
    results = []
    for end in (10_000.0, 10_900.0):
        _serve_and_label(settings, end, right=70, wrong=50)  # 58% vs 90% on the test split
        results.append(_window(settings, monkeypatch, end))
    first, second = results
    evidence = first["verdict"]["evidence"]
    assert evidence["labelled"] == 120 and evidence["reference_accuracy"] == pytest.approx(0.9)
    assert evidence["live_accuracy"] == pytest.approx(70 / 120)
    assert evidence["live_accuracy_low"] < 70 / 120 < evidence["live_accuracy_high"] < 0.85
    assert evidence["live_macro_f1_low"] <= evidence["live_macro_f1"] <= evidence["live_macro_f1_high"]
    assert first["verdict"]["status"] == "accuracy" and "accuracy" in first["verdict"]["kinds"]
    assert second["decision"]["trigger"] and second["decision"]["kind"] == "accuracy"
    conf = second["trigger_conf"]
    assert conf["trigger_kind"] == "accuracy" and "live accuracy 58.3%" in conf["trigger_reason"]
    trigger_evidence = json.loads(conf["trigger_evidence"])
    assert trigger_evidence["live_accuracy"] == pytest.approx(70 / 120) and trigger_evidence["labelled"] == 120
    assert trigger_evidence["reference_accuracy"] == pytest.approx(0.9)


def test_feedback_the_size_of_the_noise_or_on_another_version_does_not_breach(tmp_path, monkeypatch):
    settings = _settings(tmp_path)
    _serve_and_label(settings, 10_000.0, right=52, wrong=8)  # 87% on 60 labels vs 90%: noise
    # labels arriving now for what the previous champion served a day ago
    _serve_and_label(settings, 10_000.0, right=0, wrong=100, version="2", served_end=10_000.0 - 86_400)
    result = _window(settings, monkeypatch, 10_000.0)
    evidence = result["verdict"]["evidence"]
    assert evidence["labelled"] == 60 and evidence["live_accuracy"] == pytest.approx(52 / 60)
    assert "accuracy" not in result["verdict"]["kinds"]


def test_without_feedback_or_a_reference_accuracy_nothing_is_judged_on_accuracy(tmp_path, monkeypatch):
    settings = _settings(tmp_path, with_accuracy=False)  # a reference written before it carried the evaluation
    _serve_and_label(settings, 10_000.0, right=0, wrong=100)
    evidence = _window(settings, monkeypatch, 10_000.0)["verdict"]["evidence"]
    assert evidence["labelled"] == 100 and evidence["reference_accuracy"] is None and evidence["live_accuracy"] == 0.0
    later = _window(settings, monkeypatch, 20_000.0)["verdict"]["evidence"]  # no labels arrived in this window
    assert later["labelled"] == 0 and "live_accuracy" not in later


def test_the_live_quality_is_logged_to_mlflow(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)  # the artifacts of a database-backed MLflow go to ./mlruns
    settings = _settings(tmp_path)
    _serve_and_label(settings, 10_000.0, right=90, wrong=10)
    run_id = _window(settings, monkeypatch, 10_000.0, log_to_mlflow=True)["mlflow_run_id"]
    metrics = mlflow.MlflowClient(settings.mlflow_tracking_uri).get_run(run_id).data.metrics
    assert metrics["labelled"] == 100 and metrics["live_accuracy"] == pytest.approx(0.9)
    assert {"live_accuracy_low", "live_accuracy_high", "live_macro_f1", "live_macro_f1_low",
            "live_macro_f1_high"} <= set(metrics)
