"""The optimize_model flow: one function per kind of DAG task, driven by the recipe (tasks/recipe.py).

Each function takes the settings, the run's config and the upstream results (plain dicts from
XCom), calls one step, and returns the step's result as a plain dict. The DAG file only wires.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from tasks import data as data_step
from tasks import distill as distill_step
from tasks import evaluate as evaluate_step
from tasks import export as export_step
from tasks import finetune as finetune_step
from tasks import gate as gate_step
from tasks import promote as promote_step
from tasks import prune as prune_step
from tasks import quantize as quantize_step
from tasks import model_aliases, params, registry, report
from tasks.assets import fetch_demo_assets
from tasks.champion import ChampionScore
from tasks.config import PipelineConfig
from tasks.errors import ConfigError, PipelineError, PromotionFailed
from tasks.onnx_model import compare_logits
from tasks.predictions import read_logits
from tasks.recipe import MODEL_INPUT, OPTIMIZE_MODEL, Step
from tasks.results import ModelFormat, StepResult, StepStatus, write_json_atomic
from tasks.settings import PipelineSettings

log = logging.getLogger(__name__)

RECIPE = OPTIMIZE_MODEL
DEMO_PREFIX = "demo:"
DEMO_SOURCES = {"demo:imdb": "imdb", "demo:tweets": "tweets", "demo:minilm": "teacher"}

# The form's params (generated from the config fields' metadata) and where each goes in the config.
PARAM_PATHS = {name: (spec.section, spec.key) for name, spec in params.pipeline_params().items()}
DEFAULT_PARAMS: dict[str, Any] = params.default_params()
TRIGGER_PARAMS = params.TRIGGER_PARAMS
RUN_PARAMS = tuple(params.RUN_PARAMS)
# The model each candidate was converted from (export or quantization), for the agreement gate.
SOURCE_OF = {stage.candidate: stage.compared_with for stage in RECIPE.stages if stage.candidate and stage.compared_with}


def config_from_params(params: dict[str, Any]) -> PipelineConfig:
    """Flat UI params (plus an optional nested ``overrides`` object) -> a validated PipelineConfig."""
    nested: dict[str, dict[str, Any]] = {}
    params = {name: value for name, value in params.items() if name not in RUN_PARAMS}
    unknown = set(params) - set(PARAM_PATHS) - {"overrides"}
    if unknown:
        raise ConfigError(f"unknown params {sorted(unknown)}; known: {sorted(PARAM_PATHS)} and 'overrides'")
    for name, value in (DEFAULT_PARAMS | params).items():
        if name == "overrides":
            continue
        section, key = PARAM_PATHS[name]
        nested.setdefault(section, {})[key] = value
    overrides = params.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ConfigError("overrides must be an object like {\"quantize\": {\"per_channel\": false}}")
    for section, values in overrides.items():
        if not isinstance(values, dict):
            raise ConfigError(f"overrides.{section} must be an object")
        nested.setdefault(section, {}).update(values)
    return PipelineConfig.from_dict(nested)


def switched_off(config: PipelineConfig, techniques: tuple[str, ...]) -> str | None:
    """Why work that needs ``techniques`` does not run under ``config`` (None: all of them are on)."""
    off = [name for name in techniques if not getattr(config, name).enabled]
    return f"{' and '.join(off)} switched off in the run's params" if off else None


def stage_switched_off(config: PipelineConfig, stage_id: str) -> str | None:
    """Why the recipe's stage ``stage_id`` does not run under ``config`` (None: it runs): one of the
    techniques it or anything upstream of it applies is switched off."""
    return switched_off(config, RECIPE.techniques_needed(stage_id))


def switched_off_candidates(config: PipelineConfig) -> dict[str, str]:
    """The candidates ``config`` does not build, each with the reason, in recipe order."""
    reasons = {stage.candidate: stage_switched_off(config, stage.id) for stage in RECIPE.stages if stage.candidate}
    return {name: reason for name, reason in reasons.items() if reason is not None}


def enabled_candidates(config: PipelineConfig) -> list[str]:
    """The candidates ``config`` builds, evaluates and registers, in recipe order (sources first)."""
    off = switched_off_candidates(config)
    return [name for name in RECIPE.candidates if name not in off]


def resolve_source(source: str, settings: PipelineSettings) -> str:
    """Replace ``demo:*`` names with the cached demo asset paths (fetched once)."""
    if not source.startswith(DEMO_PREFIX):
        return source
    if source not in DEMO_SOURCES:
        raise ConfigError(f"unknown demo asset {source!r}; known: {sorted(DEMO_SOURCES)}")
    assets = fetch_demo_assets(settings.assets_cache, progress=log.info)
    return assets.as_dict()[DEMO_SOURCES[source]]


def prepare_data(settings: PipelineSettings, config: PipelineConfig, run_id: str) -> dict:
    data_config = replace(config.data, source=resolve_source(config.data.source, settings))
    result = data_step.run(data_config, settings.run_dir(run_id) / "data")
    return result.to_dict()


def data_changed(settings: PipelineSettings, config: PipelineConfig, data: dict, force: bool) -> dict:
    """Whether training can change anything: False when the serving champion was trained on exactly this
    data (same content hash) by exactly this code (same commit). Returns ``{"changed", "reason"}``."""
    if force:
        return {"changed": True, "reason": "force_retrain is set"}
    uri, model = settings.mlflow_tracking_uri, config.promote.registered_model
    champion = model_aliases.alias_version(uri, model, config.promote.alias)
    if champion is None:
        return {"changed": True, "reason": f"{model} has no {config.promote.alias!r} yet"}
    tags = model_aliases.version_tags(uri, model, champion)
    data_hash, code = StepResult.from_dict(data).info["data_hash"], registry.code_version()
    differences = [f"{name} {tags.get(key, '?')[:12]} -> {value[:12]}"
                   for name, key, value in (("data", "data_hash", data_hash), ("code", "code_version", code))
                   if tags.get(key) != value]
    if differences:
        return {"changed": True, "reason": f"changed since champion v{champion}: " + ", ".join(differences)}
    return {"changed": False,
            "reason": f"nothing changed: champion v{champion} was trained on this data ({data_hash[:12]}) with this "
                      f"code ({code}); the run stops here. Set force_retrain to train anyway."}


def run_stage(settings: PipelineSettings, config: PipelineConfig, run_id: str, stage_id: str, data: dict,
              upstream: dict[str, dict]) -> dict:
    """Run the recipe's stage ``stage_id`` on the prepared data and its upstream results (keyword ->
    result, as the stage's ``inputs`` name them); returns its result as a plain dict."""
    stage = RECIPE.stage(stage_id)
    missing = set(stage.inputs) - {key for key, value in upstream.items() if value}
    if missing:
        raise PipelineError(f"{stage.id} needs the results of {sorted(stage.inputs[key] for key in missing)}")
    data_dir = Path(StepResult.from_dict(data).uri("data"))
    models = {key: Path(StepResult.from_dict(value).uri("model")) for key, value in upstream.items() if value}
    out_dir = settings.run_dir(run_id) / stage.output
    section = getattr(config, stage.section)
    length = config.finetune.max_length
    if stage.step is Step.FINETUNE:
        section = replace(section, model=resolve_source(section.model, settings))
        result = finetune_step.run(section, data_dir, out_dir)
    elif stage.step is Step.DISTILL:
        result = distill_step.run(section, teacher_dir=models[MODEL_INPUT], data_dir=data_dir, out_dir=out_dir)
    elif stage.step is Step.PRUNE:
        result = prune_step.run(section, student_dir=models[MODEL_INPUT], teacher_dir=models["teacher"],
                                data_dir=data_dir, out_dir=out_dir)
    elif stage.step is Step.EXPORT:
        result = export_step.run(section, model_dir=models[MODEL_INPUT], data_dir=data_dir, out_dir=out_dir,
                                 max_length=length)
    elif stage.step is Step.QUANTIZE:
        result = quantize_step.run(section, onnx_dir=models[MODEL_INPUT], data_dir=data_dir, out_dir=out_dir,
                                   max_length=length)
    else:  # a new Step needs its branch here
        raise PipelineError(f"stage {stage.id}: no runner for step {stage.step.value!r}")
    return result.to_dict()


