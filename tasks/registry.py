"""Record a pipeline run in MLflow: one parent run, a nested run per candidate, model versions.

Re-running a task finds the parent run and the model versions it already created (by the
``pipeline_run_id`` and ``candidate`` tags) instead of creating duplicates.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.manifest import read_manifest
from tasks.model_aliases import mlflow_client
from tasks.onnx_model import INPUT_NAMES, MODEL_FILENAME, TOKENIZER_FILES
from tasks.results import ModelFormat

log = logging.getLogger(__name__)

RUN_TAG = "pipeline_run_id"
ROLE_TAG = "pipeline_role"
CANDIDATE_TAG = "candidate"
VERSION_ROLE_TAG = "role"  # on model versions: "candidate" (gated, may be served) or "reference" (the teacher)
# The formats registered as MLflow model versions: ONNX models with the ONNX flavour, TensorRT engines
# as their folder (an engine is only valid for the GPU model and TensorRT version it was built with,
# which its version's tags name).
REGISTRABLE_FORMATS = frozenset({ModelFormat.ONNX, ModelFormat.TENSORRT_PLAN})
ENGINE_ARTIFACT = "engine"
# The lineage a latency re-optimization starts from (tasks/reoptimize.py fetches them).
MODEL_FILES_ARTIFACT = "model_files"  # a PyTorch candidate's folder, on its nested run
DATA_ARTIFACT = "data"  # the run's data splits, on its parent run


@dataclass(frozen=True)
class Candidate:
    """One model the run produced and measured."""

    name: str  # e.g. "onnx_fp32", "onnx_int8"
    model_dir: Path
    metrics: dict[str, float]
    technique: str  # human-readable chain, e.g. "finetune > onnx export > dynamic int8"
    registrable: bool = True  # for a folder without a manifest; a manifest decides (see is_registrable)
    # The run's FP32 PyTorch teacher: registered as a version too (its folder), tagged as the reference
    # that every candidate's accuracy and speed-up are measured against; never gated, never served.
    reference: bool = False


def is_registrable(candidate: Candidate) -> bool:
    """Whether the candidate becomes a model version: by its folder's manifest (ONNX models only),
    else, for a folder without one, as the caller said."""
    manifest = read_manifest(candidate.model_dir)
    if manifest is None:
        return candidate.registrable
    return manifest.format in REGISTRABLE_FORMATS


def parent_run_id(tracking_uri: str, experiment: str, pipeline_run_id: str, params: dict[str, str]) -> str:
    """The MLflow run of this pipeline run, created once."""
    import mlflow

    client = mlflow_client(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    existing = client.search_runs([experiment_id], filter_string=f"tags.{RUN_TAG} = '{pipeline_run_id}' and tags.{ROLE_TAG} = 'parent'",
                                  max_results=1)
    if existing:
        return existing[0].info.run_id
    run = client.create_run(experiment_id, run_name=pipeline_run_id, tags={RUN_TAG: pipeline_run_id, ROLE_TAG: "parent"})
    for key, value in params.items():
        client.log_param(run.info.run_id, key, str(value)[:6000])
    log.info("MLflow run %s created (%s)", run.info.run_id, mlflow.get_tracking_uri())
    return run.info.run_id


def _candidate_run(client, experiment_id: str, pipeline_run_id: str, candidate: str) -> str | None:
    """The nested run an earlier attempt created for this candidate, if any."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=(f"tags.{RUN_TAG} = '{pipeline_run_id}' and tags.{CANDIDATE_TAG} = '{candidate}' "
                       f"and tags.{ROLE_TAG} = 'candidate'"),
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def _version_of_run(client, registered_model: str, run_id: str) -> str | None:
    try:
        versions = client.search_model_versions(f"name = '{registered_model}' and run_id = '{run_id}'")
    except Exception:  # noqa: BLE001 - MLflow raises when the registered model does not exist yet
        return None
    return str(versions[0].version) if versions else None


