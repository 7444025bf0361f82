"""The optimize_model flow as one function per DAG task.

Each function takes the settings, the run's config and the upstream results (plain dicts from
XCom), calls one step, and returns the step's result as a plain dict. The DAG file only wires.
"""

from __future__ import annotations

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
from tasks import registry
from tasks import report
from tasks.assets import fetch_demo_assets
from tasks.config import PipelineConfig
from tasks.errors import ConfigError, PipelineError, PromotionFailed
from tasks.results import ModelFormat, StepResult, StepStatus, write_json_atomic
from tasks.settings import PipelineSettings

log = logging.getLogger(__name__)

DEMO_PREFIX = "demo:"
DEMO_SOURCES = {"demo:imdb": "imdb", "demo:tweets": "tweets", "demo:minilm": "teacher"}

# Params shown in the Airflow UI (flat, with defaults) and where each goes in the nested config.
PARAM_PATHS = {
    "data_source": ("data", "source"),
    "text_column": ("data", "text_column"),
    "label_column": ("data", "label_column"),
    "max_train": ("data", "max_train"),
    "max_eval": ("data", "max_eval"),
    "teacher": ("finetune", "model"),
    "epochs": ("finetune", "epochs"),
    "max_steps": ("finetune", "max_steps"),
    "batch_size": ("finetune", "batch_size"),
    "learning_rate": ("finetune", "learning_rate"),
    "max_length": ("finetune", "max_length"),
    "student_layers": ("distill", "student_layers"),
    "distill_epochs": ("distill", "epochs"),
    "prune_heads": ("prune", "head_fraction"),
    "prune_ffn": ("prune", "ffn_fraction"),
    "prune_epochs": ("prune", "recovery_epochs"),
    "distill": ("distill", "enabled"),
    "prune": ("prune", "enabled"),
    "quantize": ("quantize", "enabled"),
    "max_relative_accuracy_drop": ("gate", "max_relative_accuracy_drop"),
    "max_p95_latency_ms": ("gate", "max_p95_latency_ms"),
    "max_champion_regression": ("gate", "max_champion_regression"),
    "registered_model": ("promote", "registered_model"),
    "triton_model": ("promote", "triton_model"),
}
DEFAULT_PARAMS: dict[str, Any] = {
    "data_source": "demo:imdb",
    "text_column": "text",
    "label_column": "label",
    "max_train": 1000,
    "max_eval": 500,
    "teacher": "demo:minilm",
    "epochs": 1.0,
    "max_steps": 0,
    "batch_size": 16,
    "learning_rate": 5e-5,
    "max_length": 128,
    "student_layers": 0,
    "distill_epochs": 2.0,
    "prune_heads": 0.33,
    "prune_ffn": 0.6,
    "prune_epochs": 1.0,
    "distill": True,
    "prune": True,
    "quantize": True,
    "max_relative_accuracy_drop": 0.03,
    "max_p95_latency_ms": 0.0,
    "max_champion_regression": 0.01,
    "registered_model": "text-classifier",
    "triton_model": "text_classifier",
}
# candidate -> (the step whose output it is, format, technique chain)
CANDIDATES = {
    "teacher_pytorch": ("finetune", ModelFormat.PYTORCH, "finetune (PyTorch FP32)"),
    "onnx_fp32": ("export", ModelFormat.ONNX, "finetune > ONNX export (FP32)"),
    "onnx_int8": ("quantize", ModelFormat.ONNX, "finetune > ONNX export > dynamic INT8"),
    "student_onnx_fp32": ("export_student", ModelFormat.ONNX, "finetune > distill > ONNX export (FP32)"),
    "student_int8": ("quantize_student", ModelFormat.ONNX, "finetune > distill > ONNX export > dynamic INT8"),
    "pruned_onnx_fp32": ("export_pruned", ModelFormat.ONNX, "finetune > distill > prune > ONNX export (FP32)"),
    "pruned_int8": ("quantize_pruned", ModelFormat.ONNX, "finetune > distill > prune > ONNX export > dynamic INT8"),
}
# The compression techniques a run can switch off (params and config sections of the same names), and the
# ones each candidate needs: the teacher's FP32 candidates need none, so every run has something to serve.
TECHNIQUES = ("distill", "prune", "quantize")
CANDIDATE_TECHNIQUES: dict[str, tuple[str, ...]] = {
    "teacher_pytorch": (),
    "onnx_fp32": (),
    "onnx_int8": ("quantize",),
    "student_onnx_fp32": ("distill",),
    "student_int8": ("distill", "quantize"),
    "pruned_onnx_fp32": ("distill", "prune"),
    "pruned_int8": ("distill", "prune", "quantize"),
}
# The model each candidate was converted from (export or quantization), for the agreement gate.
# Distilled and pruned models are new models: the accuracy gates judge them instead.
SOURCE_OF = {"onnx_fp32": "teacher_pytorch", "onnx_int8": "onnx_fp32", "student_int8": "student_onnx_fp32",
             "pruned_int8": "pruned_onnx_fp32"}


