"""What Triton needs to serve a registered version, kept in the MLflow registry beside it.

A promotion logs the winner's serving bundle on the version's run (artifact folder ``serving``):
the model folder as served (model file, tokenizer, manifest), ``serving.json`` (labels, maximum
length and truncation, ONNX Runtime threads), the drift reference, the embedding table and the smoke texts with
the logits the evaluation gave them. With it, any process that can read the registry can serve the
version again through the same safe switch: the reconcile loop after someone moved the alias in the
MLflow UI, or after the model repository was lost (``tasks.reconcile``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from monitoring.features import REFERENCE_FILE
from serving import model_repository as repo
from serving.truncation import DEFAULT_TRUNCATION
from tasks.errors import PromotionFailed

BUNDLE_ARTIFACT = "serving"
MODEL_FOLDER = "model"
SERVING_FILE = "serving.json"
SMOKE_FILE = "smoke.json"


@dataclass(frozen=True)
class ServingBundle:
    """One version's serving inputs, as local files."""

    model_dir: Path
    labels: tuple[str, ...]
    max_length: int
    reference: Path
    smoke_texts: tuple[str, ...]
    smoke_logits: np.ndarray  # (texts, labels): the evaluation's outputs for smoke_texts, one text at a time
    embedding_table: Path | None = None
    intra_op_threads: int = 0
    truncation: str = DEFAULT_TRUNCATION  # how the version was trained to cut a long text (serving.truncation)

    def __post_init__(self) -> None:
        if len(self.smoke_texts) != len(self.smoke_logits):
            raise PromotionFailed(f"{len(self.smoke_texts)} smoke texts but {len(self.smoke_logits)} rows of logits")


def write_bundle(bundle: ServingBundle, folder: Path) -> Path:
    """The bundle as one folder (the layout logged to MLflow and read back by ``read_bundle``)."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copytree(bundle.model_dir, folder / MODEL_FOLDER, dirs_exist_ok=True)
    shutil.copy2(bundle.reference, folder / REFERENCE_FILE)
    if bundle.embedding_table is not None:
        shutil.copy2(bundle.embedding_table, folder / repo.EMBEDDING_TABLE_FILE)
    (folder / SERVING_FILE).write_text(json.dumps(
        {"labels": list(bundle.labels), "max_length": bundle.max_length, "truncation": bundle.truncation,
         "intra_op_threads": bundle.intra_op_threads}, indent=2))
    (folder / SMOKE_FILE).write_text(json.dumps(
        {"texts": list(bundle.smoke_texts), "logits": np.asarray(bundle.smoke_logits, dtype=float).tolist()}))
    return folder


def read_bundle(folder: Path) -> ServingBundle:
    """A bundle folder written by ``write_bundle``; ``PromotionFailed`` naming what is missing."""
    missing = [name for name in (MODEL_FOLDER, SERVING_FILE, SMOKE_FILE, REFERENCE_FILE) if not (folder / name).exists()]
    if missing:
        raise PromotionFailed(f"the serving bundle in {folder} lacks {missing}")
    serving = json.loads((folder / SERVING_FILE).read_text())
    smoke = json.loads((folder / SMOKE_FILE).read_text())
    table = folder / repo.EMBEDDING_TABLE_FILE
    return ServingBundle(
        model_dir=folder / MODEL_FOLDER, labels=tuple(serving["labels"]), max_length=int(serving["max_length"]),
        reference=folder / REFERENCE_FILE, smoke_texts=tuple(smoke["texts"]),
        smoke_logits=np.asarray(smoke["logits"], dtype=np.float32).reshape(len(smoke["texts"]), -1),
        embedding_table=table if table.exists() else None, intra_op_threads=int(serving.get("intra_op_threads", 0)),
        # A bundle logged before head_tail existed was served with head truncation.
        truncation=serving.get("truncation", DEFAULT_TRUNCATION),
    )


def log_bundle(tracking_uri: str, registered_model: str, version: str, bundle: ServingBundle) -> None:
    """Log ``bundle`` on the run of ``registered_model`` ``version`` (a retry overwrites the same files)."""
    from tasks.model_aliases import mlflow_client

    client = mlflow_client(tracking_uri)
    run_id = client.get_model_version(registered_model, version).run_id
    if not run_id:
        raise PromotionFailed(f"{registered_model} version {version} has no run to keep its serving files on")
    with tempfile.TemporaryDirectory(prefix="bundle-") as scratch:
        client.log_artifacts(run_id, str(write_bundle(bundle, Path(scratch) / BUNDLE_ARTIFACT)), BUNDLE_ARTIFACT)


def download_bundle(tracking_uri: str, registered_model: str, version: str, destination: Path) -> ServingBundle:
    """The serving bundle of ``registered_model`` ``version`` from the registry, into ``destination``.
    ``PromotionFailed`` (saying what to do) for a version that has none."""
    from mlflow.artifacts import download_artifacts

    from tasks.model_aliases import mlflow_client

    run_id = mlflow_client(tracking_uri).get_model_version(registered_model, version).run_id
    try:
        folder = download_artifacts(run_id=run_id, artifact_path=BUNDLE_ARTIFACT, dst_path=str(destination),
                                    tracking_uri=tracking_uri)
    except Exception as error:  # noqa: BLE001 - MLflow raises several types for a missing artifact
        raise PromotionFailed(
            f"{registered_model} version {version} has no serving files in the registry ({error}); only versions "
            "a pipeline run promoted or proposed for approval carry them: serve it with the pipeline instead"
        ) from error
    return read_bundle(Path(folder))
