"""The optimize_model flow up to the decisions (``tasks/decisions.py``): params to config, the
recipe's stages (``tasks/recipe.py``), the evaluation and the registration.

Each function takes the settings, the run's config and the upstream results (plain dicts from
XCom), calls one step, and returns the step's result as a plain dict. The DAG file only wires.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from serving.model_repository import DEFAULT_MAX_BATCH_SIZE
from serving.truncation import DEFAULT_TRUNCATION
from tasks import compile as compile_step
from tasks import data as data_step
from tasks import distill as distill_step
from tasks import evaluate as evaluate_step
from tasks import export as export_step
from tasks import finetune as finetune_step
from tasks import prune as prune_step
from tasks import quantize as quantize_step
from tasks import hardware, lineage, model_aliases, params, registry, teacher_fetch
from tasks.assets import DATASETS, fetch_dataset, fetch_demo_assets
from tasks.config import PipelineConfig
from tasks.errors import ConfigError, PipelineError
from tasks.onnx_model import compare_logits
from tasks.predictions import read_logits
from tasks.recipe import MODEL_INPUT, OPTIMIZE_MODEL, REFERENCE_CANDIDATE, Stage, Step, Target
from tasks.results import ModelFormat, StepResult, StepStatus, write_json_atomic
from tasks.settings import PipelineSettings

log = logging.getLogger(__name__)

RECIPE = OPTIMIZE_MODEL
DECISIONS = "decisions"  # the run's records of what it decided and why (tasks/decisions.py writes most)
DEMO_PREFIX = "demo:"
DEMO_SOURCES = {"demo:imdb": "imdb", "demo:tweets": "tweets"}  # the demo teacher: tasks/teacher_fetch.py
# Multi-class data sets, fetched only when a run names them (demo:reuters8, demo:newsgroups20).
DEMO_DATASETS = {f"{DEMO_PREFIX}{name}": name for name in DATASETS}

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
    """Why the recipe's stage ``stage_id`` does not run under ``config`` (None: it runs): a GPU stage
    under target cpu, or one of the techniques it or anything upstream of it applies is switched off."""
    if RECIPE.stage(stage_id).target is Target.GPU and config.compile.target == "cpu":
        return "target is cpu: the GPU branch is switched off in the run's params"
    return switched_off(config, RECIPE.techniques_needed(stage_id))


def resolve_target(settings: PipelineSettings, config: PipelineConfig, run_id: str) -> hardware.TargetResolution:
    """The run's target resolved on this worker (its GPUs, its TensorRT), written for the later tasks."""
    resolution = _resolve_here(config)
    hardware.write_resolution(settings.run_dir(run_id) / DECISIONS, resolution)
    return resolution


def _resolve_here(config: PipelineConfig) -> hardware.TargetResolution:
    return hardware.resolve(config.compile.target, hardware.gpu_names(), hardware.tensorrt_version())


def gpu_branch_off(settings: PipelineSettings, config: PipelineConfig, run_id: str) -> str | None:
    """Why the run's GPU stages do not run on this worker (None: they do), by the run's resolution
    (resolved here when the run has none yet)."""
    resolution = hardware.read_resolution(settings.run_dir(run_id) / DECISIONS)
    if resolution is None:
        resolution = _resolve_here(config)
    return None if resolution.gpu_branch else resolution.reason


def record_skip(settings: PipelineSettings, run_id: str, stage_id: str, reason: str) -> None:
    """Keep why a stage ended SKIPPED, for the evaluation and the report (``skip_reason``)."""
    folder = settings.run_dir(run_id) / DECISIONS / "skipped"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stage_id}.txt").write_text(reason)


def recorded_skip(settings: PipelineSettings, run_id: str, stage: Stage) -> str | None:
    """Why the stage or one upstream of it ended SKIPPED, as recorded (None: none did), e.g. a
    distillation SKIPPED because the teacher's encoder family is not supported."""
    folder = settings.run_dir(run_id) / DECISIONS / "skipped"
    for upstream in RECIPE.lineage(stage.id):
        if (folder / f"{upstream.id}.txt").exists():
            return f"{upstream.id} SKIPPED: {(folder / f'{upstream.id}.txt').read_text()}"
    return None


