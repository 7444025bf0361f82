"""What a trigger hands optimize_model: ``trigger_reason``, ``trigger_kind`` (the breach kind that
persisted) and ``trigger_evidence`` (JSON), built by ``run_window`` from a real SQLite prediction log,
a champion reference like the one promotion writes, and the servers' counters."""

import json

import numpy as np
import pandas as pd
import pytest

from monitoring import monitor
from monitoring.drift import DriftConfig
from monitoring.features import REFERENCE_FILE
from monitoring.monitor import INVALID_OUTPUTS, MonitorConfig, MonitorSettings, MonitorState, run_window
from monitoring.policy import PolicyConfig
from serving import prediction_log as plog

CONFIG = MonitorConfig(drift=DriftConfig(min_rows=100), policy=PolicyConfig(persist_windows=2, cooldown_minutes=60))
VERSION = "3"
EVIDENCE_KEYS = {"kind", "windows", "slo_p95_ms", "latency_p95_ms", "token_count_p99", "invalid_outputs", "labelled",
                 "live_accuracy", "live_accuracy_low", "live_accuracy_high", "reference_accuracy",
                 "champion_version"}


@pytest.fixture()
def settings(tmp_path) -> MonitorSettings:
    """A prediction log and the champion's reference: long texts, confident, both labels."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(80, 120, 400).astype(float)
    reference = pd.DataFrame({"confidence": rng.uniform(0.8, 1.0, 400), "predicted": rng.choice(["neg", "pos"], 400),
                              "text_chars": tokens * 5, "token_count": tokens, "unknown_share": 0.0})
    folder = tmp_path / "models" / "model" / VERSION
    folder.mkdir(parents=True)
    reference.to_parquet(folder / REFERENCE_FILE)
    return MonitorSettings(f"sqlite:///{tmp_path / 'predictions.db'}", tmp_path / "models", "model", "unused",
                           tmp_path / "state", gateway_url="http://gateway")


def _serve(settings: MonitorSettings, window_end: float, latency_ms: float, short_texts: bool) -> None:
    """150 predictions in the 15 minutes before ``window_end``: short tweet-like texts when
    ``short_texts`` (they drift from the reference), else texts like the reference's."""
    rng = np.random.default_rng(int(window_end))
    tokens = rng.integers(3, 8, 150) if short_texts else rng.integers(80, 120, 150)
    rows = [plog.Prediction(served_at=window_end - 890 + i, model="model", model_version=VERSION,
                            text_chars=int(count) * 5, token_count=int(count), unknown_tokens=0,
                            label="pos" if i % 2 else "neg", probabilities=(0.1, 0.9) if i % 2 else (0.9, 0.1),
                            latency_ms=latency_ms).row() for i, count in enumerate(tokens)]
    with plog.create_engine(settings.prediction_log_url).begin() as connection:
        connection.execute(plog.PREDICTIONS.insert(), rows)


def _window(settings: MonitorSettings, monkeypatch, end: float, invalid_outputs: float = 0.0,
            config: MonitorConfig = CONFIG) -> dict:
    gateway = {"200": end, "502": 0.0, INVALID_OUTPUTS: invalid_outputs}  # ~no 5xx: errors only from invalid
    monkeypatch.setattr(monitor, "gateway_counts", lambda url, model=None: {"http://gateway/metrics": gateway})
    monkeypatch.setattr(monitor, "triton_counts", lambda url, model: None)
    return run_window(settings, config, end, False, settings.state_dir / "windows" / str(int(end)),
                      log_to_mlflow=False)


def test_latency_and_drift_in_both_windows_invalid_outputs_in_one_trigger_for_latency(settings, monkeypatch):
    _serve(settings, 10_000.0, latency_ms=150.0, short_texts=True)
    _serve(settings, 10_900.0, latency_ms=150.0, short_texts=True)
    first = _window(settings, monkeypatch, 10_000.0)
    assert first["verdict"]["kinds"] == ["latency", "drift"] and first["verdict"]["status"] == "slo_breach"
    assert not first["decision"]["trigger"] and first["trigger_conf"]["trigger_kind"] == ""
    second = _window(settings, monkeypatch, 10_900.0, invalid_outputs=3.0)
    assert second["verdict"]["kinds"] == ["errors", "latency", "drift"]
    assert "the model returned 3 non-finite outputs" in second["verdict"]["reasons"]
    assert second["decision"]["trigger"] and second["decision"]["kind"] == "latency"

    conf = second["trigger_conf"]
    assert set(conf) == {"trigger_reason", "trigger_kind", "trigger_evidence"}
    assert conf["trigger_kind"] == "latency" and conf["trigger_reason"] == second["decision"]["reason"]
    evidence = json.loads(conf["trigger_evidence"])
    assert set(evidence) == EVIDENCE_KEYS and evidence["kind"] == "latency"
    assert [window["window_end"] for window in evidence["windows"]] == [10_000.0, 10_900.0]
    assert evidence["slo_p95_ms"] == 100.0 and evidence["latency_p95_ms"] == pytest.approx(150.0)
    assert 3 <= evidence["token_count_p99"] <= 7 and evidence["invalid_outputs"] == 3
    assert evidence["champion_version"] == VERSION
    saved = MonitorState.load(settings.state_dir / "state.json").windows
    assert [record.verdict.kinds for record in saved] == [("latency", "drift"), ("errors", "latency", "drift")]


def test_invalid_outputs_in_every_window_trigger_for_errors_without_any_traffic_logged(settings, monkeypatch):
    # The gateway answered every request 502 (nothing logged); only its counter shows the model's fault.
    _window(settings, monkeypatch, 10_000.0, invalid_outputs=5.0)
    second = _window(settings, monkeypatch, 10_900.0, invalid_outputs=12.0)
    assert second["verdict"]["kinds"] == ["errors"] and second["verdict"]["evidence"]["invalid_outputs"] == 7
    assert second["decision"]["trigger"] and second["trigger_conf"]["trigger_kind"] == "errors"
    evidence = json.loads(second["trigger_conf"]["trigger_evidence"])
    assert evidence["invalid_outputs"] == 12 and evidence["token_count_p99"] is None
    assert evidence["latency_p95_ms"] == 0.0


def test_drift_alone_triggers_for_drift(settings, monkeypatch):
    for end in (10_000.0, 10_900.0):
        _serve(settings, end, latency_ms=5.0, short_texts=True)
        result = _window(settings, monkeypatch, end)
    assert result["verdict"]["status"] == "drift" and result["verdict"]["kinds"] == ["drift"]
    conf = result["trigger_conf"]
    assert conf["trigger_kind"] == "drift" and "output drift" in conf["trigger_reason"]


def test_drift_that_goes_on_triggers_again_only_after_the_cooldown(settings, monkeypatch):
    config = MonitorConfig(policy=PolicyConfig(persist_windows=1, cooldown_minutes=30))
    decisions = []
    for end in (10_000.0, 10_900.0, 11_800.0):  # drift in every window, 15 minutes apart
        _serve(settings, end, latency_ms=5.0, short_texts=True)
        decisions.append(_window(settings, monkeypatch, end, config=config)["decision"])
    assert [(decision["trigger"], decision["kind"]) for decision in decisions] == [
        (True, "drift"), (False, ""), (True, "drift")]
    assert "cooldown has 15 more minutes" in decisions[1]["reason"]
