"""The plan task of optimize_model and the checks that follow it (see ``tasks/trigger.py``).

``plan_run`` turns the trigger into a plan (and acts on an error breach at once); ``should_train``
is the short-circuit after the data is prepared; ``config_for_run`` applies the plan's overrides to
the run's params for every task after the plan.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from tasks import model_aliases, reconcile, registry, reoptimize
from tasks import pipeline as pipeline_step
from tasks import promote as promote_step
from tasks.config import PipelineConfig
from tasks.errors import PromotionFailed
from tasks.results import StepResult
from tasks.settings import PipelineSettings
from tasks.trigger import Action, RunPlan, Trigger, TriggerKind, errors_plan, merge_overrides, parse_trigger
from tasks.trigger import rollback_after_switch
from tasks.trigger import read_plan, write_plan

log = logging.getLogger(__name__)


def config_for_run(params: dict[str, Any], run_dir: Path) -> PipelineConfig:
    """The run's config: its params, with the overrides its plan added (a re-optimization's search)."""
    plan = read_plan(run_dir)
    if plan.overrides:
        params = params | {"overrides": merge_overrides(params.get("overrides"), plan.overrides)}
    return pipeline_step.config_from_params(params)


def plan_run(settings: PipelineSettings, params: dict[str, Any], run_id: str) -> dict[str, Any]:
    """The run's plan from its trigger, written for the tasks after it; a stopping plan is recorded
    in MLflow (an error breach is handled here: rollback or alert)."""
    trigger = parse_trigger(params)
    config = pipeline_step.config_from_params(params)
    run_dir = settings.run_dir(run_id)
    after_switch = recent_switch_rollback(settings, config, trigger)
    if after_switch is not None:
        plan = act_on_errors(settings, config, after_switch)
    elif trigger.kind is TriggerKind.LATENCY:
        plan = latency_plan(settings, config, trigger, run_dir)
    elif trigger.kind is TriggerKind.ERRORS:
        plan = act_on_errors(settings, config, errors_plan(trigger))
    elif trigger.kind in (TriggerKind.DRIFT, TriggerKind.ACCURACY):
        plan = RunPlan(trigger.kind.value, Action.RETRAIN.value,
                       f"{trigger.kind.value} breach ({trigger.reason}): retrain on the newest labelled data")
    else:
        plan = RunPlan(trigger.kind.value, Action.TRAIN.value, f"started because: {trigger.reason}")
    write_plan(run_dir, plan)
    log.info("plan: %s - %s", plan.action, plan.reason)
    if plan.stop:
        record_stop(settings, config, run_id, plan, plan.stop)
    return plan.to_dict()


def latency_plan(settings: PipelineSettings, config: PipelineConfig, trigger: Trigger, run_dir: Path) -> RunPlan:
    """Re-optimize the champion within the latency budget, or stop when there is nothing to do."""
    uri, model = settings.mlflow_tracking_uri, config.promote.registered_model
    origin = reoptimize.find_origin(uri, settings.experiment, model, config.promote.alias)
    kind = trigger.kind.value
    if origin is None:
        return RunPlan(kind, Action.STOP.value, "latency breach without a champion",
                       stop=f"{model} has no {config.promote.alias!r}: nothing serves that could be re-optimized")
    budget = reoptimize.latency_budget(trigger.evidence, origin.champion_p50_ms)
    base = RunPlan(kind, Action.STOP.value, f"latency breach: {budget.describe()}", champion_version=origin.version,
                   champion_run=origin.pipeline_run_id, budget=budget.to_dict())
    if budget.budget_ms <= 0:
        return replace(base, stop=f"no latency budget is left ({budget.describe()}): no model can meet the SLO "
                                  "through this serving path; nothing is re-optimized")
    folders = reoptimize.fetch_lineage(uri, origin, run_dir / "lineage")
    overrides = reoptimize.aggressive_overrides(origin.params, reoptimize.teacher_layers(folders["teacher"]),
                                                trigger.evidence.get("token_count_p99"), budget)
    return replace(base, action=Action.REOPTIMIZE.value,
                   reason=f"latency breach: re-optimize champion v{origin.version} from the teacher and data of run "
                          f"{origin.pipeline_run_id} (no fine-tuning); {budget.describe()}",
                   overrides=overrides, reused={name: str(path) for name, path in folders.items()})


def recent_switch_rollback(settings: PipelineSettings, config: PipelineConfig, trigger: Trigger) -> RunPlan | None:
    """The rollback plan when a serving breach came soon after the champion's switch (``rollback_after_switch``)."""
    if trigger.kind not in (TriggerKind.LATENCY, TriggerKind.ERRORS) or config.promote.rollback_window_minutes <= 0:
        return None
    uri, model = settings.mlflow_tracking_uri, config.promote.registered_model
    found = model_aliases.alias_tags(uri, model, config.promote.alias)
    if found is None:
        return None
    switched_at = found[1].get(promote_step.SWITCHED_AT_TAG)
    previous = model_aliases.alias_version(uri, model, promote_step.PREVIOUS_ALIAS)
    return rollback_after_switch(trigger, found[0], float(switched_at) if switched_at else None, previous,
                                 config.promote.rollback_window_minutes, time.time())


