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
    assert {"optimize_model", "monitor_serving"} <= set(dagbag.dag_ids)


def test_optimize_model_wires_the_skeleton_in_order(dagbag):
    dag = dagbag.dags["optimize_model"]
    edges = [("prepare_data", "finetune_teacher"), ("prepare_data", "data_changed"), ("data_changed", "finetune_teacher"), ("finetune_teacher", "export_onnx"),
             ("export_onnx", "quantize_int8"), ("finetune_teacher", "distill_student"),
             ("distill_student", "export_student"), ("export_student", "quantize_student"),
             ("distill_student", "prune_student"), ("finetune_teacher", "prune_student"),
             ("prune_student", "export_pruned"), ("export_pruned", "quantize_pruned"),
             ("quantize_int8", "evaluate"), ("quantize_student", "evaluate"), ("quantize_pruned", "evaluate"),
             ("evaluate", "register"),
             ("register", "promote")]
    assert {task for edge in edges for task in edge} == set(dag.task_ids)
    for upstream, downstream in edges:
        assert downstream in dag.get_task(upstream).downstream_task_ids
    assert dag.max_active_runs == 1
    assert dag.doc_md and "optimize_model" in dag.doc_md
    # evaluate runs on what was built when techniques were switched off (their tasks skipped), but not after
    # a failure; the technique tasks skip along with the one that was switched off.
    assert dag.get_task("evaluate").trigger_rule == "none_failed"
    assert {task.trigger_rule for task in dag.tasks if task.task_id != "evaluate"} == {"all_success"}
    assert all(task.retries >= 1 for task in dag.tasks)


def test_params_defaults_build_a_valid_pipeline_config(dagbag):
    from tasks.pipeline import DEFAULT_PARAMS, RUN_PARAMS, config_from_params

    dag = dagbag.dags["optimize_model"]
    defaults = {name: param.value for name, param in dag.params.items()}
    assert {k: v for k, v in defaults.items() if k not in RUN_PARAMS} == DEFAULT_PARAMS
    assert set(RUN_PARAMS) <= set(defaults)
    config_from_params(defaults)


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