def evaluate_candidates(settings: PipelineSettings, config: PipelineConfig, run_id: str, data: dict,
                        produced: dict[str, dict | None]) -> dict[str, dict]:
    """Evaluate every candidate the config switched on, on the same test split.

    ``produced`` maps stage id -> result; the stages of switched-off techniques were skipped (None,
    or absent). The result holds the evaluated candidates only.
    """
    data_dir = Path(StepResult.from_dict(data).uri("data"))
    for candidate, reason in switched_off_candidates(config).items():
        log.info("%s switched off, not evaluated: %s", candidate, reason)
    evaluations = {}
    for candidate in enabled_candidates(config):
        stage = RECIPE.producer(candidate)
        if produced.get(stage.id) is None:
            raise PipelineError(f"{candidate} is switched on but its stage {stage.id!r} produced no result (skipped "
                                f"or cleared?); clear that task and its downstream tasks to build it again")
        model_dir = Path(StepResult.from_dict(produced[stage.id]).uri("model"))
        model_format = ModelFormat(stage.model_format.value)
        log.info("evaluating %s (%s) from %s", candidate, model_format.value, model_dir)
        result = evaluate_step.run_isolated(config.evaluate, candidate, model_dir, model_format, data_dir,
                                            settings.run_dir(run_id) / "evaluation" / candidate)
        evaluations[candidate] = result.to_dict()
        log.info("%s: accuracy %.4f p50 %.2f ms p95 %.2f ms", candidate, result.metrics["accuracy"],
                 result.metrics["latency_p50_ms"], result.metrics["latency_p95_ms"])
    return evaluations


