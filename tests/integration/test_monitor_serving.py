"""monitor_serving end to end with ``dag.test()``: a prediction log holding a no-drift window and a
shifted window, the champion's reference written the way promotion writes it, the real MLflow
server; the no-drift window ends at the short-circuit, the shifted one triggers optimize_model."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from serving import prediction_log as plog
from monitoring.features import reference_features
from serving import model_repository as repo
from tasks.onnx_model import onnx_logits
from tasks.modeling import generate_texts, load_tokenizer
from monitoring.features import REFERENCE_FILE
from tasks.promote import write_reference

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL = "mon_model"
RUNNER = """
import json, sys
from datetime import datetime, timezone
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
assert not bag.import_errors, bag.import_errors
when = datetime.fromtimestamp(float(sys.argv[3]), tz=timezone.utc)
run = bag.dags["monitor_serving"].test(run_conf=json.loads(sys.argv[2]), logical_date=when)
states = {ti.task_id: ti.state for ti in run.get_task_instances()}
print("DAG_RUN", run.state, json.dumps({k: str(v) for k, v in states.items()}))
from airflow.models import DagRun
triggered = [{"run_id": r.run_id, "conf": r.conf} for r in DagRun.find(dag_id="optimize_model")]
print("TRIGGERED", json.dumps(triggered))
"""

pytestmark = pytest.mark.integration


def _log_rows(features, version: str, start: float, seconds: float) -> list[dict]:
    rows = []
    for index, item in enumerate(features.itertuples()):
        positive = item.confidence if item.predicted == "positive" else 1 - item.confidence
        rows.append(plog.Prediction(
            served_at=start + seconds * index / len(features), model=MODEL, model_version=version,
            text_chars=int(item.text_chars), token_count=int(item.token_count),
            unknown_tokens=int(round(item.unknown_share * item.token_count)), label=item.predicted,
            probabilities=(1 - positive, positive), latency_ms=3.0).row())
    return rows


def _features(onnx_dir: Path, texts: list[str]):
    logits = onnx_logits(onnx_dir / "model.onnx", load_tokenizer(onnx_dir), texts, 32, batch_size=1)
    return reference_features(logits, texts, ["negative", "positive"], onnx_dir / "tokenizer.json", 32)


def test_monitor_dag_reports_no_drift_then_triggers_on_shifted_traffic(local_services, airflow_database, exported_onnx,
                                                                       prepared_data, tmp_path):
    settings = local_services.settings
    repository = tmp_path / "models"
    version = repo.write_ensemble_version(repository, repo.ClassifierEnsemble(MODEL, ("negative", "positive"), 32),
                                          exported_onnx)
    predictions = tmp_path / "eval.parquet"
    import pandas as pd

    from tasks.splits import read_split

    test_texts = read_split(prepared_data, "test")["text"].tolist()
    logits = onnx_logits(exported_onnx / "model.onnx", load_tokenizer(exported_onnx), test_texts, 32, batch_size=1)
    frame = pd.DataFrame({"label": 0, "prediction": logits.argmax(1), "logit_0": logits[:, 0], "logit_1": logits[:, 1]})
    frame.to_parquet(predictions)
    write_reference(predictions, prepared_data, exported_onnx, ["negative", "positive"], 32,
                    repository / MODEL / str(version) / REFERENCE_FILE)

    log_url = f"sqlite:///{tmp_path / 'predictions.db'}"
    engine = plog.create_engine(log_url)
    quiet_end, shifted_end = time.time() - 3600, time.time()
    rng = random.Random(3)
    shifted_texts = [" ".join(rng.choice(["lol", "omg", "#fail", "@user", "great"]) for _ in range(rng.randint(1, 3)))
                     for _ in range(200)]
    with engine.begin() as connection:
        connection.execute(plog.PREDICTIONS.insert(), _log_rows(
            _features(exported_onnx, generate_texts(200, seed=31)[0]), str(version), quiet_end - 600, 540))
        connection.execute(plog.PREDICTIONS.insert(), _log_rows(
            _features(exported_onnx, shifted_texts), str(version), shifted_end - 600, 540))

    home = tmp_path / "home"
    env = local_services.environment() | airflow_database(home / "airflow") | {
        "PIPELINE_HOME": str(home), "PIPELINE_PREDICTION_LOG_URL": log_url,
        "PIPELINE_TRITON_MODEL_REPOSITORY": str(repository), "PIPELINE_SERVING_MODEL": MODEL,
        "PIPELINE_GATEWAY_URL": "",
    }

    def run_monitor(window_end: float) -> dict:
        conf = {"window_minutes": 15, "min_rows": 100, "persist_windows": 1, "cooldown_minutes": 0,
                "retrain_conf": json.dumps({"data_source": "/data/labelled", "max_train": 300})}
        done = subprocess.run([sys.executable, "-c", RUNNER, str(REPO_ROOT / "dags"), json.dumps(conf),
                               str(window_end)], env=env, capture_output=True, text=True, timeout=600)
        output = done.stdout + done.stderr
        line = [row for row in done.stdout.splitlines() if row.startswith("DAG_RUN")]
        assert done.returncode == 0 and line, output[-4000:]
        triggered = [row for row in done.stdout.splitlines() if row.startswith("TRIGGERED")]
        return {"state": line[0].split()[1], "tasks": json.loads(line[0].split(" ", 2)[2]), "output": output,
                "triggered": json.loads(triggered[0].split(" ", 1)[1]) if triggered else None}

    quiet = run_monitor(quiet_end)
    assert quiet["tasks"]["check_window"] == "success", quiet["output"][-3000:]
    assert quiet["tasks"]["trigger_optimize_model"] == "skipped"
    shifted = run_monitor(shifted_end)
    assert shifted["tasks"]["check_window"] == "success" and shifted["tasks"]["should_trigger"] == "success"
    assert shifted["tasks"]["trigger_optimize_model"] == "success", shifted["output"][-4000:]
    # The triggered run carries the retrain params, the reason and the evidence, under a traceable run id.
    (optimize_run,) = shifted["triggered"]
    assert optimize_run["run_id"].startswith("monitor__")
    assert optimize_run["conf"]["data_source"] == "/data/labelled" and optimize_run["conf"]["max_train"] == 300
    # ... and retrains the model this monitor watches, under its own names.
    assert (optimize_run["conf"]["triton_model"], optimize_run["conf"]["registered_model"]) == (MODEL, "text-classifier")
    assert "output drift" in optimize_run["conf"]["trigger_reason"] and optimize_run["conf"]["trigger_kind"] == "drift"
    evidence = json.loads(optimize_run["conf"]["trigger_evidence"])
    assert evidence["windows"] and evidence["kind"] == "drift" and evidence["champion_version"] == str(version)

    windows = sorted((home / "monitoring" / "windows").iterdir())
    summaries = [json.loads((folder / "summary.json").read_text()) for folder in windows]
    statuses = sorted(summary["verdict"]["status"] for summary in summaries)
    assert statuses == ["drift", "ok"]
    drifted = next(s for s in summaries if s["verdict"]["status"] == "drift")
    assert drifted["decision"]["trigger"] and "output drift" in drifted["decision"]["reason"]
    assert json.loads(drifted["trigger_conf"]["trigger_evidence"])["windows"]

    import mlflow

    mlflow.set_tracking_uri(settings.mlflow_url)
    runs = mlflow.search_runs(experiment_names=["monitoring"])
    assert set(runs["tags.status"]) >= {"ok", "drift"}
    artifacts = mlflow.MlflowClient().list_artifacts(runs[runs["tags.status"] == "drift"]["run_id"].iloc[0])
    assert {item.path for item in artifacts} >= {"summary.json", "drift_report.html"}
    assert np.isfinite(runs["metrics.latency_p95_ms"]).all()
