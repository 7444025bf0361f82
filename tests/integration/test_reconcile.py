"""Serving follows the MLflow alias, against the real MLflow and Triton servers: moving the alias (as a
reviewer does in the MLflow UI) switches Triton with zero failed requests, moving it back serves the
previous version again, a deleted model repository is rebuilt from the registry, a version that
cannot be served is refused and tagged, and the reconcile loop process does all this by itself."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from serving import model_repository as repo
from serving.triton_client import TritonClient
from tasks import model_aliases
from tasks.config import PromoteConfig
from tasks.errors import PromotionFailed
from tasks.promote import PREVIOUS_ALIAS, SERVING_ERROR_TAG
from tasks.promote import run as promote
from tasks.reconcile import reconcile_once
from tests.integration.test_registry_and_promotion import RequestStream, _register, _target, evaluated  # noqa: F401

pytestmark = pytest.mark.integration

MODEL, SERVED = "follow-model", "follow_model"


def _served(client: TritonClient) -> list[int]:
    return client.ready_versions(SERVED) if client.is_ready(SERVED) else []


def test_serving_follows_the_alias_and_the_registry_rebuilds_it(local_services, exported_onnx, evaluated,
                                                                prepared_data):
    settings, client = local_services.settings, TritonClient(local_services.settings.triton_http_url)
    target, repository = _target(settings), settings.triton_model_repository
    config = PromoteConfig(registered_model=MODEL, triton_model=SERVED, smoke_samples=6)
    predictions = Path(evaluated.uri("predictions"))
    v1, v2 = (_register(settings, MODEL, f"follow-{n}", exported_onnx, evaluated.metrics) for n in (1, 2))
    for version in (v1, v2):
        promote(config, target, exported_onnx, predictions, prepared_data, version, max_length=32)
    assert _served(client) == [2] and reconcile_once(config, target).action == "in_sync"
    assert repo.registered_version(repository, SERVED, 1) == (MODEL, v1)

    # A reviewer moves the alias back to v1 in the MLflow UI: its files serve again as version 3.
    model_aliases.set_alias(settings.mlflow_url, MODEL, "champion", v1)
    with RequestStream(settings.triton_http_url, SERVED) as during_switch:
        switched = reconcile_once(config, target)
    assert during_switch.sent > 10 and during_switch.failures == []
    assert (switched.action, switched.files_of, switched.triton_version) == ("switched", 1, 3)
    assert _served(client) == [3]
    assert model_aliases.alias_version(settings.mlflow_url, MODEL, PREVIOUS_ALIAS) == v2
    assert model_aliases.version_tags(settings.mlflow_url, MODEL, v1)["triton_version"] == "3"

    # The model repository is lost while Triton serves from memory: rebuilt from the registry's bundle,
    # numbered above what Triton still serves, and requests are answered again.
    for model in repo.ensemble_models(SERVED):
        shutil.rmtree(repository / model)
    rebuilt = reconcile_once(config, target)
    assert (rebuilt.action, rebuilt.mlflow_version, rebuilt.triton_version) == ("rebuilt", v1, 4)
    assert _served(client) == [4] and repo.registered_version(repository, SERVED, 4) == (MODEL, v1)
    assert (repository / SERVED / "4" / "reference_predictions.parquet").exists()
    assert client.classify(SERVED, ["good great film"])["LABEL"].tolist()

    # A version without serving files (registered, never promoted): refused and tagged; v1 keeps serving.
    v3 = _register(settings, MODEL, "follow-3", exported_onnx, evaluated.metrics)
    model_aliases.set_alias(settings.mlflow_url, MODEL, "champion", v3)
    with pytest.raises(PromotionFailed, match="no serving files in the registry"):
        reconcile_once(config, target)
    assert SERVING_ERROR_TAG in model_aliases.version_tags(settings.mlflow_url, MODEL, v3)
    assert reconcile_once(config, target).action == "refused" and _served(client) == [4]


def test_the_reconcile_loop_follows_an_alias_moved_in_the_registry(local_services, exported_onnx, evaluated,
                                                                   prepared_data):
    settings, client = local_services.settings, TritonClient(local_services.settings.triton_http_url)
    config = PromoteConfig(registered_model="loop-model", triton_model="loop_model", smoke_samples=4)
    predictions = Path(evaluated.uri("predictions"))
    versions = [_register(settings, "loop-model", f"loop-{n}", exported_onnx, evaluated.metrics) for n in (1, 2)]
    for version in versions:
        promote(config, _target(settings), exported_onnx, predictions, prepared_data, version, max_length=32)
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
    loop = subprocess.Popen(
        [sys.executable, "-m", "tasks.reconcile", "--mlflow", settings.mlflow_url, "--triton",
         settings.triton_http_url, "--repository", str(settings.triton_model_repository), "--registered-model",
         "loop-model", "--triton-model", "loop_model", "--interval", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        mlflow.MlflowClient(settings.mlflow_url).set_registered_model_alias("loop-model", "champion", versions[0])
        with RequestStream(settings.triton_http_url, "loop_model") as during:
            deadline = time.monotonic() + 60
            # Done when the loop has tagged v1 with the version it serves (after the switch and its check).
            while model_aliases.version_tags(settings.mlflow_url, "loop-model", versions[0])["triton_version"] != "3" \
                    and time.monotonic() < deadline:
                time.sleep(0.5)
        assert client.ready_versions("loop_model") == [3]
        assert during.failures == [] and during.sent > 10
        assert model_aliases.alias_version(settings.mlflow_url, "loop-model", PREVIOUS_ALIAS) == versions[1]
    finally:
        loop.terminate()
        output = loop.communicate(timeout=30)[0]
    assert "now serving loop-model v1 as Triton version 3 (the files of version 1)" in output, output
