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