def not_built_reason(settings: PipelineSettings, run_id: str, stage: Stage,
                     config: PipelineConfig | None = None) -> str:
    """Why the stage (or one upstream of it) built nothing, as recorded, else the run's GPU resolution
    (resolved here under ``config`` when the run recorded none, e.g. a run without ``resolve_target``)."""
    folder = settings.run_dir(run_id) / DECISIONS / "skipped"
    if stage.candidate and (folder / f"evaluate_{stage.candidate}.txt").exists():
        return f"not evaluated: {(folder / f'evaluate_{stage.candidate}.txt').read_text()}"
    recorded = recorded_skip(settings, run_id, stage)
    if recorded is not None:
        return recorded
    resolution = hardware.read_resolution(settings.run_dir(run_id) / DECISIONS)
    if resolution is not None and not resolution.gpu_branch:
        return resolution.reason
    off = gpu_branch_off(settings, config, run_id) if resolution is None and config is not None else None
    return off or f"{stage.id} or a task upstream of it was skipped; see their logs"


def not_built_candidates(settings: PipelineSettings, config: PipelineConfig, run_id: str,
                         evaluations: dict[str, dict]) -> dict[str, str]:
    """The switched-on candidates that were not built or evaluated, with why: GPU candidates on a worker
    that could not build them, and those whose stage (or one upstream) ended SKIPPED."""
    return {name: not_built_reason(settings, run_id, RECIPE.producer(name), config)
            for name in enabled_candidates(config)
            if name not in evaluations and (RECIPE.producer(name).target is Target.GPU
                                            or recorded_skip(settings, run_id, RECIPE.producer(name)))}


def switched_off_candidates(config: PipelineConfig) -> dict[str, str]:
    """The candidates ``config`` does not build, each with the reason, in recipe order."""
    reasons = {stage.candidate: stage_switched_off(config, stage.id) for stage in RECIPE.stages if stage.candidate}
    return {name: reason for name, reason in reasons.items() if reason is not None}


def enabled_candidates(config: PipelineConfig) -> list[str]:
    """The candidates ``config`` builds, evaluates and registers, in recipe order (sources first)."""
    off = switched_off_candidates(config)
    return [name for name in RECIPE.candidates if name not in off]


def resolve_teacher(teacher: str, settings: PipelineSettings) -> str:
    """The teacher param as a checked local model folder (``tasks.teacher_fetch``: a folder, ``demo:minilm``,
    an MLflow model URI, a ``pypi:`` wheel or a hub id); TeacherError saying what is wrong."""
    return str(teacher_fetch.resolve_teacher(teacher, settings.assets_cache, settings.mlflow_tracking_uri))


def resolve_source(source: str, settings: PipelineSettings) -> str:
    """Replace ``demo:*`` data set names with the cached demo asset paths (fetched once)."""
    if not source.startswith(DEMO_PREFIX):
        return source
    if source in DEMO_DATASETS:
        return str(fetch_dataset(DEMO_DATASETS[source], settings.assets_cache, progress=log.info))
    if source not in DEMO_SOURCES:
        raise ConfigError(f"unknown demo asset {source!r}; known: {sorted(DEMO_SOURCES | DEMO_DATASETS)}")
    assets = fetch_demo_assets(settings.assets_cache, progress=log.info)
    return assets.as_dict()[DEMO_SOURCES[source]]


def prepare_data(settings: PipelineSettings, config: PipelineConfig, run_id: str,
                 reused: str | None = None) -> dict:
    """Load, clean and split the run's data; with ``reused`` (a prepared data folder, e.g. the
    champion's splits a re-optimization fetched), describe that folder instead."""
    if reused is not None:
        result = data_step.result_of(Path(reused))
        log.info("reusing the prepared data in %s (data hash %s)", reused, result.info["data_hash"][:12])
        return result.to_dict()
    data_config = replace(config.data, source=resolve_source(config.data.source, settings))
    result = data_step.run(data_config, settings.run_dir(run_id) / "data")
    return result.to_dict()


def run_lineage(settings: PipelineSettings, config: PipelineConfig, data: dict) -> lineage.Lineage:
    """What this run's models are built from: the data's hash, the effective config's hash, the teacher
    (fetched to its local folder, whose content is hashed; fine-tuning checks it) and the code version."""
    teacher = str(teacher_fetch.fetch_teacher(config.finetune.model, settings.assets_cache,
                                              settings.mlflow_tracking_uri))
    return lineage.Lineage(data_hash=StepResult.from_dict(data).info["data_hash"],
                           config_hash=lineage.config_hash(config), teacher_id=lineage.teacher_identity(teacher),
                           code_version=lineage.code_version())


