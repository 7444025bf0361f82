"""Faults against the real local stack (MLflow, Triton, the gateway and the reconcile loop on loopback):
processes killed with SIGKILL by their recorded pid, a full disk on the model repository, a corrupted
model file. Each test's docstring is its promise; the ``observe`` fixture records what was seen for
bench/results/faults.md. The stack does not supervise its processes: after a kill, the test restarts
the dead service with ``LocalStack.up`` (what `opsctl up` does), and that is part of each promise.

Run by `make test-faults` (marker ``faults``, outside `make test`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import httpx
import pytest

from serving import prediction_log as plog
from tests.integration.test_registry_and_promotion import _register, evaluated  # noqa: F401 - a fixture

pytestmark = [pytest.mark.faults, pytest.mark.integration]
MODEL = "faults_model"
REGISTERED = "faults-model"


def kill_service(stack, name: str) -> int:
    """SIGKILL the service's process group (its recorded pid is the group's id: each service starts in
    a session of its own), as a crash or the OOM killer would; returns the pid."""
    pid = stack.manager.read_pid(name)
    assert pid is not None, f"{name} is not running"
    os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while stack.manager.read_pid(name) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    return pid


def restart(stack) -> float:
    """Start what is not running (as `opsctl up`); returns the seconds until every service is healthy."""
    started = time.monotonic()
    stack.up(with_airflow=False, progress=lambda _: None)
    return time.monotonic() - started


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from opsctl.services import LocalStack
    from opsctl.settings import StackSettings

    home = tmp_path_factory.mktemp("faults-stack")
    env = stack_env(home, {"PIPELINE_SERVING_MODEL": MODEL,
                           "PIPELINE_REGISTERED_MODEL": REGISTERED, "PIPELINE_MLFLOW_AUTH": "false",
                           "PIPELINE_RECONCILE_INTERVAL_S": "3"})
    local = LocalStack(StackSettings.from_env(env))
    small_disk = mount_small_disk(local.settings.triton_model_repository)
    local.up(with_airflow=False, progress=lambda _: None)
    local.small_disk = small_disk
    yield local
    local.down(progress=lambda _: None)
    if small_disk:
        subprocess.run(["umount", str(local.settings.triton_model_repository)], check=False)


def mount_small_disk(folder: Path) -> bool:
    """Mount a 256 MiB tmpfs on ``folder`` (the model repository) where this user may (root with
    CAP_SYS_ADMIN): the full-disk fault then fills a real filesystem. False where it may not."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(folder)], capture_output=True,
                             check=False)
    return mounted.returncode == 0


class Promoter:
    """Promotes fresh registry versions of the fixture model into the stack (no shadow)."""

    def __init__(self, stack, exported_onnx: Path, evaluated, prepared_data: Path) -> None:
        from tasks.config import PromoteConfig
        from tasks.promote import PromotionTarget

        settings = stack.settings
        self.settings, self.model_dir, self.evaluated, self.data = settings, exported_onnx, evaluated, prepared_data
        self.target = PromotionTarget(settings.triton_http_url, settings.triton_model_repository, settings.mlflow_url)
        self.config = PromoteConfig(registered_model=REGISTERED, triton_model=MODEL, smoke_samples=4)
        self.count = 0

    def register(self) -> str:
        self.count += 1
        return _register(self.settings, REGISTERED, f"faults-{self.count}", self.model_dir, self.evaluated.metrics)

    def promote(self, version: str):
        from tasks.promote import run as promote

        return promote(self.config, self.target, self.model_dir, Path(self.evaluated.uri("predictions")), self.data,
                       version, max_length=32)

    def champion(self) -> str | None:
        from tasks import model_aliases

        return model_aliases.alias_version(self.settings.mlflow_url, REGISTERED, "champion")

    def served(self) -> list[int]:
        from serving.triton_client import TritonClient

        return TritonClient(self.settings.triton_http_url).ready_versions(MODEL)


@pytest.fixture(scope="module")
def promoter(stack, exported_onnx, evaluated, prepared_data):
    """The stack serving a first champion, promoted through the registry."""
    helper = Promoter(stack, exported_onnx, evaluated, prepared_data)
    helper.promote(helper.register())
    return helper


