"""The decision tasks (score the champion, gate, promote, report) are separate and safe to retry:
the promotion and the report never score the champion, the report is rebuilt from the records
the tasks wrote, and a retried report overwrites the same files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from tasks import decisions, pipeline
from tasks.errors import PipelineError
from tasks.results import StepResult, StepStatus


@dataclass(frozen=True)
class _Settings:
    runs_dir: Path
    mlflow_tracking_uri: str = "http://127.0.0.1:1"
    triton_url: str = "127.0.0.1:1"
    triton_model_repository: Path = Path("/nonexistent")
    experiment: str = "optimize_model"

    def run_dir(self, run_id: str) -> Path:
        return self.runs_dir / run_id


def _evaluation(accuracy: float, p50: float) -> dict:
    metrics = {"accuracy": accuracy, "macro_f1": accuracy, "latency_p50_ms": p50, "latency_p95_ms": p50 * 1.5,
               "latency_p99_ms": p50 * 2, "size_bytes": 1e6, "throughput_per_s": 100.0, "peak_memory_mb": 100.0,
               "nan_outputs": 0.0, "nan_on_edge_inputs": 0.0}
    return StepResult("evaluate", StepStatus.SUCCESS, metrics=metrics).to_dict()


@pytest.fixture()
def recorded(monkeypatch, tmp_path):
    """MLflow calls recorded instead of sent; scoring the champion is an error after the score task."""
    calls: dict[str, list] = {"tags": [], "descriptions": [], "logged": [], "outcomes": []}
    monkeypatch.setattr(decisions.registry, "record_outcome", lambda uri, experiment, run_id, params, outcome, reason:
                        calls["outcomes"].append((run_id, outcome, reason)))
    monkeypatch.setattr(decisions.model_aliases, "tag_version", lambda uri, model, version, tags: calls["tags"].append(
        (version, tags)))
    monkeypatch.setattr(decisions.registry, "describe_decision", lambda uri, model, version, text: calls[
        "descriptions"].append((version, text)))
    monkeypatch.setattr(decisions.registry, "log_run_summary", lambda uri, parent, files, metrics: calls[
        "logged"].append([Path(path).name for path in files]))

    def no_scoring(*args, **kwargs):
        raise AssertionError("the champion was scored again")

    monkeypatch.setattr(decisions.promote_step, "champion_score", no_scoring)
    return calls


def _gate(settings, champion: dict | None) -> dict:
    config = pipeline.config_from_params({"quantize": False, "distill": False, "prune": False})
    evaluations = {"teacher_pytorch": _evaluation(0.90, 20.0), "student_onnx_fp32": _evaluation(0.60, 8.0)}
    registered = {"parent_run_id": "parent", "versions": {"teacher_pytorch": None, "student_onnx_fp32": "7"}}
    return decisions.gate_candidates(settings, config, "run", evaluations, registered, champion), config


def test_no_winner_is_recorded_and_reported_without_scoring_again(recorded, tmp_path):
    settings = _Settings(tmp_path)
    gated, config = _gate(settings, {"accuracy": 0.85, "note": "Triton m v1"})
    assert gated["winner"] is None
    assert gated["no_winner_reason"].startswith("no candidate meets 90.0 ms p95 at >= 0.873 accuracy")
    assert recorded["tags"][0][0] == "7" and recorded["tags"][0][1]["gate.accuracy"].startswith("fail")
    assert "not promoted by run run" in recorded["descriptions"][0][1]

    promoted = decisions.promote_winner(settings, config, "run", {}, {}, gated)
    assert promoted["status"] == "skipped" and "the fastest was student_onnx_fp32 at 12.0 ms p95" in promoted["reason"]
    assert recorded["outcomes"] == [("run", "not promoted", promoted["reason"])]  # said in MLflow too

    first = decisions.write_report(settings, "run")
    summary_text = Path(first["summary"]).read_text()
    again = decisions.write_report(settings, "run")  # a retried report rewrites the same files
    assert Path(again["summary"]).read_text() == summary_text
    summary = json.loads(summary_text)
    assert summary["winner"] is None and summary["promotion"]["status"] == "skipped"
    assert summary["champion_before"] == {"accuracy": 0.85, "note": "Triton m v1"}
    assert summary["switched_off"]["onnx_int8"] == "quantize switched off in the run's params"
    assert recorded["logged"] == [["summary.json", "report.md", "report.html", "pareto.png"]] * 2


def test_the_report_of_a_run_whose_gate_did_not_finish_says_so(tmp_path):
    with pytest.raises(PipelineError, match="the gate did not finish"):
        decisions.write_report(_Settings(tmp_path), "run")


def test_a_promotion_that_never_decided_is_reported_as_failed(recorded, tmp_path):
    settings = _Settings(tmp_path)
    _gate(settings, None)
    summary = json.loads(Path(decisions.write_report(settings, "run")["summary"]).read_text())
    assert summary["promotion"]["status"] == "failed"
    assert "did not run to a decision" in summary["promotion"]["reason"]

