"""Faults of the Airflow side in the production configuration: Airflow 3 on PostgreSQL with the
CeleryExecutor and two workers on Redis (as tests/integration/test_production_stack.py), running
optimize_model through the scheduler on a tiny model. A Celery worker, then the scheduler, is killed
with SIGKILL (its process group, by its recorded pid) while a task of the run is running; the test
restarts the dead service with ``LocalStack.up`` (what `opsctl up` does), as the stack does not
supervise its processes. The stack's task heartbeat timeout is 20 s
(``PIPELINE_AIRFLOW_TASK_HEARTBEAT_TIMEOUT_S``; Airflow's default is 300 s).

PostgreSQL and Redis come from tests/production_servers.py; without them these tests skip, saying why.
Run by `make test-faults` (marker ``faults``)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from opsctl.airflow_api import AirflowApi
from opsctl.process import ServiceError
from opsctl.services import LocalStack, celery_worker_names
from opsctl.settings import StackSettings
from tests.faults.test_faults import kill_service
from tests.production_servers import postgres_url, redis_url  # noqa: F401 - session fixtures
from tests.stack_env import stack_env

pytestmark = [pytest.mark.faults, pytest.mark.integration]
DAG = "optimize_model"
HEARTBEAT_TIMEOUT_S = 20
# The run's longest task on the tiny model (the scheduler is killed while it runs), and the task that writes
# the registry (a worker is killed while it is half done).
KILLED_DURING = "finetune_teacher"
REGISTERING = "register"
RUN_TIMEOUT_S = 900


@dataclass
class AirflowStack:
    """The module's stack, a signed-in client of its Airflow API and the optimize_model conf of its runs."""

    stack: LocalStack
    api: AirflowApi
    conf: dict

    @property
    def settings(self) -> StackSettings:
        return self.stack.settings


