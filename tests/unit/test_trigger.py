"""The run plan: the monitor's trigger kind decides what optimize_model does (pure parts)."""

from __future__ import annotations

import json

import pytest

from tasks import reoptimize
from tasks.errors import ConfigError, PipelineError
from tasks.trigger import Action, RunPlan, TriggerKind, errors_plan, merge_overrides, parse_trigger, read_plan
from tasks.trigger import write_plan


def test_trigger_kind_and_evidence_come_from_the_params():
    trigger = parse_trigger({"trigger_kind": "latency", "trigger_reason": "2 windows: p95 150 ms > 100 ms",
                             "trigger_evidence": json.dumps({"slo_p95_ms": 100.0})})
    assert trigger.kind is TriggerKind.LATENCY and trigger.evidence == {"slo_p95_ms": 100.0}
    assert parse_trigger({}).kind is TriggerKind.NONE
    with pytest.raises(ConfigError, match="trigger_kind 'slow'"):
        parse_trigger({"trigger_kind": "slow"})
    with pytest.raises(ConfigError, match="not a JSON object"):
        parse_trigger({"trigger_kind": "drift", "trigger_evidence": "{broken"})
    with pytest.raises(ConfigError, match="must be a JSON object"):
        parse_trigger({"trigger_evidence": "[1, 2]"})


def test_an_accuracy_drop_is_a_trigger_kind_of_its_own():
    trigger = parse_trigger({"trigger_kind": "accuracy", "trigger_evidence": '{"live_accuracy": 0.7}'})
    assert trigger.kind is TriggerKind.ACCURACY and trigger.evidence == {"live_accuracy": 0.7}


def test_every_breach_kind_the_monitor_names_is_a_trigger_kind_and_a_param_choice():
    from monitoring.policy import KINDS
    from tasks.params import RUN_PARAMS

    assert set(KINDS) <= {kind.value for kind in TriggerKind}
    assert set(RUN_PARAMS["trigger_kind"]["enum"]) == {kind.value for kind in TriggerKind}


def test_an_error_breach_never_retrains_and_rolls_back_only_for_invalid_model_outputs():
    serving_fault = errors_plan(parse_trigger({"trigger_kind": "errors",
                                               "trigger_evidence": json.dumps({"invalid_outputs": 0})}))
    assert serving_fault.action == Action.ALERT.value and "serving fault" in serving_fault.stop
    model_fault = errors_plan(parse_trigger({"trigger_kind": "errors",
                                             "trigger_evidence": json.dumps({"invalid_outputs": 7})}))
    assert model_fault.action == Action.ROLLBACK.value and "7 non-finite outputs" in model_fault.reason
    assert model_fault.stop


def test_the_plan_round_trips_and_a_run_without_one_trains(tmp_path):
    assert read_plan(tmp_path).action == Action.TRAIN.value and read_plan(tmp_path).objective == "fastest"
    plan = RunPlan("latency", Action.REOPTIMIZE.value, "because", overrides={"prune": {"head_fraction": 0.5}},
                   reused={"teacher": "/t"})
    write_plan(tmp_path, plan)
    assert read_plan(tmp_path) == plan and read_plan(tmp_path).objective == "most_accurate"


def test_overrides_merge_section_by_section():
    assert merge_overrides({"prune": {"head_fraction": 0.1, "ffn_fraction": 0.2}, "gate": {"x": 1}},
                           {"prune": {"head_fraction": 0.5}}) == {
        "prune": {"head_fraction": 0.5, "ffn_fraction": 0.2}, "gate": {"x": 1}}
    assert merge_overrides(None, {"a": {"b": 1}}) == {"a": {"b": 1}}


def test_the_budget_is_the_slo_less_the_serving_overhead_seen_in_the_window():
    budget = reoptimize.latency_budget({"slo_p95_ms": 100.0, "latency_p95_ms": 150.0}, champion_p50_ms=120.0)
    assert budget.overhead_ms == 30.0 and budget.budget_ms == 70.0
    assert "latency budget 70.0 ms" in budget.describe() and "overhead 30.0 ms" in budget.describe()
    assert reoptimize.latency_budget({"slo_p95_ms": 100.0, "latency_p95_ms": 90.0}, 120.0).budget_ms == 100.0
    assert reoptimize.latency_budget({"slo_p95_ms": 100.0, "latency_p95_ms": 150.0}, None).budget_ms == 100.0
    assert reoptimize.latency_budget({"slo_p95_ms": 10.0, "latency_p95_ms": 150.0}, 20.0).budget_ms < 0
    with pytest.raises(PipelineError, match="lacks"):
        reoptimize.latency_budget({"latency_p95_ms": 150.0}, 120.0)


