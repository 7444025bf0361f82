"""The prediction log's database goes away under traffic: a stack of its own (MLflow, Triton, the gateway and
the reconcile loop on free loopback ports, no Airflow) whose prediction log is a PostgreSQL database created
for the test, reached through a TCP proxy the test owns. The outage closes the proxy's listening socket and
cuts every open connection (the gateway sees what a crashed or unreachable server looks like: dropped
connections, then refused ones), for ``OUTAGE_S`` seconds, then opens it again on the same port.

Only the prediction log goes through the proxy: ``ProxiedLogSettings`` is the stack's settings with
``prediction_log_url`` (what ``opsctl.services.gateway_spec`` hands the gateway as
``GATEWAY_PREDICTION_LOG_URL``) pointed at the proxy; MLflow keeps its SQLite files, so the outage is the
prediction log's alone. The test reads the log directly (not through the proxy) to check it.

Skipped, saying why, without a PostgreSQL server (tests/production_servers.py). Run by `make test-faults`."""

from __future__ import annotations

import selectors
import socket
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
import sqlalchemy as sa

from opsctl import databases
from opsctl.process import free_port
from opsctl.settings import StackSettings
from serving import prediction_log as plog
from tests.faults.test_faults import MODEL, REGISTERED, Promoter, Traffic, _classify, _metric
from tests.integration.test_registry_and_promotion import evaluated  # noqa: F401 - a fixture
from tests.production_servers import postgres_url  # noqa: F401 - a session fixture
from tests.stack_env import stack_env

pytestmark = [pytest.mark.faults, pytest.mark.integration]
HOST = "127.0.0.1"
OUTAGE_S = 20.0
DRAIN_TIMEOUT_S = 60.0


class TcpProxy:
    """A loopback TCP proxy to ``upstream`` on a port of its own, in a thread of its own. ``stop`` closes the
    listening socket and cuts every open connection (``connections_cut`` counts them); ``start`` listens again
    on the same port."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = free_port(HOST)
        self.connections_cut = 0
        self.accepted = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        listener = socket.create_server((HOST, self.port))  # SO_REUSEADDR: the port is free again at once
        listener.setblocking(False)
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, args=(listener,), daemon=True, name="db-proxy")
        self._thread.start()

    def stop(self) -> None:
        """Close the listener and every connection; returns once they are closed."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=10)
        assert not self._thread.is_alive(), "the proxy thread did not stop"
        self._thread = None

    def _serve(self, listener: socket.socket) -> None:
        selector = selectors.DefaultSelector()
        selector.register(listener, selectors.EVENT_READ)
        peers: dict[socket.socket, socket.socket] = {}  # each end of a proxied connection -> the other end
        try:
            while not self._stop.is_set():
                for key, _ in selector.select(timeout=0.05):
                    if key.fileobj is listener:
                        self._accept(listener, selector, peers)
                    elif key.fileobj in peers:
                        self._relay(key.fileobj, selector, peers)
        finally:
            self.connections_cut += len(peers) // 2
            for end in list(peers):
                end.close()
            selector.close()
            listener.close()

    def _accept(self, listener: socket.socket, selector: selectors.BaseSelector,
                peers: dict[socket.socket, socket.socket]) -> None:
        try:
            client, _ = listener.accept()
        except BlockingIOError:
            return
        try:
            server = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            client.close()
            return
        for end in (client, server):
            end.setblocking(True)
            selector.register(end, selectors.EVENT_READ)
        peers[client], peers[server] = server, client
        self.accepted += 1

    @staticmethod
    def _relay(end: socket.socket, selector: selectors.BaseSelector,
               peers: dict[socket.socket, socket.socket]) -> None:
        other = peers[end]
        try:
            data = end.recv(65536)
            if data:
                other.sendall(data)
                return
        except OSError:
            pass
        for closing in (end, other):  # one side closed (or failed): close the pair
            selector.unregister(closing)
            peers.pop(closing, None)
            closing.close()


@dataclass(frozen=True)
class ProxiedLogSettings(StackSettings):
    """The stack's settings with its prediction log at ``log_url`` (the test's database, through the proxy)."""

    log_url: str = ""

    @property
    def prediction_log_url(self) -> str:
        return self.log_url