class Traffic:
    """Single-text classify requests through the gateway in a thread (at most 180 s), recording each answer:
    status (0: no connection), error text, prediction ids."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.answers: list[tuple[int, str, list[str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        started = time.monotonic()
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self._stop.is_set() and time.monotonic() - started < 180:
                self.answers.append(_classify(client))
                time.sleep(0.02)

    def statuses(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for status, _, _ in list(self.answers):
            counts[status] = counts.get(status, 0) + 1
        return counts

    def served_ids(self) -> list[str]:
        return [pid for status, _, ids in self.answers if status == 200 for pid in ids]

    def wait_for(self, status: int, timeout_s: float = 120) -> float:
        started = time.monotonic()
        seen = len(self.answers)
        while not any(answer[0] == status for answer in self.answers[seen:]):
            assert time.monotonic() - started < timeout_s, f"no {status} answer in {timeout_s} s: {self.statuses()}"
            time.sleep(0.05)
        return time.monotonic() - started

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def _classify(client: httpx.Client) -> tuple[int, str, list[str]]:
    try:
        response = client.post("/v1/classify", json={"texts": ["good great film"]})
    except httpx.TransportError as error:
        return 0, type(error).__name__, []
    if response.status_code != 200:
        return response.status_code, response.text[:300], []
    return 200, "", [item["prediction_id"] for item in response.json()["predictions"]]


def _metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def logged_ids(stack, timeout_s: float = 30) -> list[str]:
    """Every prediction id in the prediction log, once the gateway's journal has caught up."""
    url = stack.settings.gateway_url
    deadline = time.monotonic() + timeout_s
    while _metric(url, "prediction_log_queue_depth") > 0:
        assert time.monotonic() < deadline, "the prediction log did not catch up"
        time.sleep(0.2)
    frame = plog.read_window(plog.create_engine(stack.settings.prediction_log_url), 0, time.time() + 60)
    return frame["prediction_id"].tolist()


def test_kill_triton_under_traffic(stack, promoter, observe):
    """While Triton is down (SIGKILL), classify answers 503 with a reason naming Triton and nothing
    else (no other 5xx); after `opsctl up` restarts it every request succeeds again; every 200
    answer is in the prediction log exactly once, and nothing else was logged."""
    before = set(logged_ids(stack))
    with Traffic(stack.settings.gateway_url) as traffic:
        traffic.wait_for(200)
        killed_at = time.monotonic()
        kill_service(stack, "triton")
        first_503_s = traffic.wait_for(503)
        restart_s = restart(stack)
        recovered_s = traffic.wait_for(200) + restart_s + first_503_s
        time.sleep(1)
    logged = [pid for pid in logged_ids(stack) if pid not in before]
    errors = {text for status, text, _ in traffic.answers if status == 503}
    statuses = traffic.statuses()
    observe(requests=sum(statuses.values()), statuses=statuses, restart_s=round(restart_s, 1),
            outage_s=round(recovered_s, 1), served=len(traffic.served_ids()), logged=len(logged),
            duplicates=len(logged) - len(set(logged)))
    assert set(statuses) <= {200, 503}, statuses
    assert all("Triton" in text for text in errors), errors
    after_restart = traffic.answers[-5:]
    assert all(status == 200 for status, _, _ in after_restart), after_restart
    assert sorted(logged) == sorted(traffic.served_ids())
    assert time.monotonic() - killed_at < 300


def test_kill_gateway_under_traffic(stack, promoter, observe):
    """A gateway killed with SIGKILL mid-traffic loses no prediction it answered: after `opsctl up`
    restarts it, the journal is replayed and every prediction id answered 200 is in the log exactly
    once (requests in flight at the kill get no answer: the client sees a dropped connection)."""
    before = set(logged_ids(stack))
    with Traffic(stack.settings.gateway_url) as traffic:
        traffic.wait_for(200)
        time.sleep(1.0)
        kill_service(stack, "gateway")
        traffic.wait_for(0)
        restart_s = restart(stack)
        traffic.wait_for(200)
        time.sleep(1)
    logged = [pid for pid in logged_ids(stack) if pid not in before]
    served = traffic.served_ids()
    statuses = traffic.statuses()
    observe(requests=sum(statuses.values()), statuses=statuses, restart_s=round(restart_s, 1), served=len(served),
            logged=len(logged), duplicates=len(logged) - len(set(logged)),
            logged_not_answered=len(set(logged) - set(served)))
    assert set(statuses) <= {0, 200}, statuses
    assert len(logged) == len(set(logged)), "a prediction was logged twice"
    assert set(served) <= set(logged), f"{len(set(served) - set(logged))} answered predictions are not in the log"


