"""Every DAG file imports cleanly, fast, and without touching the network or a database."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

DAGS_FOLDER = Path(__file__).resolve().parents[2] / "dags"


@pytest.fixture()
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a DAG file opened a network connection at parse time")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture()
def dagbag(no_network):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS_FOLDER))


def test_every_dag_imports_without_errors(dagbag):
    assert dagbag.import_errors == {}
    assert {"optimize_model", "monitor_serving", "rollback_model"} <= set(dagbag.dag_ids)


def test_rollback_model_is_manual_and_one_call(dagbag):
    dag = dagbag.dags["rollback_model"]
    assert dag.schedule is None or str(dag.timetable.summary) in ("None", "")
    assert [task.task_id for task in dag.tasks] == ["roll_back"]
    assert set(dag.params) == {"registered_model", "triton_model"}
    page = (DAGS_FOLDER.parent / "docs" / "dags" / "rollback_model.md").read_text()
    assert all(f"`{name}`" in page for name in dag.params)


def _edges(dag) -> set[tuple[str, str]]:
    return {(task.task_id, downstream) for task in dag.tasks for downstream in task.downstream_task_ids}


def test_optimize_model_edges_equal_the_recipe(dagbag):
    from tasks.recipe import OPTIMIZE_MODEL, Target

    dag = dagbag.dags["optimize_model"]
    stages = [stage.id for stage in OPTIMIZE_MODEL.stages]
    producers = {stage.id for stage in OPTIMIZE_MODEL.stages if stage.candidate}
    first = {stage.id for stage in OPTIMIZE_MODEL.stages if not stage.inputs}
    decisions = {("evaluate", "register"), ("register", "score_champion"), ("register", "gate"),
                 ("evaluate", "gate"), ("score_champion", "gate"), ("gate", "promote"), ("evaluate", "promote"),
                 ("promote", "await_approval"), ("await_approval", "report")}
    data = {("prepare_data", task) for task in ("changed_since_champion", *stages, "evaluate", "register",
                                                "score_champion", "promote")}
    # The GPU branch starts after resolve_target, which skips it when the worker cannot or should not build it.
    gpu_first = {stage.id for stage in OPTIMIZE_MODEL.entry_stages(Target.GPU)}
    assert gpu_first == {f"{kind}_{model}" for kind in ("fp16", "qdq") for model in ("teacher", "student", "pruned")}
    expected = (OPTIMIZE_MODEL.edges() | {("changed_since_champion", stage) for stage in first}
                | {("plan", "prepare_data"), ("changed_since_champion", "resolve_target")}
                | {("resolve_target", stage) for stage in gpu_first}
                | {(stage, "evaluate") for stage in producers} | decisions | data)
    assert _edges(dag) == expected
    assert set(dag.task_ids) == {task for edge in expected for task in edge}
    assert dag.max_active_runs == 1
    assert dag.doc_md and "optimize_model" in dag.doc_md
    assert all(dag.get_task(stage.id).doc_md == stage.doc for stage in OPTIMIZE_MODEL.stages)


def test_optimize_model_trigger_rules_and_retries(dagbag):
    dag = dagbag.dags["optimize_model"]
    # evaluate runs on what was built when techniques were switched off (their tasks skipped), but not after
    # a failure; the report runs after a failed or skipped promotion too; every other task needs all upstream.
    assert dag.get_task("evaluate").trigger_rule == "none_failed"
    assert dag.get_task("report").trigger_rule == "all_done"
    assert {task.trigger_rule for task in dag.tasks if task.task_id not in ("evaluate", "report")} == {"all_success"}
    assert all(task.retries >= 1 for task in dag.tasks)
    # The report is the only leaf: its state is the run's.
    assert [task.task_id for task in dag.tasks if not task.downstream_task_ids] == ["report"]


def test_params_are_generated_from_the_config_fields(dagbag):
    from tasks.params import pipeline_params
    from tasks.pipeline import DEFAULT_PARAMS, RUN_PARAMS, config_from_params

    dag = dagbag.dags["optimize_model"]
    defaults = {name: param.value for name, param in dag.params.items()}
    assert {k: v for k, v in defaults.items() if k not in RUN_PARAMS} == DEFAULT_PARAMS
    assert set(RUN_PARAMS) <= set(defaults)
    for name, spec in pipeline_params().items():
        param = dag.params.get_param(name)
        assert param.schema["type"] == spec.type and param.description == spec.description, name
    config_from_params(defaults)
    # A list param is validated by Airflow's form as a JSON array of numbers.
    from airflow.exceptions import ParamValidationError
    from airflow.sdk import Param

    rates = dag.params.get_param("layer_learning_rates")
    assert Param([1e-5, 5e-5, 1e-4], **rates.schema).resolve() == [1e-5, 5e-5, 1e-4]
    with pytest.raises(ParamValidationError):
        Param(["fast"], **rates.schema).resolve()


def test_monitor_serving_judges_then_triggers_optimize_model(dagbag):
    dag = dagbag.dags["monitor_serving"]
    assert dag.get_task("should_trigger").downstream_task_ids == {"trigger_optimize_model"}
    assert dag.get_task("check_window").downstream_task_ids == {"should_trigger"}
    trigger = dag.get_task("trigger_optimize_model")
    assert trigger.trigger_dag_id == "optimize_model"
    assert dag.max_active_runs == 1 and dag.doc_md
    from monitoring.pipeline import config_from_params

    config = config_from_params({name: param.value for name, param in dag.params.items()})
    assert config.policy.persist_windows == 2 and config.drift.min_rows == 100


def test_dag_files_do_not_import_heavy_libraries_at_top_level():
    heavy = ("torch", "transformers", "onnxruntime", "mlflow", "tritonclient", "pandas")
    for path in DAGS_FOLDER.glob("*.py"):
        top_level = [line for line in path.read_text().splitlines() if line.startswith(("import ", "from "))]
        offenders = [line for line in top_level if any(f" {name}" in line.split(" import ")[0] for name in heavy)]
        assert not offenders, f"{path.name} imports {offenders} at top level"


def test_gpu_tasks_go_where_the_deployment_says(monkeypatch):
    """PIPELINE_GPU_QUEUE / PIPELINE_GPU_POD_TEMPLATE put the GPU branch, resolve_target and evaluate on
    the GPU worker; every other task stays on the default queue without a pod template."""
    from airflow.dag_processing.dagbag import DagBag

    from tasks.recipe import OPTIMIZE_MODEL, Target

    monkeypatch.setenv("PIPELINE_GPU_QUEUE", "gpu")
    monkeypatch.setenv("PIPELINE_GPU_POD_TEMPLATE", "/opt/airflow/pod_templates/gpu.yaml")
    dag = DagBag(dag_folder=str(DAGS_FOLDER / "optimize_model.py")).dags["optimize_model"]
    on_gpu = {stage.id for stage in OPTIMIZE_MODEL.on(Target.GPU)} | {"resolve_target", "evaluate"}
    assert {task.task_id for task in dag.tasks if task.queue == "gpu"} == on_gpu
    assert {task.task_id for task in dag.tasks
            if (task.executor_config or {}).get("pod_template_file") == "/opt/airflow/pod_templates/gpu.yaml"} == on_gpu
