"""Put a gated candidate into service on Triton, then move the MLflow alias to exactly that version.

Order matters. Version N of the ensemble's components (tokenizer, ONNX model, postprocess) is
written and loaded beside the serving version N-1 while nothing routes to it yet; only then is the
ensemble's version N written (its steps pinned to component version N) and loaded, which switches
every request at once. N is smoke-tested through Triton with raw texts against the candidate's own
evaluation outputs, and only then does the alias move (the old champion becomes
``previous_champion``). Any failure takes N out again, serves N-1 and leaves the aliases untouched.
Going forward only matters: Triton reloads an ensemble whenever one of its models is loaded, so an
ensemble version on disk must never name components that are not loaded yet.

Before anything is served, the candidate's serving bundle (``tasks.serving_bundle``) is logged on
its MLflow version, and each ensemble version folder names the MLflow version its files are
(``serving.model_repository.REGISTERED_VERSION_FILE``): the registry can then serve any promoted
version again, and ``tasks.reconcile`` makes Triton follow the alias (rollback included). Every
switch holds ``serving_lock``, so a promotion and the reconcile loop never switch at once.

Several Triton replicas may serve the one shared repository (``PromotionTarget.triton_url`` lists
them, or names a DNS record with one address per replica): every step then acts on all of them.
The components are loaded on every replica before the ensemble version is written, each replica
switches in turn, and the smoke test runs through each; a failure on any replica restores all.
"""

from __future__ import annotations

import fcntl
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from monitoring.features import REFERENCE_FILE
from serving import model_repository as repo
from serving.triton_client import TritonClient, TritonReplicas, TritonUnavailable, load_and_wait, replica_urls
from serving.truncation import DEFAULT_TRUNCATION
from tasks import model_aliases
from tasks.champion import ChampionScore
from tasks.config import PromoteConfig
from tasks.errors import PromotionFailed
from tasks.manifest import Precision, read_manifest
from tasks.predictions import read_logits
from tasks.results import ModelFormat, StepResult, StepStatus
from tasks.serving_bundle import ServingBundle, log_bundle
from tasks.splits import read_meta, read_split

log = logging.getLogger(__name__)

# Runs between loading a new version's components and switching to it (a shadow; raises to stop).
BeforeSwitch = Callable[[repo.ClassifierEnsemble, int], None]

PREVIOUS_ALIAS = "previous_champion"
# Version tags: why the reconcile loop could not serve a version the alias named (it does not try it
# again until the tag is deleted), and that a rollback replaced a version (it does not become the
# previous champion, so a second rollback cannot bring it back).
SERVING_ERROR_TAG = "serving_error"
ROLLED_BACK_TAG = "rolled_back"
# When the version last became the one served (unix seconds): a serving breach soon after rolls back.
SWITCHED_AT_TAG = "switched_at"


@dataclass(frozen=True)
class PromotionTarget:
    triton_url: str  # one or more Triton replicas: serving.triton_client.replica_urls
    model_repository: Path
    tracking_uri: str
    prediction_log_url: str | None = None  # where gateways write shadow comparisons (tasks/shadow.py)


def run(config: PromoteConfig, target: PromotionTarget, model_dir: Path, predictions: Path, data_dir: Path,
        mlflow_version: str, max_length: int, intra_op_threads: int = 0,
        truncation: str = DEFAULT_TRUNCATION) -> StepResult:
    """Serve ``model_dir`` as a new version of the ``config.triton_model`` ensemble and move the alias.
    The classifier's Triton platform follows the folder's manifest (``served_format``). The serving
    bundle is logged on the version's run first, so the registry can serve it again later."""
    served_format(model_dir)  # an unservable format fails here, before anything is changed
    replicas = TritonReplicas.from_spec(target.triton_url)
    replicas.wait_ready(timeout_s=30)
    with tempfile.TemporaryDirectory(prefix="promote-") as scratch:
        bundle = build_bundle(config, model_dir, predictions, data_dir, max_length, intra_op_threads, Path(scratch),
                              truncation)
        log_bundle(target.tracking_uri, config.registered_model, mlflow_version, bundle)
        with serving_lock(target.model_repository, config.triton_model):
            previous = repo.ensemble_versions(target.model_repository, config.triton_model)
            try:
                version, diff = serve_bundle(bundle, config, replicas, target.model_repository, mlflow_version,
                                             before_switch=shadow_step(config, target, replicas, mlflow_version))
            except OSError as error:  # writing the version (a full disk): nothing was renamed into place
                raise PromotionFailed(
                    f"{config.triton_model}: writing the new version into {target.model_repository} failed: "
                    f"{error}. Nothing was loaded; version {previous[-1] if previous else '(none)'} keeps "
                    f"serving; the alias {config.alias!r} is unchanged. Free space on the model repository "
                    "and retry.") from error
            champion_or_restore(target, config, replicas, mlflow_version, version, previous)
    log.info("promoted MLflow %s v%s as %r -> Triton %s v%d", config.registered_model, mlflow_version,
             config.alias, config.triton_model, version)
    return StepResult(
        step="promote",
        status=StepStatus.SUCCESS,
        uris={"triton_version_dir": str(target.model_repository / config.triton_model / str(version))},
        metrics={"triton_version": float(version), "smoke_max_abs_diff": diff},
        info={"registered_model": config.registered_model, "mlflow_version": mlflow_version,
              "alias": config.alias, "triton_model": config.triton_model, "triton_replicas": ",".join(replicas.urls)},
    )


