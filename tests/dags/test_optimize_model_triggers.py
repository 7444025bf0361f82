"""optimize_model acts on why it started, with ``dag.test()`` against the real MLflow and Triton.

A champion is trained and promoted; then runs triggered the way monitor_serving triggers them
(``trigger_kind`` and the evidence JSON in the conf): a latency breach re-optimizes without
fine-tuning and promotes the most accurate candidate within the budget; an impossible budget
promotes nothing and says why in the run and in MLflow; drift without new labels stops.
"""

from __future__ import annotations

import json

import pytest

from tests.dags.test_optimize_model_run import _run_dag

pytestmark = [pytest.mark.integration, pytest.mark.slow]
MODEL, SERVED = "dagtrig-model", "dagtrig_model"


@pytest.fixture(scope="module")
def trigger_env(local_services, airflow_database, tmp_path_factory) -> dict[str, str]:
    return local_services.environment() | airflow_database(tmp_path_factory.mktemp("airflow-triggers"))


@pytest.fixture(scope="module")
def base_conf(tiny_model, labelled_csv) -> dict:
    return {"data_source": str(labelled_csv), "teacher": str(tiny_model), "epochs": 3.0, "learning_rate": 5e-3,
            "max_length": 32, "registered_model": MODEL, "triton_model": SERVED, "student_layers": 1,
            "distill_epochs": 3.0, "prune_heads": 0.25, "prune_ffn": 0.25, "prune_epochs": 2.0,
            "max_relative_accuracy_drop": 0.2, "max_champion_regression": 0.2}


def _summary(local_services, run_id: str) -> dict:
    from tasks.settings import safe_name

    return json.loads((local_services.settings.runs_dir / safe_name(run_id) / "summary.json").read_text())


def _triggered(conf: dict, kind: str, **evidence) -> dict:
    return conf | {"trigger_kind": kind, "trigger_reason": f"test: {kind} breach",
                   "trigger_evidence": json.dumps({"kind": kind} | evidence)}


def test_latency_breach_reoptimizes_within_budget_and_drift_without_labels_stops(local_services, trigger_env,
                                                                                base_conf):
    from tasks import model_aliases
    from tasks.registry import RUN_TAG

    uri = local_services.settings.mlflow_url
    state, first_id, _, output = _run_dag(trigger_env, base_conf)
    assert state == "success", output[-4000:]
    first = _summary(local_services, first_id)
    champion = first["versions"][first["winner"]]
    champion_p50 = first["candidates"][first["winner"]]["latency_p50_ms"]

    # A latency breach: served p95 = the champion's own median + 5 ms overhead; a generous SLO.
    evidence = {"slo_p95_ms": 1000.0, "latency_p95_ms": champion_p50 + 5.0, "token_count_p99": 12.0}
    state, run_id, tasks, output = _run_dag(trigger_env, _triggered(base_conf, "latency", **evidence))
    assert state == "success", output[-4000:]
    assert "finetune_teacher: reusing the fine-tuned teacher" in output  # no fine-tuning again
    assert "the unchanged-check does not apply" in output
    summary = _summary(local_services, run_id)
    plan = summary["plan"]
    assert plan["action"] == "reoptimize" and plan["champion_version"] == champion
    assert plan["budget"]["budget_ms"] == pytest.approx(995.0, abs=0.01)
    assert plan["overrides"]["finetune"] == {"max_length": 16}  # the served texts' p99 fits 16 tokens
    assert summary["objective"] == "most_accurate" and summary["promotion"]["status"] == "success"
    winner = summary["candidates"][summary["winner"]]
    assert winner["latency_p95_ms"] <= 995.0 * 0.9
    passing = [name for name, gates in summary["gates"].items() if all(g["decision"] == "pass" for g in gates)]
    assert winner["accuracy"] == max(summary["candidates"][name]["accuracy"] for name in passing)
    new_champion = model_aliases.alias_version(uri, MODEL, "champion")
    assert new_champion == summary["versions"][summary["winner"]]
    assert model_aliases.version_tags(uri, MODEL, new_champion)[RUN_TAG] == run_id

    # An impossible budget: nothing is promoted, and the run, the report and MLflow say why.
    impossible = {"slo_p95_ms": 0.01, "latency_p95_ms": 0.0}
    state, none_id, _, output = _run_dag(trigger_env, _triggered(base_conf, "latency", **impossible))
    assert state == "success", output[-4000:]
    nothing = _summary(local_services, none_id)
    assert nothing["winner"] is None and nothing["promotion"]["status"] == "skipped"
    assert nothing["promotion"]["reason"].startswith("no candidate meets 0.0 ms p95 at >= ")
    assert "the fastest was" in nothing["promotion"]["reason"]
    assert model_aliases.alias_version(uri, MODEL, "champion") == new_champion
    parent = model_aliases.mlflow_client(uri).get_run(nothing["mlflow_parent_run_id"])
    assert parent.data.tags["outcome"] == "not promoted"

    # Drift without new labels: the same data as the champion's, so the run stops with the reason.
    state, drift_id, tasks, output = _run_dag(trigger_env, _triggered(base_conf, "drift"))
    assert state == "success", output[-4000:]
    assert "no labelled data arrived since champion" in output
    assert {task for task, task_state in tasks.items() if task_state != "skipped"} == {
        "plan", "prepare_data", "changed_since_champion"}, tasks
    assert model_aliases.alias_version(uri, MODEL, "champion") == new_champion
