"""The Kubeflow pipeline compiles (in .venv-kfp, `make venv-kfp`) and calls the same tasks.pipeline
functions as the Airflow DAG, with the arguments those functions take."""

import inspect
import subprocess
from pathlib import Path

import pytest
import yaml

from tasks import pipeline

ROOT = Path(__file__).resolve().parents[2]
KFP_PYTHON = ROOT / ".venv-kfp" / "bin" / "python"
UPSTREAM = ("data", "first", "second")  # run_step's positional upstream results, in order


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    assert KFP_PYTHON.exists(), "the Kubeflow compiler environment is missing: run `make venv-kfp`"
    target = tmp_path_factory.mktemp("kfp") / "optimize_model.yaml"
    done = subprocess.run([str(KFP_PYTHON), str(ROOT / "infra" / "kubeflow" / "pipeline.py"), "--output", str(target),
                           "--mlflow-url", "http://mlflow.ml:5000"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    documents = list(yaml.safe_load_all(target.read_text()))
    return {"spec": documents[0], "platform": documents[0].get("platforms") or documents[-1].get("platforms")}


def _tasks(spec: dict) -> dict[str, dict]:
    """Every task of the pipeline, the ones inside the data-changed condition included."""
    tasks = dict(spec["root"]["dag"]["tasks"])
    for name, component in spec["components"].items():
        tasks.update(component.get("dag", {}).get("tasks", {}))
    return tasks


def _constant(task: dict, name: str):
    value = task["inputs"]["parameters"].get(name, {})
    return value.get("runtimeValue", {}).get("constant")


def test_each_step_calls_a_pipeline_function_with_the_arguments_it_takes(compiled):
    called = []
    for task in _tasks(compiled["spec"]).values():
        step = _constant(task, "step")
        if step is None:
            continue
        function = getattr(pipeline, step)  # AttributeError: the pipeline names a function that does not exist
        upstream = [key for key in UPSTREAM if key in task["inputs"]["parameters"]]
        parameters = list(inspect.signature(function).parameters)
        # settings, config, run_id, then one parameter per upstream result; ``name`` only where it exists.
        assert len(parameters) >= 3 + len(upstream) and parameters[:3] == ["settings", "config", "run_id"], step
        if _constant(task, "name"):
            assert "name" in parameters, step
        called.append((step, _constant(task, "name") or ""))
    assert sorted(called) == sorted([
        ("prepare_data", ""), ("finetune_teacher", ""), ("distill_student", ""), ("prune_student", ""),
        ("export_onnx", "onnx_fp32"), ("export_onnx", "student_onnx_fp32"), ("export_onnx", "pruned_onnx_fp32"),
        ("quantize_int8", "onnx_int8"), ("quantize_int8", "student_int8"), ("quantize_int8", "pruned_int8"),
        ("register_candidates", ""), ("gate_and_promote", ""),
    ])
    # Every candidate the evaluation expects comes in as one input of the evaluate step.
    evaluate_inputs = set(compiled["spec"]["components"]["comp-evaluate"]["inputDefinitions"]["parameters"])
    assert {step for step, _, _ in pipeline.CANDIDATES.values()} <= evaluate_inputs


def test_training_runs_only_when_the_data_changed(compiled):
    root = compiled["spec"]["root"]["dag"]["tasks"]
    condition = next(task for task in root.values() if "triggerPolicy" in task)
    assert "data-changed-Output" in condition["triggerPolicy"]["condition"]
    assert {_constant(task, "step") for task in root.values()} == {"prepare_data", None}  # the rest is inside


def test_every_step_runs_the_project_image_with_the_shared_volumes(compiled):
    executors = compiled["spec"]["deploymentSpec"]["executors"]
    assert executors
    for name, executor in executors.items():
        container = executor["container"]
        assert container["image"] == "transformer-optimization/project:0.1.0", name
        env = {item["name"]: item["value"] for item in container["env"]}
        assert env["PIPELINE_RUNS_DIR"] == "/data/runs" and env["PIPELINE_TRITON_MODEL_REPOSITORY"] == "/models"
        assert env["PIPELINE_MLFLOW_TRACKING_URI"] == "http://mlflow.ml:5000"  # from the compile flag
        assert env["MLFLOW_DISABLE_TELEMETRY"] == "true"
    mounts = compiled["platform"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(mounts) == set(executors)
    for executor in mounts.values():
        assert {(m["constant"], m["mountPath"]) for m in executor["pvcMount"]} == {
            ("pipeline-data", "/data"), ("triton-models", "/models")}
