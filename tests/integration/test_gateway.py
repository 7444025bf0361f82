"""The gateway as users run it: a real uvicorn process in front of a real Triton, logging to SQLite.

Fuzzed request bodies never get a 5xx; bad input gets a 4xx that says what is wrong; Triton
stopped mid-test gives 503 with the reason and the gateway recovers when Triton is back; every
served prediction is in the prediction log."""

from __future__ import annotations

import json
import time

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving import prediction_log as plog
from serving import model_repository as repo
from tests.integration.test_registry_and_promotion import evaluated  # noqa: F401 - a fixture
from tests.stack_env import stack_env

pytestmark = pytest.mark.integration
MODEL = "gw_model"
SECOND_MODEL, SECOND_LABELS = "gw_topics", ("sports", "business")


@pytest.fixture(scope="module")
def gateway_stack(tmp_path_factory, exported_onnx):
    """Its own MLflow + Triton + gateway (this module stops and restarts Triton)."""
    from opsctl.services import LocalStack
    from opsctl.settings import StackSettings

    home = tmp_path_factory.mktemp("gateway-stack")
    # MLflow without authentication, as in conftest's local_services: test_mlflow_auth.py checks the accounts.
    env = stack_env(home, {"PIPELINE_SERVING_MODEL": MODEL, "PIPELINE_MLFLOW_AUTH": "false",
                           "PIPELINE_EXTRA_MODELS": f"{SECOND_MODEL}=gw-topics"})
    stack = LocalStack(StackSettings.from_env(env))
    repo.write_ensemble_version(stack.settings.triton_model_repository,
                                repo.ClassifierEnsemble(MODEL, ("negative", "positive"), max_length=32), exported_onnx)
    # A second served model beside it (the same tiny network, other labels): its own ensemble and route.
    repo.write_ensemble_version(stack.settings.triton_model_repository,
                                repo.ClassifierEnsemble(SECOND_MODEL, SECOND_LABELS, max_length=32), exported_onnx)
    stack.up(with_airflow=False, progress=lambda _: None)
    yield stack
    stack.down(progress=lambda _: None)


@pytest.fixture(scope="module")
def http(gateway_stack):
    with httpx.Client(base_url=gateway_stack.settings.gateway_url, timeout=30) as client:
        _wait_ready(client)
        yield client


def _wait_ready(client: httpx.Client, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.5)
    raise AssertionError(f"gateway not ready: {client.get('/readyz').text}")


