"""The Kubeflow pipeline compiles (in .venv-kfp, `make venv-kfp`), is the recipe's graph, and calls the
same tasks.pipeline functions as the Airflow DAG, with the arguments those functions take."""

import importlib
import inspect
import subprocess
from pathlib import Path

import pytest
import yaml

from tasks import pipeline
from tasks.recipe import OPTIMIZE_MODEL

ROOT = Path(__file__).resolve().parents[2]
KFP_PYTHON = ROOT / ".venv-kfp" / "bin" / "python"
UPSTREAM = ("data", "first", "second", "third")  # run_step's positional upstream results, in order


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    assert KFP_PYTHON.exists(), "the Kubeflow compiler environment is missing: run `make venv-kfp`"
    target = tmp_path_factory.mktemp("kfp") / "optimize_model.yaml"
    done = subprocess.run([str(KFP_PYTHON), str(ROOT / "infra" / "kubeflow" / "pipeline.py"), "--output", str(target),
                           "--mlflow-url", "http://mlflow.ml:5000"], capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
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
        module, name = step.split(".")
        function = getattr(importlib.import_module(f"tasks.{module}"), name)  # AttributeError: no such function
        upstream = [key for key in UPSTREAM if key in task["inputs"]["parameters"]]
        parameters = [name for name, parameter in inspect.signature(function).parameters.items()
                      if parameter.default is inspect.Parameter.empty]  # optional ones are not passed
        # settings, config, run_id, then one parameter per upstream result.
        assert parameters[:3] == ["settings", "config", "run_id"], step
        assert len(parameters) == 3 + len(upstream), (step, parameters, upstream)
        called.append(step)
    assert sorted(called) == sorted(["pipeline.prepare_data", "pipeline.register_candidates",
                                     "decisions.score_champion", "decisions.gate_candidates",
                                     "decisions.promote_winner"])


def test_the_stages_are_the_recipe_with_its_edges(compiled):
    tasks = _tasks(compiled["spec"])
    stages = {_constant(task, "stage_id"): task for task in tasks.values() if _constant(task, "stage_id")}
    assert sorted(stages) == sorted(stage.id for stage in OPTIMIZE_MODEL.stages)
    task_of_stage = {name: stage for name, task in tasks.items() for stage in [_constant(task, "stage_id")] if stage}
    for stage in OPTIMIZE_MODEL.stages:
        parameters = stages[stage.id]["inputs"]["parameters"]
        for key, source in stage.inputs.items():
            producer = parameters[key]["taskOutputParameter"]["producerTask"]
            assert task_of_stage[producer] == source, (stage.id, key)
    # Every candidate's stage comes in as one slot of the evaluate step.
    evaluate_task = next(task for task in tasks.values() if task["componentRef"]["name"] == "comp-evaluate")
    slots = evaluate_task["inputs"]["parameters"]
    producers = [stage.id for stage in OPTIMIZE_MODEL.stages if stage.candidate]
    assert _constant(evaluate_task, "slot_stages") == __import__("json").dumps(producers)
    for index, stage_id in enumerate(producers):
        assert task_of_stage[slots[f"s{index}"]["taskOutputParameter"]["producerTask"]] == stage_id


def test_training_runs_only_when_something_changed_since_the_champion(compiled):
    root = compiled["spec"]["root"]["dag"]["tasks"]
    condition = next(task for task in root.values() if "triggerPolicy" in task)
    assert "changed-since-champion-Output" in condition["triggerPolicy"]["condition"]
    assert {_constant(task, "step") for task in root.values()} == {"pipeline.prepare_data", None}  # the rest is inside


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
