"""The gateway's label feedback, in process (FastAPI's TestClient) with a stand-in for Triton: every
classified text gets a prediction id that is logged, /v1/feedback stores true labels by those ids,
checks them against the model's labels, and counts apart from the classify requests."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from monitoring.monitor import parse_gateway_metrics
from serving import prediction_log as plog
from serving.gateway import FeedbackNotStored, GatewaySettings, create_app

LABELS = ["negative", "positive"]


class FakeTriton:
    """Answers like TritonClassifier: "positive" for texts with "good" in them."""

    def __init__(self, labels: list[str] | None = LABELS) -> None:
        self.labels = labels

    async def classify(self, texts: list[str]) -> dict:
        positive = ["good" in text for text in texts]
        return {"version": "7", "labels": LABELS, "label": [LABELS[p] for p in positive],
                "probabilities": [[0.1, 0.9] if p else [0.8, 0.2] for p in positive],
                "tokens": [len(text.split()) + 2 for text in texts], "unknown": [0] * len(texts)}

    async def known_labels(self) -> set[str] | None:
        return set(self.labels) if self.labels else None

    async def readiness(self) -> str | None:
        return None

    async def close(self) -> None:
        return None


def _client(tmp_path, triton: FakeTriton | None = None, **settings) -> TestClient:
    config = GatewaySettings(prediction_log_url=f"sqlite:///{tmp_path / 'log.db'}", **settings)
    return TestClient(create_app(config, classifier=lambda _settings: triton or FakeTriton()))


def _classified_ids(client: TestClient, texts: list[str]) -> list[str]:
    response = client.post("/v1/classify", json={"texts": texts})
    assert response.status_code == 200, response.text
    ids = [prediction["prediction_id"] for prediction in response.json()["predictions"]]
    assert len(set(ids)) == len(texts) and all(len(pid) == 32 for pid in ids)
    deadline = time.monotonic() + 10  # the log writes in batches: wait until these are written
    while client.app.state.prediction_log.stats.written < _predictions_counted(client):
        assert time.monotonic() < deadline, "the prediction log did not catch up"
        time.sleep(0.02)
    return ids


def _predictions_counted(client: TestClient) -> float:
    """gateway_predictions_total summed over the served models."""
    return sum(sample.value for metric in client.app.state.metrics.predictions.collect() for sample in metric.samples
               if sample.name == "gateway_predictions_total")


def test_classified_ids_are_logged_and_take_feedback(tmp_path):
    with _client(tmp_path) as client:
        ids = _classified_ids(client, ["good film", "bad plot", "good cast"])
        response = client.post("/v1/feedback", json={"items": [
            {"prediction_id": ids[0], "label": "negative"}, {"prediction_id": ids[1], "label": "negative"},
            {"prediction_id": "0" * 32, "label": "positive"}]})
        assert response.status_code == 200, response.text
        assert response.json() == {"stored": 2, "unknown_ids": ["0" * 32]}
        metrics = client.get("/metrics").text
    engine = plog.create_engine(f"sqlite:///{tmp_path / 'log.db'}")
    logged = plog.read_window(engine, 0, time.time() + 1)
    assert sorted(logged["prediction_id"]) == sorted(ids)
    labelled = plog.read_labelled(engine, 0, time.time() + 1).set_index("prediction_id")
    assert labelled.loc[ids[0], ["label", "true_label"]].tolist() == ["positive", "negative"]
    assert labelled.loc[ids[1], ["label", "true_label"]].tolist() == ["negative", "negative"]
    assert 'gateway_feedback_requests_total{model="text_classifier",status="200"} 1.0' in metrics
    assert 'gateway_feedback_total{model="text_classifier"} 2.0' in metrics


@pytest.mark.parametrize("body, message", [
    ({"items": []}, "items"),
    ({"items": [{"prediction_id": "a"}]}, "label"),
    ({"items": [{"prediction_id": "a", "label": "positive", "extra": 1}]}, "extra"),
    ({"items": [{"prediction_id": "a", "label": ""}]}, "label"),
    ({"labels": [{"prediction_id": "a", "label": "positive"}]}, '"items"'),
    ({"items": [{"prediction_id": "a", "label": "maybe"}]}, "labels ['maybe'] are not labels of 'text_classifier'"),
    ({"items": [{"prediction_id": str(i), "label": "positive"} for i in range(4)]},
     "4 items in one request; the limit is 3"),
])
def test_bad_feedback_gets_a_clear_422_that_does_not_count_against_the_classify_slo(tmp_path, body, message):
    with _client(tmp_path, max_feedback_items=3) as client:
        response = client.post("/v1/feedback", json=body)
        assert response.status_code == 422, response.text
        assert message in str(response.json())
        counts = parse_gateway_metrics(client.get("/metrics").text)
    assert {status: n for status, n in counts.items() if status.isdigit()} == {}  # the monitor's error rate saw none


def test_unreadable_json_is_a_400_counted_as_feedback(tmp_path):
    with _client(tmp_path) as client:
        response = client.post("/v1/feedback", content=b"{nope", headers={"content-type": "application/json"})
        assert response.status_code == 400 and "not valid JSON" in response.json()["error"]
        assert 'gateway_feedback_requests_total{model="text_classifier",status="400"} 1.0' in client.get("/metrics").text


def test_any_label_is_taken_when_the_model_labels_are_unknown(tmp_path):
    with _client(tmp_path, triton=FakeTriton(labels=None)) as client:
        ids = _classified_ids(client, ["good film"])
        response = client.post("/v1/feedback", json={"items": [{"prediction_id": ids[0], "label": "maybe"}]})
        assert response.json() == {"stored": 1, "unknown_ids": []}


def test_a_failed_database_write_is_a_503_with_the_reason(tmp_path, monkeypatch):
    async def failing(self, items, model=None):
        raise FeedbackNotStored("the prediction log could not store the feedback (OperationalError: locked); "
                                "nothing was stored, send it again")

    monkeypatch.setattr(plog.PredictionLog, "record_feedback", failing)
    with _client(tmp_path) as client:
        response = client.post("/v1/feedback", json={"items": [{"prediction_id": "a", "label": "positive"}]})
        assert response.status_code == 503 and "could not store the feedback" in response.json()["error"]
        metrics = client.get("/metrics").text
    assert 'gateway_feedback_requests_total{model="text_classifier",status="503"} 1.0' in metrics
    assert 'gateway_requests_total{model="text_classifier",status="503"}' not in metrics