@pytest.fixture(scope="module")
def airflow_stack(tmp_path_factory, postgres_url, redis_url, tiny_model, labelled_csv):  # noqa: F811
    home = tmp_path_factory.mktemp("airflow-faults")
    env = stack_env(home, {"PIPELINE_DATABASE_URL": postgres_url, "PIPELINE_CELERY_BROKER_URL": redis_url,
                           "PIPELINE_MLFLOW_AUTH": "false", "PIPELINE_AIRFLOW_TASK_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S)})
    stack = LocalStack(StackSettings.from_env(env))
    try:
        stack.up(progress=lambda _: None)
        api = AirflowApi(stack.settings.airflow_url, "admin", stack.airflow_admin_password())
        api.wait_for_dag(DAG)
        api.unpause(DAG)
        conf = {"data_source": str(labelled_csv), "teacher": str(tiny_model), "epochs": 3.0,
                "learning_rate": 5e-3, "max_length": 32, "distill": False, "prune": False, "quantize": False}
        yield AirflowStack(stack, api, conf)
    finally:
        stack.down(progress=lambda _: None)
        with contextlib.suppress(ServiceError):
            stack.purge(progress=lambda _: None)


def restart(stack: LocalStack) -> float:
    """`opsctl up`: start what is not running; the seconds until every service is healthy again."""
    started = time.monotonic()
    stack.up(progress=lambda _: None)
    return time.monotonic() - started


def wait_running(api: AirflowApi, run_id: str, task_id: str, timeout_s: float = 600) -> dict:
    """The task instance once it runs on a worker (its hostname recorded)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for ti in api.task_instances(DAG, run_id):
            if ti["task_id"] == task_id and ti["state"] == "running" and ti["hostname"]:
                return ti
        assert api.run_state(DAG, run_id) in ("queued", "running"), api.task_states(DAG, run_id)
        time.sleep(1)
    raise AssertionError(f"{task_id} did not run within {timeout_s} s: {api.task_states(DAG, run_id)}")


def wait_half_registered(settings: StackSettings, api: AirflowApi, run_id: str, timeout_s: float = 600) -> dict:
    """The register task instance once it runs and has created the run's parent MLflow run (its versions are
    being created: the registry is half written)."""
    victim = wait_running(api, run_id, REGISTERING, timeout_s)
    deadline = time.monotonic() + 120
    while parent_runs(settings, run_id) == 0:
        assert time.monotonic() < deadline, "register created no MLflow run within 120 s"
        time.sleep(0.2)
    return victim


def wait_task_leaves(api: AirflowApi, run_id: str, task_id: str, state: str, timeout_s: float) -> tuple[str, float]:
    """(the task's next state, seconds until it left ``state``)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        now = api.task_states(DAG, run_id)[task_id]
        if now != state:
            return now, time.monotonic() - started
        time.sleep(1)
    return state, time.monotonic() - started


def wait_run(api: AirflowApi, run_id: str, timeout_s: float = RUN_TIMEOUT_S) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = api.run_state(DAG, run_id)
        if state in ("success", "failed"):
            return state
        time.sleep(3)
    return "timeout"


def finish_or_retry(api: AirflowApi, run_id: str) -> dict:
    """Wait for the run; when it failed, note the failed tasks, clear them (the UI's "Clear") and wait again."""
    outcome = {"first_outcome": wait_run(api, run_id)}
    if outcome["first_outcome"] == "failed":
        outcome["failed_tasks"] = sorted(t for t, s in api.task_states(DAG, run_id).items() if s == "failed")
        outcome["cleared"] = api.clear_failed(DAG, run_id)
        outcome["after_clear"] = wait_run(api, run_id)
    outcome["final"] = outcome.get("after_clear", outcome["first_outcome"])
    return outcome


def worker_service(settings: StackSettings, hostname: str) -> str:
    """The stack's service name of the Celery worker that records ``hostname`` on its task instances."""
    number = celery_worker_names(settings).index(hostname) + 1
    return f"airflow-celery-worker-{number}"


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (a worker's pool processes, their task supervisors and the task
    processes these start in process groups of their own). Found by parent pid, as Celery and Airflow
    overwrite their processes' titles and with them what /proc shows of their environments."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return sorted(found)


def process_groups(pids: list[int]) -> int:
    """How many process groups ``pids`` belong to."""
    groups = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            groups.add(os.getpgid(pid))
    return len(groups)


def alive(pids: list[int]) -> list[int]:
    living = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            living.append(pid)
    return living


def parent_runs(settings: StackSettings, run_id: str) -> int:
    """How many parent MLflow runs the pipeline run has (the register task creates one)."""
    from tasks import model_aliases
    from tasks.registry import ROLE_TAG, RUN_TAG

    client = model_aliases.mlflow_client(settings.mlflow_url)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return len(client.search_runs(experiments, filter_string=f"tags.{RUN_TAG} = '{run_id}' and tags.{ROLE_TAG} = 'parent'"))


def registry_of_run(settings: StackSettings, run_id: str) -> dict:
    """What the run left in MLflow: its parent runs, its model versions per candidate (and any version of its
    MLflow runs left untagged), the champion alias."""
    from tasks import model_aliases
    from tasks.config import REGISTERED_MODEL
    from tasks.registry import CANDIDATE_TAG, RUN_TAG

    client = model_aliases.mlflow_client(settings.mlflow_url)
    every = client.search_model_versions(f"name='{REGISTERED_MODEL}'")
    versions = [v for v in every if v.tags.get(RUN_TAG) == run_id]
    untagged = [v for v in every if RUN_TAG not in v.tags]
    candidates = Counter(v.tags.get(CANDIDATE_TAG) for v in versions)
    return {"parent_runs": parent_runs(settings, run_id), "versions": sorted(int(v.version) for v in versions),
            "untagged_versions": sorted(int(v.version) for v in untagged),
            "versions_per_candidate": dict(candidates),
            "champion": model_aliases.alias_version(settings.mlflow_url, REGISTERED_MODEL, "champion")}


def check_consistent(api: AirflowApi, run_id: str, registry: dict) -> None:
    """No task instance left running or queued; one parent run and one version per candidate; a run that
    promoted moved the champion alias to one of its own versions."""
    states = api.task_states(DAG, run_id)
    assert not [t for t, s in states.items() if s in ("running", "queued", "scheduled", "up_for_retry")], states
    assert registry["parent_runs"] == 1 and not registry["untagged_versions"], registry
    assert registry["versions"] and all(n == 1 for n in registry["versions_per_candidate"].values()), registry
    if states.get("promote") == "success":
        assert registry["champion"] is not None and int(registry["champion"]) in registry["versions"], registry


def test_kill_a_celery_worker_during_optimize_model(airflow_stack, observe):
    """A Celery worker killed (SIGKILL, its process group) while it runs optimize_model's register task,
    once that task has created the run's MLflow run (the registry half written). Promise: the
    scheduler sees the task's heartbeat stop and fails that try within the heartbeat timeout plus its
    detection interval (20 s + 10 s here); the task's retry (retries=1) runs on a live worker (either
    one, once `opsctl up` restarted the dead worker) and the run succeeds, or it fails naming the task
    and clearing the failed tasks (a retry) makes it succeed; no task instance is left running; the
    registry holds one parent run and one model version per candidate of the run, none untagged, and
    the champion alias names one of them. The report shows whether the killed try's task process
    outlived its worker (Airflow 3 starts it in a process group of its own) and what it left."""
    harness = airflow_stack
    api, settings = harness.api, harness.settings
    run_id = api.trigger(DAG, harness.conf, run_id="faults_worker_kill")
    victim = wait_half_registered(settings, api, run_id)
    worker = worker_service(settings, victim["hostname"])
    task_pids = descendants(harness.stack.manager.read_pid(worker))
    groups = process_groups(task_pids)
    kill_service(harness.stack, worker)
    orphans = alive(task_pids)
    at_kill = registry_of_run(settings, run_id)
    after_kill, detected_s = wait_task_leaves(api, run_id, REGISTERING, "running", timeout_s=300)
    orphans_at_detection = alive(orphans)
    restart_s = restart(harness.stack)
    outcome = finish_or_retry(api, run_id)
    task = next(ti for ti in api.task_instances(DAG, run_id) if ti["task_id"] == REGISTERING)
    registry = registry_of_run(settings, run_id)
    orphans_left = alive(orphans)
    for pid in orphans_left:  # a leftover of the killed worker must not outlive the test
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    observe(killed=f"{worker} ({victim['hostname']}) during {REGISTERING} try {victim['try_number']}",
            registry_at_kill={key: at_kill[key] for key in ("parent_runs", "versions", "untagged_versions")},
            worker_descendants=f"{len(task_pids)} in {groups} process groups",
            outliving_the_worker=len(orphans), alive_at_detection=len(orphans_at_detection),
            alive_at_end=len(orphans_left), task_state_after_kill=after_kill, detected_after_s=round(detected_s, 1),
            worker_restart_s=round(restart_s, 1), **outcome,
            task_final=f"{task['state']} on {task['hostname']} try {task['try_number']}", **registry)
    assert after_kill != "running", f"{REGISTERING} still running {detected_s:.0f} s after its worker died"
    assert outcome["final"] == "success", (outcome, api.task_states(DAG, run_id))
    assert task["state"] == "success" and task["try_number"] > victim["try_number"], task
    check_consistent(api, run_id, registry)


def test_kill_the_scheduler_during_optimize_model(airflow_stack, observe):
    """The scheduler killed (SIGKILL) while a task of optimize_model runs on a worker (finetune_teacher,
    run with force_retrain). Promise: the running task goes on without it (workers report to the
    api-server); once `opsctl up` restarts the scheduler the run resumes and succeeds (or fails
    naming the task, and clearing it makes it succeed); no task instance is left running or queued;
    the task that ran at the kill succeeds in that same try (not retried); the registry holds one
    parent run and one model version per candidate of the run."""
    harness = airflow_stack
    api, settings = harness.api, harness.settings
    run_id = api.trigger(DAG, harness.conf | {"force_retrain": True}, run_id="faults_scheduler_kill")
    victim = wait_running(api, run_id, KILLED_DURING)
    killed_at = time.monotonic()
    kill_service(harness.stack, "airflow-scheduler")
    time.sleep(HEARTBEAT_TIMEOUT_S)  # down for longer than a task heartbeat timeout
    while_down = api.task_states(DAG, run_id)
    victim_while_down = while_down[KILLED_DURING]
    restart_s = restart(harness.stack)
    outcome = finish_or_retry(api, run_id)
    finished_s = time.monotonic() - killed_at
    instances = api.task_instances(DAG, run_id)
    registry = registry_of_run(settings, run_id)
    observe(killed=f"airflow-scheduler during {KILLED_DURING} (on {victim['hostname']})",
            down_s=HEARTBEAT_TIMEOUT_S, task_states_while_down=dict(Counter(while_down.values())),
            killed_during_task_while_down=victim_while_down,
            scheduler_restart_s=round(restart_s, 1), **outcome, run_finished_after_kill_s=round(finished_s, 1),
            retried_tasks=sorted(ti["task_id"] for ti in instances if ti["try_number"] > 1), **registry)
    assert outcome["final"] == "success", (outcome, api.task_states(DAG, run_id))
    victim_after = next(ti for ti in instances if ti["task_id"] == KILLED_DURING)
    assert victim_after["state"] == "success" and victim_after["try_number"] == victim["try_number"], victim_after
    check_consistent(api, run_id, registry)
