"""make bench's summary page: every target with its verdict; a benchmark not run is MISSING, not met."""

import json

from bench import summary


def test_missing_benchmarks_are_missing_not_met(tmp_path):
    (tmp_path / "triton-e2e.json").write_text(json.dumps({"target": {"target": 0.8, "measured": 0.91, "met": True}}))
    assert summary.main(tmp_path) == 2
    page = (tmp_path / "bench.md").read_text()
    assert "| 91% | **met** | [triton-e2e.md](triton-e2e.md) |" in page
    assert page.count("**MISSING**") == 2


def test_every_target_met_exits_zero(tmp_path):
    (tmp_path / "compress-demo.json").write_text(json.dumps({"targets": {
        "interleaved_speedup": {"target": 8.0, "measured": 10.0, "met": True, "middle_half": [9.1, 10.4]},
        "accuracy_points_below_optimum": {"target": 1.0, "measured": 0.4, "met": True, "at_most": True,
                                          "interval_95": [-1.2, 2.0]}}}))
    (tmp_path / "triton-e2e.json").write_text(json.dumps({"target": {"target": 0.8, "measured": 0.85, "met": True}}))
    (tmp_path / "pipeline-cost.json").write_text(json.dumps(
        {"target": {"target_seconds": 1200, "measured": 900.0, "met": True}}))
    assert summary.main(tmp_path) == 0
    page = (tmp_path / "bench.md").read_text()
    assert "| >= 8.0x | 10.0x (middle half of rounds 9.1 to 10.4) | **met** |" in page and "| <= 1.0 | 0.4 (95% interval -1.2 to 2.0) | **met** |" in page and "15.0 min" in page
