"""Put a gated candidate into service on Triton, then move the MLflow alias to exactly that version.

Order matters: write the Triton version atomically, load it, smoke-test it through Triton against
the candidate's own evaluation outputs, and only then move the alias. Any failure removes the new
version, reloads the previous one and leaves the aliases untouched.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving import model_repository as repo
from serving.triton_client import TritonClient, TritonUnavailable
from tasks import data as data_step
from tasks import registry
from tasks.config import PromoteConfig
from tasks.errors import PromotionFailed
from tasks.evaluate import read_logits, tokenize
from tasks.export import MODEL_FILENAME
from tasks.modeling import load_tokenizer
from tasks.results import StepResult, StepStatus

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromotionTarget:
    triton_url: str
    model_repository: Path
    tracking_uri: str


def run(config: PromoteConfig, target: PromotionTarget, model_dir: Path, predictions: Path, data_dir: Path,
        mlflow_version: str, max_length: int, intra_op_threads: int = 0) -> StepResult:
    """Serve ``model_dir`` as a new Triton version of ``config.triton_model`` and move the alias."""
    labels = data_step.read_meta(data_dir)["labels"]
    client = TritonClient(target.triton_url)
    client.wait_ready(timeout_s=30)
    previous = repo.versions(target.model_repository, config.triton_model)
    model_config = repo.classifier_config(config.triton_model, len(labels), intra_op_threads=intra_op_threads)
    version = repo.write_version(target.model_repository, model_config, model_dir, files=(MODEL_FILENAME,))
    _save_reference(predictions, target.model_repository / config.triton_model / str(version))
    log.info("wrote %s version %d; loading it", config.triton_model, version)
    try:
        client.load(config.triton_model)
        _wait_version_ready(client, config.triton_model, version, timeout_s=120)
        diff = _smoke_test(client, config, model_dir, predictions, data_dir, version, max_length)
    except (TritonUnavailable, PromotionFailed, OSError) as error:
        _restore(client, target.model_repository, config.triton_model, version, previous)
        raise PromotionFailed(
            f"{config.triton_model} version {version} was not promoted: {error}. "
            f"Version {previous[-1] if previous else '(none)'} keeps serving; the alias {config.alias!r} is unchanged."
        ) from error
    registry.set_alias(target.tracking_uri, config.registered_model, config.alias, mlflow_version)
    registry.tag_version(target.tracking_uri, config.registered_model, mlflow_version,
                         {"triton_model": config.triton_model, "triton_version": str(version),
                          "promoted": "true"})
    log.info("promoted MLflow %s v%s as %r -> Triton %s v%d", config.registered_model, mlflow_version,
             config.alias, config.triton_model, version)
    return StepResult(
        step="promote",
        status=StepStatus.SUCCESS,
        uris={"triton_version_dir": str(target.model_repository / config.triton_model / str(version))},
        metrics={"triton_version": float(version), "smoke_max_abs_diff": diff},
        info={"registered_model": config.registered_model, "mlflow_version": mlflow_version,
              "alias": config.alias, "triton_model": config.triton_model},
    )


def _save_reference(predictions: Path, version_dir: Path) -> None:
    """Keep the evaluation outputs beside the served version: drift monitoring's reference."""
    shutil.copy2(predictions, version_dir / "reference_predictions.parquet")


def _wait_version_ready(client: TritonClient, model: str, version: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if client.is_ready(model, version):
            return
        time.sleep(0.25)
    raise PromotionFailed(f"Triton did not report {model} version {version} ready within {timeout_s:.0f}s")


def _smoke_test(client: TritonClient, config: PromoteConfig, model_dir: Path, predictions: Path, data_dir: Path,
                version: int, max_length: int) -> float:
    """Send test texts through Triton; outputs must match the candidate's evaluation outputs."""
    texts = data_step.read_split(data_dir, "test")["text"].head(config.smoke_samples).tolist()
    expected = read_logits(predictions)[: len(texts)]
    tokenizer = load_tokenizer(model_dir)
    # One request per text, as the evaluation's batches may pad differently.
    served = np.concatenate([
        client.infer_logits(config.triton_model, tokenize(tokenizer, [text], max_length), version=version)
        for text in texts
    ])
    if not np.isfinite(served).all():
        raise PromotionFailed("Triton returned NaN/Inf logits in the smoke test")
    diff = float(np.abs(served - expected).max())
    if diff > config.smoke_tolerance:
        raise PromotionFailed(
            f"Triton outputs differ from the evaluation outputs by {diff:.2e} (> {config.smoke_tolerance:.0e})"
        )
    return diff


def _restore(client: TritonClient, repository: Path, model: str, failed: int, previous: list[int]) -> None:
    repo.remove_version(repository, model, failed)
    if not previous:
        try:
            client.unload(model)
        except Exception:  # noqa: BLE001 - nothing served before; unloading is best effort
            log.warning("could not unload %s after a failed first promotion", model)
        return
    try:
        client.load(model)
    except TritonUnavailable as error:
        log.error("reloading %s after a failed promotion failed: %s", model, error)