def act_on_errors(settings: PipelineSettings, config: PipelineConfig, plan: RunPlan) -> RunPlan:
    """Roll back (when the plan says so) or only alert; a failed rollback is recorded, then raised."""
    if plan.action != Action.ROLLBACK.value:
        log.error("ALERT: %s", plan.reason)
        return plan
    target = promote_step.PromotionTarget(settings.triton_url, settings.triton_model_repository,
                                          settings.mlflow_tracking_uri, settings.prediction_log_url)
    try:
        result = reconcile.rollback(config.promote, target)
    except PromotionFailed as error:
        log.error("ALERT: %s; the rollback failed: %s", plan.reason, error)
        raise
    done = (f"rolled back to MLflow v{result.info['mlflow_version']} (Triton v{int(result.metrics['triton_version'])}),"
            f" replacing v{result.info['replaced_version'] or '?'}")
    log.error("ALERT: %s; %s", plan.reason, done)
    return replace(plan, reason=f"{plan.reason}: {done}", champion_version=result.info["mlflow_version"])


def should_train(settings: PipelineSettings, config: PipelineConfig, run_id: str, data: dict,
                 force: bool) -> dict[str, Any]:
    """Whether the recipe runs (``{"changed", "reason"}``), by the plan: a re-optimization always
    does; a retrain (after drift or an accuracy drop) needs new labels; a normal run needs a change
    since the champion."""
    plan = read_plan(settings.run_dir(run_id))
    if plan.action == Action.REOPTIMIZE.value:
        return {"changed": True, "reason": f"{plan.reason}: the unchanged-check does not apply"}
    if plan.action == Action.RETRAIN.value and not force:
        verdict = new_labels(settings, config, data, breach=plan.kind or TriggerKind.DRIFT.value)
        if not verdict["changed"]:
            record_stop(settings, config, run_id, plan, verdict["reason"])
        return verdict
    return pipeline_step.changed_since_champion(settings, config, data, force)


def new_labels(settings: PipelineSettings, config: PipelineConfig, data: dict, breach: str = "drift") -> dict[str, Any]:
    """Whether labelled data arrived since the champion was trained (its data hash differs);
    ``breach`` names what a retrain on the same labels could not fix (drift, an accuracy drop)."""
    uri, model, alias = settings.mlflow_tracking_uri, config.promote.registered_model, config.promote.alias
    found = model_aliases.alias_tags(uri, model, alias)
    data_hash = StepResult.from_dict(data).info["data_hash"]
    if found is None:
        return {"changed": True, "reason": f"{model} has no {alias!r} yet: train"}
    champion, trained_on = found[0], found[1].get("data_hash")
    if trained_on == data_hash:
        return {"changed": False,
                "reason": f"no labelled data arrived since champion v{champion} was trained (data hash "
                          f"{data_hash[:12]}): retraining on the same labels cannot fix the {breach} breach, so the "
                          "run stops. Point data_source (or the monitor's retrain_conf) at newer labelled data; the monitor's "
                          "cooldown holds its next trigger"}
    return {"changed": True, "reason": f"new labelled data since champion v{champion}: data "
                                       f"{(trained_on or '?')[:12]} -> {data_hash[:12]}"}


def record_stop(settings: PipelineSettings, config: PipelineConfig, run_id: str, plan: RunPlan, reason: str) -> None:
    """A run that stops early leaves an MLflow run that says why (the reviewers look there)."""
    outcome = {"rollback": "rolled back", "alert": "alerted"}.get(plan.action, "skipped")
    registry.record_outcome(settings.mlflow_tracking_uri, settings.experiment, run_id,
                            {"trigger_kind": plan.kind or "none", "action": plan.action,
                             "registered_model": config.promote.registered_model},
                            outcome, f"{plan.reason}. {reason}")
    log.info("the run stops: %s", reason)
