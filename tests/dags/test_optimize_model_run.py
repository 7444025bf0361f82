"""optimize_model end to end with ``dag.test()`` on a tiny model, against the real MLflow and Triton."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
RUNNER = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
assert not bag.import_errors, bag.import_errors
run = bag.dags["optimize_model"].test(run_conf=json.loads(sys.argv[2]))
print("DAG_RUN_STATE", run.state, run.run_id)
"""

pytestmark = pytest.mark.integration


def _airflow_env(stack, home: Path) -> dict[str, str]:
    env = stack.environment()
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    })
    return env


def test_dag_test_runs_every_task_and_promotes(local_services, tiny_model, labelled_csv, tmp_path):
    settings = local_services.settings
    env = _airflow_env(local_services, tmp_path / "airflow")
    (tmp_path / "airflow").mkdir()
    migrate = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, capture_output=True,
                             text=True, timeout=300)
    assert migrate.returncode == 0, migrate.stdout[-2000:] + migrate.stderr[-2000:]
    conf = {
        "data_source": str(labelled_csv), "teacher": str(tiny_model), "epochs": 3.0, "learning_rate": 5e-3,
        "max_length": 32, "registered_model": "dagtest-model", "triton_model": "dagtest_model",
        "student_layers": 1, "distill_epochs": 3.0, "prune_heads": 0.5, "prune_ffn": 0.5, "prune_epochs": 2.0,
    }
    result = subprocess.run([sys.executable, "-c", RUNNER, str(REPO_ROOT / "dags"), json.dumps(conf)], env=env,
                            capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    state_line = [line for line in result.stdout.splitlines() if line.startswith("DAG_RUN_STATE")]
    assert state_line and state_line[0].split()[1] == "success", output[-4000:]

    summaries = list(settings.runs_dir.glob("*/summary.json"))
    assert len(summaries) == 1
    summary = json.loads(summaries[0].read_text())
    assert set(summary["candidates"]) == {"teacher_pytorch", "onnx_fp32", "onnx_int8", "student_onnx_fp32",
                                          "student_int8", "pruned_onnx_fp32", "pruned_int8"}
    assert all(metrics["peak_memory_mb"] > 0 and metrics["throughput_per_s"] > 0
               for metrics in summary["candidates"].values())
    assert summary["promotion"]["status"] == "success"
    winner = summary["winner"]
    assert all(gate["decision"] == "pass" for gate in summary["gates"][winner])
    passing = [name for name, gates in summary["gates"].items() if all(g["decision"] == "pass" for g in gates)]
    assert summary["candidates"][winner]["latency_p50_ms"] == min(
        summary["candidates"][name]["latency_p50_ms"] for name in passing)

    from serving.triton_client import TritonClient
    from tasks import registry

    int8_tags = registry.version_tags(settings.mlflow_url, "dagtest-model", summary["versions"]["onnx_int8"])
    assert int8_tags["source_candidate"] == "onnx_fp32"
    assert int8_tags["source_version"] == summary["versions"]["onnx_fp32"]
    assert int8_tags["code_version"] and int8_tags["data_hash"] and int8_tags["technique"]
    assert any(key.startswith("gate.") for key in int8_tags)
    assert int8_tags["candidate"] == "onnx_int8"
    # Reviewers find the readable report and the Pareto plot on the run's parent run.
    import mlflow

    artifacts = {item.path for item in mlflow.MlflowClient(settings.mlflow_url).list_artifacts(
        summary["mlflow_parent_run_id"])}
    assert {"summary.json", "report.md", "report.html", "pareto.png"} <= artifacts
    assert f"Promoted **{winner}**" in (summaries[0].parent / "report" / "report.md").read_text()
    promoted_version = summary["versions"][winner]
    assert registry.alias_version(settings.mlflow_url, "dagtest-model", "champion") == promoted_version
    client = TritonClient(settings.triton_http_url)
    assert client.ready_versions("dagtest_model") == [1]
    served = client.classify("dagtest_model", ["great wonderful film"])
    assert served["LOGITS"].shape == (1, 2) and np.isfinite(served["LOGITS"]).all()
    assert served["LABEL"][0] in {"negative", "positive"}

    # The same data and code again: the run stops at data_changed and the champion stays.
    again = subprocess.run([sys.executable, "-c", RUNNER, str(REPO_ROOT / "dags"), json.dumps(conf)], env=env,
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert "nothing changed: champion v" in again.stdout + again.stderr
    assert len(list(settings.runs_dir.glob("*/summary.json"))) == 1
    assert registry.alias_version(settings.mlflow_url, "dagtest-model", "champion") == promoted_version
