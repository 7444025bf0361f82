"""The ONNX Runtime stand-in backend runs what Triton's dynamic batcher groups as one batch, like the
real backend, and every request still gets its own outputs."""

from __future__ import annotations

import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from serving import model_repository as repo
from serving.triton_client import TritonClient
from tasks.evaluate import onnx_predictor

pytestmark = pytest.mark.integration


def _model_stats(http_url: str, model: str) -> dict:
    with urllib.request.urlopen(f"http://{http_url}/v2/models/{model}/stats", timeout=10) as response:
        return json.load(response)["model_stats"][0]


def test_concurrent_requests_are_batched_and_answered_one_by_one(local_services, exported_onnx):
    import tritonclient.http as httpclient

    settings = local_services.settings
    config = repo.classifier_config("batching_probe", num_labels=2, max_batch_size=8)
    repo.write_version(settings.triton_model_repository, config, exported_onnx)
    client = TritonClient(settings.triton_http_url)
    client.load(config.name)
    rng = np.random.default_rng(0)
    # Equal lengths, so Triton's batcher may group them; two rows in some requests.
    requests = [rng.integers(5, 100, size=(1 + index % 2, 16), dtype=np.int64) for index in range(32)]
    expected = onnx_predictor(exported_onnx, 0)

    def infer(ids: np.ndarray) -> np.ndarray:
        inputs = [httpclient.InferInput(name, list(ids.shape), "INT64") for name in ("input_ids", "attention_mask")]
        inputs[0].set_data_from_numpy(ids)
        inputs[1].set_data_from_numpy(np.ones_like(ids))
        worker = httpclient.InferenceServerClient(settings.triton_http_url)
        try:
            return worker.infer(config.name, inputs).as_numpy("logits")
        finally:
            worker.close()

    before = _model_stats(settings.triton_http_url, config.name)
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(infer, requests))
    assert time.monotonic() - started < 120
    after = _model_stats(settings.triton_http_url, config.name)
    for ids, logits in zip(requests, answers):
        assert logits.shape == (ids.shape[0], 2)
        np.testing.assert_allclose(logits, expected({"input_ids": ids, "attention_mask": np.ones_like(ids)}),
                                   atol=1e-4)
    inferences = after["inference_count"] - before["inference_count"]
    executions = after["execution_count"] - before["execution_count"]
    assert inferences == sum(ids.shape[0] for ids in requests)
    assert executions < len(requests), "eight clients at once should have been batched at least once"
    client.unload(config.name)
    client.close()
