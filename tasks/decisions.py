"""The decisions of an optimize_model run, one function per DAG task, each safe to retry.

``score_champion`` -> ``gate_candidates`` -> ``promote_winner`` -> ``write_report``. Each writes
its record under the run's folder (``decisions/``) and the report is built from those records, so
a retried report rewrites the same report, a retried promotion does not score the champion again,
and the report is written after a failed promotion too.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from tasks import gate as gate_step
from tasks import approval, hardware, model_aliases, registry, report
from tasks import promote as promote_step
from tasks.champion import ChampionScore
from monitoring.stats import paired_bootstrap_macro_f1, paired_comparison, per_class_scores
from tasks.config import GateConfig, PipelineConfig, PrimaryMetric
from tasks.errors import PipelineError, PromotionFailed
from tasks.pipeline import DECISIONS, RECIPE, candidate_metrics, not_built_candidates, switched_off_candidates
from tasks.predictions import class_shares, majority_share, read_answers, read_logits
from tasks.recipe import REFERENCE_CANDIDATE, Target
from tasks.results import StepResult, StepStatus, write_json_atomic
from tasks.settings import PipelineSettings
from tasks.trigger import read_plan

log = logging.getLogger(__name__)

FASTEST = "fastest (the best primary metric within the latency noise margin)"
PER_TEXT = ("correct", "predicted")  # the champion record's per-text lists, left out of logs and the summary


def score_champion(settings: PipelineSettings, config: PipelineConfig, run_id: str, data: dict) -> dict | None:
    """The serving champion's accuracy on this run's test split, through Triton (None: nothing serves)."""
    target = _promotion_target(settings)
    score = promote_step.champion_score(target, config.promote, Path(StepResult.from_dict(data).uri("data")))
    record = None if score is None else {"accuracy": score.accuracy, "note": score.note}
    if score is not None and score.correct is not None:  # per test text, for the paired comparison
        record["correct"] = [int(value) for value in score.correct]
    if score is not None and score.predicted is not None:  # the answers, for macro-F1's
        record["predicted"] = [int(value) for value in score.predicted]
    write_json_atomic(settings.run_dir(run_id) / DECISIONS / "champion.json", {"champion": record})
    log.info("champion: %s", {key: value for key, value in record.items() if key not in PER_TEXT} if record
             else "nothing serves yet")
    return record


def choose_winner(gated: dict[str, tuple[bool, dict[str, float]]], objective: str = "fastest",
                  preferred: frozenset[str] = frozenset(), noise_margin: float = 0.0,
                  metric: str = PrimaryMetric.ACCURACY.value) -> str | None:
    """Among the candidates that passed every gate (name -> (passed, metrics)): the best by ``metric``
    (the run's primary metric) of those whose batch-1 p50 is within ``noise_margin`` of the fastest
    one's (latencies that close are one speed within measurement noise), the faster of equals; with
    ``objective`` "most_accurate" (a re-optimization within a latency budget) the best of all. When any
    of the ``preferred`` candidates (the GPU ones, for target gpu) passed, the choice is among those."""
    passing = [(metrics, name) for name, (ok, metrics) in gated.items() if ok]
    if any(name in preferred for _, name in passing):
        passing = [(metrics, name) for metrics, name in passing if name in preferred]
    if not passing:
        return None
    if objective != "most_accurate":
        fastest = min(metrics["latency_p50_ms"] for metrics, _ in passing)
        passing = [item for item in passing if item[0]["latency_p50_ms"] <= fastest * (1.0 + noise_margin)]
    return min(passing, key=lambda item: (-item[0][metric], item[0]["latency_p50_ms"], item[1]))[1]


def no_winner_reason(config: GateConfig, candidates: dict[str, dict[str, float]], teacher_score: float) -> str:
    """Why nothing is promoted, plainly: the budget and primary metric asked for (``teacher_score``: the
    teacher's primary metric), and the fastest candidate."""
    metric = config.primary_metric
    fastest = min(candidates, key=lambda name: candidates[name]["latency_p95_ms"])
    metrics = candidates[fastest]
    budget = (f"{gate_step.latency_limit(config):.1f} ms p95 at " if config.max_p95_latency_ms > 0 else "")
    return (f"no candidate meets {budget}>= {gate_step.required_accuracy(config, teacher_score):.3f} "
            f"{gate_step.METRIC_NAMES[metric]} (and the other gates); the fastest was {fastest} at "
            f"{metrics['latency_p95_ms']:.1f} ms p95 with {gate_step.METRIC_NAMES[metric]} {metrics[metric]:.3f}")


def judge_candidates(config: GateConfig, evaluations: dict[str, dict], names: list[str],
                     champion: dict | None) -> dict[str, list[gate_step.GateCheck]]:
    """Every gate of each candidate in ``names`` (evaluation results as plain dicts, the reference
    teacher's included), against the champion's record (``score_champion``; None: nothing serves)."""
    teacher = StepResult.from_dict(evaluations[REFERENCE_CANDIDATE]).metrics
    correct = tuple(map(bool, champion["correct"])) if champion and "correct" in champion else None
    predicted = tuple(map(int, champion["predicted"])) if champion and "predicted" in champion else None
    score = None if champion is None else ChampionScore(champion["accuracy"], champion["note"], correct, predicted)
    teacher_predictions = _predictions(evaluations[REFERENCE_CANDIDATE])
    shares = (class_shares(teacher_predictions, len(label_names(evaluations)))
              if teacher_predictions else None)
    gates = {}
    for name in names:
        predictions = _predictions(evaluations[name])
        gates[name] = gate_step.evaluate_gates(config, candidate_metrics(evaluations, name), teacher, score,
                                               class_shares=shares,
                                               candidate_answers=read_answers(predictions) if predictions else None)
    return gates


def _describe_losers(settings: PipelineSettings, config: PipelineConfig, run_id: str, versions: dict,
                     gates: dict[str, list[gate_step.GateCheck]], winner: str | None, objective: str,
                     preferred: frozenset[str]) -> None:
    """Say in every other version's description why it was not promoted (``preferred``: the GPU
    candidates, when one of them won because target gpu prefers them)."""
    for name, checks in gates.items():
        if name == winner:
            continue
        reasons = gate_step.failure_reasons(checks)
        metric = gate_step.METRIC_NAMES[config.gate.primary_metric]
        better = (f"better by {metric}" if objective == "most_accurate" else
                  f"faster, or as fast within {config.gate.latency_noise_margin:.0%} and better by {metric}")
        if not reasons and preferred and name not in preferred:
            better = "a GPU candidate (target gpu prefers them)"
        why = "; ".join(reasons) if reasons else f"passed every gate but {winner} was {better}"
        registry.describe_decision(settings.mlflow_tracking_uri, config.promote.registered_model, versions[name],
                                   f"not promoted by run {run_id}: {why}.")


def gate_candidates(settings: PipelineSettings, config: PipelineConfig, run_id: str, evaluations: dict[str, dict],
                    registered: dict, champion: dict | None) -> dict:
    """Gate every registered candidate, record each gate on its model version, choose the winner and
    say in every other version's description why it was not chosen. Writes ``decisions/gates.json``."""
    teacher = StepResult.from_dict(evaluations[REFERENCE_CANDIDATE]).metrics
    model_name, uri = config.promote.registered_model, settings.mlflow_tracking_uri
    gates = judge_candidates(config.gate, evaluations,
                             [name for name, version in registered["versions"].items() if version is not None],
                             champion)
    for name, checks in gates.items():
        model_aliases.tag_version(uri, model_name, registered["versions"][name],
                                  {f"gate.{c.name}": f"{c.decision.value}: {c.detail}" for c in checks})
    plan = read_plan(settings.run_dir(run_id))
    resolution = hardware.read_resolution(settings.run_dir(run_id) / DECISIONS)
    preferred = frozenset(name for name in gates if resolution is not None and resolution.prefer_gpu
                          and RECIPE.producer(name).target is Target.GPU)
    winner = choose_winner({name: (gate_step.passed(checks), evaluations[name]["metrics"])
                            for name, checks in gates.items()}, plan.objective, preferred,
                           config.gate.latency_noise_margin, config.gate.primary_metric)
    registered_metrics = {name: evaluations[name]["metrics"] for name in gates}
    no_winner = (no_winner_reason(config.gate, registered_metrics, teacher[config.gate.primary_metric])
                 if winner is None and registered_metrics else None)
    _describe_losers(settings, config, run_id, registered["versions"], gates, winner,
                     plan.objective, preferred if winner in preferred else frozenset())
    decisions = {
        "run_id": run_id,
        "mlflow_parent_run_id": registered["parent_run_id"],
        "registered_model": model_name,
        "versions": registered["versions"],
        "reference_version": registered.get("reference_version"),
        "candidates": {name: StepResult.from_dict(value).metrics for name, value in evaluations.items()},
        "switched_off": switched_off_candidates(config) | not_built_candidates(settings, config, run_id, evaluations),
        "target": resolution.to_dict() if resolution is not None else None,
        "champion_before": None if champion is None else {key: value for key, value in champion.items()
                                                          if key not in PER_TEXT},
        "primary_metric": config.gate.primary_metric,
        "majority_share": _majority(evaluations),
        "gates": {name: [{"name": c.name, "decision": c.decision.value, "detail": c.detail} for c in checks]
                  for name, checks in gates.items()},
        "winner": winner,
        "objective": plan.objective,
        "plan": plan.to_dict(),
        "no_winner_reason": no_winner,
    } | quality_record(evaluations, config.gate.primary_metric)
    write_json_atomic(settings.run_dir(run_id) / DECISIONS / "gates.json", decisions)
    log.info("winner: %s", winner or f"none: {no_winner}; the champion stays")
    return {"winner": winner, "no_winner_reason": no_winner}


def promote_winner(settings: PipelineSettings, config: PipelineConfig, run_id: str, data: dict,
                   evaluations: dict[str, dict], gated: dict) -> dict:
    """Serve the gated winner on Triton and move the alias; SKIPPED (with the reason) when there is none.

    The outcome, failure included, is written to ``decisions/promotion.json`` for the report;
    a failure is raised after that, so the task fails and the run with it.
    """
    decisions = read_decisions(settings, run_id)
    winner, record_path = gated["winner"], settings.run_dir(run_id) / DECISIONS / "promotion.json"
    if winner is None:
        why = gated.get("no_winner_reason") or "no candidate passed every gate"
        result = StepResult(step="promote", status=StepStatus.SKIPPED,
                            reason=f"{why}; nothing is promoted and the champion stays (see the gates of each)")
        write_json_atomic(record_path, result.to_dict())
        registry.record_outcome(settings.mlflow_tracking_uri, settings.experiment, run_id, {}, "not promoted",
                                result.reason)
        return result.to_dict()
    uri, model_name, version = settings.mlflow_tracking_uri, config.promote.registered_model, decisions["versions"][winner]
    candidate = StepResult.from_dict(evaluations[winner])
    if config.promote.approval == "manual":
        return _propose(settings, config, run_id, data, candidate, winner, version, record_path)
    try:
        result = promote_step.run(config.promote, _promotion_target(settings), model_dir=Path(candidate.uri("model")),
                                  predictions=Path(candidate.uri("predictions")),
                                  data_dir=Path(StepResult.from_dict(data).uri("data")), mlflow_version=version,
                                  max_length=config.evaluate.max_length, intra_op_threads=config.evaluate.threads,
                                  truncation=config.evaluate.truncation)
    except PromotionFailed as error:
        registry.describe_decision(uri, model_name, version, f"gates passed but run {run_id} could not serve it: {error}")
        failed = StepResult(step="promote", status=StepStatus.FAILED, reason=str(error), info={"candidate": winner})
        write_json_atomic(record_path, failed.to_dict())
        raise
    result = replace(result, info=result.info | {"candidate": winner})
    registry.describe_decision(
        uri, model_name, version,
        f"promoted by run {run_id}: every gate passed and it was the "
        f"{'most accurate' if decisions.get('objective') == 'most_accurate' else FASTEST} passing candidate; "
        f"serving as Triton "
        f"{config.promote.triton_model} version {int(result.metrics['triton_version'])} with alias "
        f"{config.promote.alias!r}.")
    write_json_atomic(record_path, result.to_dict())
    return result.to_dict()


def _propose(settings: PipelineSettings, config: PipelineConfig, run_id: str, data: dict, candidate: StepResult,
             winner: str, version: str, record_path: Path) -> dict:
    """Manual approval: the winner becomes the challenger; the record says the run waits for a reviewer."""
    proposal = approval.propose(config.promote, _promotion_target(settings), Path(candidate.uri("model")),
                                Path(candidate.uri("predictions")), Path(StepResult.from_dict(data).uri("data")),
                                version, config.evaluate.max_length, config.evaluate.threads,
                                datetime.now(timezone.utc), truncation=config.evaluate.truncation)
    waiting = proposal.describe(config.promote)
    registry.describe_decision(settings.mlflow_tracking_uri, config.promote.registered_model, version,
                               f"every gate passed in run {run_id}; {waiting}.")
    result = StepResult(step="promote", status=StepStatus.SKIPPED, reason=waiting,
                        info={"candidate": winner, "mlflow_version": version, "approval": "pending",
                              "deadline": proposal.deadline.isoformat()})
    write_json_atomic(record_path, result.to_dict())
    return result.to_dict()


def awaits_review(promotion: dict) -> bool:
    """Whether a promotion record is a manual-approval proposal still waiting for a reviewer."""
    return promotion.get("info", {}).get("approval") == "pending"


def await_approval(settings: PipelineSettings, config: PipelineConfig, run_id: str, now: datetime) -> dict | None:
    """One check of a run waiting for a reviewer: None while nobody decided (and the deadline is ahead),
    else the final promotion record (also written for the report). A run that did not wait (approval
    auto, no winner, a failed promotion) gets its promotion record back at once."""
    record_path = settings.run_dir(run_id) / DECISIONS / "promotion.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else None
    if record is None or not awaits_review(record):
        return record
    proposal = approval.Proposal(record["info"]["mlflow_version"], datetime.fromisoformat(record["info"]["deadline"]))
    outcome = approval.decision(settings.mlflow_tracking_uri, config.promote, proposal, now)
    if outcome == "pending":
        return None
    try:
        result = approval.conclude(config.promote, _promotion_target(settings), proposal, outcome)
    except PromotionFailed as error:
        result = StepResult(step="promote", status=StepStatus.FAILED, reason=f"approved, but not served: {error}",
                            info={"mlflow_version": proposal.version, "approval": outcome})
    result = replace(result, info=result.info | {"candidate": record["info"]["candidate"]})
    registry.describe_decision(settings.mlflow_tracking_uri, config.promote.registered_model, proposal.version,
                               f"{outcome} after review: {result.reason}")
    write_json_atomic(record_path, result.to_dict())
    return result.to_dict()


def read_decisions(settings: PipelineSettings, run_id: str) -> dict:
    """The gate task's record of run ``run_id``; PipelineError when the gate did not finish."""
    path = settings.run_dir(run_id) / DECISIONS / "gates.json"
    if not path.exists():
        raise PipelineError(f"nothing to report: the gate did not finish for run {run_id} ({path} is missing); "
                            "see the gate task and the tasks before it")
    return json.loads(path.read_text())


def write_report(settings: PipelineSettings, run_id: str) -> dict:
    """``summary.json`` and the readable report (Markdown, HTML, Pareto plot) of the run from the
    decision records, all logged to the MLflow parent run. Runs after a failed promotion too."""
    summary = read_decisions(settings, run_id)
    promotion_path = settings.run_dir(run_id) / DECISIONS / "promotion.json"
    summary["promotion"] = (json.loads(promotion_path.read_text()) if promotion_path.exists() else
                            StepResult(step="promote", status=StepStatus.FAILED,
                                       reason="the promote task did not run to a decision (see its log)").to_dict())
    summary_path = settings.run_dir(run_id) / "summary.json"
    write_json_atomic(summary_path, summary)
    reports = report.write_reports(summary, settings.run_dir(run_id) / "report")
    registry.log_run_summary(settings.mlflow_tracking_uri, summary["mlflow_parent_run_id"], [summary_path, *reports],
                             {f"{name}.{key}": value for name, value in summary["candidates"].items()
                              for key, value in value.items() if key in ("accuracy", "macro_f1", "latency_p95_ms")})
    return {"summary": str(summary_path), "winner": summary["winner"], "promotion": summary["promotion"]}


def label_names(evaluations: dict[str, dict]) -> list[str]:
    """The run's label names in class-id order, from the fine-tuned teacher's model config (its
    evaluation's class ids when the config names none; empty without either)."""
    reference = StepResult.from_dict(evaluations[REFERENCE_CANDIDATE])
    config_path = Path(reference.uris.get("model", "")) / "config.json"
    id2label = json.loads(config_path.read_text()).get("id2label", {}) if config_path.is_file() else {}
    if id2label:
        return [str(id2label[key]) for key in sorted(id2label, key=int)]
    predictions = _predictions(evaluations[REFERENCE_CANDIDATE])
    return [str(index) for index in range(read_logits(predictions).shape[1])] if predictions else []


def quality_record(evaluations: dict[str, dict], metric: str) -> dict:
    """The per-class table (precision, recall, F1, support) of every evaluated candidate, and each
    candidate's paired comparison with the teacher on ``metric`` (a candidate better than its
    teacher beyond the noise says the teacher is under-trained), for the report."""
    answers = {name: read_answers(path) for name, value in evaluations.items()
               if (path := _predictions(value)) is not None}
    if REFERENCE_CANDIDATE not in answers:
        return {"labels": [], "per_class": {}, "versus_teacher": {}}
    names = label_names(evaluations)
    as_text = {name: ([names[i] for i in found.truth], [names[i] for i in found.predicted])
               for name, found in answers.items()}
    truth, teacher = as_text[REFERENCE_CANDIDATE]
    versus = {}
    for name, (_, predicted) in as_text.items():
        if name != REFERENCE_CANDIDATE:
            versus[name] = (paired_bootstrap_macro_f1(truth, predicted, teacher, names)
                            if metric == PrimaryMetric.MACRO_F1.value else
                            paired_comparison(answers[name].correct, answers[REFERENCE_CANDIDATE].correct)).to_dict()
    return {"labels": names, "versus_teacher": versus,
            "per_class": {name: per_class_scores(found[0], found[1], names) for name, found in as_text.items()}}


def _majority(evaluations: dict[str, dict]) -> float | None:
    predictions = _predictions(evaluations[REFERENCE_CANDIDATE])
    return majority_share(predictions) if predictions else None


def _predictions(evaluation: dict) -> Path | None:
    """A candidate's per-text outputs, when its evaluation wrote them (every evaluation of this pipeline does)."""
    path = StepResult.from_dict(evaluation).uris.get("predictions")
    return Path(path) if path else None


def _promotion_target(settings: PipelineSettings) -> promote_step.PromotionTarget:
    return promote_step.PromotionTarget(settings.triton_url, settings.triton_model_repository,
                                        settings.mlflow_tracking_uri, settings.prediction_log_url)
