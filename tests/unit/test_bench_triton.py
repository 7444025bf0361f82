"""The Triton end-to-end benchmark: perf_analyzer's command and output, the in-process side, the
comparison. The whole benchmark against a real Triton runs in tests/integration (slow)."""

import json

import numpy as np
import pytest

from bench import triton_e2e

# Written by perf_analyzer 2.51.0 (-f) against this project's Triton, one concurrency.
PERF_ANALYZER_CSV = """Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency
1,382.183,3,884,1,43,1225,449,2,2073,4583,6139,8183
"""


def test_perf_analyzer_csv_gives_throughput_and_latency_in_ms():
    load = triton_e2e.parse_perf_analyzer_csv(PERF_ANALYZER_CSV)
    assert load == triton_e2e.Load(1, 382.183, 2.073, 6.139, 8.183)


def test_perf_analyzer_command_pins_one_concurrency_over_grpc(tmp_path):
    command = triton_e2e.perf_analyzer_command(tmp_path / "pa", "m", "127.0.0.1:9", tmp_path / "in.json", 4,
                                               tmp_path / "out.csv", 5000)
    joined = " ".join(command)
    assert "-i grpc -u 127.0.0.1:9" in joined and "--concurrency-range 4:4" in joined and "-b 1" in joined
    assert "--measurement-interval 5000" in joined and command[command.index("-f") + 1] == str(tmp_path / "out.csv")


def test_input_data_sends_one_text_or_one_tokenized_text_per_request():
    assert triton_e2e.ensemble_input_data(["a", "b c"]) == {
        "data": [{"TEXT": {"content": ["a"], "shape": [1]}}, {"TEXT": {"content": ["b c"], "shape": [1]}}]}
    batch = {"input_ids": np.array([[2, 7, 3]]), "attention_mask": np.array([[1, 1, 1]])}
    data = triton_e2e.model_input_data([batch])
    assert data["data"][0]["input_ids"] == {"content": [2, 7, 3], "shape": [3]}
    assert json.loads(json.dumps(data)) == data  # what perf_analyzer reads


def test_in_process_load_spreads_requests_over_threads():
    seen = []
    load = triton_e2e.in_process_load(seen.append, list(range(10)), concurrency=3, seconds=0.2)
    assert load.concurrency == 3 and load.throughput_per_s > 0 and load.p50_ms <= load.p99_ms
    assert set(seen) == set(range(10))  # every request is used, none invented


def test_compare_takes_each_sides_best_throughput():
    triton = [triton_e2e.Load(1, 80.0, 1, 1, 1), triton_e2e.Load(2, 90.0, 1, 1, 1)]
    local = [triton_e2e.Load(1, 100.0, 1, 1, 1), triton_e2e.Load(2, 95.0, 1, 1, 1)]
    figures = triton_e2e.compare(triton, local)
    assert figures["share_by_concurrency"] == {1: 0.8, 2: pytest.approx(90 / 95)}
    assert figures["best_share"] == 0.9


def test_default_model_is_the_compression_benchmarks_promoted_candidate(tmp_path, monkeypatch, capsys):
    from bench import compress

    monkeypatch.setattr(triton_e2e, "REPO_ROOT", tmp_path)
    assert triton_e2e.main([]) == 1  # nothing built under tmp_path
    assert str(tmp_path / ".bench" / "compress" / compress.PROMOTED_ROW) in capsys.readouterr().err