class TimedTraffic(Traffic):
    """``Traffic`` that also records when each request was sent and answered (monotonic seconds)."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.timings: list[tuple[float, float]] = []

    def _loop(self) -> None:
        started = time.monotonic()
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self._stop.is_set() and time.monotonic() - started < 180:
                sent = time.monotonic()
                answer = _classify(client)
                self.timings.append((sent, time.monotonic()))
                self.answers.append(answer)
                time.sleep(0.02)

    def timed_answers(self) -> list[tuple[float, float, int, list[str]]]:
        """(sent, answered, status, prediction ids) of each request."""
        return [(sent, answered, status, ids)
                for (sent, answered), (status, _, ids) in zip(list(self.timings), list(self.answers))]


@pytest.fixture(scope="module")
def log_database(postgres_url):  # noqa: F811
    """A PostgreSQL database of the test's own for the prediction log (its direct URL); dropped at the end."""
    name = f"faults_dboutage_{uuid.uuid4().hex[:8]}"
    databases.create_databases(postgres_url, [name])
    yield databases.database_url(postgres_url, name)
    databases.drop_databases(postgres_url, [name])


@pytest.fixture(scope="module")
def log_proxy(postgres_url):  # noqa: F811
    server = sa.engine.make_url(postgres_url)
    proxy = TcpProxy((server.host or HOST, server.port or 5432))
    proxy.start()
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def db_stack(tmp_path_factory, log_database, log_proxy):
    """A stack (no Airflow) whose gateway logs predictions to ``log_database`` through ``log_proxy``."""
    from opsctl.services import LocalStack

    home = tmp_path_factory.mktemp("dboutage-stack")
    env = stack_env(home, {"PIPELINE_SERVING_MODEL": MODEL,
                           "PIPELINE_REGISTERED_MODEL": REGISTERED, "PIPELINE_MLFLOW_AUTH": "false",
                           "PIPELINE_RECONCILE_INTERVAL_S": "3"})
    proxied = sa.engine.make_url(log_database).set(host=HOST, port=log_proxy.port)
    settings = ProxiedLogSettings(**vars(StackSettings.from_env(env)),
                                  log_url=proxied.render_as_string(hide_password=False))
    local = LocalStack(settings)
    try:
        local.up(with_airflow=False, progress=lambda _: None)
        yield local
    finally:
        local.down(progress=lambda _: None)


@pytest.fixture(scope="module")
def db_promoter(db_stack, exported_onnx, evaluated, prepared_data):  # noqa: F811
    """The database stack serving a first champion, promoted through the registry."""
    helper = Promoter(db_stack, exported_onnx, evaluated, prepared_data)
    helper.promote(helper.register())
    return helper


def drained(gateway_url: str, timeout_s: float = DRAIN_TIMEOUT_S) -> float:
    """Seconds until the gateway's journal is empty (every prediction in the database)."""
    started = time.monotonic()
    while _metric(gateway_url, "prediction_log_queue_depth") > 0:
        assert time.monotonic() - started < timeout_s, (
            f"the journal still holds {_metric(gateway_url, 'prediction_log_queue_depth'):.0f} predictions "
            f"{timeout_s:.0f} s after the database came back")
        time.sleep(0.2)
    return time.monotonic() - started


def logged_ids(engine: sa.Engine) -> list[str]:
    """Every prediction id in the log, read from PostgreSQL directly (not through the proxy)."""
    with engine.connect() as connection:
        return list(connection.execute(sa.select(plog.PREDICTIONS.c.prediction_id)).scalars())


def latency_ms(answers: list[tuple[float, float, int, list[str]]], start: float, end: float) -> dict[str, float]:
    """p50, p99 and max (ms) of the requests sent in [start, end), and how many there were."""
    seconds = [answered - sent for sent, answered, _, _ in answers if start <= sent < end]
    if not seconds:
        return {"requests": 0}
    p50, p99, most = np.percentile(np.array(seconds) * 1000, [50, 99, 100])
    return {"requests": len(seconds), "p50": round(float(p50), 1), "p99": round(float(p99), 1),
            "max": round(float(most), 1)}


