"""The plan task against a real MLflow store (SQLite, in process): a latency breach re-optimizes from
the champion's logged lineage within a budget, drift without new labels stops, an error breach is
alerted without retraining, and every stop leaves an MLflow run that says why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks import model_aliases, planning, registry
from tasks.pipeline import prepare_data, run_stage
from tasks.settings import PipelineSettings
from tasks.splits import META_FILENAME

MODEL = "plan-model"
CHAMPION_PARAMS = {"distill.student_layers": "0", "prune.head_fraction": "0.33", "prune.ffn_fraction": "0.6",
                   "finetune.max_length": "128"}


@pytest.fixture(scope="module")
def champion_store(tmp_path_factory, trained_teacher: Path, exported_onnx: Path, prepared_data: Path):
    """An MLflow store whose champion (an ONNX version, batch-1 median 50 ms, p95 90 ms) came from run ``run1``,
    with the teacher's folder and the data splits logged as that run's lineage."""
    import mlflow

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.MlflowClient(uri).create_experiment("optimize_model", artifact_location=str(root / "artifacts"))
    parent = registry.parent_run_id(uri, "optimize_model", "run1", CHAMPION_PARAMS)
    registry.log_data(uri, parent, prepared_data)
    data_hash = json.loads((prepared_data / META_FILENAME).read_text())["data_hash"]
    lineage = {"data_hash": data_hash}
    reference = registry.log_candidate(uri, "optimize_model", parent, "run1", MODEL, registry.Candidate(
        "teacher_pytorch", trained_teacher, {"accuracy": 0.9, "latency_p50_ms": 70.0, "latency_p95_ms": 80.0},
        "finetune", reference=True), lineage)
    assert model_aliases.version_tags(uri, MODEL, reference)[registry.VERSION_ROLE_TAG] == "reference"
    lineage |= {"reference_version": reference}
    version = registry.log_candidate(uri, "optimize_model", parent, "run1", MODEL, registry.Candidate(
        "onnx_fp32", exported_onnx, {"accuracy": 0.9, "latency_p50_ms": 50.0, "latency_p95_ms": 90.0}, "finetune > onnx"),
        lineage)
    model_aliases.set_alias(uri, MODEL, "champion", version)
    return uri, version, data_hash


def _settings(uri: str, tmp_path: Path) -> PipelineSettings:
    return PipelineSettings(runs_dir=tmp_path / "runs", mlflow_tracking_uri=uri, triton_url="127.0.0.1:1",
                            triton_model_repository=tmp_path / "models", assets_cache=tmp_path / "assets")


def _params(kind: str, **evidence) -> dict:
    return {"registered_model": MODEL, "trigger_kind": kind, "trigger_reason": f"2 windows: {kind}",
            "trigger_evidence": json.dumps(evidence)}


def _outcome(uri: str, run_id: str) -> dict[str, str]:
    client = model_aliases.mlflow_client(uri)
    experiment = client.get_experiment_by_name("optimize_model").experiment_id
    runs = client.search_runs([experiment], f"tags.{registry.RUN_TAG} = '{run_id}'")
    assert len(runs) == 1
    return runs[0].data.tags


def test_a_latency_breach_reoptimizes_from_the_champions_lineage_within_the_budget(champion_store, tmp_path,
                                                                                  trained_teacher):
    uri, version, data_hash = champion_store
    settings = _settings(uri, tmp_path)
    params = _params("latency", slo_p95_ms=100.0, latency_p95_ms=130.0, token_count_p99=20.0)
    plan = planning.plan_run(settings, params, "run2")
    assert plan["action"] == "reoptimize" and plan["stop"] is None
    assert plan["champion_version"] == version and plan["champion_run"] == "run1"
    assert plan["budget"]["overhead_ms"] == 80.0 and plan["budget"]["budget_ms"] == 20.0  # 130 served - 50 (own median)
    # The teacher and the data are the champion run's, fetched from MLflow: nothing is fine-tuned again.
    teacher = Path(plan["reused"]["teacher"])
    assert (teacher / "config.json").read_bytes() == (trained_teacher / "config.json").read_bytes()
    config = planning.config_for_run(params, settings.run_dir("run2"))
    assert config.gate.max_p95_latency_ms == 20.0 and config.evaluate.max_length == 32
    assert config.distill.student_layers == 1 and config.prune.head_fraction == 0.5
    assert config.gate.max_champion_regression == 0.98  # the champion breaches the SLO: not the bar
    data = prepare_data(settings, config, "run2", reused=plan["reused"]["data"])
    assert data["info"]["data_hash"] == data_hash
    teacher_result = run_stage(settings, config, "run2", "finetune_teacher", data, {}, reused_teacher=str(teacher))
    assert teacher_result["uris"]["model"] == str(teacher)
    # A re-optimization skips the unchanged-check, and its winner is the most accurate within the budget.
    assert planning.should_train(settings, config, "run2", data, force=False)["changed"] is True


def test_no_budget_left_stops_and_says_why_in_mlflow(champion_store, tmp_path):
    uri, _, _ = champion_store
    plan = planning.plan_run(_settings(uri, tmp_path), _params("latency", slo_p95_ms=100.0, latency_p95_ms=300.0),
                             "run3")
    assert plan["stop"].startswith("no latency budget is left (latency budget -150.0 ms")
    tags = _outcome(uri, "run3")
    assert tags["outcome"] == "skipped" and "no latency budget is left" in tags["outcome_reason"]


@pytest.mark.parametrize("kind", ["drift", "accuracy"])
def test_a_retrain_without_new_labels_stops_with_the_reason(champion_store, tmp_path, prepared_data, kind):
    """Drift and an accuracy drop from label feedback both retrain on new labels, and stop without them."""
    from tasks.data import result_of

    uri, version, data_hash = champion_store
    settings = _settings(uri, tmp_path)
    params, run = _params(kind), f"run4-{kind}"
    plan = planning.plan_run(settings, params, run)
    assert plan["action"] == "retrain" and plan["kind"] == kind and plan["reason"].startswith(f"{kind} breach")
    config = planning.config_for_run(params, settings.run_dir(run))
    verdict = planning.should_train(settings, config, run, result_of(prepared_data).to_dict(), force=False)
    assert verdict["changed"] is False
    assert f"no labelled data arrived since champion v{version} was trained (data hash {data_hash[:12]})" \
        in verdict["reason"]
    assert f"cannot fix the {kind} breach" in verdict["reason"]
    assert _outcome(uri, run)["outcome"] == "skipped"
    newer = result_of(prepared_data).to_dict()
    newer["info"]["data_hash"] = "f" * 64
    assert planning.should_train(settings, config, run, newer, force=False)["changed"] is True


def test_an_error_breach_without_invalid_outputs_alerts_and_retrains_nothing(champion_store, tmp_path):
    uri, _, _ = champion_store
    settings = _settings(uri, tmp_path)
    plan = planning.plan_run(settings, _params("errors", invalid_outputs=0), "run5")
    assert plan["action"] == "alert" and "serving fault" in plan["stop"]
    assert _outcome(uri, "run5")["outcome"] == "alerted"
    assert not (settings.run_dir("run5") / "lineage").exists()


def test_an_error_breach_with_invalid_outputs_and_nothing_to_roll_back_to_fails_loudly(champion_store, tmp_path):
    from tasks.errors import PromotionFailed

    uri, _, _ = champion_store
    with pytest.raises(PromotionFailed, match="no 'previous_champion' alias"):
        planning.plan_run(_settings(uri, tmp_path), _params("errors", invalid_outputs=3), "run6")


def test_a_latency_breach_right_after_a_switch_plans_a_rollback(champion_store, tmp_path):
    import time

    from tasks.promote import PREVIOUS_ALIAS, SWITCHED_AT_TAG
    from tasks.trigger import parse_trigger

    uri, version, _ = champion_store
    settings = _settings(uri, tmp_path)
    config = planning.pipeline_step.config_from_params({"registered_model": MODEL})
    trigger = parse_trigger(_params("latency", slo_p95_ms=100.0, latency_p95_ms=150.0))
    reference = model_aliases.version_tags(uri, MODEL, version)["reference_version"]
    model_aliases.set_alias(uri, MODEL, PREVIOUS_ALIAS, reference)
    try:
        assert planning.recent_switch_rollback(settings, config, trigger) is None  # no switch time recorded
        model_aliases.tag_version(uri, MODEL, version, {SWITCHED_AT_TAG: f"{time.time() - 300:.0f}"})
        plan = planning.recent_switch_rollback(settings, config, trigger)
        assert plan.action == "rollback" and f"previous_champion v{reference}" in plan.reason
        model_aliases.tag_version(uri, MODEL, version, {SWITCHED_AT_TAG: ""})  # what a rollback leaves
        assert planning.recent_switch_rollback(settings, config, trigger) is None
    finally:
        model_aliases.mlflow_client(uri).delete_registered_model_alias(MODEL, PREVIOUS_ALIAS)
