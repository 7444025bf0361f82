"""The monitoring benchmark runs one real window (log, features, Evidently, decision) and reports its time."""

from bench import monitor


def test_monitor_benchmark_measures_a_real_window():
    result = monitor.run(rows=600)
    assert result["rows"] == 600 and result["seconds"] > 0
    assert result["verdict"] == "ok"  # served draws come from the reference's distribution