def log_candidate(tracking_uri: str, experiment: str, parent_id: str, pipeline_run_id: str, registered_model: str,
                  candidate: Candidate, lineage: dict[str, str]) -> str | None:
    """Log one candidate as a nested run; register ONNX candidates, engines and the reference teacher.
    Returns the model version (or None).

    Idempotent: a retry finds the nested run of an earlier attempt (by its tags) and the version
    registered from that run, so neither is created twice, even when the earlier attempt stopped
    between registering and tagging.
    """
    import mlflow

    client = mlflow_client(tracking_uri)
    experiment_id = mlflow.set_experiment(experiment).experiment_id
    tags = {RUN_TAG: pipeline_run_id, CANDIDATE_TAG: candidate.name, ROLE_TAG: "candidate",
            "technique": candidate.technique} | lineage
    run_id = _candidate_run(client, experiment_id, pipeline_run_id, candidate.name)
    version = _version_of_run(client, registered_model, run_id) if run_id else None
    if version is not None:
        log.info("candidate %s already registered as version %s; not registering again", candidate.name, version)
    else:
        with mlflow.start_run(run_id=parent_id):
            run_kwargs = {"run_id": run_id} if run_id else {"run_name": candidate.name, "tags": tags}
            with mlflow.start_run(nested=True, **run_kwargs):
                mlflow.log_metrics(candidate.metrics)
                if not is_registrable(candidate):
                    _log_model_files(candidate)
                    if not candidate.reference:
                        return None
                    version = _create_version(client, registered_model, MODEL_FILES_ARTIFACT)
                elif _is_engine(candidate):
                    mlflow.log_artifacts(str(candidate.model_dir), ENGINE_ARTIFACT)
                    version = _create_version(client, registered_model, ENGINE_ARTIFACT)
                else:
                    version = _log_onnx(registered_model, candidate)
    tags |= engine_tags(candidate.model_dir) | {VERSION_ROLE_TAG: "reference" if candidate.reference else "candidate"}
    for key, value in (tags | {CANDIDATE_TAG: candidate.name}).items():
        client.set_model_version_tag(registered_model, version, key, value)
    for key, value in candidate.metrics.items():
        client.set_model_version_tag(registered_model, version, f"metric.{key}", f"{value:.6g}")
    client.update_model_version(registered_model, version, description=_description(candidate))
    return version


def _description(candidate: Candidate) -> str:
    """A version's description in the registry: what it is, how it was built and what it measured."""
    if candidate.reference:
        return (f"{candidate.name}: {candidate.technique}. The reference of this run: every candidate's accuracy "
                f"and speed-up are measured against it (accuracy {candidate.metrics.get('accuracy', float('nan')):.4f}, "
                f"p50 latency {candidate.metrics.get('latency_p50_ms', float('nan')):.2f} ms at batch 1). "
                "PyTorch FP32 model folder: never gated and never served by Triton.")
    return (f"{candidate.name}: {candidate.technique}. Accuracy {candidate.metrics.get('accuracy', float('nan')):.4f}, "
            f"p95 latency {candidate.metrics.get('latency_p95_ms', float('nan')):.2f} ms "
            f"(batch 1, {'GPU' if 'gpu_memory_mb' in candidate.metrics else 'CPU'}).")


def _log_onnx(registered_model: str, candidate: Candidate) -> str:
    """Log an ONNX candidate with the ONNX flavour (in the active run) and register it."""
    import mlflow
    import onnx

    signature, example = _signature(candidate.model_dir)
    info = mlflow.onnx.log_model(
        onnx_model=onnx.load(str(candidate.model_dir / MODEL_FILENAME)),
        name="model",
        registered_model_name=registered_model,
        signature=signature,
        input_example=example,
        onnx_execution_providers=["CPUExecutionProvider"],
        save_as_external_data=False,
        pip_requirements=["onnxruntime", "onnx", "numpy"],
        extra_files=[str(candidate.model_dir / name) for name in TOKENIZER_FILES
                     if (candidate.model_dir / name).exists()],
    )
    return str(info.registered_model_version)


def _is_engine(candidate: Candidate) -> bool:
    manifest = read_manifest(candidate.model_dir)
    return manifest is not None and manifest.format is ModelFormat.TENSORRT_PLAN


def _create_version(client, registered_model: str, artifact: str) -> str:
    """Register a folder the active run logged under ``artifact`` as a version: a TensorRT engine's
    folder (engine, tokenizer, manifest, profile) or the reference teacher's model folder."""
    import mlflow

    run = mlflow.active_run()
    try:
        client.get_registered_model(registered_model)
    except Exception:  # noqa: BLE001 - MLflow raises RestException when the model does not exist yet
        client.create_registered_model(registered_model)
    created = client.create_model_version(registered_model, source=f"{run.info.artifact_uri}/{artifact}",
                                          run_id=run.info.run_id)
    return str(created.version)