def candidate_metrics(evaluations: dict[str, dict], candidate: str) -> dict[str, float]:
    """A candidate's evaluation metrics plus its agreement with its source model on the same test texts."""
    metrics = dict(StepResult.from_dict(evaluations[candidate]).metrics)
    source = SOURCE_OF.get(candidate)
    if source is not None:
        agreement = compare_logits(
            read_logits(Path(StepResult.from_dict(evaluations[source]).uri("predictions"))),
            read_logits(Path(StepResult.from_dict(evaluations[candidate]).uri("predictions"))),
        )
        metrics.update({f"source_{key}": value for key, value in agreement.items()})
    return metrics


def register_candidates(settings: PipelineSettings, config: PipelineConfig, run_id: str, data: dict,
                        evaluations: dict[str, dict]) -> dict[str, Any]:
    """One MLflow parent run, a nested run per candidate, ONNX candidates registered as versions."""
    data_result = StepResult.from_dict(data)
    off = switched_off_candidates(config)
    parent = registry.parent_run_id(settings.mlflow_tracking_uri, settings.experiment, run_id,
                                    _flatten(config.to_dict()) | {"switched_off": ", ".join(off) or "none"})
    lineage = {"data_hash": data_result.info["data_hash"],
               "split_sizes": ",".join(f"{k}={int(v)}" for k, v in data_result.metrics.items()),
               "code_version": registry.code_version()}
    for candidate, reason in off.items():
        log.info("%s switched off, not registered: %s", candidate, reason)
    versions: dict[str, str | None] = {}
    for candidate in (name for name in RECIPE.candidates if name in evaluations):  # sources come first
        stage = RECIPE.producer(candidate)
        evaluation = StepResult.from_dict(evaluations[candidate])
        source = SOURCE_OF.get(candidate)
        versions[candidate] = registry.log_candidate(
            settings.mlflow_tracking_uri, settings.experiment, parent, run_id, config.promote.registered_model,
            registry.Candidate(candidate, Path(evaluation.uri("model")), candidate_metrics(evaluations, candidate),
                               RECIPE.technique_chain(stage.id),
                               registrable=stage.model_format.value == ModelFormat.ONNX.value),
            lineage | {"source_candidate": source or "-",
                       "source_version": (versions.get(source) or "not registered") if source else "-"},
        )
    return {"parent_run_id": parent, "versions": versions}


# The decisions: four tasks, each safe to retry. Each writes its record under the run's folder
# (``decisions/``), and the report reads those records, so a retried report rewrites the same
# report and a retried promotion does not score the champion again.
DECISIONS = "decisions"


def score_champion(settings: PipelineSettings, config: PipelineConfig, run_id: str, data: dict) -> dict | None:
    """The serving champion's accuracy on this run's test split, through Triton (None: nothing serves)."""
    target = _promotion_target(settings)
    score = promote_step.champion_score(target, config.promote, Path(StepResult.from_dict(data).uri("data")))
    record = None if score is None else {"accuracy": score.accuracy, "note": score.note}
    write_json_atomic(settings.run_dir(run_id) / DECISIONS / "champion.json", {"champion": record})
    log.info("champion: %s", record or "nothing serves yet")
    return record


def choose_winner(gated: dict[str, tuple[bool, float]]) -> str | None:
    """The fastest (lowest batch-1 p50 latency) candidate among those that passed every gate."""
    passing = [(latency, name) for name, (ok, latency) in gated.items() if ok]
    return min(passing)[1] if passing else None


