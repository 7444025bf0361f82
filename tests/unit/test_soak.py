"""The soak benchmark's judgement (bench/soak.py) on hand-made runs: where a 5xx falls, RSS growth and slope,
the prediction check and the report."""

from __future__ import annotations

import json

import pytest

from bench import soak
from bench.soak import MIB, Answer, Window

PROMOTION = Window("promotion", 100.0, 104.0, "switch")
ROLLBACK = Window("rollback", 200.0, 203.0, "switch")


def test_a_5xx_inside_a_window_is_counted_there_and_one_outside_breaks_the_promise():
    answers = [Answer(10.0, 5.0, 200, 1, ("a",)), Answer(101.0, 5.0, 503, 1), Answer(99.99, 20.0, 503, 1),
               Answer(150.0, 5.0, 503, 1), Answer(202.0, 5.0, 502, 1), Answer(250.0, 30000.0, 0, 2),
               Answer(300.0, 5.0, 422, 1)]
    errors = soak.classify_errors(answers, [PROMOTION, ROLLBACK])
    assert errors["by_status"] == {"0": 1, "200": 1, "422": 1, "502": 1, "503": 3}
    # the request sent at 99.99 s and answered at 100.01 s overlaps the promotion's span
    assert errors["inside_windows"] == {"promotion": {"503": 2}, "rollback": {"502": 1}}
    assert errors["outside_windows"] == {"0": 1, "503": 1} and errors["outside_count"] == 2


def test_no_errors_means_nothing_outside():
    errors = soak.classify_errors([Answer(float(t), 3.0, 200, 1) for t in range(50)], [PROMOTION])
    assert errors["outside_count"] == 0 and errors["inside_windows"] == {"promotion": {}}


def _series(values_mib, every_s=5.0):
    return [(index * every_s, int(value * MIB)) for index, value in enumerate(values_mib)]


def test_flat_rss_is_flat_with_a_zero_slope():
    trend = soak.rss_trend(_series([500.0] * 4 + [200.0] * 30), warmup_s=20.0)  # the warm-up's samples left out
    assert trend["samples"] == 30 and trend["start_mib"] == 200.0
    assert trend["growth_mib"] == 0.0 and trend["slope_mib_per_min"] == 0.0 and trend["flat"]


def test_growth_is_last_third_median_over_first_third_median_and_the_slope_is_per_minute():
    values = [100.0 + index for index in range(12)]  # 1 MiB per 5 s sample = 12 MiB/min
    trend = soak.rss_trend(_series(values), warmup_s=0.0)
    assert trend["first_third_median_mib"] == 101.5 and trend["last_third_median_mib"] == 109.5
    assert trend["growth_mib"] == 8.0 and trend["growth_pct"] == pytest.approx(7.88, abs=0.01)
    assert trend["slope_mib_per_min"] == pytest.approx(12.0) and trend["flat"]


def test_growth_at_the_limit_is_not_flat():
    trend = soak.rss_trend(_series([100.0] * 10 + [110.0] * 10 + [110.0] * 10), warmup_s=0.0)
    assert trend["growth_pct"] == 10.0 and not trend["flat"]


def test_too_few_samples_is_not_evidence_of_flat():
    trend = soak.rss_trend(_series([100.0] * 5), warmup_s=16.0)
    assert trend == {"samples": 1, "flat": False, "why": "1 samples after the warm-up (need 3)"}


def test_phase_medians_split_at_the_marks():
    series = _series([100.0] * 4 + [150.0] * 4 + [120.0] * 4)
    assert soak.phase_medians(series, [("before", 0.0), ("after promotion", 20.0), ("after rollback", 40.0)]) == {
        "before": 100.0, "after promotion": 150.0, "after rollback": 120.0}


def test_prediction_check_counts_missing_duplicate_and_extra_rows():
    answers = [Answer(0.0, 1.0, 200, 2, ("a", "b")), Answer(1.0, 1.0, 200, 1, ("c",)), Answer(2.0, 1.0, 503, 1)]
    assert soak.prediction_check(answers, ["a", "b", "c"])["equal"]
    missing = soak.prediction_check(answers, ["a", "b"])
    assert missing["answered_not_logged"] == 1 and not missing["equal"]
    twice = soak.prediction_check(answers, ["a", "b", "c", "c"])
    assert twice["logged_twice_or_more"] == 1 and twice["log_rows_for_answered_ids"] == 4 and not twice["equal"]
    extra = soak.prediction_check(answers, ["a", "b", "c", "z"])
    assert extra["logged_not_answered"] == 1 and not extra["equal"]
    short = soak.prediction_check([Answer(0.0, 1.0, 200, 2, ("a",))], ["a"])  # two texts, one id
    assert short["texts_answered"] == 2 and not short["equal"]