# Params that describe why a run started (set by monitor_serving's trigger); not step settings.
TRIGGER_PARAMS = ("trigger_reason", "trigger_evidence")
# Params about the run itself rather than a step.
RUN_PARAMS = (*TRIGGER_PARAMS, "force_retrain")


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
    # Distillation, pruning recovery and evaluation use the fine-tuning sequence length, batch size
    # and learning rate unless told otherwise.
    finetune = nested["finetune"]
    nested.setdefault("evaluate", {}).setdefault("max_length", finetune.get("max_length", 128))
    for key in ("max_length", "batch_size", "learning_rate"):
        if key in finetune:
            nested.setdefault("distill", {}).setdefault(key, finetune[key])
            nested.setdefault("prune", {}).setdefault(key, finetune[key])
    return PipelineConfig.from_dict(nested)


def switched_off(config: PipelineConfig, techniques: tuple[str, ...]) -> str | None:
    """Why work that needs ``techniques`` does not run under ``config`` (None: all of them are on)."""
    off = [name for name in techniques if not getattr(config, name).enabled]
    return f"{' and '.join(off)} switched off in the run's params" if off else None


def switched_off_candidates(config: PipelineConfig) -> dict[str, str]:
    """The candidates ``config`` does not build, each with the reason, in CANDIDATES order."""
    reasons = {name: switched_off(config, CANDIDATE_TECHNIQUES[name]) for name in CANDIDATES}
    return {name: reason for name, reason in reasons.items() if reason is not None}


# Steps that make no candidate of their own name, and the techniques they need.
STEP_TECHNIQUES: dict[str, tuple[str, ...]] = {"distill_student": ("distill",), "prune_student": ("distill", "prune")}


def step_switched_off(config: PipelineConfig, step: str, name: str = "") -> str | None:
    """Why the pipeline step ``step`` (writing candidate ``name``, for export and quantize) does not run
    under ``config``; None when it runs. For orchestrators without the DAG's per-task checks (Kubeflow)."""
    return switched_off(config, CANDIDATE_TECHNIQUES.get(name) or STEP_TECHNIQUES.get(step, ()))


def enabled_candidates(config: PipelineConfig) -> list[str]:
    """The candidates ``config`` builds, evaluates and registers, in CANDIDATES order (sources first)."""
    off = switched_off_candidates(config)
    return [name for name in CANDIDATES if name not in off]


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
    champion = registry.alias_version(uri, model, config.promote.alias)
    if champion is None:
        return {"changed": True, "reason": f"{model} has no {config.promote.alias!r} yet"}
    tags = registry.version_tags(uri, model, champion)
    data_hash, code = StepResult.from_dict(data).info["data_hash"], registry.code_version()
    differences = [f"{name} {tags.get(key, '?')[:12]} -> {value[:12]}"
                   for name, key, value in (("data", "data_hash", data_hash), ("code", "code_version", code))
                   if tags.get(key) != value]
    if differences:
        return {"changed": True, "reason": f"changed since champion v{champion}: " + ", ".join(differences)}
    return {"changed": False,
            "reason": f"nothing changed: champion v{champion} was trained on this data ({data_hash[:12]}) with this "
                      f"code ({code}); the run stops here. Set force_retrain to train anyway."}


def finetune_teacher(settings: PipelineSettings, config: PipelineConfig, run_id: str, data: dict) -> dict:
    finetune_config = replace(config.finetune, model=resolve_source(config.finetune.model, settings))
    data_dir = Path(StepResult.from_dict(data).uri("data"))
    return finetune_step.run(finetune_config, data_dir, settings.run_dir(run_id) / "teacher").to_dict()


def distill_student(settings: PipelineSettings, config: PipelineConfig, run_id: str, data: dict,
                    teacher: dict) -> dict:
    result = distill_step.run(
        config.distill,
        teacher_dir=Path(StepResult.from_dict(teacher).uri("model")),
        data_dir=Path(StepResult.from_dict(data).uri("data")),
        out_dir=settings.run_dir(run_id) / "student",
    )
    return result.to_dict()


def prune_student(settings: PipelineSettings, config: PipelineConfig, run_id: str, data: dict, teacher: dict,
                  student: dict) -> dict:
    """Prune the distilled student's heads and FFN neurons, then recover it by distilling from the teacher."""
    result = prune_step.run(
        config.prune,
        student_dir=Path(StepResult.from_dict(student).uri("model")),
        teacher_dir=Path(StepResult.from_dict(teacher).uri("model")),
        data_dir=Path(StepResult.from_dict(data).uri("data")),
        out_dir=settings.run_dir(run_id) / "pruned",
    )
    return result.to_dict()


def export_onnx(settings: PipelineSettings, config: PipelineConfig, run_id: str, data: dict, model: dict,
                name: str = "onnx_fp32") -> dict:
    """Export the model of an upstream result (teacher or student) into ``<run>/<name>``."""
    result = export_step.run(
        config.export,
        model_dir=Path(StepResult.from_dict(model).uri("model")),
        data_dir=Path(StepResult.from_dict(data).uri("data")),
        out_dir=settings.run_dir(run_id) / name,
        max_length=config.finetune.max_length,
    )
    return result.to_dict()


def quantize_int8(settings: PipelineSettings, config: PipelineConfig, run_id: str, data: dict, onnx: dict,
                  name: str = "onnx_int8") -> dict:
    """Quantize an exported model into ``<run>/<name>``."""
    result = quantize_step.run(
        config.quantize,
        onnx_dir=Path(StepResult.from_dict(onnx).uri("model")),
        data_dir=Path(StepResult.from_dict(data).uri("data")),
        out_dir=settings.run_dir(run_id) / name,
        max_length=config.finetune.max_length,
    )
    return result.to_dict()