def test_classify_returns_labels_probabilities_and_the_version(http):
    response = http.post("/v1/classify", json={"texts": ["good great film", "awful boring plot", ""]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == MODEL and body["model_version"] == "1" and body["latency_ms"] > 0
    assert len(body["predictions"]) == 3
    for prediction in body["predictions"]:
        assert prediction["label"] in {"negative", "positive"}
        assert set(prediction["probabilities"]) == {"negative", "positive"}
        assert sum(prediction["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert prediction["tokens"] >= 2  # [CLS] and [SEP] at least
    assert http.get("/healthz").json() == {"status": "ok"}
    assert "/v1/classify" in http.get("/openapi.json").json()["paths"]


@pytest.mark.parametrize("body, content_type, status, message", [
    (b"{not json", "application/json", 400, "not valid JSON"),
    (b'{"texts": ["\xff\xfe bad bytes"]}', "application/json", 400, "not valid JSON"),
    (b'{"texts": "one string"}', "application/json", 422, "texts"),
    (b'{"texts": []}', "application/json", 422, "texts"),
    (b'{"texts": [1, 2]}', "application/json", 422, "texts"),
    (b'{"text": ["a"]}', "application/json", 422, "texts"),
    (json.dumps({"texts": ["a"] * 33}).encode(), "application/json", 422, "limit is 32"),
    (json.dumps({"texts": ["a" * 10_001]}).encode(), "application/json", 422, "longer than 10000"),
    (json.dumps({"texts": ["a"], "padding": "x" * (1 << 21)}).encode(), "application/json", 413, "over 1048576 bytes"),
    (b'{"texts": ["\\ud800 lone surrogate"]}', "application/json", 422, "not valid Unicode"),
])
def test_bad_input_gets_a_clear_4xx(http, body, content_type, status, message):
    response = http.post("/v1/classify", content=body, headers={"content-type": content_type})
    assert response.status_code == status, response.text
    assert message in json.dumps(response.json())


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
                           max_leaves=12)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=st.one_of(
    st.binary(max_size=200),
    JSON_VALUES.map(lambda value: json.dumps(value).encode()),
    st.lists(st.text(max_size=300), min_size=0, max_size=40).map(lambda texts: json.dumps({"texts": texts}).encode()),
    st.lists(JSON_VALUES, max_size=5).map(lambda texts: json.dumps({"texts": texts}).encode()),
))
def test_fuzzed_bodies_never_get_a_server_error(http, body):
    response = http.post("/v1/classify", content=body, headers={"content-type": "application/json"})
    assert response.status_code < 500, (body[:200], response.text[:500])
    assert response.status_code == 200 or "error" in response.json()


def test_triton_down_gives_503_with_the_reason_then_recovers(gateway_stack, http):
    assert http.post("/v1/classify", json={"texts": ["fine"]}).status_code == 200
    gateway_stack.manager.stop("triton")
    down = http.post("/v1/classify", json={"texts": ["fine"]})
    assert down.status_code == 503 and "Triton" in down.json()["error"]
    ready = http.get("/readyz")
    assert ready.status_code == 503 and "Triton" in ready.json()["error"]
    assert http.get("/healthz").status_code == 200  # the gateway itself stays up

    gateway_stack.up(with_airflow=False, progress=lambda _: None)
    deadline, status = time.monotonic() + 60, None
    while time.monotonic() < deadline:
        status = http.post("/v1/classify", json={"texts": ["fine again"]}).status_code
        if status == 200:
            break
        time.sleep(0.5)
    assert status == 200
    metrics = http.get("/metrics").text
    assert 'gateway_requests_total{model="gw_model",status="503"}' in metrics


def _metric(http: httpx.Client, name: str) -> float:
    """The metric ``name`` summed over its labels (every served model)."""
    values = [float(line.rsplit(" ", 1)[1]) for line in http.get("/metrics").text.splitlines()
              if line.startswith(name + " ") or line.startswith(name + "{")]
    assert values, f"{name} not in /metrics"
    return sum(values)


def _log_caught_up(http: httpx.Client, timeout_s: float = 10.0) -> None:
    """Wait until every prediction served so far has been written (writes are batched)."""
    deadline = time.monotonic() + timeout_s
    while _metric(http, "prediction_log_written") < _metric(http, "gateway_predictions_total"):
        assert time.monotonic() < deadline, "the prediction log did not catch up"
        time.sleep(0.1)


def test_every_served_prediction_is_in_the_log(gateway_stack, http):
    engine = plog.create_engine(gateway_stack.settings.prediction_log_url)
    _log_caught_up(http)
    before = plog.count(engine)
    served = 0
    for index in range(40):
        texts = [f"text number {index} was good"] * (1 + index % 3)
        response = http.post("/v1/classify", json={"texts": texts})
        assert response.status_code == 200
        served += len(response.json()["predictions"])
    _log_caught_up(http)
    assert plog.count(engine) == before + served
    latest = plog.read_window(engine, time.time() - 60, time.time() + 1).iloc[-1]
    assert latest["model"] == MODEL and latest["model_version"] == "1" and latest["token_count"] >= 2
    assert latest["text"] is None
    metrics = http.get("/metrics").text
    assert "prediction_log_written" in metrics and "gateway_request_latency_seconds_bucket" in metrics


RAW_TEXTS = (
    "A fine film.<br /><br />The cast<BR>was great.",
    "  tabs\tand\n\nnew lines   everywhere  ",
    "Café crème, naïve façade — déjà vu 🎬",
    "<br/>",
    "a very long review " * 400,
)


def test_raw_texts_are_served_as_the_evaluation_reads_them(gateway_stack, http, exported_onnx):
    """Serving parity: raw texts (HTML breaks, odd whitespace, unicode, very long) through the
    gateway and Triton give the evaluation's probabilities for the same raw texts, which training
    and evaluation see normalised by ``serving.text``; the log records the normalised length."""
    from monitoring.features import softmax
    from serving.text import normalise_text
    from tasks.modeling import load_tokenizer
    from tasks.onnx_model import onnx_logits

    expected = softmax(onnx_logits(exported_onnx / "model.onnx", load_tokenizer(exported_onnx),
                                   [normalise_text(text) for text in RAW_TEXTS], 32, batch_size=1))
    served = []
    for text in RAW_TEXTS:  # one text per request, as the evaluation ran them
        response = http.post("/v1/classify", json={"texts": [text]})
        assert response.status_code == 200, response.text
        served.append([response.json()["predictions"][0]["probabilities"][label] for label in ("negative", "positive")])
    assert np.abs(np.array(served) - expected).max() < 1e-4
    engine = plog.create_engine(gateway_stack.settings.prediction_log_url)
    _log_caught_up(http)
    logged = plog.read_window(engine, time.time() - 60, time.time() + 1).sort_values("id").tail(len(RAW_TEXTS))
    assert logged["text_chars"].tolist() == [len(normalise_text(text)) for text in RAW_TEXTS]


def _metric_names(text: str) -> set[str]:
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_every_metric_the_dashboard_and_alerts_use_is_exported(gateway_stack, http):
    """The Grafana dashboard and the Prometheus alerts name metrics that the live gateway and Triton
    really export (GPU metrics only exist on GPU hosts)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    assert http.post("/v1/classify", json={"texts": ["good", "bad"]}).status_code == 200
    settings = gateway_stack.settings
    exported = _metric_names(http.get("/metrics").text)
    exported |= _metric_names(httpx.get(f"http://{settings.host}:{settings.triton_metrics_port}/metrics").text)
    texts = [(root / "infra" / "grafana" / "dashboards" / "serving.json").read_text(),
             (root / "infra" / "prometheus" / "alerts.yml").read_text()]
    used = {name for text in texts for name in re.findall(r"\b(?:nv|gateway|prediction_log|prediction_journal)_[a-z_]+\b", text)}
    missing = sorted(name for name in used - exported if not name.startswith("nv_gpu_"))
    assert len(used) > 10 and not missing, f"not exported: {missing}"


def test_feedback_attaches_true_labels_to_served_predictions(gateway_stack, http):
    """Ids come back from classify, feedback by those ids is stored against the logged predictions,
    and labels are checked against the served version's labels (read from Triton)."""
    response = http.post("/v1/classify", json={"texts": ["good great film", "awful boring plot"]})
    assert response.status_code == 200, response.text
    ids = [prediction["prediction_id"] for prediction in response.json()["predictions"]]
    _log_caught_up(http)
    stored = http.post("/v1/feedback", json={"items": [{"prediction_id": ids[0], "label": "negative"},
                                                       {"prediction_id": ids[1], "label": "negative"},
                                                       {"prediction_id": "f" * 32, "label": "positive"}]})
    assert stored.status_code == 200, stored.text
    assert stored.json() == {"stored": 2, "unknown_ids": ["f" * 32]}
    wrong = http.post("/v1/feedback", json={"items": [{"prediction_id": ids[0], "label": "neutral"}]})
    assert wrong.status_code == 422 and "not labels of" in wrong.json()["error"]
    engine = plog.create_engine(gateway_stack.settings.prediction_log_url)
    labelled = plog.read_labelled(engine, time.time() - 60, time.time() + 1)
    assert set(labelled["prediction_id"]) == set(ids) and set(labelled["true_label"]) == {"negative"}
    metrics = http.get("/metrics").text
    assert 'gateway_feedback_requests_total{model="gw_model",status="422"} 1.0' in metrics
    assert 'gateway_feedback_total{model="gw_model"} 2.0' in metrics


def test_a_second_model_answers_on_its_own_route_with_its_own_metrics(gateway_stack, http):
    """Two ensembles in one Triton, one gateway: each answers on its own route and is counted and logged
    under its own name; a model not served is a 404 that lists the served ones."""
    assert http.get("/v1/models").json() == {"default": MODEL, "models": [MODEL, SECOND_MODEL]}
    before = _metric_value(http.get("/metrics").text, f'gateway_predictions_total{{model="{MODEL}"}}')
    second = http.post(f"/v1/models/{SECOND_MODEL}/classify", json={"texts": ["a match", "a merger", "a goal"]})
    assert second.status_code == 200, second.text
    assert second.json()["model"] == SECOND_MODEL
    assert {prediction["label"] for prediction in second.json()["predictions"]} <= set(SECOND_LABELS)
    assert set(second.json()["predictions"][0]["probabilities"]) == set(SECOND_LABELS)
    default = http.post(f"/v1/models/{MODEL}/classify", json={"texts": ["good film"]}).json()
    assert set(default["predictions"][0]["probabilities"]) == {"negative", "positive"}
    missing = http.post("/v1/models/nope/classify", json={"texts": ["x"]})
    assert missing.status_code == 404 and missing.json()["models"] == [MODEL, SECOND_MODEL]
    metrics = http.get("/metrics").text
    assert _metric_value(metrics, f'gateway_predictions_total{{model="{SECOND_MODEL}"}}') >= 3.0
    assert _metric_value(metrics, f'gateway_predictions_total{{model="{MODEL}"}}') == before + 1.0
    _log_caught_up(http)
    logged = plog.read_window(plog.create_engine(gateway_stack.settings.prediction_log_url), time.time() - 60,
                              time.time() + 1)
    ids = {prediction["prediction_id"] for prediction in second.json()["predictions"]}
    assert set(logged[logged["prediction_id"].isin(ids)]["model"]) == {SECOND_MODEL}


def _metric_value(page: str, sample: str) -> float:
    return next(float(line.rsplit(" ", 1)[1]) for line in page.splitlines() if line.startswith(sample + " "))


class GatewayTraffic:
    """Single-text classify requests through the gateway in a thread until stopped (at most 120 s)."""

    def __init__(self, url: str, path: str = "/v1/classify") -> None:
        import threading

        self.url, self.path, self.statuses = url, path, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        started = time.monotonic()
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self._stop.is_set() and time.monotonic() - started < 120:
                self.statuses.append(client.post(self.path, json={"texts": ["good great film"]}).status_code)
                time.sleep(0.05)

    def __enter__(self) -> GatewayTraffic:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def test_a_shadow_is_judged_on_copied_live_traffic_and_a_failed_one_blocks_the_switch(gateway_stack, http,
                                                                                       exported_onnx, evaluated,
                                                                                       prepared_data):
    """Runs last in this module: it promotes new versions of the gateway's model."""
    from pathlib import Path

    import mlflow

    from serving.shadow import shadow_model
    from serving.triton_client import TritonClient
    from tasks import model_aliases
    from tasks.config import PromoteConfig
    from tasks.errors import PromotionFailed
    from tasks.promote import PromotionTarget
    from tasks.promote import run as promote
    from tests.integration.test_registry_and_promotion import _register

    settings = gateway_stack.settings
    target = PromotionTarget(settings.triton_http_url, settings.triton_model_repository, settings.mlflow_url,
                             settings.prediction_log_url)
    config = PromoteConfig(registered_model="shadow-model", triton_model=MODEL, smoke_samples=4, shadow_requests=6,
                           shadow_minutes=2)
    predictions, triton = Path(evaluated.uri("predictions")), TritonClient(settings.triton_http_url)
    served_before = triton.ready_versions(MODEL)
    first = _register(settings, "shadow-model", "shadow-1", exported_onnx, evaluated.metrics)
    with GatewayTraffic(settings.gateway_url) as traffic:
        promote(config, target, exported_onnx, predictions, prepared_data, first, max_length=32)
    assert set(traffic.statuses) == {200}
    assert triton.ready_versions(MODEL) == [served_before[-1] + 1]
    assert not triton.is_ready(shadow_model(MODEL))
    assert not (settings.triton_model_repository / shadow_model(MODEL)).exists()
    run = mlflow.MlflowClient(settings.mlflow_url).get_run(
        mlflow.MlflowClient(settings.mlflow_url).get_model_version("shadow-model", first).run_id)
    # The same model shadowed itself: full agreement, both latencies side by side.
    assert run.data.metrics["shadow_requests"] >= 6 and run.data.metrics["shadow_agreement"] == 1.0
    assert run.data.metrics["shadow_p95_ms"] > 0 and run.data.metrics["shadow_champion_p95_ms"] > 0
    tags = model_aliases.version_tags(settings.mlflow_url, "shadow-model", first)
    assert tags["shadow"].startswith("shadow passed") and "switched_at" in tags

    # A challenger held to an impossible latency ratio: the shadow fails and nothing switches.
    second = _register(settings, "shadow-model", "shadow-2", exported_onnx, evaluated.metrics)
    strict = PromoteConfig(registered_model="shadow-model", triton_model=MODEL, smoke_samples=4, shadow_requests=3,
                           shadow_minutes=2, shadow_max_latency_ratio=1e-6)
    with GatewayTraffic(settings.gateway_url) as traffic, pytest.raises(PromotionFailed, match="shadow failed"):
        promote(strict, target, exported_onnx, predictions, prepared_data, second, max_length=32)
    assert set(traffic.statuses) == {200}
    assert triton.ready_versions(MODEL) == [served_before[-1] + 1] and not triton.is_ready(shadow_model(MODEL))
    assert model_aliases.alias_version(settings.mlflow_url, "shadow-model", "champion") == first
    assert "median call latency" in model_aliases.version_tags(settings.mlflow_url, "shadow-model", second)["shadow"]

    # A shadow of this model copies only this model's traffic: with requests to the second model alone,
    # none is copied and the shadow cannot be judged.
    third = _register(settings, "shadow-model", "shadow-3", exported_onnx, evaluated.metrics)
    starved = PromoteConfig(registered_model="shadow-model", triton_model=MODEL, smoke_samples=4, shadow_requests=3,
                            shadow_minutes=0.25)
    with GatewayTraffic(settings.gateway_url, f"/v1/models/{SECOND_MODEL}/classify") as traffic, \
            pytest.raises(PromotionFailed, match="only 0 of 3 requests were copied"):
        promote(starved, target, exported_onnx, predictions, prepared_data, third, max_length=32)
    assert traffic.statuses and set(traffic.statuses) == {200}
    assert model_aliases.alias_version(settings.mlflow_url, "shadow-model", "champion") == first