def gate_candidates(settings: PipelineSettings, config: PipelineConfig, run_id: str, evaluations: dict[str, dict],
                    registered: dict, champion: dict | None) -> dict:
    """Gate every registered candidate, record each gate on its model version, choose the winner and
    say in every other version's description why it was not chosen. Writes ``decisions/gates.json``."""
    teacher = StepResult.from_dict(evaluations["teacher_pytorch"]).metrics
    score = None if champion is None else ChampionScore(champion["accuracy"], champion["note"])
    model_name, uri = config.promote.registered_model, settings.mlflow_tracking_uri
    gates: dict[str, list[gate_step.GateCheck]] = {}
    for name, version in registered["versions"].items():
        if version is None:
            continue
        gates[name] = gate_step.evaluate_gates(config.gate, candidate_metrics(evaluations, name), teacher, score)
        model_aliases.tag_version(uri, model_name, version,
                             {f"gate.{c.name}": f"{c.decision.value}: {c.detail}" for c in gates[name]})
    winner = choose_winner({name: (gate_step.passed(checks), evaluations[name]["metrics"]["latency_p50_ms"])
                            for name, checks in gates.items()})
    for name, checks in gates.items():
        if name != winner:
            reasons = gate_step.failure_reasons(checks)
            why = "; ".join(reasons) if reasons else f"passed every gate but {winner} was faster"
            registry.describe_decision(uri, model_name, registered["versions"][name],
                                       f"not promoted by run {run_id}: {why}.")
    decisions = {
        "run_id": run_id,
        "mlflow_parent_run_id": registered["parent_run_id"],
        "registered_model": model_name,
        "versions": registered["versions"],
        "candidates": {name: StepResult.from_dict(value).metrics for name, value in evaluations.items()},
        "switched_off": switched_off_candidates(config),
        "champion_before": champion,
        "gates": {name: [{"name": c.name, "decision": c.decision.value, "detail": c.detail} for c in checks]
                  for name, checks in gates.items()},
        "winner": winner,
    }
    write_json_atomic(settings.run_dir(run_id) / DECISIONS / "gates.json", decisions)
    log.info("winner: %s", winner or "none: no candidate passed every gate; the champion stays")
    return {"winner": winner}


def promote_winner(settings: PipelineSettings, config: PipelineConfig, run_id: str, data: dict,
                   evaluations: dict[str, dict], gated: dict) -> dict:
    """Serve the gated winner on Triton and move the alias; SKIPPED (with the reason) when there is none.

    The outcome, failure included, is written to ``decisions/promotion.json`` for the report;
    a failure is raised after that, so the task fails and the run with it.
    """
    decisions = read_decisions(settings, run_id)
    winner, record_path = gated["winner"], settings.run_dir(run_id) / DECISIONS / "promotion.json"
    if winner is None:
        result = StepResult(step="promote", status=StepStatus.SKIPPED,
                            reason="no candidate passed every gate; the champion stays (see the gates of each)")
        write_json_atomic(record_path, result.to_dict())
        return result.to_dict()
    uri, model_name, version = settings.mlflow_tracking_uri, config.promote.registered_model, decisions["versions"][winner]
    candidate = StepResult.from_dict(evaluations[winner])
    try:
        result = promote_step.run(config.promote, _promotion_target(settings), model_dir=Path(candidate.uri("model")),
                                  predictions=Path(candidate.uri("predictions")),
                                  data_dir=Path(StepResult.from_dict(data).uri("data")), mlflow_version=version,
                                  max_length=config.evaluate.max_length, intra_op_threads=config.evaluate.threads)
    except PromotionFailed as error:
        registry.describe_decision(uri, model_name, version, f"gates passed but run {run_id} could not serve it: {error}")
        failed = StepResult(step="promote", status=StepStatus.FAILED, reason=str(error), info={"candidate": winner})
        write_json_atomic(record_path, failed.to_dict())
        raise
    result = replace(result, info=result.info | {"candidate": winner})
    registry.describe_decision(
        uri, model_name, version,
        f"promoted by run {run_id}: every gate passed and it was the fastest passing candidate; serving as Triton "
        f"{config.promote.triton_model} version {int(result.metrics['triton_version'])} with alias "
        f"{config.promote.alias!r}.")
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
                              for key, value in value.items() if key in ("accuracy", "latency_p95_ms")})
    return {"summary": str(summary_path), "winner": summary["winner"], "promotion": summary["promotion"]}


def _promotion_target(settings: PipelineSettings) -> promote_step.PromotionTarget:
    return promote_step.PromotionTarget(settings.triton_url, settings.triton_model_repository,
                                        settings.mlflow_tracking_uri)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat
