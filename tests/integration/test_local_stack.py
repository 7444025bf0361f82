"""The whole local stack as `make demo` uses it: real Airflow services running optimize_model on a
tiny model through the scheduler, then a restart that keeps history, registry and served model,
and a stop that leaves no process behind.

The scheduler's run has distill and quantize switched off (so prune and sparsify are off too): the
skipped tasks, their logged reasons and the two FP32 candidates that are still evaluated, registered,
gated and promoted are checked here. Every technique on, through ``dag.test()``, is
tests/dags/test_optimize_model_run.py."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from opsctl.airflow_api import AirflowApi
from opsctl.services import LocalStack
from opsctl.settings import StackSettings
from tests.stack_env import opsctl as _opsctl
from tests.stack_env import stack_env
from tests.switched_off_run import assert_switched_off_run

pytestmark = pytest.mark.integration


def _env(home: Path) -> dict[str, str]:
    return stack_env(home)



def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def _wait_run(api: AirflowApi, run_id: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = api.run_state("optimize_model", run_id)
        if state in ("success", "failed"):
            return state
        time.sleep(3)
    return "timeout"


def _task_log(settings, run_id: str, task_id: str) -> str:
    """What a task of optimize_model logged (every attempt), from the scheduler's log folder."""
    folder = settings.airflow_home / "logs" / "dag_id=optimize_model" / f"run_id={run_id}" / f"task_id={task_id}"
    return "\n".join(path.read_text(errors="replace") for path in sorted(folder.rglob("*.log")))


def _assert_switched_off_run(settings, tasks: dict, champion_version: str) -> None:
    """distill and quantize off (so prune off too), through the scheduler: the reasons are in the task logs."""
    from tasks import model_aliases

    summary = assert_switched_off_run(tasks, settings.runs_dir / "stack_test_run",
                                      lambda task_id: _task_log(settings, "stack_test_run", task_id))
    assert champion_version == summary["versions"]["onnx_fp32"]
    assert model_aliases.alias_version(settings.mlflow_url, "text-classifier", "champion") == champion_version


def test_scheduler_runs_optimize_model_and_restart_keeps_state(tmp_path, tiny_model, labelled_csv, monkeypatch):
    env = _env(tmp_path / "stack")
    stack = LocalStack(StackSettings.from_env(env))
    settings = stack.settings
    messages: list[str] = []
    try:
        stack.up(progress=messages.append)
        # MLflow runs with authentication: the Airflow tasks sign in through the connection mlflow_default
        # (their environment has no MLflow account), this test as the pipeline.
        assert settings.mlflow_auth and any("created the accounts pipeline, reviewer" in line for line in messages)
        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            monkeypatch.setenv(name, stack.environment()[name])
        assert all(state["running"] for state in stack.status().values())
        pids = {name: state["pid"] for name, state in stack.status().items()}
        again: list[str] = []
        stack.up(progress=again.append)  # second up is a no-op
        assert all("already running" in line for line in again if "healthy" not in line)
        assert {name: state["pid"] for name, state in stack.status().items()} == pids

        password = stack.airflow_admin_password()
        assert password
        api = AirflowApi(settings.airflow_url, "admin", password)
        api.wait_for_dag("optimize_model")
        api.unpause("optimize_model")
        conf = {"data_source": str(labelled_csv), "teacher": str(tiny_model), "epochs": 3.0,
                "learning_rate": 5e-3, "max_length": 32, "distill": False, "prune": False, "quantize": False}
        run_id = api.trigger("optimize_model", conf, run_id="stack_test_run")
        state = _wait_run(api, run_id, timeout_s=600)
        assert state == "success", f"{api.task_states('optimize_model', run_id)}\n" + \
            stack.manager.log_tail("airflow-scheduler", 60)
        tasks = api.task_states("optimize_model", run_id)
        assert tasks.get("promote") == "success", f"{tasks}\n" + "\n".join(
            _task_log(settings, run_id, task_id)[-3000:] for task_id in ("plan", "changed_since_champion", "gate", "promote"))
        promoted = api.xcom("optimize_model", run_id, "promote")
        assert promoted["status"] == "success"
        mlflow_version = promoted["info"]["mlflow_version"]
        _assert_switched_off_run(settings, tasks, mlflow_version)
    finally:
        stack.down(progress=messages.append)
    assert not any(_alive(pid) for pid in pids.values())

    restarted = LocalStack(settings)
    try:
        restarted.up(progress=lambda _: None)
        api = AirflowApi(settings.airflow_url, "admin", restarted.airflow_admin_password())
        assert api.run_state("optimize_model", "stack_test_run") == "success"
        from serving.triton_client import TritonClient
        from tasks import model_aliases

        assert model_aliases.alias_version(settings.mlflow_url, "text-classifier", "champion") == mlflow_version
        client = TritonClient(settings.triton_http_url)
        assert client.ready_versions("text_classifier") == [1]
        summary = json.loads((settings.runs_dir / "stack_test_run" / "summary.json").read_text())
        assert summary["promotion"]["status"] == "success"
        # The CLI a user reaches for next: what is the champion, and what does it answer?
        champion = _opsctl(env, "champion")
        assert champion.returncode == 0, champion.stderr
        assert f"champion: text-classifier version {mlflow_version} " in champion.stdout
        assert "Triton text_classifier: version 1 ready" in champion.stdout
        classified = _opsctl(env, "classify", "a wonderful film", "dull and far too long")
        assert classified.returncode == 0, classified.stderr
        assert classified.stdout.startswith("text_classifier version 1, ")
        assert len([line for line in classified.stdout.splitlines() if " p=" in line]) == 2
        refused = _opsctl(env, "classify", "x" * 20_000)
        assert refused.returncode == 1 and "the gateway answered 422" in refused.stderr and "longer than" in refused.stderr
    finally:
        restarted.down(progress=lambda _: None)
    assert all(not state["running"] for state in restarted.status().values())
