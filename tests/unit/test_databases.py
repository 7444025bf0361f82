"""The production configuration's settings: database names per stack, the URLs each component gets, what is
refused (a broker without a database, URLs of the wrong kind), and `opsctl purge` refusing while the stack runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from opsctl import cli, databases
from opsctl.process import ProcessManager, ServiceError, ServiceSpec
from opsctl.services import (LocalStack, airflow_environment, base_environment, celery_worker_names,
                             celery_worker_specs, gateway_spec)
from opsctl.settings import SettingsError, StackSettings

SERVER = "postgresql://postgres:s3cret@db.example:5433/postgres"
BROKER = "redis://127.0.0.1:6379/4"


def _production(home: Path) -> StackSettings:
    return StackSettings.from_env({"PIPELINE_HOME": str(home), "PIPELINE_DATABASE_URL": SERVER,
                                   "PIPELINE_CELERY_BROKER_URL": BROKER})


def test_stack_names_are_safe_short_and_differ_per_home(tmp_path):
    first, second = tmp_path / "My Stack!", tmp_path / "other" / "My Stack!"
    name = databases.stack_name(first)
    assert name.startswith("my_stack_") and len(name) == len("my_stack_") + 8
    assert set(name) <= set("abcdefghijklmnopqrstuvwxyz0123456789_")
    assert name == databases.stack_name(first) != databases.stack_name(second)
    long_name = databases.stack_name(tmp_path / ("x" * 200))
    assert all(len(db) <= 63 for db in databases.database_names(long_name).values())
    assert databases.stack_name(tmp_path / "---").startswith("stack_")


def test_database_names_per_role_and_urls_keep_server_and_password():
    names = databases.database_names("demo_0123abcd")
    assert names == {role: f"pipeline_demo_0123abcd_{role}" for role in ("airflow", "mlflow", "mlflow_auth",
                                                                          "predictions")}
    assert databases.database_url(SERVER, names["mlflow"]) == \
        "postgresql+psycopg2://postgres:s3cret@db.example:5433/pipeline_demo_0123abcd_mlflow"


@pytest.mark.parametrize(("variable", "value", "expected"), [
    ("PIPELINE_DATABASE_URL", "sqlite:///x.db", "is not a PostgreSQL URL"),
    ("PIPELINE_DATABASE_URL", "not a url", "is not a database URL"),
    ("PIPELINE_CELERY_BROKER_URL", "amqp://guest:pw@rabbit//", "is not a Redis URL"),
])
def test_urls_of_the_wrong_kind_are_refused_with_the_expected_form(variable, value, expected):
    env = {"PIPELINE_DATABASE_URL": SERVER, variable: value}
    with pytest.raises(SettingsError, match=expected) as raised:
        StackSettings.from_env(env)
    assert "pw@" not in str(raised.value)  # a password is never echoed


def test_a_broker_without_a_database_is_refused_saying_what_to_set():
    with pytest.raises(SettingsError, match="PIPELINE_CELERY_BROKER_URL needs PIPELINE_DATABASE_URL"):
        StackSettings.from_env({"PIPELINE_CELERY_BROKER_URL": BROKER})


def test_cli_reports_a_broker_without_a_database_without_a_traceback(monkeypatch, capsys):
    monkeypatch.setenv("PIPELINE_CELERY_BROKER_URL", BROKER)
    monkeypatch.delenv("PIPELINE_DATABASE_URL", raising=False)
    assert cli.main(["status"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: PIPELINE_CELERY_BROKER_URL needs PIPELINE_DATABASE_URL") and "Traceback" not in err


def test_without_the_urls_everything_stays_sqlite_and_local(tmp_path):
    settings = StackSettings.from_env({"PIPELINE_HOME": str(tmp_path)})
    assert settings.database_names == {}
    assert settings.airflow_database_url == f"sqlite:///{tmp_path / 'airflow' / 'airflow.db'}"
    assert settings.mlflow_backend_store_url == f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    assert settings.mlflow_auth_database_url == f"sqlite:///{tmp_path / 'mlflow' / 'basic_auth.db'}"
    assert settings.prediction_log_url == f"sqlite:///{tmp_path / 'predictions.db'}"
    assert settings.gateway_journal_dir == tmp_path / "predictions.db.journal"
    env = base_environment(settings, {})
    assert airflow_environment(settings, env)["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
    assert not any(name.startswith("AIRFLOW__CELERY") for name in airflow_environment(settings, env))
    assert celery_worker_names(settings) == [] and "airflow-celery-worker-1" not in LocalStack(settings).service_names


def test_production_urls_reach_every_component(tmp_path):
    settings = _production(tmp_path)
    names = settings.database_names
    env = base_environment(settings, {})
    assert env["PIPELINE_PREDICTION_LOG_URL"] == databases.database_url(SERVER, names["predictions"])
    airflow = airflow_environment(settings, env)
    assert airflow["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == databases.database_url(SERVER, names["airflow"])
    assert airflow["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert airflow["AIRFLOW__CELERY__BROKER_URL"] == BROKER
    assert airflow["AIRFLOW__CELERY__RESULT_BACKEND"] == "db+" + airflow["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert airflow["AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__GLOBAL_KEYPREFIX"] == f"pipeline_{settings.stack_name}:"
    assert settings.mlflow_backend_store_url.endswith(f"/{names['mlflow']}")
    assert settings.mlflow_auth_database_url.endswith(f"/{names['mlflow_auth']}")
    gateway = gateway_spec(settings, env).env
    assert gateway["GATEWAY_PREDICTION_LOG_URL"] == env["PIPELINE_PREDICTION_LOG_URL"]
    assert gateway["GATEWAY_JOURNAL_DIR"] == str(tmp_path / "prediction-journal")


def test_two_celery_workers_each_with_its_own_hostname(tmp_path):
    settings = _production(tmp_path)
    stack = LocalStack(settings)
    specs = celery_worker_specs(settings, {"X": "1"}, stack.manager.log_file)
    hostnames = [spec.argv[spec.argv.index("--celery-hostname") + 1] for spec in specs]
    assert hostnames == celery_worker_names(settings) and len(set(hostnames)) == 2
    assert all(host.endswith(f"@{settings.stack_name}") for host in hostnames)
    for spec, hostname in zip(specs, hostnames):
        assert spec.argv[1:3] == ["celery", "worker"] and spec.argv[spec.argv.index("--concurrency") + 1] == "1"
        assert spec.env["PIPELINE_CELERY_WORKER_HOSTNAME"] == hostname and spec.env["X"] == "1"
    assert stack.service_names[-2:] == ["airflow-celery-worker-1", "airflow-celery-worker-2"]


def test_worker_hostname_is_the_environments_or_the_machines(monkeypatch):
    import socket

    from opsctl.worker_hostname import worker_hostname

    monkeypatch.setenv("PIPELINE_CELERY_WORKER_HOSTNAME", "worker-2@demo_0123abcd")
    assert worker_hostname() == "worker-2@demo_0123abcd"
    monkeypatch.delenv("PIPELINE_CELERY_WORKER_HOSTNAME")
    assert worker_hostname() == socket.getfqdn()


def test_purge_refuses_while_a_service_of_the_stack_runs(tmp_path):
    settings = _production(tmp_path)
    stack = LocalStack(settings)
    manager = ProcessManager(settings.pids_dir, settings.logs_dir)
    manager.start(ServiceSpec(name="gateway", argv=[sys.executable, "-c", "import time; time.sleep(60)"], env={}))
    try:
        with pytest.raises(ServiceError, match=r"still runs \(gateway\).*opsctl down"):
            stack.purge(progress=lambda _: None)
    finally:
        manager.stop("gateway")


def test_purge_on_sqlite_drops_nothing_and_says_so(tmp_path):
    said: list[str] = []
    assert LocalStack(StackSettings(home=tmp_path)).purge(progress=said.append) == []
    assert said and said[0].startswith("nothing to drop: the stack runs on SQLite")


def test_docker_compose_names_the_settings_the_local_production_configuration_sets(tmp_path):
    """One production configuration: docker-compose's Airflow and gateway get the variables the local stack sets
    with PIPELINE_DATABASE_URL and PIPELINE_CELERY_BROKER_URL, with the same driver and the same result backend."""
    import yaml

    compose = yaml.safe_load((Path(__file__).resolve().parents[2] / "docker-compose.yml").read_text())
    settings = _production(tmp_path)
    local = airflow_environment(settings, base_environment(settings, {}))
    airflow = compose["x-airflow"]["environment"]
    for name in ("AIRFLOW__CORE__EXECUTOR", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CELERY__BROKER_URL",
                 "AIRFLOW__CELERY__RESULT_BACKEND", "PIPELINE_PREDICTION_LOG_URL"):
        assert name in airflow and name in local, name
    assert airflow["AIRFLOW__CORE__EXECUTOR"] == local["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert airflow["AIRFLOW__CELERY__RESULT_BACKEND"] == "db+" + airflow["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    gateway = compose["services"]["gateway"]["environment"]
    for url in (airflow["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"], airflow["PIPELINE_PREDICTION_LOG_URL"],
                gateway["GATEWAY_PREDICTION_LOG_URL"]):
        assert url.startswith(f"{databases.POSTGRES_DRIVER}://"), url
    assert "GATEWAY_JOURNAL_DIR" in gateway and airflow["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://")


def test_down_without_the_broker_set_still_stops_the_workers_a_celery_start_left(tmp_path):
    settings = _production(tmp_path)
    manager = ProcessManager(settings.pids_dir, settings.logs_dir)
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    manager.start(ServiceSpec(name="airflow-celery-worker-2", argv=sleeper, env={}))
    sqlite_stack = LocalStack(StackSettings(home=tmp_path))  # the same home, started again without the URLs
    try:
        with pytest.raises(ServiceError, match=r"still runs \(airflow-celery-worker-2\)"):
            sqlite_stack.purge(progress=lambda _: None)
        stopped: list[str] = []
        sqlite_stack.down(progress=stopped.append)
        assert stopped == ["airflow-celery-worker-2: stopped"]
        assert not manager.state("airflow-celery-worker-2").running
    finally:
        manager.stop("airflow-celery-worker-2")
