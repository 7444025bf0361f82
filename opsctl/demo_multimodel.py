"""``make demo-multimodel`` (after ``make demo``): a topic classifier served beside the sentiment one.

It trains the extra served model of ``PIPELINE_EXTRA_MODELS`` (``topic_classifier`` from the
registered model ``topic-classifier`` by default) on a multi-class data set (Reuters-21578 R8, eight
news topics) through optimize_model, with that model's registered and served names; the reconcile
loop and the gateway already know it. Then it asks each model on its own gateway route and runs each
model's monitor once.
"""

from __future__ import annotations

import json
import time

import httpx

from opsctl.demo import (DAG_ID, PROFILES, SAMPLE_TEXTS, follow_run, print_summary, stack_is_running,
                         trigger_and_follow)
from opsctl.services import LocalStack
from opsctl.settings import StackSettings
from tasks.served_models import ServedModel, model_params, monitor_dag_id

# The demo profile's budget on eight imbalanced news topics: two epochs, as the multi-class benchmark
# (bench/multiclass.py) found one epoch too few for the rare topics.
TOPIC_PROFILE = PROFILES["demo"] | {"data_source": "demo:reuters8", "epochs": 2.0}
TOPIC_TEXTS = (
    "The company said quarterly net profit rose 12 pct on higher sales and raised its dividend.",
    "Crude oil prices climbed after OPEC members agreed to cut output by one mln barrels per day.",
    "The central bank lowered its discount rate by half a point to support the money market.",
)


def run_multimodel_demo(settings: StackSettings, timeout_s: float = 2400.0, force: bool = False) -> int:
    """Train and serve the extra model, then ask both models and run both monitors; 0 when all worked."""
    stack = LocalStack(settings)
    if not stack_is_running(stack):
        return 1
    models = settings.served_models()
    if len(models) < 2:
        print("error: only one model is served: set PIPELINE_EXTRA_MODELS (e.g. topic_classifier=topic-classifier) "
              "and restart the stack with `make up`")
        return 1
    default, topic = models[0], models[1]
    conf = TOPIC_PROFILE | model_params(topic) | ({"force_retrain": True} if force else {})
    api, run_id, state = trigger_and_follow(settings, stack, conf, f"demo_multimodel__{topic.served}", timeout_s)
    if state != "success":
        print(f"error: the run ended as {state!r}. Task logs: {settings.airflow_url}/dags/{DAG_ID}/runs/{run_id}")
        return 1
    from tasks.settings import safe_name

    summary_path = settings.runs_dir / safe_name(run_id) / "summary.json"
    if summary_path.exists():
        print_summary(settings, DAG_ID, run_id, json.loads(summary_path.read_text()), samples=TOPIC_TEXTS)
    if not wait_until_served(settings.gateway_url, topic.served, timeout_s=180.0):
        return 1
    answered = [ask_model(settings.gateway_url, model, texts) for model, texts in
                ((default, SAMPLE_TEXTS), (topic, TOPIC_TEXTS))]
    judged = [run_monitor_once(api, settings, model, default) for model in (default, topic)]
    return 0 if all(answered) and all(judged) else 1


def wait_until_served(gateway_url: str, served: str, timeout_s: float) -> bool:
    """Wait until the gateway's /readyz no longer lists ``served`` as unavailable (the reconcile loop
    loads the new champion within its interval)."""
    deadline = time.monotonic() + timeout_s
    reason = "no answer from the gateway"
    while time.monotonic() < deadline:
        try:
            answer = httpx.get(f"{gateway_url}/readyz", timeout=10.0)
            unavailable = answer.json().get("unavailable", {}) if answer.status_code == 200 else {}
            reason = unavailable.get(served) or (f"HTTP {answer.status_code}" if answer.status_code != 200 else "")
        except (httpx.HTTPError, ValueError) as error:
            reason = str(error)
        if not reason:
            return True
        time.sleep(3)
    print(f"error: the gateway does not serve {served!r} after {timeout_s:.0f}s: {reason}")
    return False


def ask_model(gateway_url: str, model: ServedModel, texts: tuple[str, ...]) -> bool:
    """Classify ``texts`` on the model's own route and print each answer; False when it failed."""
    route = f"/v1/models/{model.served}/classify"
    answer = httpx.post(f"{gateway_url}{route}", json={"texts": list(texts)}, timeout=30.0)
    if answer.status_code != 200:
        print(f"error: {route} answered {answer.status_code}: {answer.text}")
        return False
    body = answer.json()
    print(f"\n== {route}: {body['model']} version {body['model_version']}")
    for text, prediction in zip(texts, body["predictions"], strict=True):
        print(f"   {prediction['label']:12s} p={max(prediction['probabilities'].values()):.3f}  {text}")
    return True


def run_monitor_once(api, settings: StackSettings, model: ServedModel, default: ServedModel) -> bool:
    """One run of the model's own monitor DAG; prints its verdict (False when the run failed)."""
    dag_id = monitor_dag_id(model, default)
    api.wait_for_dag(dag_id)
    api.unpause(dag_id)
    run_id = f"demo_multimodel__{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
    api.trigger(dag_id, {"window_minutes": 60}, run_id=run_id)
    print(f"\n== {dag_id} (watches {model.served}) run {run_id}")
    state = follow_run(api, dag_id, run_id, timeout_s=600)
    if state != "success":
        print(f"error: {dag_id} run {run_id} ended as {state!r}: {settings.airflow_url}/dags/{dag_id}/runs/{run_id}")
        return False
    result = api.xcom(dag_id, run_id, "check_window") or {}
    print(f"   {model.served}: {(result.get('decision') or {}).get('reason', 'no verdict')}")
    return True