def _when_new_version_appears(repository: Path, action) -> threading.Thread:
    """Run ``action`` once a new ensemble version folder appears in the repository (the switch has begun)."""
    from serving import model_repository as repo

    known = set(repo.ensemble_versions(repository, MODEL))

    def watch() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if set(repo.ensemble_versions(repository, MODEL)) - known:
                action()
                return
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_kill_mlflow_during_promotion(stack, promoter, observe, monkeypatch):
    """MLflow killed (SIGKILL) during a promotion's switch (once the new version is in the repository):
    the promotion fails with PromotionFailed, Triton serves the version it served before (the switch is
    undone) and the champion alias is unchanged; after `opsctl up` restarts MLflow the reconcile loop
    leaves that version serving, and a retry of the promotion succeeds."""
    from serving import model_repository as repo
    from tasks.errors import PromotionFailed

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # the client's default retries take minutes
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    repository = stack.settings.triton_model_repository
    champion, served_before = promoter.champion(), promoter.served()
    version = promoter.register()
    watcher = _when_new_version_appears(repository, lambda: kill_service(stack, "mlflow"))
    started = time.monotonic()
    with pytest.raises(PromotionFailed) as failure:
        promoter.promote(version)
    failed_after_s = time.monotonic() - started
    watcher.join(timeout=5)
    served_during_outage = promoter.served()
    restart_s = restart(stack)
    time.sleep(3 * stack.settings.reconcile_interval_s)  # a few passes of the reconcile loop
    served_after = promoter.served()
    marker_after = repo.registered_version(repository, MODEL, served_after[-1])
    champion_after = promoter.champion()
    retry_started = time.monotonic()
    retry = promoter.promote(version)
    observe(error=str(failure.value)[:220], failed_after_s=round(failed_after_s, 1), served_before=served_before,
            served_during_outage=served_during_outage, mlflow_restart_s=round(restart_s, 1),
            champion_before=champion, champion_after_restart=champion_after,
            served_after_reconcile=served_after, retry_s=round(time.monotonic() - retry_started, 1),
            retry_served=promoter.served(), retry_champion=promoter.champion())
    assert served_during_outage == served_before and champion_after == champion
    assert served_after == served_before and marker_after == (REGISTERED, champion)
    assert promoter.champion() == version and promoter.served() == [int(retry.metrics["triton_version"])]


FULL_DISK_CHILD = """
import json, resource, sys
from pathlib import Path
args = json.loads(sys.argv[1])
if args["limit"]:
    resource.setrlimit(resource.RLIMIT_FSIZE, (args["limit"], args["limit"]))
from tasks.config import PromoteConfig
from tasks.promote import PromotionTarget, run
from tests.stack_env import stack_env
target = PromotionTarget(args["triton"], Path(args["repository"]), args["mlflow"])
config = PromoteConfig(registered_model=args["registered"], triton_model=args["model"], smoke_samples=4)
run(config, target, Path(args["model_dir"]), Path(args["predictions"]), Path(args["data"]), args["version"], max_length=32)
"""


@contextmanager
def disk_full_but(folder: Path, free_bytes: int):
    """Fill the filesystem of ``folder`` (the stack's tmpfs) until ``free_bytes`` are left; empty it on exit."""
    filler = folder / ".filler"
    stats = os.statvfs(folder)
    with filler.open("wb") as handle:
        os.posix_fallocate(handle.fileno(), 0, max(stats.f_bavail * stats.f_frsize - free_bytes, 1))
    try:
        yield
    finally:
        filler.unlink()