@pytest.mark.parametrize(("current", "p99", "expected"), [
    (128, 40.0, 48), (128, 64.0, 64), (128, 100.0, None), (64, 64.0, None), (128, None, None), (128, 0.0, None),
    (512, 2000.0, None)])
def test_the_maximum_length_shortens_only_when_the_served_texts_fit(current, p99, expected):
    assert reoptimize.shorter_max_length(current, p99) == expected


def test_the_search_is_more_aggressive_than_the_champions_run():
    budget = reoptimize.LatencyBudget(100.0, 150.0, 120.0)
    champion = {"distill.student_layers": "0", "prune.head_fraction": "0.33", "prune.ffn_fraction": "0.6",
                "finetune.max_length": "128"}
    overrides = reoptimize.aggressive_overrides(champion, teacher_layers=6, token_p99=50.0, budget=budget)
    assert overrides["distill"]["student_layers"] == 2  # the champion's student had half of 6 layers
    assert overrides["prune"]["head_fraction"] == 0.5 and overrides["prune"]["ffn_fraction"] == 0.75
    assert overrides["finetune"] == {"max_length": 64}
    assert overrides["gate"] == {"max_p95_latency_ms": 70.0, "max_champion_regression": 0.98}
    assert overrides["quantize"] == {"enabled": True, "mode": "static_int8"}  # the faster batch-invariant INT8
    again = reoptimize.aggressive_overrides(
        champion | {"distill.student_layers": "1", "prune.head_fraction": "0.7", "prune.ffn_fraction": "0.85"},
        teacher_layers=6, token_p99=None, budget=budget)
    assert again["distill"]["student_layers"] == 1  # never fewer than one layer
    assert again["prune"]["head_fraction"] == 0.75 and again["prune"]["ffn_fraction"] == 0.9  # capped
    assert "finetune" not in again


def test_the_overrides_make_a_valid_config():
    from tasks.pipeline import config_from_params

    overrides = reoptimize.aggressive_overrides({}, 2, 20.0, reoptimize.LatencyBudget(100.0, 120.0, 100.0))
    config = config_from_params({"overrides": overrides})
    assert config.gate.max_p95_latency_ms == 80.0 and config.distill.student_layers == 1
    assert config.finetune.max_length == config.evaluate.max_length == config.distill.max_length == 32
    assert config.quantize.mode == "static_int8"


def test_a_serving_breach_soon_after_a_switch_rolls_back_and_nothing_else_does():
    from tasks.trigger import Trigger, rollback_after_switch

    latency = Trigger(TriggerKind.LATENCY, "2 windows over the SLO", {})
    now = 10_000.0
    plan = rollback_after_switch(latency, "5", now - 600, "4", 60.0, now)
    assert plan.action == Action.ROLLBACK.value and plan.stop and plan.champion_version == "5"
    assert "10 min after the switch to v5" in plan.reason and "previous_champion v4" in plan.reason
    errors = Trigger(TriggerKind.ERRORS, "5% errors", {})
    assert rollback_after_switch(errors, "5", now - 60, "4", 60.0, now).action == Action.ROLLBACK.value
    # Too long after the switch, no switch recorded (a rollback clears it), nothing to go back to, switched off,
    # or a breach the model's switch cannot explain: the usual plan decides.
    assert rollback_after_switch(latency, "5", now - 61 * 60, "4", 60.0, now) is None
    assert rollback_after_switch(latency, "5", None, "4", 60.0, now) is None
    assert rollback_after_switch(latency, "5", now - 60, None, 60.0, now) is None
    assert rollback_after_switch(latency, "5", now - 60, "5", 60.0, now) is None
    assert rollback_after_switch(latency, "5", now - 60, "4", 0.0, now) is None
    drift = Trigger(TriggerKind.DRIFT, "drift", {})
    assert rollback_after_switch(drift, "5", now - 60, "4", 60.0, now) is None


def test_a_reoptimization_keeps_the_truncation_its_reused_teacher_was_fine_tuned_with():
    from tasks.pipeline import config_from_params

    budget = reoptimize.LatencyBudget(100.0, 150.0, 120.0)
    champion = {"finetune.max_length": "128", "finetune.truncation": "head_tail"}
    overrides = reoptimize.aggressive_overrides(champion, teacher_layers=6, token_p99=None, budget=budget)
    assert overrides["finetune"] == {"truncation": "head_tail"}
    config = config_from_params({"overrides": overrides})
    assert config.distill.truncation == config.prune.truncation == config.evaluate.truncation == "head_tail"