def build_bundle(config: PromoteConfig, model_dir: Path, predictions: Path, data_dir: Path, max_length: int,
                 intra_op_threads: int, scratch: Path, truncation: str = DEFAULT_TRUNCATION) -> ServingBundle:
    """The candidate's serving bundle: its folder, the drift monitoring's embedding table and reference
    (the evaluation outputs and their features), and the first test texts with their evaluation logits
    for the smoke test. ``max_length`` and ``truncation`` are how the evaluation cut a long text: the
    served tokenizer, the table and the reference cut it the same way."""
    labels = tuple(read_meta(data_dir)["labels"])
    table = fit_embedding_table(model_dir, data_dir, max_length, scratch / repo.EMBEDDING_TABLE_FILE, truncation)
    try:
        reference = write_reference(predictions, data_dir, model_dir, list(labels), max_length,
                                    scratch / REFERENCE_FILE, embedding_table=table, truncation=truncation)
    except Exception as error:  # noqa: BLE001 - reported as a failed promotion; nothing was changed yet
        raise PromotionFailed(
            f"{config.triton_model}: could not build the drift reference from {predictions.name}: {error}. "
            f"Nothing was changed; the alias {config.alias!r} is unchanged."
        ) from error
    texts = read_split(data_dir, "test")["text"].head(config.smoke_samples).tolist()
    return ServingBundle(model_dir=model_dir, labels=labels, max_length=max_length, reference=reference,
                         smoke_texts=tuple(texts), smoke_logits=read_logits(predictions)[: len(texts)],
                         embedding_table=table, intra_op_threads=intra_op_threads, truncation=truncation)


def shadow_step(config: PromoteConfig, target: PromotionTarget, replicas: TritonReplicas,
                mlflow_version: str) -> BeforeSwitch | None:
    """The shadow the promotion runs before its switch (param ``shadow_requests``), or None."""
    if config.shadow_requests <= 0:
        return None
    from tasks import shadow

    def before_switch(ensemble: repo.ClassifierEnsemble, version: int) -> None:
        shadow.run_shadow(config, replicas, target.model_repository, ensemble, version, target.prediction_log_url,
                          target.tracking_uri, mlflow_version)

    return before_switch


def serve_bundle(bundle: ServingBundle, config: PromoteConfig, replicas: TritonReplicas, repository: Path,
                 mlflow_version: str, min_version: int = 1,
                 before_switch: BeforeSwitch | None = None) -> tuple[int, float]:
    """Write ``bundle`` as the next version (at least ``min_version``) of the ensemble, switch every
    replica to it and smoke-test it; on any failure the version before serves again. The caller holds
    ``serving_lock``. ``before_switch(ensemble, version)`` runs once the new components are loaded
    and a version serves (a shadow; it raises to stop the switch). Returns the Triton version and
    the smoke test's largest logit difference."""
    ensemble = repo.ClassifierEnsemble(config.triton_model, bundle.labels, bundle.max_length,
                                       truncation=bundle.truncation, intra_op_threads=bundle.intra_op_threads,
                                       **gpu_serving(bundle.model_dir))
    previous = repo.ensemble_versions(repository, ensemble.name)
    tables = (bundle.embedding_table,) if bundle.embedding_table else ()
    version = repo.write_component_versions(repository, ensemble, bundle.model_dir, served_format(bundle.model_dir),
                                            tokenizer_files=tables, min_version=min_version)
    log.info("wrote %s version %d; loading it on %s", ensemble.name, version, ", ".join(replicas.urls))
    try:
        with tempfile.TemporaryDirectory(prefix="marker-") as scratch:
            marker = repo.write_registered_version(Path(scratch), config.registered_model, mlflow_version)
            check = (lambda: before_switch(ensemble, version)) if before_switch and previous else None
            if before_switch and not previous:
                log.info("%s: nothing serves yet, so there is no champion to shadow; switching", ensemble.name)
            switch_to(replicas, repository, ensemble.name, version, repo.render_ensemble_config(ensemble, version),
                      (bundle.reference, marker), before_switch=check)
        expected_embeddings = reference_embeddings(bundle.reference)
        diff = max(_smoke_test(client, config, ensemble.name, bundle, version, expected_embeddings)
                   for client in replicas.clients)
    except Exception as error:  # noqa: BLE001 - whatever failed, the previous version must serve again
        restore_serving(replicas, repository, ensemble.name, version, previous)
        raise PromotionFailed(
            f"{ensemble.name} version {version} was not promoted: {error}. "
            f"Version {previous[-1] if previous else '(none)'} keeps serving; "
            f"the alias {config.alias!r} is unchanged."
        ) from error
    return version, diff