def evaluate_candidates(settings: PipelineSettings, config: PipelineConfig, run_id: str, data: dict,
                        produced: dict[str, dict | None]) -> dict[str, dict]:
    """Evaluate every candidate the config switched on, on the same test split.

    ``produced`` maps step name -> result; the steps of switched-off techniques were skipped (None,
    or absent). The result holds the evaluated candidates only.
    """
    data_dir = Path(StepResult.from_dict(data).uri("data"))
    for candidate, reason in switched_off_candidates(config).items():
        log.info("%s switched off, not evaluated: %s", candidate, reason)
    evaluations = {}
    for candidate in enabled_candidates(config):
        step, model_format, _ = CANDIDATES[candidate]
        if produced.get(step) is None:
            raise PipelineError(f"{candidate} is switched on but its step {step!r} produced no result (skipped or "
                                f"cleared?); clear that step and its downstream tasks to build it again")
        model_dir = Path(StepResult.from_dict(produced[step]).uri("model"))
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
        agreement = export_step.compare_logits(
            evaluate_step.read_logits(Path(StepResult.from_dict(evaluations[source]).uri("predictions"))),
            evaluate_step.read_logits(Path(StepResult.from_dict(evaluations[candidate]).uri("predictions"))),
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
    for candidate in (name for name in CANDIDATES if name in evaluations):  # sources come before what they feed
        _, model_format, technique = CANDIDATES[candidate]
        evaluation = StepResult.from_dict(evaluations[candidate])
        metrics = candidate_metrics(evaluations, candidate)
        source = SOURCE_OF.get(candidate)
        versions[candidate] = registry.log_candidate(
            settings.mlflow_tracking_uri, settings.experiment, parent, run_id, config.promote.registered_model,
            registry.Candidate(candidate, Path(evaluation.uri("model")), metrics, technique,
                               registrable=model_format is ModelFormat.ONNX),
            lineage | {"source_candidate": source or "-",
                       "source_version": (versions.get(source) or "not registered") if source else "-"},
        )
    return {"parent_run_id": parent, "versions": versions}


def choose_winner(gated: dict[str, tuple[bool, float]]) -> str | None:
    """The fastest (lowest batch-1 p50 latency) candidate among those that passed every gate."""
    passing = [(latency, name) for name, (ok, latency) in gated.items() if ok]
    return min(passing)[1] if passing else None


def gate_and_promote(settings: PipelineSettings, config: PipelineConfig, run_id: str, data: dict,
                     evaluations: dict[str, dict], registered: dict) -> dict:
    """Gate every registered candidate; promote the fastest one that passes every gate."""
    teacher = StepResult.from_dict(evaluations["teacher_pytorch"]).metrics
    data_dir = Path(StepResult.from_dict(data).uri("data"))
    target = promote_step.PromotionTarget(settings.triton_url, settings.triton_model_repository,
                                          settings.mlflow_tracking_uri)
    champion = promote_step.champion_score(target, config.promote, data_dir)
    model_name, uri = config.promote.registered_model, settings.mlflow_tracking_uri
    gates: dict[str, list[gate_step.GateCheck]] = {}
    for name, version in registered["versions"].items():
        if version is None:
            continue
        gates[name] = gate_step.evaluate_gates(config.gate, candidate_metrics(evaluations, name), teacher, champion)
        registry.tag_version(uri, model_name, version,
                             {f"gate.{c.name}": f"{c.decision.value}: {c.detail}" for c in gates[name]})
    winner = choose_winner({name: (gate_step.passed(checks), evaluations[name]["metrics"]["latency_p50_ms"])
                            for name, checks in gates.items()})
    for name, checks in gates.items():
        if name == winner:
            continue
        reasons = gate_step.failure_reasons(checks)
        why = "; ".join(reasons) if reasons else f"passed every gate but {winner} was faster"
        registry.describe_decision(uri, model_name, registered["versions"][name], f"not promoted by run {run_id}: {why}.")
    if winner is None:
        log.warning("no candidate passed every gate; the champion stays")
        result = StepResult(step="promote", status=StepStatus.SKIPPED,
                            reason="no candidate passed every gate; the champion stays (see the gates of each)")
    else:
        version = registered["versions"][winner]
        candidate = StepResult.from_dict(evaluations[winner])
        try:
            result = promote_step.run(
                config.promote,
                target,
                model_dir=Path(candidate.uri("model")),
                predictions=Path(candidate.uri("predictions")),
                data_dir=data_dir,
                mlflow_version=version,
                max_length=config.evaluate.max_length,
                intra_op_threads=config.evaluate.threads,
            )
        except PromotionFailed as error:
            registry.describe_decision(uri, model_name, version,
                                       f"gates passed but run {run_id} could not serve it: {error}")
            # The run's record is written even so: reviewers see every gate and why serving failed.
            failed = StepResult(step="promote", status=StepStatus.FAILED, reason=str(error),
                                info={"candidate": winner})
            _write_summary(settings, config, run_id, registered, evaluations, champion, gates, winner, failed)
            raise
        result = replace(result, info=result.info | {"candidate": winner})
        registry.describe_decision(
            uri, model_name, version,
            f"promoted by run {run_id}: every gate passed and it was the fastest passing candidate; serving as "
            f"Triton {config.promote.triton_model} version {int(result.metrics['triton_version'])} with alias "
            f"{config.promote.alias!r}.")
    summary_path = _write_summary(settings, config, run_id, registered, evaluations, champion, gates, winner,
                                  result)
    return result.to_dict() | {"summary": str(summary_path)}


def _write_summary(settings: PipelineSettings, config: PipelineConfig, run_id: str, registered: dict,
                   evaluations: dict[str, dict], champion: gate_step.ChampionScore | None,
                   gates: dict[str, list[gate_step.GateCheck]], winner: str | None, result: StepResult) -> Path:
    """``summary.json`` of the run (candidates, the switched-off ones with why, gates, winner, promotion),
    also logged to the parent run."""
    uri = settings.mlflow_tracking_uri
    summary = {
        "run_id": run_id,
        "mlflow_parent_run_id": registered["parent_run_id"],
        "registered_model": config.promote.registered_model,
        "versions": registered["versions"],
        "candidates": {name: StepResult.from_dict(value).metrics for name, value in evaluations.items()},
        "switched_off": switched_off_candidates(config),
        "champion_before": {"accuracy": champion.accuracy, "note": champion.note} if champion else None,
        "gates": {name: [{"name": c.name, "decision": c.decision.value, "detail": c.detail} for c in checks]
                  for name, checks in gates.items()},
        "winner": winner,
        "promotion": result.to_dict(),
    }
    summary_path = settings.run_dir(run_id) / "summary.json"
    write_json_atomic(summary_path, summary)
    # The readable report (Markdown, HTML, Pareto plot) beside summary.json, all on the parent run.
    reports = report.write_reports(summary, settings.run_dir(run_id) / "report")
    registry.log_run_summary(uri, registered["parent_run_id"], [summary_path, *reports],
                             {f"{name}.{key}": value for name, value in summary["candidates"].items()
                              for key, value in value.items() if key in ("accuracy", "latency_p95_ms")})
    return summary_path


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat
