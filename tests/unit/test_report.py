from tasks import report


def _summary(promoted: bool = True) -> dict:
    def metrics(accuracy, p50, size, throughput):
        return {"accuracy": accuracy, "latency_p50_ms": p50, "latency_p95_ms": p50 * 1.5, "latency_p99_ms": p50 * 2,
                "size_bytes": size, "throughput_per_s": throughput, "peak_memory_mb": 600.0}

    promotion = ({"status": "success", "metrics": {"triton_version": 4.0},
                  "info": {"registered_model": "m", "mlflow_version": "20", "alias": "champion", "triton_model": "t"}}
                 if promoted else {"status": "skipped", "reason": "no candidate passed every gate"})
    return {
        "run_id": "manual__<script>", "versions": {"teacher_pytorch": None, "onnx_int8": "2", "pruned_int8": "3",
                                                   "slow_worse": "4"},
        "candidates": {"teacher_pytorch": metrics(0.80, 25.0, 90e6, 40.0), "onnx_int8": metrics(0.79, 10.0, 23e6, 100.0),
                       "pruned_int8": metrics(0.78, 3.0, 15e6, 400.0), "slow_worse": metrics(0.70, 30.0, 90e6, 30.0)},
        "champion_before": {"accuracy": 0.786, "note": "Triton t v3"},
        "gates": {"onnx_int8": [{"name": "champion_regression", "decision": "fail", "detail": "0.79 vs champion 0.81"}],
                  "pruned_int8": [{"name": "accuracy_vs_teacher", "decision": "pass", "detail": "ok"}],
                  "slow_worse": [{"name": "accuracy_vs_teacher", "decision": "pass", "detail": "ok"}]},
        "winner": "pruned_int8" if promoted else None, "promotion": promotion,
    }


def test_pareto_front_keeps_only_undominated_candidates_fastest_first():
    points = {"a": (25.0, 0.80), "b": (10.0, 0.79), "c": (3.0, 0.78), "d": (30.0, 0.70), "e": (10.0, 0.75)}
    assert report.pareto_front(points) == ["c", "b", "a"]


def test_rows_carry_ratios_against_the_teacher_and_the_gate_verdicts():
    rows = {row["name"]: row for row in report.candidate_rows(_summary())}
    assert rows["teacher_pytorch"]["faster"] == 1.0 and rows["teacher_pytorch"]["gates"] == "not gated (reference)"
    assert rows["pruned_int8"]["faster"] == 25.0 / 3.0 and rows["pruned_int8"]["smaller"] == 6.0
    assert rows["pruned_int8"]["cost_reduction"] == 0.9  # 10x the throughput on the same cores
    assert rows["onnx_int8"]["gates"] == "FAIL: champion_regression: 0.79 vs champion 0.81"


def test_markdown_and_html_say_what_was_promoted_and_why_others_were_not():
    page = report.markdown(_summary())
    assert "Promoted **pruned_int8**: MLflow m version 20 (alias `champion`), Triton t version 4." in page
    assert "| pruned_int8 | 3 | 0.7800 | - | 97.5% | 15.0 | 6.0x | 3.00 |" in page  # no macro-F1 in this summary
    with_f1 = _summary()
    with_f1["candidates"]["pruned_int8"]["macro_f1"] = 0.7712
    assert "| pruned_int8 | 3 | 0.7800 | 0.7712 | 97.5% |" in report.markdown(with_f1)
    assert "Primary metric: `accuracy`" in page
    assert "FAIL: champion_regression" in page and "Pareto front" in page and "accuracy 0.7860" in page
    assert "Every candidate was built: no technique was switched off." in page
    skipped = report.markdown(_summary(promoted=False))
    assert "Nothing promoted: no candidate passed every gate. The champion stays." in skipped
    page = report.html_page(_summary())
    assert "<script>" not in page and "&lt;script&gt;" in page  # run ids are escaped
    assert page.count("<tr>") == 5 and 'class="fail"' in page


def test_reports_are_written_with_a_real_plot(tmp_path):
    files = report.write_reports(_summary(), tmp_path / "report")
    assert [path.name for path in files] == ["report.md", "report.html", "pareto.png"]
    assert files[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and files[2].stat().st_size > 10_000


def test_switched_off_candidates_are_named_with_the_reason():
    summary = _summary() | {"switched_off": {"student_onnx_fp32": "distill switched off in the run's params",
                                             "student_int8": "distill switched off in the run's params"}}
    line = ("Switched off (not built, evaluated or registered): student_onnx_fp32 (distill switched off in the "
            "run's params); student_int8 (distill switched off in the run's params).")
    assert line in report.markdown(summary)
    assert line.replace("'", "&#x27;") in report.html_page(summary)
    assert [row["name"] for row in report.candidate_rows(summary)] == list(summary["candidates"])
