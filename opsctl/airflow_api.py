"""A small client of Airflow 3's REST API (``/api/v2``) with simple-auth-manager login."""

from __future__ import annotations

import time
import urllib.parse
from typing import Any

import requests

from tasks.errors import PipelineError


class AirflowApiError(PipelineError):
    """Airflow's API refused a request or did not answer."""


class AirflowApi:
    def __init__(self, base_url: str, username: str, password: str, timeout_s: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self._session = requests.Session()
        response = self._session.post(f"{self.base_url}/auth/token", json={"username": username, "password": password},
                                      timeout=timeout_s)
        if response.status_code not in (200, 201):
            raise AirflowApiError(f"login to {self.base_url} as {username} failed: {response.status_code} {response.text[:200]}")
        self._session.headers["Authorization"] = f"Bearer {response.json()['access_token']}"

    def _call(self, method: str, path: str, **kwargs: Any) -> dict:
        response = self._session.request(method, f"{self.base_url}/api/v2{path}", timeout=self.timeout_s, **kwargs)
        if response.status_code >= 400:
            raise AirflowApiError(f"{method} {path}: {response.status_code} {response.text[:300]}")
        return response.json() if response.content else {}

    def wait_for_dag(self, dag_id: str, timeout_s: float = 180.0) -> dict:
        """Wait until the DAG processor has parsed ``dag_id``; fail with its import error if it has one."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                return self._call("GET", f"/dags/{dag_id}")
            except AirflowApiError:
                errors = self._call("GET", "/importErrors").get("import_errors", [])
                mine = [error for error in errors if dag_id in error.get("filename", "")]
                if mine:
                    raise AirflowApiError(f"{dag_id} failed to import:\n{mine[0].get('stack_trace', '')[-2000:]}") from None
                time.sleep(2)
        raise AirflowApiError(f"DAG {dag_id} was not parsed within {timeout_s:.0f}s: check the dag-processor log")

    def unpause(self, dag_id: str) -> None:
        self._call("PATCH", f"/dags/{dag_id}", json={"is_paused": False})

    def trigger(self, dag_id: str, conf: dict[str, Any], run_id: str | None = None) -> str:
        body: dict[str, Any] = {"logical_date": None, "conf": conf}
        if run_id:
            body["dag_run_id"] = run_id
        return self._call("POST", f"/dags/{dag_id}/dagRuns", json=body)["dag_run_id"]

    def run_state(self, dag_id: str, run_id: str) -> str:
        return self.run(dag_id, run_id)["state"]

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        return {item["task_id"]: item["state"] for item in self.task_instances(dag_id, run_id)}

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        """Every task instance of a run (task_id, state, start_date, end_date, duration, try_number...).

        The API pages its answer (50 by default): a run with more task instances is read page by page."""
        path, page, instances = f"/dags/{dag_id}/dagRuns/{_quote(run_id)}/taskInstances", 100, []
        while True:
            answer = self._call("GET", path, params={"limit": page, "offset": len(instances)})
            instances += answer["task_instances"]
            if not answer["task_instances"] or len(instances) >= answer.get("total_entries", 0):
                return instances

    def run(self, dag_id: str, run_id: str) -> dict:
        """One DAG run (state, start_date, end_date, conf...)."""
        return self._call("GET", f"/dags/{dag_id}/dagRuns/{_quote(run_id)}")

    def clear_failed(self, dag_id: str, run_id: str) -> list[str]:
        """Clear a run's failed (and upstream-failed) task instances, so the scheduler runs them again (the
        UI's "Clear" on a failed run); returns the cleared task ids."""
        body = {"dag_run_id": run_id, "only_failed": True, "reset_dag_runs": True, "dry_run": False}
        answer = self._call("POST", f"/dags/{dag_id}/clearTaskInstances", json=body)
        return [item["task_id"] for item in answer.get("task_instances", [])]

    def xcom(self, dag_id: str, run_id: str, task_id: str) -> Any:
        path = f"/dags/{dag_id}/dagRuns/{_quote(run_id)}/taskInstances/{task_id}/xcomEntries/return_value"
        return self._call("GET", path, params={"deserialize": "true"}).get("value")


def _quote(value: str) -> str:
    return urllib.parse.quote(value, safe="")
