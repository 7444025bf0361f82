"""Put a gated candidate into service on Triton, then move the MLflow alias to exactly that version.

Order matters. Version N of the ensemble's components (tokenizer, ONNX model, postprocess) is
written and loaded beside the serving version N-1 while nothing routes to it yet; only then is the
ensemble's version N written (its steps pinned to component version N) and loaded, which switches
every request at once. N is smoke-tested through Triton with raw texts against the candidate's own
evaluation outputs, and only then does the alias move (the old champion becomes
``previous_champion``). Any failure takes N out again, serves N-1 and leaves the aliases untouched.
``rollback`` serves the previous champion again by the same forward path: its files become a new
version. Going forward only matters: Triton reloads an ensemble whenever one of its models is
loaded, so an ensemble version on disk must never name components that are not loaded yet.

Several Triton replicas may serve the one shared repository (``PromotionTarget.triton_url`` lists
them, or names a DNS record with one address per replica): every step then acts on all of them.
The components are loaded on every replica before the ensemble version is written, each replica
switches in turn, and the smoke test runs through each; a failure on any replica restores all.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from monitoring.features import REFERENCE_FILE
from serving import model_repository as repo
from serving.triton_client import TritonClient, TritonReplicas, TritonUnavailable, load_and_wait, replica_urls
from tasks import model_aliases
from tasks.champion import ChampionScore
from tasks.config import PromoteConfig
from tasks.errors import PromotionFailed
from tasks.manifest import Precision, read_manifest
from tasks.predictions import read_logits
from tasks.results import ModelFormat, StepResult, StepStatus
from tasks.splits import read_meta, read_split

log = logging.getLogger(__name__)

PREVIOUS_ALIAS = "previous_champion"


@dataclass(frozen=True)
class PromotionTarget:
    triton_url: str  # one or more Triton replicas: serving.triton_client.replica_urls
    model_repository: Path
    tracking_uri: str


def run(config: PromoteConfig, target: PromotionTarget, model_dir: Path, predictions: Path, data_dir: Path,
        mlflow_version: str, max_length: int, intra_op_threads: int = 0) -> StepResult:
    """Serve ``model_dir`` as a new version of the ``config.triton_model`` ensemble and move the alias.
    The classifier's Triton platform follows the folder's manifest (``served_format``)."""
    model_format = served_format(model_dir)
    labels = tuple(read_meta(data_dir)["labels"])
    ensemble = repo.ClassifierEnsemble(config.triton_model, labels, max_length, intra_op_threads=intra_op_threads,
                                       **gpu_serving(model_dir))
    repository = target.model_repository
    replicas = TritonReplicas.from_spec(target.triton_url)
    replicas.wait_ready(timeout_s=30)
    previous = repo.ensemble_versions(repository, ensemble.name)
    with tempfile.TemporaryDirectory(prefix="promote-") as scratch:
        # Drift monitoring's embedding table (for the tokenizer's version) and reference (the evaluation
        # outputs and their features, beside the served version).
        table = fit_embedding_table(model_dir, data_dir, max_length, Path(scratch) / repo.EMBEDDING_TABLE_FILE)
        try:
            reference = write_reference(predictions, data_dir, model_dir, list(labels), max_length,
                                        Path(scratch) / REFERENCE_FILE, embedding_table=table)
        except Exception as error:  # noqa: BLE001 - reported as a failed promotion; nothing was changed yet
            raise PromotionFailed(
                f"{ensemble.name}: could not build the drift reference from {predictions.name}: {error}. "
                f"Nothing was changed; the alias {config.alias!r} is unchanged."
            ) from error
        version = repo.write_component_versions(repository, ensemble, model_dir, model_format,
                                                tokenizer_files=(table,) if table else ())
        log.info("wrote %s version %d; loading it on %s", ensemble.name, version, ", ".join(replicas.urls))
        try:
            _switch_to(replicas, repository, ensemble.name, version, repo.render_ensemble_config(ensemble, version),
                       (reference,))
            diff = max(_smoke_test(client, config, ensemble.name, predictions, data_dir, version,
                                   reference_embeddings(reference)) for client in replicas.clients)
        except Exception as error:  # noqa: BLE001 - whatever failed, the previous version must serve again
            _restore(replicas, repository, ensemble.name, version, previous)
            raise PromotionFailed(
                f"{ensemble.name} version {version} was not promoted: {error}. "
                f"Version {previous[-1] if previous else '(none)'} keeps serving; "
                f"the alias {config.alias!r} is unchanged."
            ) from error
    current = model_aliases.alias_version(target.tracking_uri, config.registered_model, config.alias)
    if current is not None and current != mlflow_version:
        model_aliases.set_alias(target.tracking_uri, config.registered_model, PREVIOUS_ALIAS, current)
    model_aliases.set_alias(target.tracking_uri, config.registered_model, config.alias, mlflow_version)
    model_aliases.tag_version(target.tracking_uri, config.registered_model, mlflow_version,
                              {"triton_model": ensemble.name, "triton_version": str(version), "promoted": "true"})
    log.info("promoted MLflow %s v%s as %r -> Triton %s v%d", config.registered_model, mlflow_version,
             config.alias, ensemble.name, version)
    return StepResult(
        step="promote",
        status=StepStatus.SUCCESS,
        uris={"triton_version_dir": str(repository / ensemble.name / str(version))},
        metrics={"triton_version": float(version), "smoke_max_abs_diff": diff},
        info={"registered_model": config.registered_model, "mlflow_version": mlflow_version,
              "alias": config.alias, "triton_model": ensemble.name, "triton_replicas": ",".join(replicas.urls)},
    )


def served_format(model_dir: Path) -> str:
    """The format Triton serves ``model_dir`` as (a key of ``serving.model_repository.CLASSIFIER_WRITERS``):
    its manifest's, or ONNX for a folder without one (the only format promoted before manifests).
    ``PromotionFailed`` for a format no writer serves, before anything is changed."""
    manifest = read_manifest(model_dir)
    model_format = manifest.format if manifest is not None else ModelFormat.ONNX
    if model_format.value not in repo.CLASSIFIER_WRITERS:
        raise PromotionFailed(
            f"{model_dir} holds a {model_format.value} model, which Triton is not set up to serve; served formats: "
            f"{', '.join(sorted(repo.CLASSIFIER_WRITERS))}. Nothing was changed."
        )
    return model_format.value


def gpu_serving(model_dir: Path) -> dict:
    """How the classifier runs on Triton beyond its format: an FP16 ONNX model (the GPU branch's, see
    tasks/recipe.py) on the GPU through ONNX Runtime's TensorRT accelerator, which builds its engine
    when the model loads (the route when the pipeline could build none); everything else as written
    (a TensorRT plan is always on the GPU, the other ONNX models on the CPU)."""
    manifest = read_manifest(model_dir)
    if manifest is not None and manifest.format is ModelFormat.ONNX and manifest.precision is Precision.FP16:
        return {"gpu": True, "tensorrt_precision": "FP16"}
    return {}


def rollback(config: PromoteConfig, target: PromotionTarget) -> StepResult:
    """Serve the ``previous_champion`` again in Triton and make it the champion in MLflow.

    Its Triton version's files are copied to a new version and switched to like any promotion, so
    requests never see a gap; the MLflow version is re-tagged with the new Triton version."""
    previous = model_aliases.alias_version(target.tracking_uri, config.registered_model, PREVIOUS_ALIAS)
    if previous is None:
        raise PromotionFailed(
            f"{config.registered_model} has no {PREVIOUS_ALIAS!r} alias: nothing to roll back to"
        )
    current = model_aliases.alias_version(target.tracking_uri, config.registered_model, config.alias)
    tags = model_aliases.version_tags(target.tracking_uri, config.registered_model, previous)
    if "triton_version" not in tags or tags.get("triton_model") != config.triton_model:
        raise PromotionFailed(
            f"{config.registered_model} version {previous} was never served as {config.triton_model}; "
            "promote it with the pipeline instead"
        )
    source = int(tags["triton_version"])
    repository = target.model_repository
    present = repo.ensemble_versions(repository, config.triton_model)
    if source not in present:
        raise PromotionFailed(f"Triton version {source} of {config.triton_model} is no longer in the repository")
    replicas = TritonReplicas.from_spec(target.triton_url)
    replicas.wait_ready(timeout_s=30)
    try:
        version = repo.copy_ensemble_components(repository, config.triton_model, source)
    except repo.RepositoryError as error:
        raise PromotionFailed(f"cannot roll back {config.triton_model} to version {source}: {error}") from error
    reference = repository / config.triton_model / str(source) / REFERENCE_FILE
    try:
        _switch_to(replicas, repository, config.triton_model, version,
                   repo.repinned_ensemble_config(repository, config.triton_model, source, version),
                   tuple(path for path in (reference,) if path.exists()))
        for client in replicas.clients:
            _check_serving(client, config.triton_model, version)
    except Exception as error:  # noqa: BLE001 - whatever failed, the current version must serve again
        _restore(replicas, repository, config.triton_model, version, present)
        raise PromotionFailed(
            f"rollback of {config.triton_model} to the files of version {source} failed: {error}; version "
            f"{present[-1]} serves again and the aliases are unchanged"
        ) from error
    model_aliases.set_alias(target.tracking_uri, config.registered_model, config.alias, previous)
    model_aliases.delete_alias(target.tracking_uri, config.registered_model, PREVIOUS_ALIAS)
    model_aliases.tag_version(target.tracking_uri, config.registered_model, previous,
                              {"triton_version": str(version), "rolled_back_from": current or ""})
    if current is not None:
        model_aliases.tag_version(target.tracking_uri, config.registered_model, current,
                                  {"rolled_back": f"replaced by version {previous}"})
    log.info("rolled back %s to MLflow v%s (Triton v%d, the files of v%d)", config.registered_model, previous,
             version, source)
    return StepResult(
        step="rollback",
        status=StepStatus.SUCCESS,
        metrics={"triton_version": float(version)},
        info={"registered_model": config.registered_model, "mlflow_version": previous,
              "replaced_version": current or "", "triton_model": config.triton_model,
              "files_of_triton_version": str(source)},
    )


def champion_score(target: PromotionTarget, config: PromoteConfig, data_dir: Path) -> ChampionScore | None:
    """The serving champion's accuracy on this run's test split, measured through Triton with raw texts
    one per request (as every candidate was evaluated), on the first replica (all serve the same
    version). None when nothing is serving yet."""
    client = TritonClient(replica_urls(target.triton_url)[0])
    if not client.is_ready(config.triton_model):
        return None
    version = client.ready_versions(config.triton_model)[-1]
    labels = read_meta(data_dir)["labels"]
    test = read_split(data_dir, "test")
    served = client.labels(config.triton_model, test["text"].tolist())
    unknown = sorted(set(served) - set(labels))
    if unknown:
        return ChampionScore(None, f"Triton {config.triton_model} v{version} predicts labels {unknown} that this "
                                   f"data does not have ({labels})")
    truth = [labels[index] for index in test["label"]]
    correct = tuple(bool(guess == true) for guess, true in zip(served, truth))
    return ChampionScore(float(np.mean(correct)), f"Triton {config.triton_model} v{version}", correct)


def _switch_to(replicas: TritonReplicas, repository: Path, name: str, version: int, ensemble_config: str,
              ensemble_files: tuple[Path, ...]) -> None:
    """Load component version N beside the serving one on every replica, then add ensemble version N
    and load it on each replica in turn (the switch)."""
    load_and_wait(replicas, repo.ensemble_models(name)[:-1], version)
    repo.write_ensemble_step(repository, name, version, ensemble_config, ensemble_files)
    load_and_wait(replicas, (name,), version)


CHECK_TEXTS = ("a short check that the model serves", "another one, a little longer, with punctuation!")


def _check_serving(client: TritonClient, name: str, version: int) -> None:
    """Version N answers with finite probabilities that sum to one (a rollback has no evaluation outputs
    for these texts to compare with; the files it serves already passed the smoke test once)."""
    served = client.classify(name, list(CHECK_TEXTS), version=version)
    probabilities = served["PROBABILITIES"]
    if not np.isfinite(probabilities).all() or not np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-4):
        raise PromotionFailed(f"{name} version {version} returned invalid probabilities: {probabilities.tolist()}")


# The most training texts the embedding projection is fitted on (the fit is a small SVD, the cost is
# tokenising them).
EMBEDDING_FIT_TEXTS = 5000
# How far a served embedding may be from the offline one (relative to it, at least 1): the reference's
# are rounded through float16 as the gateway logs them.
EMBEDDING_SMOKE_TOLERANCE = 1e-2


def fit_embedding_table(model_dir: Path, data_dir: Path, max_length: int, target: Path) -> Path | None:
    """Fit the embedding projection table (``monitoring.embedding``) of ``model_dir``'s ONNX model on
    the training split's texts (at most ``EMBEDDING_FIT_TEXTS``) and save it at ``target``.

    Embeddings are optional: when the table cannot be fitted (a TensorRT engine, a quantization whose
    embedding matrix cannot be read), the promotion goes on without it, with a warning. The version
    then serves NaN embeddings (not logged) and its reference has no embedding columns, so drift
    monitoring does not judge that feature."""
    from monitoring import embedding as emb

    try:
        texts = read_split(data_dir, "train")["text"].head(EMBEDDING_FIT_TEXTS).tolist()
        table = emb.fit_table_for(model_dir / "model.onnx", model_dir / "tokenizer.json", texts, max_length)
    except Exception as error:  # noqa: BLE001 - never fail a promotion for the optional embeddings
        log.warning("%s: no embedding table, so no embedding drift for this version: %s", model_dir, error)
        return None
    np.save(target, table)
    return target


def write_reference(predictions: Path, data_dir: Path, model_dir: Path, labels: list[str], max_length: int,
                    target: Path, embedding_table: Path | None = None) -> Path:
    """The evaluation's per-text outputs (label, prediction, logits) plus the monitoring features
    (confidence, predicted label, text length, token and unknown-token share) of the same test texts,
    and their embeddings through ``embedding_table`` (a saved table, ``fit_embedding_table``) if given."""
    import pandas as pd

    from monitoring.features import reference_features

    frame = pd.read_parquet(predictions)
    texts = read_split(data_dir, "test")["text"].tolist()
    table = np.load(embedding_table) if embedding_table is not None else None
    features = reference_features(read_logits(predictions), texts, labels, model_dir / "tokenizer.json", max_length,
                                  embedding_table=table)
    pd.concat([frame.reset_index(drop=True), features], axis=1).to_parquet(target, index=False)
    return target


def reference_embeddings(reference: Path) -> np.ndarray | None:
    """The embeddings of a reference file (test texts in order), or None when it has none."""
    import pandas as pd

    from monitoring import embedding as emb

    frame = pd.read_parquet(reference)
    return frame[list(emb.COLUMNS)].to_numpy(dtype=np.float64) if all(c in frame for c in emb.COLUMNS) else None


def _smoke_test(client: TritonClient, config: PromoteConfig, name: str, predictions: Path, data_dir: Path,
                version: int, expected_embeddings: np.ndarray | None = None) -> float:
    """Send raw test texts through the ensemble, one per request and then batched; outputs must match
    the candidate's evaluation outputs either way, and the served embeddings the reference's (when it
    has them)."""
    texts = read_split(data_dir, "test")["text"].head(config.smoke_samples).tolist()
    expected = read_logits(predictions)[: len(texts)]
    extra = ("EMBEDDING",) if expected_embeddings is not None else ()
    # One text per request, as the evaluation ran them.
    answers = [client.classify(name, [text], version=version, extra_outputs=extra) for text in texts]
    served = np.concatenate([answer["LOGITS"] for answer in answers])
    if not np.isfinite(served).all():
        raise PromotionFailed("Triton returned NaN/Inf logits in the smoke test")
    diff = float(np.abs(served - expected).max())
    if diff > config.smoke_tolerance:
        raise PromotionFailed(
            f"Triton outputs differ from the evaluation outputs by {diff:.2e} (> {config.smoke_tolerance:.0e})"
        )
    if expected_embeddings is not None:
        check_embeddings(np.concatenate([answer["EMBEDDING"] for answer in answers]),
                         expected_embeddings[: len(texts)])
    return max(diff, _batched_smoke_test(client, config, name, texts, expected, version))


def _batched_smoke_test(client: TritonClient, config: PromoteConfig, name: str, texts: list[str],
                        expected: np.ndarray, version: int) -> float:
    """The same texts in requests of ``config.smoke_batch``: a batch-variant model (one whose answer
    to a text depends on the texts padded and batched with it) fails here."""
    size = config.smoke_batch
    if size < 2 or len(texts) < 2:
        return 0.0
    served = np.concatenate([client.classify(name, texts[start:start + size], version=version)["LOGITS"]
                             for start in range(0, len(texts), size)])
    diff = float(np.abs(served - expected).max()) if np.isfinite(served).all() else float("inf")
    if diff > config.smoke_tolerance:
        raise PromotionFailed(
            f"batched {size} texts per request, Triton's outputs differ from the evaluation's (one text at a time) "
            f"by {diff:.2e} (> {config.smoke_tolerance:.0e}): the model's answer to a text depends on the texts "
            "served with it (dynamic INT8 with per-tensor activation scales does this; quantize with "
            "activation_scales per_token)")
    return diff


def check_embeddings(served: np.ndarray, expected: np.ndarray) -> None:
    """``PromotionFailed`` unless the served embeddings are the offline ones (``EMBEDDING_SMOKE_TOLERANCE``)."""
    served = np.asarray(served, dtype=np.float64)
    if served.shape != expected.shape or not np.isfinite(served).all():
        raise PromotionFailed(f"Triton returned embeddings of shape {served.shape} with non-finite values "
                              f"{not np.isfinite(served).all()}; expected finite ones of shape {expected.shape}")
    off = np.abs(served - expected) / np.maximum(1.0, np.abs(expected))
    if off.max() > EMBEDDING_SMOKE_TOLERANCE:
        raise PromotionFailed(f"Triton's embeddings differ from the reference's by {off.max():.2e} (relative, > "
                              f"{EMBEDDING_SMOKE_TOLERANCE:.0e}): the tokenizer's embedding table is not the one fitted")


def _restore(replicas: TritonReplicas, repository: Path, name: str, failed: int, previous: list[int]) -> None:
    """Take the failed version N out and serve ``previous[-1]`` again.

    The ensemble goes back first (its older version's components are still loaded beside N), the
    components after it (dropping N, which nothing routes to any more). Errors are logged: the
    caller reports the original failure.
    """
    models = repo.ensemble_models(name)
    if not previous:
        for model in reversed(models):
            try:
                replicas.unload(model)
            except Exception:  # noqa: BLE001 - nothing served before; unloading is best effort
                log.warning("could not unload %s after a failed first promotion", model)
        repo.remove_ensemble_version(repository, name, failed)
        return
    serving = previous[-1]
    try:
        if failed in repo.ensemble_versions(repository, name):
            repo.remove_ensemble_version(repository, name, failed, models=(name,))
            repo.restore_config(repository, name, serving)
            load_and_wait(replicas, (name,), serving)
        components = models[:-1]
        repo.remove_ensemble_version(repository, name, failed, models=components)
        for model in components:
            repo.restore_config(repository, model, serving)
        load_and_wait(replicas, components, serving)
    except (TritonUnavailable, PromotionFailed) as error:
        log.error("serving %s version %d again after a failed switch to %d failed: %s", name, serving, failed,
                  error)