def test_latency_by_phase_keeps_the_windows_apart_from_the_steady_phases():
    answers = [Answer(50.0, 10.0, 200, 1), Answer(102.0, 900.0, 200, 1), Answer(150.0, 20.0, 200, 1),
               Answer(250.0, 30.0, 200, 1), Answer(251.0, 5.0, 503, 1)]
    phases = soak.latency_by_phase(answers, [PROMOTION, ROLLBACK],
                                   [("before promotion", 0.0), ("after promotion", 104.0), ("after rollback", 203.0)])
    assert list(phases) == ["during promotion", "during rollback", "before promotion", "after promotion",
                            "after rollback"]
    assert phases["during promotion"]["max_ms"] == 900.0 and phases["during rollback"] == {"count": 0}
    assert phases["before promotion"]["p50_ms"] == 10.0 and phases["after rollback"]["count"] == 1


def test_latency_series_buckets_by_sending_time():
    answers = [Answer(1.0, 10.0, 200, 1), Answer(29.0, 30.0, 200, 1), Answer(31.0, 5.0, 503, 1)]
    assert soak.latency_series(answers, bucket_s=30.0) == [
        {"from_s": 0.0, "requests": 2, "count": 2, "p50_ms": 20.0, "p95_ms": 29.0, "p99_ms": 29.8, "max_ms": 30.0},
        {"from_s": 30.0, "requests": 1, "count": 0}]


def test_latency_summary_uses_only_200_answers():
    answers = [Answer(float(i), float(i + 1), 200, 1) for i in range(100)] + [Answer(0.0, 9999.0, 503, 1)]
    summary = soak.latency_summary(answers)
    assert summary["count"] == 100 and summary["p50_ms"] == 50.5 and summary["max_ms"] == 100.0
    assert soak.latency_summary([]) == {"count": 0}


def _run(rss_end_mib: float, logged: list[str]) -> soak.SoakRun:
    answers = [Answer(float(t), 4.0, 200, 1, (f"id{t}",)) for t in range(0, 300, 2)] + [Answer(101.0, 4.0, 503, 1)]
    flat = _series([300.0] * 60)
    growing = _series([300.0] * 30 + [rss_end_mib] * 30)
    return soak.SoakRun(duration_s=300.0, rate_per_s=0.5, warmup_s=10.0, answers=answers, windows=[PROMOTION, ROLLBACK],
                        rss={"triton": growing, "gateway": flat}, logged_ids=logged,
                        events={"promotion": {"ok": True, "status": "success", "seconds": 7.5,
                                              "metrics": {"triton_version": 3.0}, "info": {"mlflow_version": "3"}},
                                "rollback": {"ok": True}, "served_after": [3],
                                "service_pids": {"triton": [1]}}, header="test run", notes=["A note."])


def test_report_passes_a_clean_run_and_renders_every_section(tmp_path):
    run = _run(300.0, [f"id{t}" for t in range(0, 300, 2)])
    report = soak.build_report(run)
    assert report["passed"] and report["errors"]["inside_windows"]["promotion"] == {"503": 1}
    markdown_path, json_path = soak.write_report(report, tmp_path / "soak.md")
    text = markdown_path.read_text()
    for heading in ("## Promises", "## Requests", "## 503 windows", "## Latency", "## Memory", "## Prediction log",
                    "| during promotion | 3 |", "| after rollback | 48 |"):
        assert heading in text
    assert "| promotion | switch | 100.0 | 104.0 | 4.0 | 503: 1 |" in text
    assert "- promotion: success in 7.5 s, MLflow version 3 served as Triton version 3\n" in text
    assert "- served_after: [3]\n" in text
    assert "| triton | 58 |" in text and "FAIL" not in text and "\nA note.\n" in text
    assert json.loads(json_path.read_text())["rss_series"]["gateway"][0] == [0.0, 300 * MIB]


def test_report_fails_growing_memory_and_a_missing_log_row():
    report = soak.build_report(_run(360.0, [f"id{t}" for t in range(0, 298, 2)]))
    assert not report["passed"]
    assert report["promises"] == {"no 5xx outside the 503 windows": True,
                                  "memory flat (growth < 10%) for every service": False,
                                  "prediction log rows = texts answered": False,
                                  "promotions and rollback succeeded": True}
    assert report["rss"]["triton"]["growth_pct"] == 20.0 and report["rss"]["gateway"]["flat"]
    assert soak.render(report).count("**FAIL**") == 2


def test_a_failed_switch_or_none_recorded_fails_the_switch_promise():
    run = _run(300.0, [f"id{t}" for t in range(0, 300, 2)])
    run.events["rollback"] = {"ok": False, "error": "PromotionFailed: ...", "seconds": 2.0}
    report = soak.build_report(run)
    assert not report["promises"]["promotions and rollback succeeded"]
    assert "- rollback: **failed** after 2.0 s: PromotionFailed: ...\n" in soak.render(report)
    run.events = {"served_after": [1]}
    assert not soak.build_report(run)["promises"]["promotions and rollback succeeded"]


def test_traffic_refuses_other_hosts_and_unbounded_rates():
    with pytest.raises(ValueError, match="loopback"):
        soak.RateTraffic("http://example.com", 10, 10, ["a"], origin=0.0)
    with pytest.raises(ValueError, match="rate"):
        soak.RateTraffic("http://127.0.0.1:1", 1000, 10, ["a"], origin=0.0)
