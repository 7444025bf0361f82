"""Against the real MLflow and Triton servers: register candidates, promote v1 then v2, and a failed
promotion that leaves the serving version and the alias untouched."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from serving import model_repository as repo
from serving.triton_client import TritonClient
from tasks import registry
from tasks.config import EvaluateConfig, PromoteConfig
from tasks.errors import PromotionFailed
from tasks.evaluate import read_logits, run as evaluate
from tasks.evaluate import tokenize
from tasks.modeling import load_tokenizer
from tasks.promote import PromotionTarget, run as promote
from tasks.results import ModelFormat

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def evaluated(exported_onnx, prepared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "onnx_fp32"
    result = evaluate(EvaluateConfig(warmup=1, max_length=32), "onnx_fp32", exported_onnx, ModelFormat.ONNX,
                      prepared_data, out)
    return result


def _register(settings, model_name: str, run_key: str, model_dir: Path, metrics: dict) -> str:
    uri = settings.mlflow_url
    parent = registry.parent_run_id(uri, "integration", run_key, {"p": "1"})
    return registry.log_candidate(uri, "integration", parent, run_key, model_name,
                                  registry.Candidate("onnx_fp32", model_dir, metrics, "export"), {"data_hash": "x"})


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
    assert len(client.search_runs([client.get_experiment_by_name("integration").experiment_id],
                                  filter_string="tags.pipeline_role = 'parent' and tags.pipeline_run_id = 'run-a'")) == 1


def test_promote_v1_then_v2_then_a_failed_promotion_keeps_serving(local_services, exported_onnx, evaluated,
                                                                  prepared_data, tmp_path):
    settings = local_services.settings
    target = PromotionTarget(settings.triton_http_url, settings.triton_model_repository, settings.mlflow_url)
    config = PromoteConfig(registered_model="promo-model", triton_model="promo_model", smoke_samples=8)
    predictions = Path(evaluated.uri("predictions"))
    mlflow_v1 = _register(settings, "promo-model", "run-1", exported_onnx, evaluated.metrics)
    first = promote(config, target, exported_onnx, predictions, prepared_data, mlflow_v1, max_length=32)
    assert first.metrics["triton_version"] == 1.0
    assert registry.alias_version(settings.mlflow_url, "promo-model", "champion") == mlflow_v1
    assert (settings.triton_model_repository / "promo_model" / "1" / "reference_predictions.parquet").exists()

    mlflow_v2 = _register(settings, "promo-model", "run-2", exported_onnx, evaluated.metrics)
    second = promote(config, target, exported_onnx, predictions, prepared_data, mlflow_v2, max_length=32)
    assert second.metrics["triton_version"] == 2.0
    client = TritonClient(settings.triton_http_url)
    assert client.ready_versions("promo_model") == [2]
    assert registry.alias_version(settings.mlflow_url, "promo-model", "champion") == mlflow_v2

    # A corrupted model file: the load fails, version 2 keeps serving, the alias stays on v2.
    broken = tmp_path / "broken"
    shutil.copytree(exported_onnx, broken)
    (broken / "model.onnx").write_bytes(b"this is not an onnx file")
    mlflow_v3 = _register(settings, "promo-model", "run-3", exported_onnx, evaluated.metrics)
    with pytest.raises(PromotionFailed, match="Version 2 keeps serving"):
        promote(config, target, broken, predictions, prepared_data, mlflow_v3, max_length=32)
    assert repo.versions(settings.triton_model_repository, "promo_model") == [1, 2]
    assert client.ready_versions("promo_model") == [2]
    assert registry.alias_version(settings.mlflow_url, "promo-model", "champion") == mlflow_v2

    texts = ["good great movie", "awful boring film"]
    tokenizer = load_tokenizer(exported_onnx)
    served = np.concatenate([client.infer_logits("promo_model", tokenize(tokenizer, [t], 32)) for t in texts])
    assert served.shape == (2, 2) and np.isfinite(served).all()


def test_smoke_test_mismatch_rolls_back(local_services, exported_onnx, evaluated, prepared_data, tmp_path):
    """A model whose Triton outputs differ from its evaluation outputs is not promoted."""
    settings = local_services.settings
    target = PromotionTarget(settings.triton_http_url, settings.triton_model_repository, settings.mlflow_url)
    config = PromoteConfig(registered_model="smoke-model", triton_model="smoke_model", smoke_samples=4)
    frame_path = tmp_path / "wrong_predictions.parquet"
    import pandas as pd

    frame = pd.read_parquet(evaluated.uri("predictions"))
    frame["logit_0"], frame["logit_1"] = frame["logit_1"], frame["logit_0"]  # wrong label order
    frame.to_parquet(frame_path)
    version = _register(settings, "smoke-model", "run-s", exported_onnx, evaluated.metrics)
    with pytest.raises(PromotionFailed, match="differ from the evaluation outputs"):
        promote(config, target, exported_onnx, frame_path, prepared_data, version, max_length=32)
    assert repo.versions(settings.triton_model_repository, "smoke_model") == []
    assert registry.alias_version(settings.mlflow_url, "smoke-model", "champion") is None
    assert read_logits(frame_path).shape[1] == 2
