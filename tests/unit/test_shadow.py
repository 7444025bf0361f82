"""Shadow traffic's records and verdict: comparisons written to and read from a real SQLite database,
their summary, and the thresholds that block a switch."""

from __future__ import annotations

import math

import pytest
import sqlalchemy as sa

from serving.shadow import Comparison, ShadowSummary, agreement, create_table, read_comparisons, shadow_model
from serving.shadow import write_comparison
from tasks.config import PromoteConfig
from tasks.errors import ConfigError
from tasks.shadow import judge


def _comparisons(count: int, agreed: int = 4, shadow_ms: float | None = 5.0) -> list[Comparison]:
    return [Comparison("3", "4", 4, agreed, 10.0 + i % 3, None if shadow_ms is None else shadow_ms + i % 2)
            for i in range(count)]


def test_comparisons_round_trip_per_shadow_version_and_time(tmp_path):
    url = f"sqlite:///{tmp_path / 'log.db'}"
    assert read_comparisons(url, "clf", since=0) == []  # before any gateway created the table
    create_table(url)
    engine = sa.create_engine(url)
    write_comparison(engine, "clf", Comparison("3", "4", 2, 1, 9.0, 4.0), at=100.0)
    write_comparison(engine, "clf", Comparison("3", "4", 3, 3, 8.0, 5.0), at=200.0)
    write_comparison(engine, "clf", Comparison("3", "5", 1, 1, 8.0, 5.0), at=200.0)
    write_comparison(engine, "other", Comparison("1", "2", 1, 1, 8.0, 5.0), at=200.0)
    write_comparison(engine, "clf", Comparison("3", "?", 1, 0, 8.0, None, "x" * 900), at=300.0)
    engine.dispose()
    assert [c.texts for c in read_comparisons(url, "clf", since=150.0, shadow_version="4")] == [3]
    assert len(read_comparisons(url, "clf", since=0)) == 4
    failed = read_comparisons(url, "clf", since=250.0)[0]
    assert failed.shadow_ms is None and len(failed.error) == 500
    assert shadow_model("clf") == "clf_shadow"


def test_the_summary_pools_texts_and_counts_failed_copies():
    summary = ShadowSummary.of(_comparisons(20, agreed=3) + [Comparison("3", "?", 4, 0, 10.0, None, "boom")])
    assert (summary.requests, summary.texts, summary.failed) == (21, 80, 1)
    assert summary.agreement == pytest.approx(0.75)
    assert summary.shadow_p95_ms == pytest.approx(6.0) and summary.champion_p95_ms == pytest.approx(12.0)
    assert math.isnan(ShadowSummary.of([]).agreement)
    assert agreement(["a", "b", "c"], ["a", "c", "c"]) == 2


def test_a_shadow_passes_only_when_every_threshold_holds():
    config = PromoteConfig(shadow_requests=20, shadow_min_agreement=0.95, shadow_max_latency_ratio=1.5)
    passed = judge(config, ShadowSummary.of(_comparisons(20)))
    assert passed.passed and passed.reason.startswith("shadow passed: 20 requests, 80 texts, agreement 100.0%, p50/p95")
    cases = {
        "agreed with the champion on 75.0% of 80 texts": _comparisons(20, agreed=3),
        "only 5 of 20 requests were copied": _comparisons(5),
        "failed 1 of 21 copied requests": _comparisons(20) + [Comparison("3", "?", 4, 0, 10.0, None, "boom")],
        "median call latency was 30.5 ms": _comparisons(20, shadow_ms=30.0),
    }
    for problem, comparisons in cases.items():
        verdict = judge(config, ShadowSummary.of(comparisons))
        assert not verdict.passed and problem in verdict.reason, verdict.reason
    nothing = judge(config, ShadowSummary.of([]))
    assert not nothing.passed and "only 0 of 20 requests" in nothing.reason


def test_shadow_params_are_checked():
    for bad in ({"shadow_requests": -1}, {"shadow_minutes": 0}, {"shadow_min_agreement": 1.5},
                {"shadow_max_latency_ratio": 0}, {"rollback_window_minutes": -1}):
        with pytest.raises(ConfigError):
            PromoteConfig(**bad)