def champion_or_restore(target: PromotionTarget, config: PromoteConfig, replicas: TritonReplicas,
                        mlflow_version: str, version: int, previous: list[int]) -> None:
    """Move the alias to the version now served; when the registry cannot be written (MLflow down),
    serve the version before again, so Triton never serves a version the alias does not name for
    longer than the switch. If the registry took part of the change, the reconcile loop serves
    whatever the alias names once MLflow answers."""
    try:
        make_champion(target.tracking_uri, config, mlflow_version, version)
    except Exception as error:  # noqa: BLE001 - any registry failure: the switch is undone
        restore_serving(replicas, target.model_repository, config.triton_model, version, previous)
        raise PromotionFailed(
            f"{config.triton_model} version {version} was served, but moving the alias {config.alias!r} of "
            f"{config.registered_model} to version {mlflow_version} failed: {error}. Version "
            f"{previous[-1] if previous else '(none)'} serves again; retry the promotion once MLflow answers."
        ) from error


def make_champion(tracking_uri: str, config: PromoteConfig, mlflow_version: str, triton_version: int) -> None:
    """Point the alias at the version now served (the one it named before becomes ``previous_champion``)
    and tag it with its Triton version; the tags of an earlier refusal or rollback are cleared."""
    current = model_aliases.alias_version(tracking_uri, config.registered_model, config.alias)
    if current is not None and current != mlflow_version:
        model_aliases.set_alias(tracking_uri, config.registered_model, PREVIOUS_ALIAS, current)
    model_aliases.set_alias(tracking_uri, config.registered_model, config.alias, mlflow_version)
    record_served(tracking_uri, config, mlflow_version, triton_version)


def record_served(tracking_uri: str, config: PromoteConfig, mlflow_version: str, triton_version: int) -> None:
    """Tag ``mlflow_version`` as served by Triton ``triton_version``; clear a refusal or rollback mark."""
    model_aliases.tag_version(tracking_uri, config.registered_model, mlflow_version,
                              {"triton_model": config.triton_model, "triton_version": str(triton_version),
                               "promoted": "true", SWITCHED_AT_TAG: f"{time.time():.0f}"})
    for tag in (SERVING_ERROR_TAG, ROLLED_BACK_TAG):
        model_aliases.delete_version_tag(tracking_uri, config.registered_model, mlflow_version, tag)


@contextmanager
def serving_lock(repository: Path, name: str, timeout_s: float = 900.0) -> Iterator[None]:
    """Hold the repository's lock for ``name``: one promotion, rollback or reconcile switches at a time
    (an advisory ``flock`` on a file in the repository, which every writer shares)."""
    repository.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    with open(repository / f".{name}.lock", "a+") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise PromotionFailed(f"another promotion, rollback or reconcile of {name} has held "
                                          f"{repository} for over {timeout_s:.0f} s; try again later") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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
    return ChampionScore(float(np.mean(correct)), f"Triton {config.triton_model} v{version}", correct,
                         tuple(labels.index(guess) for guess in served))


