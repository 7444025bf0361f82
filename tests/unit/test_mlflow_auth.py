"""MLflow authentication in the local stack, without a server: the secrets file, the MLflow spec, the
Airflow connection the tasks read their account from, and what opsctl shows. The server itself:
tests/integration/test_mlflow_auth.py."""

from __future__ import annotations

import json
import stat

import pytest

from opsctl import cli, mlflow_auth
from opsctl.services import airflow_environment, base_environment, mlflow_secrets, mlflow_spec, \
    with_pipeline_credentials
from opsctl.settings import SettingsError, StackSettings, load_or_create_secrets
from tasks.settings import PipelineSettings


@pytest.fixture
def settings(tmp_path) -> StackSettings:
    return StackSettings.from_env({"PIPELINE_HOME": str(tmp_path / "stack")})


def test_secrets_are_owner_only_kept_and_completed(tmp_path):
    path = tmp_path / "secrets.json"
    first = load_or_create_secrets(path, ("a", "b"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(set(first.values())) == 2
    assert load_or_create_secrets(path, ("a", "b")) == first
    more = load_or_create_secrets(path, ("a", "b", "c"))  # a name added by a newer version of the stack
    assert {name: more[name] for name in ("a", "b")} == first and more["c"]
    assert json.loads(path.read_text()) == more and stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize(("value", "expected"), [(None, True), ("", True), ("false", False), ("0", False),
                                                 ("TRUE", True)])
def test_authentication_is_on_unless_switched_off(value, expected):
    env = {} if value is None else {"PIPELINE_MLFLOW_AUTH": value}
    assert StackSettings.from_env(env).mlflow_auth is expected


def test_a_bad_switch_is_named():
    with pytest.raises(SettingsError, match="PIPELINE_MLFLOW_AUTH='maybe'"):
        StackSettings.from_env({"PIPELINE_MLFLOW_AUTH": "maybe"})


def test_mlflow_runs_the_basic_auth_app_with_secrets_only_in_its_environment(settings):
    secrets = mlflow_secrets(settings)
    assert set(secrets) == set(mlflow_auth.SECRET_NAMES)
    assert stat.S_IMODE(settings.mlflow_credentials_file.stat().st_mode) == 0o600
    spec = mlflow_spec(settings, base_environment(settings, {}), secrets)
    assert spec.argv[-2:] == ["--app-name", "basic-auth"]
    assert spec.env["MLFLOW_AUTH_CONFIG_PATH"] == str(settings.mlflow_auth_config)
    assert spec.env["MLFLOW_AUTH_ADMIN_PASSWORD"] == secrets["admin"]
    assert spec.env["MLFLOW_FLASK_SERVER_SECRET_KEY"] == secrets["flask_secret_key"]
    config = settings.mlflow_auth_config.read_text()
    assert "default_permission = NO_PERMISSIONS" in config and settings.mlflow_auth_database_url in config
    on_display = " ".join(spec.argv) + config  # the command line is logged; the config is not secret
    assert not any(secret in on_display for secret in secrets.values())
    plain = mlflow_spec(settings, base_environment(settings, {}), None)
    assert "--app-name" not in plain.argv and "MLFLOW_AUTH_ADMIN_PASSWORD" not in plain.env


def test_services_get_the_pipeline_account_and_airflow_only_its_connection(settings, monkeypatch, tmp_path):
    secrets = mlflow_secrets(settings)
    env = with_pipeline_credentials(base_environment(settings, {}), secrets)
    assert (env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]) == ("pipeline", secrets["pipeline"])
    airflow_env = airflow_environment(settings, env, secrets)
    assert "MLFLOW_TRACKING_USERNAME" not in airflow_env and "MLFLOW_TRACKING_PASSWORD" not in airflow_env
    # A task reads the connection from the environment Airflow runs it in, and exports it for MLflow.
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow"))
    monkeypatch.setenv("AIRFLOW_CONN_MLFLOW_DEFAULT", airflow_env["AIRFLOW_CONN_MLFLOW_DEFAULT"])
    task_env = {name: value for name, value in airflow_env.items() if name.startswith("PIPELINE_")}
    task_settings = PipelineSettings.in_airflow_task(task_env)
    assert task_settings.mlflow_tracking_uri == settings.mlflow_url
    assert (task_env["MLFLOW_TRACKING_USERNAME"], task_env["MLFLOW_TRACKING_PASSWORD"]) == (
        "pipeline", secrets["pipeline"])


def test_without_the_connection_a_task_keeps_its_environment(settings, monkeypatch, tmp_path):
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow"))
    monkeypatch.delenv("AIRFLOW_CONN_MLFLOW_DEFAULT", raising=False)
    env = settings.pipeline_environment() | {"MLFLOW_TRACKING_USERNAME": "someone"}
    PipelineSettings.in_airflow_task(env)
    assert env["MLFLOW_TRACKING_USERNAME"] == "someone" and "MLFLOW_TRACKING_PASSWORD" not in env


def test_opsctl_says_where_the_reviewer_password_is_and_prints_it_only_when_asked(settings, monkeypatch, capsys):
    monkeypatch.setenv("PIPELINE_HOME", str(settings.home))
    assert cli.main(["mlflow-password"]) == 1
    assert "start the stack" in capsys.readouterr().err
    secrets = mlflow_secrets(settings)
    cli._print_urls(settings, "airflow-password")
    shown = capsys.readouterr().out
    assert str(settings.mlflow_credentials_file) in shown and "opsctl mlflow-password reviewer" in shown
    assert not any(secret in shown for secret in secrets.values())
    assert cli.main(["mlflow-password"]) == 0
    assert capsys.readouterr().out.strip() == secrets["reviewer"]


def test_opsctl_signs_in_as_the_pipeline_unless_the_user_chose_an_account(settings):
    secrets = mlflow_secrets(settings)
    path = settings.mlflow_credentials_file
    assert mlflow_auth.stack_client_environment(path, {}) == {
        "MLFLOW_TRACKING_USERNAME": "pipeline", "MLFLOW_TRACKING_PASSWORD": secrets["pipeline"]}
    assert mlflow_auth.stack_client_environment(path, {"MLFLOW_TRACKING_USERNAME": "reviewer"}) == {}
    assert mlflow_auth.stack_client_environment(settings.home / "absent.json", {}) == {}


def test_the_reviewer_may_move_aliases_of_the_served_models_only():
    grants = mlflow_auth.account_grants(["text-classifier", "topic-classifier"])
    assert {grant.permission for grant in grants["reviewer"] if grant.resource_id == "*"} == {"READ"}
    assert {grant.resource_id for grant in grants["reviewer"] if grant.permission == "EDIT"} == {
        "text-classifier", "topic-classifier"}
    assert all(grant.permission == "MANAGE" for grant in grants["pipeline"])


def test_the_compose_one_shot_names_the_passwords_it_lacks(monkeypatch, capsys):
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "PIPELINE_MLFLOW_PASSWORD", "PIPELINE_MLFLOW_REVIEWER_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PIPELINE_MLFLOW_PASSWORD", "pipeline-password")
    assert mlflow_auth.main(["--url", "http://127.0.0.1:9", "--registered-model", "m"]) == 2
    error = capsys.readouterr().err
    assert "MLFLOW_AUTH_ADMIN_PASSWORD, PIPELINE_MLFLOW_REVIEWER_PASSWORD" in error and "pipeline-password" not in error
