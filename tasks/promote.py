"""Put a gated candidate into service on Triton, then move the MLflow alias to exactly that version.

Order matters: write the new Triton version (ensemble: tokenizer -> ONNX model -> postprocess)
atomically, load it, smoke-test it through Triton with raw texts against the candidate's own
evaluation outputs, and only then move the alias (the old champion becomes
``previous_champion``). Any failure removes the new version, reloads the previous one and
leaves the aliases untouched. ``rollback`` serves the previous champion again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from monitoring.features import REFERENCE_FILE
from serving import model_repository as repo
from serving.triton_client import TritonClient, TritonUnavailable
from tasks import data as data_step
from tasks import registry
from tasks.config import PromoteConfig
from tasks.errors import PromotionFailed
from tasks.gate import ChampionScore
from tasks.evaluate import read_logits
from tasks.results import StepResult, StepStatus

log = logging.getLogger(__name__)

PREVIOUS_ALIAS = "previous_champion"


@dataclass(frozen=True)
class PromotionTarget:
    triton_url: str
    model_repository: Path
    tracking_uri: str


def run(config: PromoteConfig, target: PromotionTarget, model_dir: Path, predictions: Path, data_dir: Path,
        mlflow_version: str, max_length: int, intra_op_threads: int = 0) -> StepResult:
    """Serve ``model_dir`` as a new version of the ``config.triton_model`` ensemble and move the alias."""
    labels = tuple(data_step.read_meta(data_dir)["labels"])
    ensemble = repo.ClassifierEnsemble(config.triton_model, labels, max_length, intra_op_threads=intra_op_threads)
    client = TritonClient(target.triton_url)
    client.wait_ready(timeout_s=30)
    previous = repo.ensemble_versions(target.model_repository, ensemble.name)
    version = repo.write_ensemble_version(target.model_repository, ensemble, model_dir)
    log.info("wrote %s version %d; loading it", ensemble.name, version)
    try:
        # Drift monitoring's reference: the evaluation outputs and their features, beside the served version.
        write_reference(predictions, data_dir, model_dir, list(labels), max_length,
                        target.model_repository / ensemble.name / str(version) / REFERENCE_FILE)
        _load_version(client, ensemble.name, version)
        diff = _smoke_test(client, config, ensemble.name, predictions, data_dir, version)
    except Exception as error:  # noqa: BLE001 - whatever failed, the previous version must serve again
        _restore(client, target.model_repository, ensemble.name, version, previous)
        raise PromotionFailed(
            f"{ensemble.name} version {version} was not promoted: {error}. "
            f"Version {previous[-1] if previous else '(none)'} keeps serving; the alias {config.alias!r} is unchanged."
        ) from error
    current = registry.alias_version(target.tracking_uri, config.registered_model, config.alias)
    if current is not None and current != mlflow_version:
        registry.set_alias(target.tracking_uri, config.registered_model, PREVIOUS_ALIAS, current)
    registry.set_alias(target.tracking_uri, config.registered_model, config.alias, mlflow_version)
    registry.tag_version(target.tracking_uri, config.registered_model, mlflow_version,
                         {"triton_model": ensemble.name, "triton_version": str(version), "promoted": "true"})
    log.info("promoted MLflow %s v%s as %r -> Triton %s v%d", config.registered_model, mlflow_version,
             config.alias, ensemble.name, version)
    return StepResult(
        step="promote",
        status=StepStatus.SUCCESS,
        uris={"triton_version_dir": str(target.model_repository / ensemble.name / str(version))},
        metrics={"triton_version": float(version), "smoke_max_abs_diff": diff},
        info={"registered_model": config.registered_model, "mlflow_version": mlflow_version,
              "alias": config.alias, "triton_model": ensemble.name},
    )


def rollback(config: PromoteConfig, target: PromotionTarget) -> StepResult:
    """Serve the ``previous_champion`` again in Triton and make it the champion in MLflow."""
    previous = registry.alias_version(target.tracking_uri, config.registered_model, PREVIOUS_ALIAS)
    if previous is None:
        raise PromotionFailed(
            f"{config.registered_model} has no {PREVIOUS_ALIAS!r} alias: nothing to roll back to"
        )
    current = registry.alias_version(target.tracking_uri, config.registered_model, config.alias)
    tags = registry.version_tags(target.tracking_uri, config.registered_model, previous)
    if "triton_version" not in tags or tags.get("triton_model") != config.triton_model:
        raise PromotionFailed(
            f"{config.registered_model} version {previous} was never served as {config.triton_model}; "
            "promote it with the pipeline instead"
        )
    wanted = int(tags["triton_version"])
    present = repo.ensemble_versions(target.model_repository, config.triton_model)
    if wanted not in present:
        raise PromotionFailed(f"Triton version {wanted} of {config.triton_model} is no longer in the repository")
    client = TritonClient(target.triton_url)
    client.wait_ready(timeout_s=30)
    newer = [v for v in present if v > wanted]
    for version in newer:
        repo.retire_ensemble_version(target.model_repository, config.triton_model, version)
    repo.restore_ensemble_config(target.model_repository, config.triton_model, wanted)
    try:
        _load_version(client, config.triton_model, wanted, going_back=True)
    except Exception as error:  # noqa: BLE001 - put the newer versions back and serve the newest again
        for version in newer:
            repo.unretire_ensemble_version(target.model_repository, config.triton_model, version)
        _restore(client, target.model_repository, config.triton_model, None, present, going_back=False)
        raise PromotionFailed(
            f"rollback of {config.triton_model} to version {wanted} failed: {error}; version {present[-1]} "
            "serves again and the aliases are unchanged"
        ) from error
    registry.set_alias(target.tracking_uri, config.registered_model, config.alias, previous)
    registry.delete_alias(target.tracking_uri, config.registered_model, PREVIOUS_ALIAS)
    if current is not None:
        registry.tag_version(target.tracking_uri, config.registered_model, current,
                             {"rolled_back": f"replaced by version {previous}"})
    log.info("rolled back %s to MLflow v%s (Triton v%d)", config.registered_model, previous, wanted)
    return StepResult(
        step="rollback",
        status=StepStatus.SUCCESS,
        metrics={"triton_version": float(wanted)},
        info={"registered_model": config.registered_model, "mlflow_version": previous,
              "replaced_version": current or "", "triton_model": config.triton_model},
    )


def champion_score(target: PromotionTarget, config: PromoteConfig, data_dir: Path) -> ChampionScore | None:
    """The serving champion's accuracy on this run's test split, measured through Triton with raw texts
    one per request (as every candidate was evaluated). None when nothing is serving yet."""
    client = TritonClient(target.triton_url)
    if not client.is_ready(config.triton_model):
        return None
    version = client.ready_versions(config.triton_model)[-1]
    labels = data_step.read_meta(data_dir)["labels"]
    test = data_step.read_split(data_dir, "test")
    served = [str(client.classify(config.triton_model, [text])["LABEL"][0]) for text in test["text"]]
    unknown = sorted(set(served) - set(labels))
    if unknown:
        return ChampionScore(None, f"Triton {config.triton_model} v{version} predicts labels {unknown} that this "
                                   f"data does not have ({labels})")
    truth = [labels[index] for index in test["label"]]
    accuracy = float(np.mean([guess == true for guess, true in zip(served, truth)]))
    return ChampionScore(accuracy, f"Triton {config.triton_model} v{version}")


def _load_version(client: TritonClient, name: str, version: int, timeout_s: float = 120.0,
                  going_back: bool = False) -> None:
    """Load (or reload) every model of the ensemble and wait until version N of each is ready.

    The ensemble's steps are pinned to its own version of each component, and components keep two
    versions loaded. Going forward, the components load first (adding N beside N-1) and the
    ensemble last (switching every request to N at once). Going back (rollback, failed promotion),
    the ensemble loads first (back onto the older components, still loaded) and the components
    after it (dropping the newer version nobody routes to any more).
    """
    components = repo.ensemble_models(name)[:-1]
    models = (name, *components) if going_back else (*components, name)
    for model in models:
        client.load(model)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(client.is_ready(model, version) for model in models):
            return
        time.sleep(0.25)
    raise PromotionFailed(f"Triton did not report {name} version {version} ready within {timeout_s:.0f}s")


def write_reference(predictions: Path, data_dir: Path, model_dir: Path, labels: list[str], max_length: int,
                    target: Path) -> Path:
    """The evaluation's per-text outputs (label, prediction, logits) plus the monitoring features
    (confidence, predicted label, text length, token and unknown-token share) of the same test texts."""
    import pandas as pd

    from monitoring.features import reference_features

    frame = pd.read_parquet(predictions)
    texts = data_step.read_split(data_dir, "test")["text"].tolist()
    features = reference_features(read_logits(predictions), texts, labels, model_dir / "tokenizer.json", max_length)
    pd.concat([frame.reset_index(drop=True), features], axis=1).to_parquet(target, index=False)
    return target


def _smoke_test(client: TritonClient, config: PromoteConfig, name: str, predictions: Path, data_dir: Path,
                version: int) -> float:
    """Send raw test texts through the ensemble; outputs must match the candidate's evaluation outputs."""
    texts = data_step.read_split(data_dir, "test")["text"].head(config.smoke_samples).tolist()
    expected = read_logits(predictions)[: len(texts)]
    # One text per request, as the evaluation ran them.
    served = np.concatenate([client.classify(name, [text], version=version)["LOGITS"] for text in texts])
    if not np.isfinite(served).all():
        raise PromotionFailed("Triton returned NaN/Inf logits in the smoke test")
    diff = float(np.abs(served - expected).max())
    if diff > config.smoke_tolerance:
        raise PromotionFailed(
            f"Triton outputs differ from the evaluation outputs by {diff:.2e} (> {config.smoke_tolerance:.0e})"
        )
    return diff


def _restore(client: TritonClient, repository: Path, name: str, failed: int | None, previous: list[int],
             going_back: bool = True) -> None:
    """Remove the failed version (if any) and serve ``previous[-1]`` with its own config again
    (``going_back`` False: it is the newest version again, after a failed rollback)."""
    if failed is not None:
        repo.remove_ensemble_version(repository, name, failed)
    models = repo.ensemble_models(name)
    if not previous:
        for model in reversed(models):
            try:
                client.unload(model)
            except Exception:  # noqa: BLE001 - nothing served before; unloading is best effort
                log.warning("could not unload %s after a failed first promotion", model)
        return
    repo.restore_ensemble_config(repository, name, previous[-1])
    try:
        _load_version(client, name, previous[-1], going_back=going_back)
    except (TritonUnavailable, PromotionFailed) as error:
        log.error("reloading %s version %d after a failed promotion failed: %s", name, previous[-1], error)
