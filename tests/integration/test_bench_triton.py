"""The Triton end-to-end benchmark against a real Triton and the real perf_analyzer (make perf-analyzer)."""

import json

import pytest

from bench import triton_e2e

pytestmark = pytest.mark.slow


def test_triton_and_in_process_are_measured_at_every_concurrency(tmp_path, exported_onnx, prepared_data):
    if not (triton_e2e.PERF_ANALYZER_DIR / "perf_analyzer").exists():
        pytest.fail("perf_analyzer missing: make test-slow builds it (make perf-analyzer)")
    report = triton_e2e.run(exported_onnx, prepared_data, tmp_path, texts=20, seconds=1.0, concurrencies=(1, 2))
    for level in ("ensemble", "model"):
        figures = report["levels"][level]
        assert [load["concurrency"] for load in figures["triton"]] == [1, 2]
        assert all(load["throughput_per_s"] > 0 for load in figures["triton"] + figures["in_process"])
        assert figures["best_share"] == pytest.approx(figures["best_triton_per_s"] / figures["best_in_process_per_s"])
    assert json.loads((tmp_path / "triton-e2e.json").read_text())["target"] == report["target"]
    assert "## ensemble" in (tmp_path / "triton-e2e.md").read_text()
