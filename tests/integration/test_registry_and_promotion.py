"""Against the real MLflow and Triton servers: register candidates, promote v1 then v2 through the
raw-text ensemble, failed promotions that leave the serving version and the aliases untouched,
rollback, and zero failed requests while versions switch."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from serving import model_repository as repo
from serving.triton_client import TritonClient, TritonUnavailable
from tasks import model_aliases, registry
from tasks.config import EvaluateConfig, PromoteConfig
from tasks.errors import PromotionFailed
from tasks.evaluate import run as evaluate
from tasks.promote import PREVIOUS_ALIAS, PromotionTarget, champion_score
from tasks.promote import run as promote
from tasks.reconcile import rollback
from tasks.results import ModelFormat

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def evaluated(exported_onnx, prepared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "onnx_fp32"
    return evaluate(EvaluateConfig(warmup=1, max_length=32), "onnx_fp32", exported_onnx, ModelFormat.ONNX,
                    prepared_data, out)


def _register(settings, model_name: str, run_key: str, model_dir: Path, metrics: dict) -> str:
    uri = settings.mlflow_url
    parent = registry.parent_run_id(uri, "integration", run_key, {"p": "1"})
    return registry.log_candidate(uri, "integration", parent, run_key, model_name,
                                  registry.Candidate("onnx_fp32", model_dir, metrics, "export"), {"data_hash": "x"})


def _target(settings) -> PromotionTarget:
    return PromotionTarget(settings.triton_http_url, settings.triton_model_repository, settings.mlflow_url)


class RequestStream:
    """A bounded stream of single-text requests on loopback, counting failures (at most 3000 requests, 180 s)."""

    def __init__(self, url: str, model: str, max_requests: int = 3000, max_seconds: float = 180.0) -> None:
        self.client = TritonClient(url)
        self.model = model
        self.max_requests = max_requests
        self.max_seconds = max_seconds
        self.sent = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        started = time.monotonic()
        while not self._stop.is_set() and self.sent < self.max_requests and time.monotonic() - started < self.max_seconds:
            try:
                result = self.client.classify(self.model, ["good great film"])
                if not np.isfinite(result["PROBABILITIES"]).all():
                    self.failures.append("non-finite output")
            except Exception as error:  # noqa: BLE001 - every failure is counted and reported
                # tritonclient's exception keeps its message out of repr(): str() carries it.
                self.failures.append(f"{time.monotonic() - started:.2f}s {type(error).__name__}: {error}"[:300])
            self.sent += 1

    def __enter__(self) -> RequestStream:
        self._thread.start()
        time.sleep(0.5)
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(0.5)
        self._stop.set()
        self._thread.join(timeout=30)


def test_register_is_idempotent_and_tags_lineage(local_services, exported_onnx, evaluated):
    settings = local_services.settings
    first = _register(settings, "idempotent-model", "run-a", exported_onnx, evaluated.metrics)
    again = _register(settings, "idempotent-model", "run-a", exported_onnx, evaluated.metrics)
    assert first == again == "1"
    import mlflow

    client = mlflow.MlflowClient(settings.mlflow_url)
    version = client.get_model_version("idempotent-model", first)
    assert version.tags["pipeline_run_id"] == "run-a"
    assert version.tags["data_hash"] == "x"
    assert float(version.tags["metric.accuracy"]) == pytest.approx(evaluated.metrics["accuracy"], abs=1e-5)
    experiment_id = client.get_experiment_by_name("integration").experiment_id
    parents = client.search_runs([experiment_id],
                                 filter_string="tags.pipeline_role = 'parent' and tags.pipeline_run_id = 'run-a'")
    assert len(parents) == 1
    # An attempt that stopped after registering but before tagging the version is still found.
    client.delete_model_version_tag("idempotent-model", first, "pipeline_run_id")
    assert _register(settings, "idempotent-model", "run-a", exported_onnx, evaluated.metrics) == first
    assert client.get_model_version("idempotent-model", first).tags["pipeline_run_id"] == "run-a"
    candidates = client.search_runs([experiment_id],
                                    filter_string="tags.pipeline_role = 'candidate' and tags.pipeline_run_id = 'run-a'")
    assert len(candidates) == 1
    assert len(client.search_model_versions("name = 'idempotent-model'")) == 1
    registry.describe_decision(settings.mlflow_url, "idempotent-model", first, "not promoted: test reason.")
    registry.describe_decision(settings.mlflow_url, "idempotent-model", first, "promoted: second decision.")
    description = client.get_model_version("idempotent-model", first).description
    assert description.startswith("onnx_fp32: export.") and description.endswith("Decision: promoted: second decision.")
    assert "test reason" not in description


def test_promote_switch_fail_and_roll_back_without_dropping_requests(local_services, exported_onnx, evaluated,
                                                                     prepared_data, tmp_path):
    settings = local_services.settings
    target = _target(settings)
    config = PromoteConfig(registered_model="promo-model", triton_model="promo_model", smoke_samples=8)
    predictions = Path(evaluated.uri("predictions"))
    mlflow_v1 = _register(settings, "promo-model", "run-1", exported_onnx, evaluated.metrics)
    first = promote(config, target, exported_onnx, predictions, prepared_data, mlflow_v1, max_length=32)
    assert first.metrics["triton_version"] == 1.0
    assert model_aliases.alias_version(settings.mlflow_url, "promo-model", "champion") == mlflow_v1
    assert (settings.triton_model_repository / "promo_model" / "1" / "reference_predictions.parquet").exists()
    client = TritonClient(settings.triton_http_url)
    # The champion measured through Triton on the same split gives the evaluation's accuracy exactly.
    score = champion_score(target, config, prepared_data)
    assert score.accuracy == pytest.approx(evaluated.metrics["accuracy"], abs=1e-9)
    assert "promo_model v1" in score.note
    served = client.classify("promo_model", ["good great movie", "awful boring film, a waste"])
    assert list(served["LABEL"]) and set(served["LABEL"]) <= {"negative", "positive"}
    assert np.allclose(served["PROBABILITIES"].sum(axis=1), 1.0, atol=1e-5)

    mlflow_v2 = _register(settings, "promo-model", "run-2", exported_onnx, evaluated.metrics)
    with RequestStream(settings.triton_http_url, "promo_model") as during_switch:
        second = promote(config, target, exported_onnx, predictions, prepared_data, mlflow_v2, max_length=32)
    assert during_switch.sent > 10 and during_switch.failures == []
    assert second.metrics["triton_version"] == 2.0
    assert client.ready_versions("promo_model") == [2]
    assert model_aliases.alias_version(settings.mlflow_url, "promo-model", "champion") == mlflow_v2
    assert model_aliases.alias_version(settings.mlflow_url, "promo-model", PREVIOUS_ALIAS) == mlflow_v1

    # A corrupted model file: the load fails, version 2 keeps serving, the aliases stay.
    broken = tmp_path / "broken"
    shutil.copytree(exported_onnx, broken)
    (broken / "model.onnx").write_bytes(b"this is not an onnx file")
    mlflow_v3 = _register(settings, "promo-model", "run-3", exported_onnx, evaluated.metrics)
    with RequestStream(settings.triton_http_url, "promo_model") as during_failure:
        with pytest.raises(PromotionFailed, match="Version 2 keeps serving"):
            promote(config, target, broken, predictions, prepared_data, mlflow_v3, max_length=32)
    assert during_failure.sent > 10 and during_failure.failures == []
    assert repo.ensemble_versions(settings.triton_model_repository, "promo_model") == [1, 2]
    assert client.ready_versions("promo_model") == [2]
    assert model_aliases.alias_version(settings.mlflow_url, "promo-model", "champion") == mlflow_v2

    # Roll back: the files of version 1 serve again, as version 3, and MLflow version 1 is the champion.
    with RequestStream(settings.triton_http_url, "promo_model") as during_rollback:
        result = rollback(config, target)
    assert during_rollback.sent > 10 and during_rollback.failures == []
    assert result.info["mlflow_version"] == mlflow_v1
    assert result.info["files_of_triton_version"] == "1"
    assert client.ready_versions("promo_model") == [3]
    assert model_aliases.version_tags(settings.mlflow_url, "promo-model", mlflow_v1)["triton_version"] == "3"
    assert (settings.triton_model_repository / "promo_model" / "3" / "reference_predictions.parquet").exists()
    assert model_aliases.alias_version(settings.mlflow_url, "promo-model", "champion") == mlflow_v1
    assert model_aliases.alias_version(settings.mlflow_url, "promo-model", PREVIOUS_ALIAS) is None
    with pytest.raises(PromotionFailed, match="nothing to roll back to"):
        rollback(config, target)

    # What `opsctl champion` prints for this state.
    from opsctl.cli import champion_lines

    lines = champion_lines(settings.mlflow_url, client, "promo-model", "promo_model", PREVIOUS_ALIAS, model_aliases)
    assert lines[0].startswith(f"champion: promo-model version {mlflow_v1} (onnx_fp32, accuracy ")
    assert lines[0].endswith("served as Triton promo_model version 3")
    assert lines[1:3] == ["Triton promo_model: version 3 ready", "previous champion: none"]
    assert champion_lines(settings.mlflow_url, client, "never-registered", "nothing", PREVIOUS_ALIAS,
                          model_aliases)[0].startswith("no champion")


def test_smoke_test_mismatch_is_not_promoted(local_services, exported_onnx, evaluated, prepared_data, tmp_path):
    """Outputs through Triton that differ from the evaluation outputs (wrong label order) block promotion."""
    settings = local_services.settings
    config = PromoteConfig(registered_model="smoke-model", triton_model="smoke_model", smoke_samples=4)
    frame = pd.read_parquet(evaluated.uri("predictions"))
    frame["logit_0"], frame["logit_1"] = frame["logit_1"], frame["logit_0"]
    wrong = tmp_path / "wrong_predictions.parquet"
    frame.to_parquet(wrong)
    version = _register(settings, "smoke-model", "run-s", exported_onnx, evaluated.metrics)
    with pytest.raises(PromotionFailed, match="differ from the evaluation outputs"):
        promote(config, _target(settings), exported_onnx, wrong, prepared_data, version, max_length=32)
    assert repo.ensemble_versions(settings.triton_model_repository, "smoke_model") == []
    assert model_aliases.alias_version(settings.mlflow_url, "smoke-model", "champion") is None
    assert not TritonClient(settings.triton_http_url).is_ready("smoke_model")
    assert champion_score(_target(settings), config, prepared_data) is None


def test_batched_smoke_test_refuses_a_model_whose_answers_depend_on_the_batch(local_services, exported_onnx,
                                                                             prepared_data, tmp_path):
    """The smoke test sends its texts batched too: dynamic INT8 with per-tensor activation scales answers
    a text differently when Triton pads and batches it with others, and is refused; per-token scales
    answer the same either way and are served."""
    from tasks.quantize import run as quantize
    from tasks.config import QuantizeConfig

    settings = local_services.settings
    config = PromoteConfig(registered_model="batch-model", triton_model="batch_model", smoke_samples=16,
                           smoke_batch=8, smoke_tolerance=1e-5)
    for scales in ("per_tensor", "per_token"):
        model_dir = tmp_path / scales
        quantize(QuantizeConfig(activation_scales=scales), exported_onnx, prepared_data, model_dir, max_length=32)
        evaluation = evaluate(EvaluateConfig(warmup=1, max_length=32), scales, model_dir, ModelFormat.ONNX,
                              prepared_data, tmp_path / f"eval_{scales}")
        version = _register(settings, "batch-model", f"run-{scales}", model_dir, evaluation.metrics)
        if scales == "per_tensor":
            with pytest.raises(PromotionFailed, match="depends on the texts served with it"):
                promote(config, _target(settings), model_dir, Path(evaluation.uri("predictions")), prepared_data,
                        version, max_length=32)
            assert model_aliases.alias_version(settings.mlflow_url, "batch-model", "champion") is None
        else:
            result = promote(config, _target(settings), model_dir, Path(evaluation.uri("predictions")),
                             prepared_data, version, max_length=32)
            assert result.metrics["smoke_max_abs_diff"] <= 1e-5
            assert model_aliases.alias_version(settings.mlflow_url, "batch-model", "champion") == version


@pytest.fixture(scope="module")
def second_replica(local_services, tmp_path_factory):
    """A second Triton serving the stack's model repository (as replicas share a volume in production).
    It loads what the repository holds when it starts, as a pod added by an autoscaler does."""
    from opsctl.services import standalone_triton

    with standalone_triton(tmp_path_factory.mktemp("replica"), local_services.settings.triton_model_repository) as replica:
        yield replica.triton_http_url


def test_promotion_switches_every_replica_and_never_half_promotes(local_services, second_replica, exported_onnx,
                                                                 evaluated, prepared_data):
    settings = local_services.settings
    replicas = f"{settings.triton_http_url},{second_replica}"
    target = PromotionTarget(replicas, settings.triton_model_repository, settings.mlflow_url)
    config = PromoteConfig(registered_model="replica-model", triton_model="replica_model", smoke_samples=4)
    predictions = Path(evaluated.uri("predictions"))
    first = promote(config, target, exported_onnx, predictions, prepared_data,
                    _register(settings, "replica-model", "run-r1", exported_onnx, evaluated.metrics), max_length=32)
    assert first.info["triton_replicas"] == replicas
    clients = [TritonClient(url) for url in (settings.triton_http_url, second_replica)]
    assert [client.ready_versions("replica_model") for client in clients] == [[1], [1]]

    v2 = _register(settings, "replica-model", "run-r2", exported_onnx, evaluated.metrics)
    with RequestStream(settings.triton_http_url, "replica_model") as on_first, \
            RequestStream(second_replica, "replica_model") as on_second:
        promote(config, target, exported_onnx, predictions, prepared_data, v2, max_length=32)
    assert on_first.failures == [] and on_second.failures == [] and min(on_first.sent, on_second.sent) > 10
    assert [client.ready_versions("replica_model") for client in clients] == [[2], [2]]

    # One replica down: nothing is written or loaded anywhere, the champion stays.
    from opsctl.process import free_port

    down = PromotionTarget(f"{replicas},127.0.0.1:{free_port()}", settings.triton_model_repository,
                           settings.mlflow_url)
    v3 = _register(settings, "replica-model", "run-r3", exported_onnx, evaluated.metrics)
    with pytest.raises(TritonUnavailable, match="not ready"):
        promote(config, down, exported_onnx, predictions, prepared_data, v3, max_length=32)
    assert repo.ensemble_versions(settings.triton_model_repository, "replica_model") == [1, 2]
    assert [client.ready_versions("replica_model") for client in clients] == [[2], [2]]
    assert model_aliases.alias_version(settings.mlflow_url, "replica-model", "champion") == v2

    # A replica the promotion did not reach (started mid-switch) converges through the sync loop.
    from serving.replica_sync import sync_once

    only_first = PromotionTarget(settings.triton_http_url, settings.triton_model_repository, settings.mlflow_url)
    promote(config, only_first, exported_onnx, predictions, prepared_data, v3, max_length=32)
    assert [client.ready_versions("replica_model") for client in clients] == [[3], [2]]
    with RequestStream(second_replica, "replica_model") as during_sync:
        assert sync_once(clients[1], settings.triton_model_repository, "replica_model") == \
            "replica_model: now serving version 3 (was [2])"
    assert during_sync.failures == [] and during_sync.sent > 10
    assert clients[1].ready_versions("replica_model") == [3]
    assert sync_once(clients[1], settings.triton_model_repository, "replica_model") == \
        "replica_model: serving version 3"
    assert sync_once(clients[1], settings.triton_model_repository, "never_promoted") == \
        "never_promoted: nothing promoted yet"
