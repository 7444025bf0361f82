from pathlib import Path

import pytest

from opsctl import cli
from opsctl.settings import SettingsError, StackSettings
from tasks.errors import ConfigError
from tasks.settings import PipelineSettings, safe_name


def test_defaults_bind_loopback_and_keep_state_in_one_folder(tmp_path):
    settings = StackSettings.from_env({"PIPELINE_HOME": str(tmp_path)})
    assert settings.host == "127.0.0.1"
    for path in (settings.mlflow_dir, settings.triton_model_repository, settings.airflow_home, settings.runs_dir):
        assert path.is_relative_to(tmp_path)
    env = settings.pipeline_environment()
    assert PipelineSettings.from_env(env).triton_url == "127.0.0.1:8000"


@pytest.mark.parametrize("value", ["abc", "0", "70000"])
def test_bad_port_is_rejected(value):
    with pytest.raises(SettingsError, match="PIPELINE_MLFLOW_PORT"):
        StackSettings.from_env({"PIPELINE_MLFLOW_PORT": value})


def test_cli_reports_bad_settings_without_a_traceback(monkeypatch, capsys):
    monkeypatch.setenv("PIPELINE_MLFLOW_PORT", "not-a-port")
    assert cli.main(["status"]) == 1
    assert "error: PIPELINE_MLFLOW_PORT" in capsys.readouterr().err


def test_cli_usage_error_exits_2():
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["no-such-command"])
    assert exit_info.value.code == 2


def test_pipeline_settings_name_what_is_missing():
    with pytest.raises(ConfigError, match="PIPELINE_RUNS_DIR"):
        PipelineSettings.from_env({})


def test_run_ids_become_safe_folder_names():
    assert safe_name("manual__2026-11-27T03:08:11+00:00") == "manual__2026-11-27T03_08_11_00_00"
    with pytest.raises(ConfigError):
        safe_name("///")


def test_a_worker_builds_one_settings_object_that_also_carries_the_monitors(tmp_path):
    env = StackSettings.from_env({"PIPELINE_HOME": str(tmp_path)}).pipeline_environment()
    monitor = PipelineSettings.from_env(env | {"PIPELINE_RETRAIN_CONF": '{"max_train": 300}'}).monitor_settings()
    assert monitor.state_dir == tmp_path / "monitoring"
    assert monitor.prediction_log_url == env["PIPELINE_PREDICTION_LOG_URL"]
    assert monitor.model_repository == Path(env["PIPELINE_TRITON_MODEL_REPOSITORY"])
    assert (monitor.gateway_url, monitor.triton_metrics_url) == (env["PIPELINE_GATEWAY_URL"],
                                                                 env["PIPELINE_TRITON_METRICS_URL"])
    assert monitor.serving_model == env["PIPELINE_SERVING_MODEL"] and monitor.retrain_conf == '{"max_train": 300}'
    # optimize_model's tasks run without the monitor's variables; the monitor names what it lacks.
    pipeline_only = {name: value for name, value in env.items()
                     if name not in ("PIPELINE_PREDICTION_LOG_URL", "PIPELINE_HOME")}
    settings = PipelineSettings.from_env(pipeline_only)
    with pytest.raises(ConfigError, match="PIPELINE_PREDICTION_LOG_URL', 'PIPELINE_HOME"):
        settings.monitor_settings()


def test_the_task_heartbeat_timeout_reaches_airflow(tmp_path):
    from opsctl.services import airflow_environment, base_environment

    for env, expected in (({}, "300"), ({"PIPELINE_AIRFLOW_TASK_HEARTBEAT_TIMEOUT_S": "20"}, "20")):
        settings = StackSettings.from_env({"PIPELINE_HOME": str(tmp_path)} | env)
        airflow = airflow_environment(settings, base_environment(settings, {}))
        assert airflow["AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT"] == expected
    with pytest.raises(SettingsError, match="PIPELINE_AIRFLOW_TASK_HEARTBEAT_TIMEOUT_S"):
        StackSettings.from_env({"PIPELINE_AIRFLOW_TASK_HEARTBEAT_TIMEOUT_S": "soon"})
