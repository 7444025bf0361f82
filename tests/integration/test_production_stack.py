"""The local stack in the production configuration: Airflow 3 on PostgreSQL with the CeleryExecutor (two
workers on a Redis broker), MLflow and the prediction log on PostgreSQL. optimize_model runs through the
scheduler on a tiny model; its tasks spread over both workers; Airflow's, MLflow's and the gateway's rows
are in the stack's own PostgreSQL databases; `opsctl purge` drops them after `down`.

PostgreSQL and Redis come from tests/production_servers.py (the local servers, or ones it starts); without
them this test skips, saying why. Slow tier: several minutes."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from opsctl import databases
from opsctl.airflow_api import AirflowApi
from opsctl.process import ServiceError
from opsctl.services import LocalStack, celery_worker_names
from opsctl.settings import StackSettings
from tests.production_servers import postgres_url, redis_url  # noqa: F401 - session fixtures
from tests.stack_env import opsctl as _opsctl
from tests.stack_env import stack_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RUN_ID = "production_stack_run"


def _env(home: Path, database: str, broker: str) -> dict[str, str]:
    return stack_env(home, {"PIPELINE_DATABASE_URL": database, "PIPELINE_CELERY_BROKER_URL": broker})



def _scalar(url: str, query: str, **params) -> int:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            return connection.execute(sa.text(query), params).scalar_one()
    finally:
        engine.dispose()


def _wait_run(api: AirflowApi, run_id: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = api.run_state("optimize_model", run_id)
        if state in ("success", "failed"):
            return state
        time.sleep(3)
    return "timeout"


def _classify(settings: StackSettings, timeout_s: float = 90.0) -> dict:
    """One request through the gateway once Triton serves the champion (the reconcile loop may still load it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        response = httpx.post(f"{settings.gateway_url}/v1/classify", json={"texts": ["a wonderful film"]}, timeout=30)
        if response.status_code == 200 or time.monotonic() > deadline:
            assert response.status_code == 200, response.text
            return response.json()
        time.sleep(3)


def _wait_logged(url: str, prediction_id: str, timeout_s: float = 60.0) -> int:
    deadline = time.monotonic() + timeout_s
    count = 0
    while time.monotonic() < deadline:
        count = _scalar(url, "SELECT count(*) FROM predictions WHERE prediction_id = :id", id=prediction_id)
        if count:
            break
        time.sleep(1)
    return count


def _run_optimize_model(stack: LocalStack, tiny_model: Path, labelled_csv: Path) -> list[dict]:
    """optimize_model through the scheduler and the Celery workers; its task instances once it succeeded."""
    settings = stack.settings
    api = AirflowApi(settings.airflow_url, "admin", stack.airflow_admin_password())
    api.wait_for_dag("optimize_model")
    api.unpause("optimize_model")
    conf = {"data_source": str(labelled_csv), "teacher": str(tiny_model), "epochs": 3.0,
            "learning_rate": 5e-3, "max_length": 32, "distill": False, "prune": False, "quantize": False}
    run_id = api.trigger("optimize_model", conf, run_id=RUN_ID)
    state = _wait_run(api, run_id, timeout_s=900)
    assert state == "success", (f"{api.task_states('optimize_model', run_id)}\n"
                                + stack.manager.log_tail("airflow-scheduler", 40)
                                + "".join(stack.manager.log_tail(f"airflow-celery-worker-{n}", 40) for n in (1, 2)))
    return api.task_instances("optimize_model", run_id)


def test_production_configuration_end_to_end(tmp_path, tiny_model, labelled_csv, monkeypatch, postgres_url,
                                             redis_url):
    env = _env(tmp_path / "stack", postgres_url, redis_url)
    stack = LocalStack(StackSettings.from_env(env))
    try:
        _up_run_and_check(stack, env, tiny_model, labelled_csv, monkeypatch, postgres_url)
        stack.down(progress=lambda _: None)
        _purge_and_check(stack.settings, env, postgres_url, redis_url)
    finally:  # a failed check leaves nothing behind either: no process, no database, no broker key
        stack.down(progress=lambda _: None)
        with contextlib.suppress(ServiceError):
            stack.purge(progress=lambda _: None)


def _up_run_and_check(stack: LocalStack, env: dict[str, str], tiny_model: Path, labelled_csv: Path, monkeypatch,
                      postgres_url: str) -> None:
    settings = stack.settings
    names = settings.database_names
    messages: list[str] = []
    stack.up(progress=messages.append)
    assert f"postgresql: created the databases {', '.join(names.values())}" in messages
    assert [name for name, state in stack.status().items() if not state["running"]] == []
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, stack.environment()[name])

    task_instances = _run_optimize_model(stack, tiny_model, labelled_csv)
    # Both workers ran tasks, and no other process did (the scheduler marks tasks it never runs, such as
    # empty ones, without a hostname).
    ran_on = {ti["hostname"] for ti in task_instances if ti["state"] == "success" and ti["hostname"]}
    assert ran_on == set(celery_worker_names(settings)), ran_on

    urls = {role: databases.database_url(postgres_url, name) for role, name in names.items()}
    assert _scalar(urls["airflow"], "SELECT count(*) FROM dag_run WHERE run_id = :id AND state = 'success'",
                   id=RUN_ID) == 1
    assert _scalar(urls["airflow"], "SELECT count(*) FROM celery_taskmeta WHERE status = 'SUCCESS'") > 0
    assert _scalar(urls["mlflow"], "SELECT count(*) FROM model_versions WHERE name = 'text-classifier'") >= 1
    assert _scalar(urls["mlflow_auth"], "SELECT count(*) FROM users WHERE username IN ('pipeline', 'reviewer')") == 2

    body = _classify(settings)
    prediction_id = body["predictions"][0]["prediction_id"]
    assert _wait_logged(urls["predictions"], prediction_id) == 1
    assert settings.gateway_journal_dir == settings.home / "prediction-journal"
    assert settings.gateway_journal_dir.is_dir()

    refused = _opsctl(env, "purge")
    assert refused.returncode == 1 and "stop it with `opsctl down`" in refused.stderr


def _purge_and_check(settings: StackSettings, env: dict[str, str], postgres_url: str, redis_url: str) -> None:
    import redis

    names = list(settings.database_names.values())
    purged = _opsctl(env, "purge")
    assert purged.returncode == 0, purged.stderr
    assert f"postgresql: dropped {', '.join(names)}" in purged.stdout
    assert f"under {settings.broker_key_prefix!r}" in purged.stdout
    assert databases.existing_databases(postgres_url, names) == []
    client = redis.Redis.from_url(redis_url)
    assert list(client.scan_iter(match=f"{settings.broker_key_prefix}*")) == []
    client.close()