def switch_to(replicas: TritonReplicas, repository: Path, name: str, version: int, ensemble_config: str,
              ensemble_files: tuple[Path, ...], before_switch: Callable[[], None] | None = None) -> None:
    """Load component version N beside the serving one on every replica, run ``before_switch`` (it
    raises to stop), then add ensemble version N and load it on each replica in turn (the switch)."""
    load_and_wait(replicas, repo.ensemble_models(name)[:-1], version)
    if before_switch is not None:
        before_switch()
    repo.write_ensemble_step(repository, name, version, ensemble_config, ensemble_files)
    load_and_wait(replicas, (name,), version)


CHECK_TEXTS = ("a short check that the model serves", "another one, a little longer, with punctuation!")


def check_serving(client: TritonClient, name: str, version: int) -> None:
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


def fit_embedding_table(model_dir: Path, data_dir: Path, max_length: int, target: Path,
                        truncation: str = DEFAULT_TRUNCATION) -> Path | None:
    """Fit the embedding projection table (``monitoring.embedding``) of ``model_dir``'s ONNX model on
    the training split's texts (at most ``EMBEDDING_FIT_TEXTS``) and save it at ``target``.

    Embeddings are optional: when the table cannot be fitted (a TensorRT engine, a quantization whose
    embedding matrix cannot be read), the promotion goes on without it, with a warning. The version
    then serves NaN embeddings (not logged) and its reference has no embedding columns, so drift
    monitoring does not judge that feature."""
    from monitoring import embedding as emb

    try:
        texts = read_split(data_dir, "train")["text"].head(EMBEDDING_FIT_TEXTS).tolist()
        table = emb.fit_table_for(model_dir / "model.onnx", model_dir / "tokenizer.json", texts, max_length,
                                  truncation)
    except Exception as error:  # noqa: BLE001 - never fail a promotion for the optional embeddings
        log.warning("%s: no embedding table, so no embedding drift for this version: %s", model_dir, error)
        return None
    np.save(target, table)
    return target


def write_reference(predictions: Path, data_dir: Path, model_dir: Path, labels: list[str], max_length: int,
                    target: Path, embedding_table: Path | None = None, truncation: str = DEFAULT_TRUNCATION) -> Path:
    """The evaluation's per-text outputs (label, prediction, logits) plus the monitoring features
    (confidence, predicted label, text length, token and unknown-token share) of the same test texts,
    and their embeddings through ``embedding_table`` (a saved table, ``fit_embedding_table``) if given."""
    import pandas as pd

    from monitoring.features import reference_features

    frame = pd.read_parquet(predictions)
    texts = read_split(data_dir, "test")["text"].tolist()
    table = np.load(embedding_table) if embedding_table is not None else None
    features = reference_features(read_logits(predictions), texts, labels, model_dir / "tokenizer.json", max_length,
                                  embedding_table=table, truncation=truncation)
    pd.concat([frame.reset_index(drop=True), features], axis=1).to_parquet(target, index=False)
    return target


def reference_embeddings(reference: Path) -> np.ndarray | None:
    """The embeddings of a reference file (test texts in order), or None when it has none."""
    import pandas as pd

    from monitoring import embedding as emb

    frame = pd.read_parquet(reference)
    return frame[list(emb.COLUMNS)].to_numpy(dtype=np.float64) if all(c in frame for c in emb.COLUMNS) else None


def _smoke_test(client: TritonClient, config: PromoteConfig, name: str, bundle: ServingBundle, version: int,
                expected_embeddings: np.ndarray | None = None) -> float:
    """Send the bundle's raw smoke texts through the ensemble, one per request and then batched;
    outputs must match the candidate's evaluation outputs either way, and the served embeddings the
    reference's (when it has them)."""
    texts, expected = list(bundle.smoke_texts), np.asarray(bundle.smoke_logits)
    extra = ("EMBEDDING",) if expected_embeddings is not None else ()
    # One text per request, as the evaluation ran them.
    answers = [client.classify(name, [text], version=version, extra_outputs=extra) for text in texts]
    served = np.concatenate([answer["LOGITS"] for answer in answers]) if answers else expected
    if not np.isfinite(served).all():
        raise PromotionFailed("Triton returned NaN/Inf logits in the smoke test")
    diff = float(np.abs(served - expected).max()) if len(texts) else 0.0
    if diff > config.smoke_tolerance:
        raise PromotionFailed(
            f"Triton outputs differ from the evaluation outputs by {diff:.2e} (> {config.smoke_tolerance:.0e})"
        )
    if expected_embeddings is not None and answers:
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


def restore_serving(replicas: TritonReplicas, repository: Path, name: str, failed: int, previous: list[int]) -> None:
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
