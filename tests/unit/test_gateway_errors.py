"""Every 5xx the gateway answers is counted, unhandled exceptions included, and the monitor's error
rate is right with several gateway replicas: each is read on its own, against its own previous
counters (a restarted one counts from its start). Real gateway apps, served over HTTP on loopback."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from monitoring import monitor
from monitoring.monitor import INVALID_OUTPUTS, MonitorConfig, MonitorSettings, parse_gateway_metrics, run_window
from serving.gateway import GatewaySettings, create_app
from serving.model_repository import DEFAULT_MODEL

LABELS = ["negative", "positive"]


class StandInTriton:
    """Answers like TritonClassifier, or raises an exception no handler expects (``broken``)."""

    def __init__(self, broken: bool = False) -> None:
        self.broken = broken

    async def classify(self, texts: list[str]) -> dict:
        if self.broken:
            raise RuntimeError("a bug in the gateway's own code")
        return {"version": "1", "labels": LABELS, "label": [LABELS[1]] * len(texts),
                "probabilities": [[0.2, 0.8]] * len(texts), "tokens": None, "unknown": None}

    async def known_labels(self) -> set[str] | None:
        if self.broken:
            raise KeyError("labels")
        return set(LABELS)

    async def readiness(self) -> str | None:
        return None

    async def close(self) -> None:
        return None


def _app(tmp_path: Path, broken: bool = False):
    settings = GatewaySettings(prediction_log_url=f"sqlite:///{tmp_path / 'predictions.db'}")
    return create_app(settings, lambda _settings: StandInTriton(broken))


def test_an_unhandled_exception_is_a_counted_json_500(tmp_path):
    with TestClient(_app(tmp_path, broken=True)) as client:
        answer = client.post("/v1/classify", json={"texts": ["fine"]})
        assert answer.status_code == 500 and answer.json()["error"].startswith("internal error (RuntimeError)")
        feedback = client.post("/v1/feedback", json={"items": [{"prediction_id": "x" * 32, "label": "positive"}]})
        assert feedback.status_code == 500 and "KeyError" in feedback.json()["error"]
        page = client.get("/metrics").text
    assert parse_gateway_metrics(page) == {"500": 1.0, INVALID_OUTPUTS: 0.0}
    assert 'gateway_feedback_requests_total{model="text_classifier",status="500"} 1.0' in page  # apart from the classify SLO


class Replica:
    """One gateway process's app served by uvicorn in a thread on a loopback port."""

    def __init__(self, app, port: int = 0) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the gateway replica did not start"
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def classify(self, times: int) -> list[int]:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            return [client.post("/v1/classify", json={"texts": ["text"]}).status_code for _ in range(times)]

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


@pytest.fixture()
def replicas(tmp_path):
    started: list[Replica] = []

    def start(folder: str, broken: bool = False, port: int = 0) -> Replica:
        (tmp_path / folder).mkdir(exist_ok=True)
        started.append(Replica(_app(tmp_path / folder, broken), port))
        return started[-1]

    yield start
    for replica in started:
        replica.stop()


def _window(settings: MonitorSettings, end: float) -> dict:
    return run_window(settings, MonitorConfig(), end, False, settings.state_dir / "windows" / str(int(end)),
                      log_to_mlflow=False)["verdict"]["evidence"]


def test_the_error_rate_of_two_replicas_one_of_them_restarted(tmp_path, replicas, monkeypatch):
    monkeypatch.setattr(monitor, "triton_counts", lambda url, model: None)
    healthy, failing = replicas("a"), replicas("b", broken=True)
    settings = MonitorSettings(f"sqlite:///{tmp_path / 'log.db'}", tmp_path / "models", DEFAULT_MODEL, "unused",
                               tmp_path / "state", gateway_url=f"{healthy.url},{failing.url}")
    assert healthy.classify(6) == [200] * 6 and failing.classify(4) == [500] * 4
    first = _window(settings, 900)
    assert (first["requests"], first["gateway_replicas"]) == (10, 2)
    assert first["error_rate"] == pytest.approx(4 / 10)

    healthy.classify(10)
    failing.stop()  # restarted, on the same address, fixed: its counters begin again
    restarted = replicas("b", port=failing.port)
    assert restarted.classify(3) == [200] * 3
    second = _window(settings, 1800)
    assert second["requests"] == 13 and second["error_rate"] == 0.0

    failing_again = replicas("c", broken=True)  # the autoscaler added a replica since
    settings = MonitorSettings(**{**settings.__dict__, "gateway_url": f"{healthy.url},{restarted.url},"
                                                                       f"{failing_again.url}"})
    healthy.classify(5)
    failing_again.classify(5)
    third = _window(settings, 2700)
    assert (third["requests"], third["gateway_replicas"]) == (10, 3)
    assert third["error_rate"] == pytest.approx(5 / 10)
