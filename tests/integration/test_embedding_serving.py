"""Pooled input embeddings end to end, against the real Triton and MLflow servers: a version written
before embeddings existed serves (and the gateway logs no embedding), a promotion over it fits the
projection table and switches without a failed request, the gateway then logs embeddings that are
the offline ones, a monitoring window judges them, and the older version's files serve again (a
rollback) without a failed request while the gateway falls back to logging none."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest

from monitoring import embedding as emb
from serving import model_repository as repo
from serving import prediction_log as plog
from serving.triton_client import TritonReplicas, load_and_wait
from tasks import registry
from tasks.config import EvaluateConfig, PromoteConfig
from tasks.evaluate import run as evaluate
from tasks.promote import PromotionTarget, write_reference
from tasks.promote import run as promote
from tasks.results import ModelFormat
from tasks.splits import read_split
from tests.integration.test_registry_and_promotion import RequestStream

pytestmark = pytest.mark.integration
MODEL = "emb_model"


@pytest.fixture(scope="module")
def evaluated(exported_onnx, prepared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "onnx_fp32"
    return evaluate(EvaluateConfig(warmup=1, max_length=32), "onnx_fp32", exported_onnx, ModelFormat.ONNX,
                    prepared_data, out)


def _as_written_before_embeddings(repository: Path, version: int) -> None:
    """Make version ``version`` what a release before embeddings wrote: no embedding output in the
    tokenizer's and the ensemble's configs (and their snapshots), a tokenizer model.py that never
    returns one."""
    for model in (f"{MODEL}_tokenizer", MODEL):
        for path in (repository / model / "config.pbtxt", repository / model / str(version) / repo.CONFIG_SNAPSHOT):
            text = re.sub(r',\n  \{ name: "(embedding|EMBEDDING)"[^\n]*\}', "", path.read_text())
            path.write_text(text.replace(' output_map { key: "embedding" value: "EMBEDDING" }', ""))
            assert "mbedding" not in path.read_text().lower().replace("embedding_projection", "")
    script = repository / f"{MODEL}_tokenizer" / str(version) / "model.py"
    script.write_text(script.read_text().replace("if self._embedding_dims:", "if False:"))


def _classify(client, texts: list[str]) -> str:
    response = client.post("/v1/classify", json={"texts": texts})
    assert response.status_code == 200, response.text
    return response.json()["model_version"]


def _logged(engine, version: str, expected: int, timeout_s: float = 15.0):
    deadline = time.monotonic() + timeout_s
    while True:
        rows = plog.read_window(engine, 0, time.time() + 60)
        rows = rows[rows["model_version"] == version]
        if len(rows) >= expected or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def test_embeddings_are_served_logged_judged_and_survive_old_versions(local_services, exported_onnx, evaluated,
                                                                      prepared_data, tmp_path):
    from fastapi.testclient import TestClient

    from monitoring.drift import DriftConfig
    from monitoring.monitor import MonitorConfig, MonitorSettings, run_window
    from serving.gateway import GatewaySettings, create_app

    settings = local_services.settings
    repository = settings.triton_model_repository
    ensemble = repo.ClassifierEnsemble(MODEL, ("negative", "positive"), max_length=32)
    replicas = TritonReplicas([settings.triton_http_url])
    old = repo.write_ensemble_version(repository, ensemble, exported_onnx)
    _as_written_before_embeddings(repository, old)
    predictions = Path(evaluated.uri("predictions"))
    write_reference(predictions, prepared_data, exported_onnx, ["negative", "positive"], 32,
                    repository / MODEL / str(old) / "reference_predictions.parquet")
    load_and_wait(replicas, repo.ensemble_models(MODEL), old)

    log_url = f"sqlite:///{tmp_path / 'predictions.db'}"
    engine = plog.create_engine(log_url)
    gateway = create_app(GatewaySettings(triton_grpc_url=settings.triton_grpc_url, model=MODEL,
                                         prediction_log_url=log_url))
    texts = read_split(prepared_data, "test")["text"].tolist()
    window = (texts * 4)[:120]
    with TestClient(gateway) as http:
        # The version written before embeddings: served, logged without one.
        assert _classify(http, texts[:5]) == str(old)
        assert _logged(engine, str(old), 5)["embedding"].isna().all()

        config = PromoteConfig(registered_model="emb-model", triton_model=MODEL, smoke_samples=6)
        parent = registry.parent_run_id(settings.mlflow_url, "integration", "emb-run", {"p": "1"})
        mlflow_version = registry.log_candidate(settings.mlflow_url, "integration", parent, "emb-run", "emb-model",
                                                registry.Candidate("onnx_fp32", exported_onnx, evaluated.metrics,
                                                                   "export"), {"data_hash": "x"})
        target = PromotionTarget(settings.triton_http_url, repository, settings.mlflow_url)
        with RequestStream(settings.triton_http_url, MODEL) as during_promotion:
            new = int(promote(config, target, exported_onnx, predictions, prepared_data, mlflow_version,
                              max_length=32).metrics["triton_version"])
        assert during_promotion.sent > 10 and during_promotion.failures == []
        table_file = repository / f"{MODEL}_tokenizer" / str(new) / emb.TABLE_FILE
        assert table_file.exists()
        reference = repository / MODEL / str(new) / "reference_predictions.parquet"
        import pandas as pd

        assert set(emb.COLUMNS) <= set(pd.read_parquet(reference).columns)

        _classify(http, ["one request to see the new version"])  # the gateway notices the version changed
        for start in range(0, len(window), 30):
            assert _classify(http, window[start:start + 30]) == str(new)
        rows = _logged(engine, str(new), len(window) + 1).tail(len(window))
        assert rows["embedding"].notna().all()
        logged = np.stack([emb.decode(blob) for blob in rows["embedding"]])
        offline = emb.reference_embeddings(np.load(table_file), exported_onnx / "tokenizer.json", window, 32)
        assert np.allclose(logged, offline, rtol=1e-2, atol=1e-2)
        assert np.abs(logged).max() > 0.1  # whitened: not all zeros

        # A monitoring window over what the gateway logged judges the embeddings.
        monitor = MonitorSettings(log_url, repository, MODEL, settings.mlflow_url, tmp_path / "state")
        summary = run_window(monitor, MonitorConfig(drift=DriftConfig(min_rows=50)), time.time() + 1, False,
                             tmp_path / "window", log_to_mlflow=False)
        judged = summary["verdict"]["evidence"]["drift"]["embedding"]
        assert np.isfinite(judged["score"]) and 0 <= judged["p_value"] <= 1, judged

        # The older version's files serve again (as a rollback does): no failed request, and the
        # gateway falls back to logging no embedding for the version without one.
        again = repo.copy_ensemble_components(repository, MODEL, old)
        assert '"embedding"' in (repository / f"{MODEL}_tokenizer" / "config.pbtxt").read_text()
        with RequestStream(settings.triton_http_url, MODEL) as during_rollback:
            load_and_wait(replicas, repo.ensemble_models(MODEL)[:-1], again)
            repo.write_ensemble_step(repository, MODEL, again, repo.repinned_ensemble_config(repository, MODEL, old,
                                                                                            again))
            load_and_wait(replicas, (MODEL,), again)
        assert during_rollback.sent > 10 and during_rollback.failures == []
        assert _classify(http, texts[:3]) == str(again)
        assert _classify(http, texts[:3]) == str(again)
        assert _logged(engine, str(again), 6)["embedding"].isna().all()
    replicas.close()