def outage(proxy: TcpProxy, gateway_url: str, engine: sa.Engine) -> dict[str, float]:
    """Cut the database off for ``OUTAGE_S`` seconds and bring it back; what the gateway and the database showed."""
    failures_before = _metric(gateway_url, "prediction_log_write_failures")
    cut_at = time.monotonic()
    proxy.stop()
    time.sleep(0.5)  # a COMMIT the server had already received when the connection was cut is counted here
    rows_at_cut = plog.count(engine)
    depths = []
    while time.monotonic() - cut_at < OUTAGE_S:
        depths.append(_metric(gateway_url, "prediction_log_queue_depth"))
        time.sleep(0.5)
    sampled_at = time.monotonic()
    depth_at_end = _metric(gateway_url, "prediction_log_queue_depth")
    failures = _metric(gateway_url, "prediction_log_write_failures") - failures_before
    rows_at_end = plog.count(engine)
    proxy.start()
    return {"cut_at": cut_at, "sampled_at": sampled_at, "back_at": time.monotonic(), "rows_at_cut": rows_at_cut,
            "rows_at_end": rows_at_end, "depth_at_end": depth_at_end, "depth_max": max(depths + [depth_at_end]),
            "write_failures": failures}


def test_prediction_log_database_outage_under_traffic(db_stack, db_promoter, log_proxy, log_database, observe):
    """The prediction log's PostgreSQL unreachable for 20 s under traffic (two clients): its proxy closes its
    listening socket and cuts every open connection, then listens again on the same port. Promise: classify
    answers 200 throughout (no 5xx, no dropped connection) and its latency does not stall (p99 during the
    outage at most 4 times the p99 before it, or 1 s); the gateway's metrics show the journal growing
    (prediction_log_queue_depth holds at least every prediction answered since the cut) and failed writes
    (prediction_log_write_failures), while the database gets no row; once it is back the journal drains to 0
    within 60 s and every prediction id answered 200 is in the PostgreSQL log exactly once, and nothing else
    was logged."""
    gateway_url = db_stack.settings.gateway_url
    engine = sa.create_engine(log_database)
    try:
        drained(gateway_url)
        before = set(logged_ids(engine))
        with TimedTraffic(gateway_url) as first, TimedTraffic(gateway_url) as second:
            first.wait_for(200)
            second.wait_for(200)
            time.sleep(5)
            seen = outage(log_proxy, gateway_url, engine)
            drain_s = drained(gateway_url)
            time.sleep(3)
        drained(gateway_url)
        replayed = _metric(gateway_url, "prediction_log_replayed_duplicates")
        logged = [pid for pid in logged_ids(engine) if pid not in before]
    finally:
        engine.dispose()
    answers = first.timed_answers() + second.timed_answers()
    served = first.served_ids() + second.served_ids()
    answered_in_outage = sum(len(ids) for sent, answered, status, ids in answers
                             if status == 200 and sent >= seen["cut_at"] and answered <= seen["sampled_at"])
    statuses = dict(Counter(status for _, _, status, _ in answers))
    latency = {"before": latency_ms(answers, 0.0, seen["cut_at"]),
               "outage": latency_ms(answers, seen["cut_at"], seen["back_at"]),
               "after": latency_ms(answers, seen["back_at"], float("inf"))}
    observe(outage_s=round(seen["back_at"] - seen["cut_at"], 1), connections_cut=log_proxy.connections_cut,
            statuses=statuses, latency_ms=latency, queue_depth_max=int(seen["depth_max"]),
            queue_depth_at_end=int(seen["depth_at_end"]), answered_during_outage=answered_in_outage,
            write_failures=int(seen["write_failures"]),
            rows_written_during_outage=seen["rows_at_end"] - seen["rows_at_cut"],
            drained_after_s=round(drain_s, 1), replayed_duplicates_skipped=int(replayed), served=len(served),
            logged=len(logged), duplicates=len(logged) - len(set(logged)),
            logged_not_answered=len(set(logged) - set(served)))
    assert set(statuses) == {200}, statuses
    assert latency["outage"]["p99"] <= max(1000.0, 4 * latency["before"]["p99"]), latency
    assert seen["write_failures"] > 0 and seen["rows_at_end"] == seen["rows_at_cut"], seen
    assert answered_in_outage > 0 and seen["depth_at_end"] >= answered_in_outage, (seen, answered_in_outage)
    assert len(logged) == len(set(logged)), "a prediction was logged twice"
    assert sorted(logged) == sorted(served), (f"{len(set(served) - set(logged))} answered predictions are not in "
                                              f"the log, {len(set(logged) - set(served))} logged were not answered")
