"""The served models side by side: parsing ``PIPELINE_EXTRA_MODELS`` and ``GATEWAY_MODELS``, and the
gateway's routes by model (a stand-in Triton per model, the real app over its ASGI interface)."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from monitoring.monitor import INVALID_OUTPUTS, parse_gateway_metrics
from serving import prediction_log as plog
from serving.gateway import GatewaySettings, create_app
from tasks.errors import ConfigError
from tasks.served_models import ServedModel, model_params, monitor_dag_id, parse_model_list, served_models

LABELS = {"sentiment": ["negative", "positive"], "topics": ["sports", "business", "science"]}


def test_the_default_model_comes_first_then_the_extra_ones():
    models = served_models({"PIPELINE_SERVING_MODEL": "sentiment", "PIPELINE_REGISTERED_MODEL": "sentiment-clf",
                            "PIPELINE_EXTRA_MODELS": " topics=topic-clf , news=news.clf ,"})
    assert models == (ServedModel("sentiment", "sentiment-clf"), ServedModel("topics", "topic-clf"),
                      ServedModel("news", "news.clf"))
    assert [monitor_dag_id(model, models[0]) for model in models] == [
        "monitor_serving", "monitor_serving__topics", "monitor_serving__news"]


def test_the_topic_model_is_served_by_default_and_an_empty_list_serves_only_the_default():
    assert served_models({}) == (ServedModel("text_classifier", "text-classifier"),
                                 ServedModel("topic_classifier", "topic-classifier"))
    assert served_models({"PIPELINE_EXTRA_MODELS": ""}) == (ServedModel("text_classifier", "text-classifier"),)


@pytest.mark.parametrize("text, message", [
    ("topics", "is not served=registered"), ("=topic-clf", "is not served=registered"),
    ("topics=", "is not served=registered"), ("top ics=clf", "must be letters, digits"),
    ("topics=clf/x", "must be letters, digits"), ("text_classifier=other", "served model names ['text_classifier']"),
    ("a=text-classifier", "registered model names ['text-classifier']"),
])
def test_bad_entries_say_what_is_wrong(text, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        served_models({"PIPELINE_EXTRA_MODELS": text})
    assert parse_model_list("") == ()


@pytest.mark.parametrize("models, message", [("a,,a", "twice"), ("a,b c", "not Triton model names")])
def test_bad_gateway_model_lists_are_refused(models, message):
    with pytest.raises(ValueError, match=message):
        GatewaySettings(models=models).served_models()
    assert GatewaySettings(model="solo").served_models() == ("solo",)
    assert GatewaySettings.from_env({"GATEWAY_MODELS": "b, a"}).served_models() == ("b", "a")


class StandInTriton:
    """One served model's Triton: answers with that model's labels, the first label for every text."""

    def __init__(self, model: str) -> None:
        self.model = model

    async def classify(self, texts: list[str]) -> dict:
        labels = LABELS[self.model]
        share = [1.0 / len(labels)] * len(labels)
        return {"version": "3" if self.model == "topics" else "1", "labels": labels, "label": [labels[0]] * len(texts),
                "probabilities": [share] * len(texts), "tokens": None, "unknown": None}

    async def known_labels(self) -> set[str] | None:
        return set(LABELS[self.model])

    async def readiness(self) -> str | None:
        return None

    async def close(self) -> None:
        return None


@pytest.fixture()
def client(tmp_path):
    settings = GatewaySettings(prediction_log_url=f"sqlite:///{tmp_path / 'log.db'}", models="sentiment,topics",
                               shadow_copies=0)
    with TestClient(create_app(settings, lambda model_settings: StandInTriton(model_settings.model))) as test_client:
        yield test_client


def test_each_model_answers_on_its_own_route_and_the_first_is_the_default(client):
    assert client.get("/v1/models").json() == {"default": "sentiment", "models": ["sentiment", "topics"]}
    topics = client.post("/v1/models/topics/classify", json={"texts": ["the match", "the market"]})
    assert topics.status_code == 200, topics.text
    assert topics.json()["model"] == "topics" and topics.json()["model_version"] == "3"
    assert set(topics.json()["predictions"][0]["probabilities"]) == set(LABELS["topics"])
    for path in ("/v1/classify", "/v1/models/sentiment/classify"):
        answer = client.post(path, json={"texts": ["fine"]}).json()
        assert answer["model"] == "sentiment" and answer["predictions"][0]["label"] == "negative"
    assert client.get("/readyz").json()["models"] == ["sentiment", "topics"]


def test_feedback_is_checked_against_the_labels_of_the_model_its_route_names(client):
    topic_id = client.post("/v1/models/topics/classify", json={"texts": ["goal"]}).json()["predictions"][0][
        "prediction_id"]
    deadline = time.monotonic() + 10  # the log writes in batches: wait until the prediction is written
    while client.app.state.prediction_log.stats.written < 1:
        assert time.monotonic() < deadline, "the prediction log did not catch up"
        time.sleep(0.02)
    stored = client.post("/v1/models/topics/feedback", json={"items": [{"prediction_id": topic_id, "label": "sports"}]})
    assert stored.status_code == 200 and stored.json()["stored"] == 1
    wrong = client.post("/v1/feedback", json={"items": [{"prediction_id": topic_id, "label": "sports"}]})
    assert wrong.status_code == 422 and "not labels of 'sentiment'" in wrong.json()["error"]
    other = client.post("/v1/feedback", json={"items": [{"prediction_id": topic_id, "label": "negative"}]})
    assert other.status_code == 422, other.text  # a sentiment label, but the prediction is the topic model's
    assert f"{topic_id} (topics)" in other.json()["error"] and "nothing was stored" in other.json()["error"]
    labelled = plog.read_labelled(plog.create_engine(client.app.state.settings.prediction_log_url), 0, 2e9)
    assert labelled["true_label"].tolist() == ["sports"]  # the refused label did not replace it
    invalid = client.post("/v1/models/topics/feedback", json={"items": []})
    assert invalid.status_code == 422 and "prediction_id" in invalid.json()["error"]  # the feedback example


def test_an_unknown_model_is_a_404_that_lists_the_served_ones(client):
    for path, body in (("/v1/models/weather/classify", {"texts": ["rain"]}),
                       ("/v1/models/weather/feedback", {"items": [{"prediction_id": "x", "label": "sun"}]}),
                       ("/v1/models/weather/classify", {"text": "not the classify body"})):
        answer = client.post(path, json=body)
        assert answer.status_code == 404
        assert answer.json() == {"error": "model 'weather' is not served here; the served models: sentiment, topics",
                                 "models": ["sentiment", "topics"]}


def test_metrics_are_labelled_per_model_and_the_monitor_reads_each_alone(client):
    for _ in range(3):
        client.post("/v1/models/topics/classify", json={"texts": ["a", "b"]})
    client.post("/v1/classify", json={"texts": ["x" * 20_000]})  # 422 for the default model
    client.post("/v1/models/weather/classify", json={"texts": ["rain"]})  # 404, neither model's
    page = client.get("/metrics").text
    assert 'gateway_predictions_total{model="topics"} 6.0' in page
    assert 'gateway_predictions_total{model="sentiment"} 0.0' in page
    assert parse_gateway_metrics(page, "topics") == {"200": 3.0, INVALID_OUTPUTS: 0.0}
    assert parse_gateway_metrics(page, "sentiment") == {"422": 1.0, INVALID_OUTPUTS: 0.0}
    assert 'gateway_requests_total{model="unknown",status="404"} 1.0' in page


def test_the_local_stack_serves_reconciles_and_monitors_every_model(tmp_path):
    from opsctl.services import gateway_spec, reconcile_spec
    from opsctl.settings import StackSettings

    settings = StackSettings.from_env({"PIPELINE_HOME": str(tmp_path), "PIPELINE_EXTRA_MODELS": "topics=topic-clf"})
    assert gateway_spec(settings, {}).env["GATEWAY_MODELS"] == "text_classifier,topics"
    argv = reconcile_spec(settings, {}).argv
    assert [argv[i + 1] for i, argument in enumerate(argv) if argument == "--model"] == [
        "text_classifier=text-classifier", "topics=topic-clf"]
    environment = settings.pipeline_environment()  # what Airflow's monitor DAG file reads
    assert served_models(environment) == (ServedModel("text_classifier", "text-classifier"),
                                          ServedModel("topics", "topic-clf"))


def test_the_multimodel_demo_trains_the_topic_model_under_its_own_names():
    from opsctl.demo_multimodel import TOPIC_PROFILE
    from tasks.pipeline import config_from_params

    topic = served_models({})[1]
    config = config_from_params(TOPIC_PROFILE | model_params(topic))
    assert (config.promote.registered_model, config.promote.triton_model) == ("topic-classifier", "topic_classifier")
    assert config.data.source == "demo:reuters8"


def test_compose_and_kubernetes_serve_reconcile_and_monitor_the_same_models():
    from pathlib import Path

    import yaml

    from tasks.reconcile import parse_args

    root = Path(__file__).resolve().parents[2]
    compose = yaml.safe_load((root / "docker-compose.yml").read_text())["services"]
    airflow = compose["airflow-worker"]["environment"]
    models = served_models(airflow)
    loop = parse_args(compose["reconcile"]["command"][3:], {})
    reconciled = [(config.triton_model, config.registered_model) for config in loop.configs]
    assert reconciled == [(model.served, model.registered) for model in models] and len(models) == 2
    assert compose["gateway"]["environment"]["GATEWAY_MODELS"].split(",") == [model.served for model in models]
    kubernetes = [doc for doc in yaml.safe_load_all((root / "infra" / "k8s" / "serving.yaml").read_text()) if doc]
    containers = {container["name"]: container for doc in kubernetes if doc.get("kind") == "Deployment"
                  for container in doc["spec"]["template"]["spec"]["containers"]}
    loop = parse_args(containers["reconcile"]["command"][3:], {})
    assert [(c.triton_model, c.registered_model) for c in loop.configs] == reconciled
    gateway_env = {item["name"]: item.get("value") for item in containers["gateway"]["env"]}
    assert gateway_env["GATEWAY_MODELS"].split(",") == [model.served for model in models]
    helm = yaml.safe_load((root / "infra" / "helm" / "airflow-values.yaml").read_text())
    helm_env = {item["name"]: item.get("value") for item in helm["env"]}
    assert served_models(helm_env) == models


def test_the_gateway_refuses_to_start_with_a_bad_model_list(monkeypatch):
    from serving.gateway import app_from_env

    monkeypatch.setenv("GATEWAY_MODELS", "sentiment,sentiment")
    with pytest.raises(SystemExit, match="GATEWAY_MODELS names a model twice"):
        app_from_env()