def engine_tags(model_dir: Path) -> dict[str, str]:
    """What an engine is valid for, as version tags: the TensorRT version and the GPU model it was
    built with (empty for other formats)."""
    manifest = read_manifest(model_dir)
    if manifest is None or manifest.format is not ModelFormat.TENSORRT_PLAN:
        return {}
    gpu, version = manifest.details.get("gpu", "unknown"), manifest.details.get("tensorrt_version", "unknown")
    return {"tensorrt_version": str(version), "gpu": str(gpu),
            "engine_valid_for": f"{gpu} with TensorRT {version} only"}


def _log_model_files(candidate: Candidate) -> None:
    """A PyTorch candidate's folder as artifacts of its run: a re-optimization starts from the teacher."""
    import mlflow

    manifest = read_manifest(candidate.model_dir)
    if manifest is not None and manifest.format is ModelFormat.PYTORCH:
        mlflow.log_artifacts(str(candidate.model_dir), MODEL_FILES_ARTIFACT)


def log_data(tracking_uri: str, parent_id: str, data_dir: Path) -> None:
    """The run's data splits as artifacts of its parent run (a re-optimization trains on them again)."""
    mlflow_client(tracking_uri).log_artifacts(parent_id, str(data_dir), DATA_ARTIFACT)


def record_outcome(tracking_uri: str, experiment: str, pipeline_run_id: str, params: dict[str, str], outcome: str,
                   reason: str) -> str:
    """The run's outcome on its parent run (created if needed), as tags and as the run's description,
    for a run that ended before any candidate (a stop) or without a winner."""
    client = mlflow_client(tracking_uri)
    run_id = parent_run_id(tracking_uri, experiment, pipeline_run_id, params)
    client.set_tag(run_id, "outcome", outcome)
    client.set_tag(run_id, "outcome_reason", reason[:5000])
    client.set_tag(run_id, "mlflow.note.content", f"**{outcome}**: {reason}")
    return run_id


def parent_run_params(tracking_uri: str, registered_model: str, version: str) -> dict[str, str] | None:
    """The params of the pipeline run that registered ``version`` (its parent run: the run's config,
    flattened), found by the version's ``pipeline_run_id`` tag; None when they cannot be read."""
    client = mlflow_client(tracking_uri)
    try:
        model_version = client.get_model_version(registered_model, version)
        pipeline_run_id = model_version.tags.get(RUN_TAG)
        if not pipeline_run_id or not model_version.run_id:
            return None
        experiment_id = client.get_run(model_version.run_id).info.experiment_id
        parents = client.search_runs([experiment_id], filter_string=f"tags.{RUN_TAG} = '{pipeline_run_id}' and "
                                                                    f"tags.{ROLE_TAG} = 'parent'", max_results=1)
    except Exception as error:  # noqa: BLE001 - MLflow raises RestException/MlflowException for missing runs
        log.info("cannot read the params of the run behind %s v%s: %s", registered_model, version, error)
        return None
    return dict(parents[0].data.params) if parents else None


def describe_decision(tracking_uri: str, registered_model: str, version: str, decision: str) -> None:
    """Append the promotion decision (and why) to the version's description shown in the MLflow UI."""
    client = mlflow_client(tracking_uri)
    current = client.get_model_version(registered_model, version).description or ""
    base = current.split("\n\nDecision:")[0]
    client.update_model_version(registered_model, version, description=f"{base}\n\nDecision: {decision}")


def _signature(model_dir: Path):
    from mlflow.models import infer_signature

    example = {name: np.ones((1, 8), dtype=np.int64) for name in INPUT_NAMES}
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_dir / MODEL_FILENAME), providers=["CPUExecutionProvider"])
    output = session.run(None, example)[0]
    return infer_signature(example, output), example


def log_run_summary(tracking_uri: str, parent_id: str, files: list[Path], metrics: dict[str, float]) -> None:
    """The run's summary and reports as artifacts of its parent run, its headline metrics as metrics."""
    client = mlflow_client(tracking_uri)
    for path in files:
        client.log_artifact(parent_id, str(path))
    for key, value in metrics.items():
        client.log_metric(parent_id, key, value)
