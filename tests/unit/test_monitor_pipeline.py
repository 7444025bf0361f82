"""The monitor task body: the window's key and folder come from its end, the retrain params from
the param or else the settings."""

from datetime import datetime, timezone

import pytest

from monitoring import pipeline
from monitoring.errors import MonitoringConfigError
from monitoring.monitor import MonitorSettings

KNOWN = ("data_source", "max_train", "trigger_reason", "trigger_kind", "trigger_evidence")
RESERVED = ("trigger_reason", "trigger_kind", "trigger_evidence")


@pytest.fixture()
def calls(monkeypatch) -> list[dict]:
    seen = []

    def run_window(settings, config, window_end, optimization_active, out_dir, log_to_mlflow=True):
        seen.append({"window_end": window_end, "out_dir": out_dir, "persist": config.policy.persist_windows})
        return {"trigger_conf": {"trigger_reason": "r", "trigger_evidence": "{}"}}

    monkeypatch.setattr(pipeline, "run_window", run_window)
    return seen


def _settings(tmp_path, retrain_conf: str = "") -> MonitorSettings:
    return MonitorSettings("sqlite://", tmp_path / "models", "model", "unused", tmp_path / "state",
                           retrain_conf=retrain_conf)


def test_the_window_end_names_its_folder_and_the_settings_give_the_default_retrain_params(tmp_path, calls):
    end = datetime(2026, 3, 1, 12, 15, 0, 400_000, tzinfo=timezone.utc)
    result = pipeline.check_window(_settings(tmp_path, '{"data_source": "/data/labelled"}'), {"persist_windows": 3},
                                   end, False, known_params=KNOWN, reserved=RESERVED)
    assert result["trigger_conf"] == {"data_source": "/data/labelled", "trigger_reason": "r", "trigger_evidence": "{}"}
    (call,) = calls
    assert call["window_end"] == end.replace(microsecond=0).timestamp() and call["persist"] == 3
    assert call["out_dir"] == tmp_path / "state" / "windows" / "20260301T121500Z"
    overridden = pipeline.check_window(_settings(tmp_path, '{"data_source": "/a"}'),
                                       {"retrain_conf": '{"max_train": 5}'}, end, False, KNOWN, RESERVED)
    assert "data_source" not in overridden["trigger_conf"] and overridden["trigger_conf"]["max_train"] == 5


def test_a_bad_retrain_setting_fails_before_the_window_is_judged(tmp_path, calls):
    with pytest.raises(MonitoringConfigError, match="unknown optimize_model params"):
        pipeline.check_window(_settings(tmp_path, '{"data_sorce": "/a"}'), {}, datetime.now(timezone.utc), False,
                              KNOWN, RESERVED)
    assert calls == []


def test_monitoring_does_not_import_the_pipeline():
    """Layers: dags/opsctl/bench > tasks > monitoring > serving; the DAG passes in what it needs of tasks."""
    import ast
    from pathlib import Path

    package = Path(pipeline.__file__).parent
    imports = []
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imports.append((path.name, node.module))
            elif isinstance(node, ast.Import):
                imports += [(path.name, alias.name) for alias in node.names]
    assert imports and not [(name, module) for name, module in imports if module.split(".")[0] == "tasks"]


def test_the_feedback_params_reach_the_policy():
    config = pipeline.config_from_params({"min_feedback": 200, "max_accuracy_drop": 0.1})
    assert (config.policy.min_feedback, config.policy.max_accuracy_drop) == (200, 0.1)
    defaults = pipeline.config_from_params({}).policy
    assert (defaults.min_feedback, defaults.max_accuracy_drop) == (50, 0.05)
    with pytest.raises(ValueError, match="min_feedback"):
        pipeline.config_from_params({"min_feedback": 0})