def run_params(config: PipelineConfig) -> dict[str, str]:
    """The params of the run's MLflow parent run: the flattened config and the switched-off candidates."""
    off = switched_off_candidates(config)
    return lineage.config_params(config) | {"switched_off": ", ".join(off) or "none"}


def changed_since_champion(settings: PipelineSettings, config: PipelineConfig, data: dict, force: bool) -> dict:
    """Whether training can change anything: False when the serving champion was built from this data,
    this effective configuration, this teacher and this code. Returns ``{"changed", "reason"}``; the
    reason names each component that differs (for the configuration, the params)."""
    if force:
        return {"changed": True, "reason": "force_retrain is set"}
    uri, model = settings.mlflow_tracking_uri, config.promote.registered_model
    found = model_aliases.alias_tags(uri, model, config.promote.alias)
    if found is None:
        return {"changed": True, "reason": f"{model} has no {config.promote.alias!r} yet"}
    champion, tags = found
    current = run_lineage(settings, config, data)
    config_differs = tags.get("config_hash") not in (None, "", current.config_hash)
    champion_params = registry.parent_run_params(uri, model, champion) if config_differs else None
    differences = lineage.lineage_differences(tags, current, champion_params, run_params(config))
    if differences:
        return {"changed": True, "reason": f"changed since champion v{champion}: " + "; ".join(differences)}
    return {"changed": False,
            "reason": f"nothing changed: champion v{champion} was trained on this data "
                      f"({lineage.short(current.data_hash)}), with this configuration, this teacher and this code "
                      f"({current.code_version}); set force_retrain to train anyway"}


def run_stage(settings: PipelineSettings, config: PipelineConfig, run_id: str, stage_id: str, data: dict,
              upstream: dict[str, dict], reused_teacher: str | None = None) -> dict:
    """Run the recipe's stage ``stage_id`` on the prepared data and its upstream results (keyword ->
    result, as the stage's ``inputs`` name them); returns its result as a plain dict.

    ``reused_teacher``: a fine-tuned teacher folder (a re-optimization's, from the champion's
    lineage) that the fine-tuning stage returns instead of training again."""
    stage = RECIPE.stage(stage_id)
    off = gpu_branch_off(settings, config, run_id) if stage.target is Target.GPU else None
    if off is not None:
        record_skip(settings, run_id, stage.id, off)
        return StepResult(step=stage.step.value, status=StepStatus.SKIPPED, reason=off).to_dict()
    if stage.step is Step.FINETUNE and reused_teacher is not None:
        log.info("%s: reusing the fine-tuned teacher in %s (no fine-tuning)", stage.id, reused_teacher)
        return StepResult(step="finetune", status=StepStatus.SUCCESS, uris={"model": reused_teacher},
                          info={"reused": reused_teacher}).to_dict()
    missing = set(stage.inputs) - {key for key, value in upstream.items() if value}
    if missing:
        raise PipelineError(f"{stage.id} needs the results of {sorted(stage.inputs[key] for key in missing)}")
    data_dir = Path(StepResult.from_dict(data).uri("data"))
    models = {key: Path(StepResult.from_dict(value).uri("model")) for key, value in upstream.items() if value}
    section = replace(getattr(config, stage.section), **stage.settings)
    if stage.section == "finetune":
        section = replace(section, model=resolve_teacher(section.model, settings))
    result = _run_step(stage, section, models, data_dir, settings.run_dir(run_id) / stage.output,
                       config.finetune.max_length, settings.triton_tensorrt, config.finetune.truncation)
    if result.status is StepStatus.SKIPPED:
        record_skip(settings, run_id, stage.id, result.reason or "")
    return result.to_dict()