def test_full_disk_on_the_model_repository_during_promotion(stack, promoter, observe):
    """A full disk while a promotion copies the model into the repository: where the suite may mount
    (root), the repository is a 256 MiB tmpfs filled until half the model file is free, so the copy
    fails with ENOSPC ("No space left on device"); elsewhere the promoting process may not write a
    file larger than half the model (RLIMIT_FSIZE; Python ignores SIGXFSZ, so the write fails with
    EFBIG, "File too large"; that cap also stops the bundle's copy in /tmp, before the repository).
    Promise: the promotion fails naming the error (PromotionFailed on the tmpfs), no new version and no half-written folder is left in the
    repository, the served version and the champion alias are unchanged, the gateway answers 200."""
    from serving import model_repository as repo

    settings = stack.settings
    repository = settings.triton_model_repository
    champion, served_before = promoter.champion(), promoter.served()
    versions_before = repo.ensemble_versions(repository, MODEL)
    model_bytes = (promoter.model_dir / "model.onnx").stat().st_size
    args = {"limit": None if stack.small_disk else model_bytes // 2, "triton": settings.triton_http_url,
            "repository": str(repository), "mlflow": settings.mlflow_url, "registered": REGISTERED, "model": MODEL,
            "model_dir": str(promoter.model_dir), "predictions": promoter.evaluated.uri("predictions"),
            "data": str(promoter.data), "version": promoter.register()}
    full = disk_full_but(repository, model_bytes // 2) if stack.small_disk else nullcontext()
    with Traffic(settings.gateway_url) as traffic, full:
        child = subprocess.run([sys.executable, "-c", FULL_DISK_CHILD, json.dumps(args)], capture_output=True,
                               text=True, timeout=300, env=os.environ | {"PYTHONPATH": str(Path.cwd())})
        time.sleep(1)
    last_line = (child.stderr.strip().splitlines() or [""])[-1]
    leftovers = sorted(path.name for folder in repository.iterdir() if folder.is_dir()
                       for path in folder.iterdir() if path.name.startswith("."))
    expected = "No space left on device" if stack.small_disk else "File too large"
    observe(simulated="tmpfs filled (ENOSPC)" if stack.small_disk else f"RLIMIT_FSIZE {args['limit']} B (EFBIG)",
            model_bytes=model_bytes, exit_code=child.returncode, error=last_line[:220],
            versions_before=versions_before, versions_after=repo.ensemble_versions(repository, MODEL),
            served=promoter.served(), champion_unchanged=promoter.champion() == champion,
            gateway_statuses=traffic.statuses(), staging_leftovers=leftovers)
    assert child.returncode != 0 and expected in last_line, child.stderr[-2000:]
    # With RLIMIT_FSIZE every write of the process is capped: the bundle's copy in /tmp fails first,
    # before the repository is touched. Only the tmpfs fills the repository alone.
    assert "PromotionFailed" in last_line or not stack.small_disk, last_line
    assert not leftovers
    assert repo.ensemble_versions(repository, MODEL) == versions_before
    assert promoter.served() == served_before and promoter.champion() == champion
    assert set(traffic.statuses()) == {200}


def test_corrupted_model_file_in_the_repository(stack, promoter, observe):
    """The served version's model.onnx truncated to half on disk, then Triton killed and restarted (a
    crash or a reboot is when a model file is read again). Promise, as the code keeps it: the stack
    does not repair it by itself, but says so clearly: classify answers 503 naming Triton (no other
    5xx), /readyz is 503, and the reconcile loop logs the broken file ("Protobuf parsing failed");
    once the operator removes that version's folders, classify answers 200 again and the reconcile
    loop serves the champion, rebuilt from the serving bundle logged in the registry (the report
    shows which version answered first: Triton may serve the older version left in the repository
    until the reconcile loop's next pass)."""
    from serving import model_repository as repo

    settings, repository = stack.settings, stack.settings.triton_model_repository
    served_before = promoter.served()
    model_file = repository / f"{MODEL}_onnx" / str(served_before[-1]) / "model.onnx"
    model_file.write_bytes(model_file.read_bytes()[: model_file.stat().st_size // 2])
    reconcile_log = stack.manager.log_file("reconcile")
    log_offset = reconcile_log.stat().st_size
    with Traffic(settings.gateway_url) as traffic:
        kill_service(stack, "triton")
        started = time.monotonic()
        restart_s = restart(stack)
        traffic.wait_for(503)
        readyz = httpx.get(f"{settings.gateway_url}/readyz")
        deadline = time.monotonic() + 60
        while "Protobuf parsing failed" not in reconcile_log.read_text()[log_offset:]:
            assert time.monotonic() < deadline, reconcile_log.read_text()[log_offset:][-2000:]
            time.sleep(0.5)
        reported_s = time.monotonic() - started
        repo.remove_ensemble_version(repository, MODEL, served_before[-1])
        try:
            recovered_s = traffic.wait_for(200, timeout_s=120) + reported_s
        except AssertionError:
            tail = [line[24:220] for line in reconcile_log.read_text()[log_offset:].splitlines()
                    if "tasks.reconcile" in line][-2:]
            observe(served_before=served_before, statuses=traffic.statuses(), reconcile_reported_after_s=round(
                reported_s, 1), recovered="no 200 within 120 s of the repair",
                    triton_running=stack.manager.state("triton").running, reconcile_last=tail)
            raise
        first_served = promoter.served()
        first_holds = repo.registered_version(repository, MODEL, first_served[-1]) if first_served else None
        holds, deadline = first_holds, time.monotonic() + 90
        while holds != (REGISTERED, promoter.champion()) and time.monotonic() < deadline:
            time.sleep(0.5)
            served_after = promoter.served()
            holds = repo.registered_version(repository, MODEL, served_after[-1]) if served_after else None
        champion_served_s = time.monotonic() - started
        time.sleep(1)
    statuses = traffic.statuses()
    errors = sorted({text[:100] for status, text, _ in traffic.answers if status == 503})
    served_after = promoter.served()
    reconciled = [line[24:] for line in reconcile_log.read_text()[log_offset:].splitlines()
                  if "tasks.reconcile" in line][-1:]
    observe(served_before=served_before, triton_restart_s=round(restart_s, 1), statuses=statuses,
            readyz=readyz.status_code, error_503=errors[:1], reconcile_reported_after_s=round(reported_s, 1),
            first_200_after_s=round(recovered_s, 1), first_served=first_served, first_served_holds=first_holds,
            champion=promoter.champion(), champion_served_after_s=round(champion_served_s, 1),
            served_after=served_after, served_holds=holds, reconcile_last=reconciled)
    assert set(statuses) <= {200, 503}, statuses
    assert all("Triton" in text for text in errors) and readyz.status_code == 503
    assert holds == (REGISTERED, promoter.champion()), "the version served after the repair is not the champion"
