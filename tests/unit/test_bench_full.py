"""bench/full.py's figures from known inputs: intervals, speed-ups, target checks and the page."""

import json

import numpy as np
import pytest

from bench import full
from bench.latency_workers import InterleavedLatency


def _latency(teacher_p50: list[float], winner_p50: list[float]) -> InterleavedLatency:
    latency = InterleavedLatency(rounds=len(teacher_p50), texts=20)
    latency.per_round_p50 = {"teacher_pytorch": teacher_p50, "pruned_int8": winner_p50}
    latency.calls = {"teacher_pytorch": teacher_p50 * 3, "pruned_int8": winner_p50 * 3}
    return latency


def test_accuracy_figures_pair_the_same_texts():
    rng = np.random.default_rng(1)
    teacher = rng.random(2000) < 0.9
    winner = teacher.copy()
    winner[:40] = False  # the winner gets 40 texts wrong that the teacher got right (or both got wrong)
    figures = full.accuracy_figures(teacher, winner)
    assert figures["test_texts"] == 2000
    assert figures["teacher_accuracy"] == pytest.approx(teacher.mean())
    low, high = figures["teacher_interval"]
    assert low < figures["teacher_accuracy"] < high and high - low < 0.04
    assert figures["retention"] == pytest.approx(winner.mean() / teacher.mean())
    low, high = figures["retention_interval"]
    assert low < figures["retention"] < high < 1.0  # paired: the interval is narrow and below 1
    with pytest.raises(ValueError, match="different test texts"):
        full.accuracy_figures(teacher, winner[:100])


def test_speedup_is_the_median_round_ratio_with_an_interval():
    figures = full.speedup_figures(_latency([20.0, 22.0, 40.0, 21.0, 20.0], [2.0, 2.0, 2.0, 2.1, 2.5]),
                                   "teacher_pytorch", "pruned_int8")
    assert figures["speedup"] == pytest.approx(10.0)  # ratios 10, 11, 20, 10, 8
    assert figures["rounds"] == 5
    assert figures["speedup_interval"][0] <= 10.0 <= figures["speedup_interval"][1]


def _report(teacher_accuracy: float, retention: float, speedup: float) -> dict:
    accuracy = {"test_texts": 5000, "teacher_accuracy": teacher_accuracy, "teacher_interval": (0.87, 0.89),
                "winner_accuracy": teacher_accuracy * retention, "winner_interval": (0.86, 0.88),
                "retention": retention, "retention_interval": (retention - 0.01, retention + 0.01)}
    side = {"speedup": speedup, "speedup_interval": (speedup - 1, speedup + 1), "rounds": 40,
            "reference_p50_ms": 40.0, "p50_ms": 40.0 / speedup}
    latency = {"default_threads": side, "one_thread": side}
    return {"measured_at": "2026-12-05 20:00 UTC", "machine": {"processor": "AMD EPYC (avx2)", "cpus": 2},
            "run_id": "bench_full__x", "conf": {"max_train": 4000}, "max_length": 256, "winner": "pruned_int8",
            "mlflow_version": "7", "accuracy": accuracy, "latency": latency,
            "targets": full.target_checks(accuracy, latency)}


def test_targets_and_the_page_say_what_was_met():
    met = _report(0.885, 0.99, 12.0)
    assert all(check["met"] for check in met["targets"].values())
    assert not met["targets"]["teacher_accuracy"]["met_at_interval_low"]  # 0.87 < 0.88
    missed = _report(0.85, 0.97, 6.0)
    assert not any(check["met"] for check in missed["targets"].values())
    page = full.markdown(missed, full_profile=False)
    assert "a reduced run, not the full profile" in page and "AMD EPYC (avx2)" in page
    assert page.count("**no**") == 3 and "0.8500" in page and "6.0x" in page
    assert "the `full` profile" in full.markdown(met, full_profile=True)
    json.dumps(met, default=float)  # the JSON page can be written


def test_a_run_without_a_winner_is_refused_with_the_reason(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"run_id": "r", "winner": None, "versions": {},
                                                       "candidates": {}, "no_winner_reason": "every gate failed"}))
    with pytest.raises(SystemExit, match="promoted nothing: every gate failed"):
        full.PromotedRun.read(tmp_path)
    with pytest.raises(SystemExit, match="no summary.json"):
        full.PromotedRun.read(tmp_path / "missing")


def test_the_page_lists_every_candidate_with_the_gates_verdicts():
    from tests.unit.test_report import _summary

    report = _report(0.885, 0.99, 4.0)
    report["candidates"] = full.candidate_table(_summary())
    assert [row["name"] for row in report["candidates"]] == ["teacher_pytorch", "onnx_int8", "pruned_int8", "slow_worse"]
    page = full.markdown(report, full_profile=False)
    assert "| onnx_int8 | 2 | 0.7900 | 98.8% | 10.00 | 2.5x | 23.0 | FAIL: champion_regression: 0.79 vs champion 0.81 |" \
        in page
    assert "| teacher_pytorch | - | 0.8000 | 100.0% | 25.00 | 1.0x | 90.0 | not gated (reference) |" in page
    assert "| candidate |" not in full.markdown(_report(0.885, 0.99, 4.0), full_profile=False)  # older reports


def test_the_page_names_the_runs_truncation():
    from opsctl.demo import PROFILES

    assert full.truncation_of(PROFILES["full"]) == "head_tail"
    assert full.truncation_of({"max_train": 4000}) == "head"  # the config's default
    report = _report(0.885, 0.99, 12.0) | {"truncation": "head_tail"}
    assert "256 tokens per text (head_tail truncation)" in full.markdown(report, full_profile=True)
    assert "256 tokens per text (head truncation)" in full.markdown(_report(0.885, 0.99, 12.0), full_profile=False)