def _run_step(stage: Stage, section: Any, models: dict[str, Path], data_dir: Path, out_dir: Path,
              length: int, serving_tensorrt: str | None = None, truncation: str = DEFAULT_TRUNCATION) -> StepResult:
    """Call the stage's step with its section of the config (``serving_tensorrt``: the serving Triton's
    TensorRT, which an engine must be built with; ``length`` and ``truncation``: the run's tokens per text
    and how a longer text is cut, which export and quantization tokenize with)."""
    if stage.step is Step.FINETUNE:
        return finetune_step.run(section, data_dir, out_dir)
    if stage.step is Step.DISTILL:
        return distill_step.run(section, teacher_dir=models[MODEL_INPUT], data_dir=data_dir, out_dir=out_dir)
    if stage.step is Step.PRUNE:
        return prune_step.run(section, student_dir=models[MODEL_INPUT], teacher_dir=models["teacher"],
                              data_dir=data_dir, out_dir=out_dir)
    if stage.step is Step.EXPORT:
        return export_step.run(section, model_dir=models[MODEL_INPUT], data_dir=data_dir, out_dir=out_dir,
                               max_length=length, truncation=truncation)
    if stage.step is Step.QUANTIZE:
        return quantize_step.run(section, onnx_dir=models[MODEL_INPUT], data_dir=data_dir, out_dir=out_dir,
                                 max_length=length, truncation=truncation)
    if stage.step is Step.COMPILE:  # the engine takes what Triton will send it
        return compile_step.run(compile_step.serving_profile(section, length, DEFAULT_MAX_BATCH_SIZE),
                                models[MODEL_INPUT], out_dir, serving_tensorrt=serving_tensorrt)
    raise PipelineError(f"stage {stage.id}: no runner for step {stage.step.value!r}")  # a new Step needs a branch


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
        device = "cuda" if stage.target is Target.GPU else "cpu"
        # The worker could not build it, or its stage (or one upstream) ended SKIPPED: say why.
        if produced.get(stage.id) is None and (device == "cuda" or recorded_skip(settings, run_id, stage)):
            log.info("%s not built, not evaluated: %s", candidate, not_built_reason(settings, run_id, stage, config))
            continue
        if produced.get(stage.id) is None:
            raise PipelineError(f"{candidate} is switched on but its stage {stage.id!r} produced no result (skipped "
                                f"or cleared?); clear that task and its downstream tasks to build it again")
        unable = evaluate_step.gpu_unavailable_reason(stage.model_format) if device == "cuda" else None
        if unable is not None:
            record_skip(settings, run_id, f"evaluate_{candidate}", unable)
            log.info("%s cannot be evaluated on this worker: %s", candidate, unable)
            continue
        model_dir = Path(StepResult.from_dict(produced[stage.id]).uri("model"))
        log.info("evaluating %s (%s, on %s) from %s", candidate, stage.model_format.value, device, model_dir)
        result = evaluate_step.run_isolated(config.evaluate, candidate, model_dir, stage.model_format, data_dir,
                                            settings.run_dir(run_id) / "evaluation" / candidate, device)
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
    parent = registry.parent_run_id(settings.mlflow_tracking_uri, settings.experiment, run_id, run_params(config))
    built_from = run_lineage(settings, config, data).tags() | {
        "split_sizes": ",".join(f"{k}={int(v)}" for k, v in data_result.metrics.items())}
    registry.log_data(settings.mlflow_tracking_uri, parent, Path(data_result.uri("data")))
    for candidate, reason in off.items():
        log.info("%s switched off, not registered: %s", candidate, reason)
    versions: dict[str, str | None] = {}
    for candidate in (name for name in RECIPE.candidates if name in evaluations):  # sources come first
        stage = RECIPE.producer(candidate)
        evaluation = StepResult.from_dict(evaluations[candidate])
        source = SOURCE_OF.get(candidate)
        is_reference = candidate == REFERENCE_CANDIDATE
        versions[candidate] = registry.log_candidate(
            settings.mlflow_tracking_uri, settings.experiment, parent, run_id, config.promote.registered_model,
            registry.Candidate(candidate, Path(evaluation.uri("model")), candidate_metrics(evaluations, candidate),
                               RECIPE.technique_chain(stage.id),
                               registrable=stage.model_format is ModelFormat.ONNX, reference=is_reference),
            built_from | {"source_candidate": source or "-",
                          "source_version": (versions.get(source) or "not registered") if source else "-",
                          "reference_version": "-" if is_reference
                          else versions.get(REFERENCE_CANDIDATE) or "not registered"},
        )
    # The reference stays out of `versions`: those are the candidates the gates judge.
    return {"parent_run_id": parent, "reference_version": versions.pop(REFERENCE_CANDIDATE, None),
            "versions": versions}

