"""optimize_model end to end with ``dag.test()`` on a tiny model, against the real MLflow and Triton."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.switched_off_run import assert_switched_off_run

REPO_ROOT = Path(__file__).resolve().parents[2]
RUNNER = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
assert not bag.import_errors, bag.import_errors
run = bag.dags["optimize_model"].test(run_conf=json.loads(sys.argv[2]))
print("DAG_RUN_STATE", run.state, run.run_id)
for ti in run.get_task_instances():
    print("TASK_STATE", ti.task_id, ti.state)
"""

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def airflow_env(local_services, airflow_database, tmp_path_factory) -> dict[str, str]:
    """An Airflow home with a migrated SQLite database, shared by the DAG runs of this module."""
    return local_services.environment() | airflow_database(tmp_path_factory.mktemp("airflow"))


def _run_dag(env: dict[str, str], conf: dict) -> tuple[str, str, dict[str, str], str]:
    """Run optimize_model once with ``dag.test()``: (run state, run id, task id -> state, output)."""
    result = subprocess.run([sys.executable, "-c", RUNNER, str(REPO_ROOT / "dags"), json.dumps(conf)], env=env,
                            capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    lines = [line.split() for line in result.stdout.splitlines()]
    state_line = [line for line in lines if line[:1] == ["DAG_RUN_STATE"]]
    assert state_line, output[-4000:]
    tasks = {line[1]: line[2] for line in lines if line[:1] == ["TASK_STATE"] and len(line) == 3}
    return state_line[0][1], state_line[0][2], tasks, output


def test_dag_test_runs_every_task_and_promotes(local_services, airflow_env, tiny_model, labelled_csv):
    from tasks.settings import safe_name

    settings = local_services.settings
    env = airflow_env
    conf = {
        "data_source": str(labelled_csv), "teacher": str(tiny_model), "epochs": 3.0, "learning_rate": 5e-3,
        "max_length": 32, "registered_model": "dagtest-model", "triton_model": "dagtest_model",
        "student_layers": 1, "distill_epochs": 3.0, "prune_heads": 0.5, "prune_ffn": 0.5, "prune_epochs": 2.0,
        "sparsify": True, "sparsity": 0.5, "sparsify_epochs": 2.0,  # the technique added through the recipe alone
        "target": "gpu",  # on this CPU machine: the GPU branch is skipped and the CPU candidates compete
    }
    state, run_id, tasks, output = _run_dag(env, conf)
    assert state == "success", output[-4000:]
    from tasks.recipe import OPTIMIZE_MODEL, Target

    gpu_stages = {stage.id for stage in OPTIMIZE_MODEL.on(Target.GPU)}
    assert {task for task, task_state in tasks.items() if task_state == "skipped"} == gpu_stages, tasks
    assert {task for task, task_state in tasks.items() if task_state == "success"} == set(tasks) - gpu_stages, tasks
    assert "target gpu asked for, but no NVIDIA GPU is visible to CUDA on this worker" in output

    summary_path = settings.runs_dir / safe_name(run_id) / "summary.json"
    # Every task that ran recorded what it cost (on_success_callback, in the task's process).
    from tasks.cost import read_costs

    costs = read_costs(settings.runs_dir / safe_name(run_id))
    assert set(costs) == set(tasks) - gpu_stages, sorted(costs)
    assert all(cost["seconds"] >= 0 and cost["peak_memory_mb"] > 50 for cost in costs.values())
    # Candidates are evaluated in processes of their own: their peak shows through the children's.
    assert costs["evaluate"]["peak_memory_children_mb"] > 50
    summary = json.loads(summary_path.read_text())
    # Each decision left its record for the report (and for a retry of the task after it).
    decisions = summary_path.parent / "decisions"
    assert {path.name for path in decisions.iterdir()} == {
        "plan.json", "target.json", "champion.json", "gates.json", "promotion.json"}
    gpu_candidates = {stage.candidate for stage in OPTIMIZE_MODEL.on(Target.GPU) if stage.candidate}
    assert set(summary["candidates"]) == set(OPTIMIZE_MODEL.candidates) - gpu_candidates == {
        "teacher_pytorch", "onnx_fp32", "onnx_int8", "student_onnx_fp32", "student_int8", "pruned_onnx_fp32",
        "pruned_int8", "sparse_onnx_fp32"}
    # The GPU candidates are listed as not built, each with the worker's reason.
    assert set(summary["switched_off"]) == gpu_candidates
    assert all("no NVIDIA GPU is visible" in reason for reason in summary["switched_off"].values())
    assert summary["target"]["requested"] == "gpu" and summary["target"]["gpu_branch"] is False
    assert all(metrics["peak_memory_mb"] > 0 and metrics["throughput_per_s"] > 0
               for metrics in summary["candidates"].values())
    assert summary["promotion"]["status"] == "success"
    winner = summary["winner"]
    assert all(gate["decision"] == "pass" for gate in summary["gates"][winner])
    passing = [name for name, gates in summary["gates"].items() if all(g["decision"] == "pass" for g in gates)]
    fastest = min(summary["candidates"][name]["latency_p50_ms"] for name in passing)
    as_fast = [name for name in passing if summary["candidates"][name]["latency_p50_ms"] <= fastest * 1.1]
    assert winner in as_fast  # within the 10% latency noise margin of the fastest: the most accurate of those
    assert summary["candidates"][winner]["accuracy"] == max(summary["candidates"][name]["accuracy"] for name in as_fast)
    assert {gate["name"] for gate in summary["gates"][winner]} >= {"accuracy", "accuracy_floor", "finite_outputs"}
    assert "95% interval" in (summary_path.parent / "report" / "report.md").read_text()
    # make bench-full measures what the DAG built and promoted, from the run folder (one latency round here).
    from bench import full

    measured = full.measure_run(summary_path.parent, conf, max_length=32, rounds=1, progress=lambda _: None)
    assert measured["winner"] == winner and measured["accuracy"]["test_texts"] > 0
    assert measured["accuracy"]["winner_accuracy"] == pytest.approx(summary["candidates"][winner]["accuracy"])
    assert measured["latency"]["one_thread"]["speedup"] > 0 and set(measured["targets"]) == set(full.TARGETS)

    from serving.triton_client import TritonClient
    from tasks import model_aliases

    int8_tags = model_aliases.version_tags(settings.mlflow_url, "dagtest-model", summary["versions"]["onnx_int8"])
    assert int8_tags["source_candidate"] == "onnx_fp32"
    assert int8_tags["source_version"] == summary["versions"]["onnx_fp32"]
    assert all(int8_tags[key] for key in ("data_hash", "config_hash", "teacher_id", "code_version", "technique"))
    assert any(key.startswith("gate.") for key in int8_tags)
    assert int8_tags["candidate"] == "onnx_int8" and int8_tags["role"] == "candidate"
    # The FP32 teacher is registered too, as the reference every candidate's lineage names; never gated.
    reference = summary["reference_version"]
    assert reference and reference not in summary["versions"].values() and "teacher_pytorch" not in summary["gates"]
    reference_tags = model_aliases.version_tags(settings.mlflow_url, "dagtest-model", reference)
    assert reference_tags["role"] == "reference" and reference_tags["candidate"] == "teacher_pytorch"
    assert int8_tags["reference_version"] == reference
    fp32_tags = model_aliases.version_tags(settings.mlflow_url, "dagtest-model", summary["versions"]["onnx_fp32"])
    assert fp32_tags["source_version"] == reference
    # Reviewers find the readable report and the Pareto plot on the run's parent run.
    import mlflow

    artifacts = {item.path for item in mlflow.MlflowClient(settings.mlflow_url).list_artifacts(
        summary["mlflow_parent_run_id"])}
    assert {"summary.json", "report.md", "report.html", "pareto.png"} <= artifacts
    assert f"Promoted **{winner}**" in (summary_path.parent / "report" / "report.md").read_text()
    promoted_version = summary["versions"][winner]
    assert model_aliases.alias_version(settings.mlflow_url, "dagtest-model", "champion") == promoted_version
    client = TritonClient(settings.triton_http_url)
    assert client.ready_versions("dagtest_model") == [1]
    served = client.classify("dagtest_model", ["great wonderful film"])
    assert served["LOGITS"].shape == (1, 2) and np.isfinite(served["LOGITS"]).all()
    assert served["LABEL"][0] in {"negative", "positive"}

    # The same data, params, teacher and code again: the run stops at changed_since_champion and the champion stays.
    _, again_id, again_tasks, again_output = _run_dag(env, conf)
    assert "nothing changed: champion v" in again_output
    # Everything after the short-circuit is skipped, evaluate (trigger rule none_failed) included.
    assert {task for task, task_state in again_tasks.items() if task_state != "skipped"} == {
        "plan", "prepare_data", "changed_since_champion"}, again_tasks
    assert not (settings.runs_dir / safe_name(again_id) / "summary.json").exists()
    assert model_aliases.alias_version(settings.mlflow_url, "dagtest-model", "champion") == promoted_version

    # Triggered the way monitor_serving triggers (trigger_kind and evidence in the conf); the full
    # re-optimization is tests/dags/test_optimize_model_triggers.py (make test-slow).
    # Drift, but no labelled data arrived since the champion was trained: the run stops with that reason.
    drift = conf | {"trigger_kind": "drift", "trigger_reason": "test", "trigger_evidence": "{}"}
    _, _, drift_tasks, drift_output = _run_dag(env, drift)
    assert "no labelled data arrived since champion v" in drift_output
    assert {task for task, task_state in drift_tasks.items() if task_state != "skipped"} == {
        "plan", "prepare_data", "changed_since_champion"}, drift_tasks
    # A latency breach whose serving overhead alone exceeds the SLO: nothing to re-optimize, and MLflow says so.
    latency = conf | {"trigger_kind": "latency", "trigger_reason": "test",
                      "trigger_evidence": json.dumps({"slo_p95_ms": 1.0, "latency_p95_ms": 500.0})}
    _, latency_id, latency_tasks, latency_output = _run_dag(env, latency)
    assert "no latency budget is left" in latency_output
    assert {task for task, task_state in latency_tasks.items() if task_state != "skipped"} == {"plan"}, latency_tasks
    import mlflow

    stopped = mlflow.MlflowClient(settings.mlflow_url).search_runs(
        [mlflow.MlflowClient(settings.mlflow_url).get_experiment_by_name("optimize_model").experiment_id],
        f"tags.pipeline_run_id = '{latency_id}'")
    assert [run.data.tags["outcome"] for run in stopped] == ["skipped"]
    assert model_aliases.alias_version(settings.mlflow_url, "dagtest-model", "champion") == promoted_version


@pytest.mark.slow
def test_dag_test_with_techniques_switched_off_still_evaluates_and_registers(local_services, airflow_env, tiny_model,
                                                                              labelled_csv):
    """distill and quantize off (so prune off too): their tasks are SKIPPED with the reason, and the
    teacher's two FP32 candidates are evaluated, registered, gated and one of them promoted.

    In `make test-slow` only: `make test` makes the same assertions on the same conf through the
    scheduler (tests/integration/test_local_stack.py), a second run of this DAG would only repeat them."""
    from tasks import model_aliases
    from tasks.settings import safe_name

    settings = local_services.settings
    conf = {
        "data_source": str(labelled_csv), "teacher": str(tiny_model), "epochs": 3.0, "learning_rate": 5e-3,
        "max_length": 32, "registered_model": "dagtest-lite", "triton_model": "dagtest_lite",
        "distill": False, "prune": False, "quantize": False,
    }
    state, run_id, tasks, output = _run_dag(airflow_env, conf)
    assert state == "success", output[-4000:]
    summary = assert_switched_off_run(tasks, settings.runs_dir / safe_name(run_id), lambda _task_id: output)
    assert model_aliases.alias_version(settings.mlflow_url, "dagtest-lite", "champion") == summary["versions"]["onnx_fp32"]


@pytest.mark.slow
def test_a_teacher_that_cannot_be_fetched_fails_the_task_that_fetches_it_saying_why(airflow_env, labelled_csv,
                                                                                    tmp_path):
    """No folder at the teacher's path and no champion yet (so `changed_since_champion` compares nothing):
    `finetune_teacher` fails at once, without a retry, with the one-line reason, and nothing after it runs.
    In `make test-slow` only: tests/unit/test_teacher_source.py checks every error itself."""
    missing = tmp_path / "no-such-teacher"
    conf = {"data_source": str(labelled_csv), "teacher": str(missing), "registered_model": "dagtest-no-teacher",
            "triton_model": "dagtest_no_teacher", "target": "cpu"}
    state, _, tasks, output = _run_dag(airflow_env, conf)
    assert state == "failed", output[-4000:]
    assert (tasks["plan"], tasks["changed_since_champion"], tasks["finetune_teacher"]) == (
        "success", "success", "failed"), (tasks, output[-4000:])
    assert {tasks[task] for task in ("export_onnx", "distill_student", "evaluate", "promote")} == {"upstream_failed"}
    assert f"teacher '{missing}': no such folder on this worker" in output, output[-4000:]
    assert "up_for_retry" not in output.lower(), output[-4000:]
