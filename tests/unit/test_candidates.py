"""Which candidates a run builds when techniques are switched off, and what evaluation does with
the steps that were skipped."""

import pytest

from tasks import pipeline
from tasks.errors import PipelineError
from tasks.pipeline import CANDIDATES, config_from_params, enabled_candidates, switched_off, switched_off_candidates
from tasks.results import StepResult, StepStatus

ALL = list(CANDIDATES)


@pytest.mark.parametrize(
    "params, enabled",
    [
        ({}, ALL),
        ({"quantize": False}, ["teacher_pytorch", "onnx_fp32", "student_onnx_fp32", "pruned_onnx_fp32"]),
        ({"prune": False}, ["teacher_pytorch", "onnx_fp32", "onnx_int8", "student_onnx_fp32", "student_int8"]),
        ({"distill": False, "prune": False}, ["teacher_pytorch", "onnx_fp32", "onnx_int8"]),
        ({"distill": False, "prune": False, "quantize": False}, ["teacher_pytorch", "onnx_fp32"]),
    ],
)
def test_enabled_candidates_follow_the_switches_and_keep_the_teacher(params, enabled):
    config = config_from_params(params)
    assert enabled_candidates(config) == enabled
    assert list(switched_off_candidates(config)) == [name for name in ALL if name not in enabled]


def test_every_candidate_names_the_techniques_it_needs():
    assert set(pipeline.CANDIDATE_TECHNIQUES) == set(CANDIDATES)
    assert {technique for needed in pipeline.CANDIDATE_TECHNIQUES.values() for technique in needed} == set(
        pipeline.TECHNIQUES)
    # A candidate's source (for the agreement gate) is built whenever the candidate is.
    for candidate, source in pipeline.SOURCE_OF.items():
        assert set(pipeline.CANDIDATE_TECHNIQUES[source]) <= set(pipeline.CANDIDATE_TECHNIQUES[candidate])


def test_the_reason_names_every_switched_off_technique():
    config = config_from_params({"distill": False, "prune": False, "quantize": False})
    assert switched_off(config, ("distill",)) == "distill switched off in the run's params"
    assert switched_off(config, ()) is None
    assert switched_off(config_from_params({}), ("distill", "quantize")) is None
    assert switched_off_candidates(config)["pruned_int8"] == (
        "distill and prune and quantize switched off in the run's params")
    assert switched_off_candidates(config_from_params({"quantize": False}))["student_int8"] == (
        "quantize switched off in the run's params")


def _result(step: str, tmp_path) -> dict:
    return StepResult(step, StepStatus.SUCCESS, uris={"model": str(tmp_path / step), "data": str(tmp_path)}).to_dict()


def test_evaluation_measures_only_the_candidates_that_were_built(monkeypatch, tmp_path, caplog):
    measured = []

    def fake_run_isolated(config, candidate, model_dir, model_format, data_dir, out_dir):
        measured.append(candidate)
        return StepResult("evaluate", StepStatus.SUCCESS, metrics={"accuracy": 0.8, "latency_p50_ms": 1.0,
                                                                   "latency_p95_ms": 2.0})

    monkeypatch.setattr(pipeline.evaluate_step, "run_isolated", fake_run_isolated)
    settings = type("Settings", (), {"run_dir": lambda self, run_id: tmp_path / run_id})()
    config = config_from_params({"distill": False, "prune": False, "quantize": False})
    # What XCom hands over for skipped tasks: None.
    produced = {"finetune": _result("finetune", tmp_path), "export": _result("export", tmp_path), "quantize": None,
                "export_student": None, "quantize_student": None, "export_pruned": None, "quantize_pruned": None}
    with caplog.at_level("INFO", logger="tasks.pipeline"):
        evaluations = pipeline.evaluate_candidates(settings, config, "run", _result("data", tmp_path), produced)
    assert measured == list(evaluations) == ["teacher_pytorch", "onnx_fp32"]
    assert "student_int8 switched off, not evaluated: distill and quantize switched off in the run's params" in (
        caplog.text)

    # A switched-on candidate whose step produced nothing is an error that says so, not a KeyError.
    with pytest.raises(PipelineError, match="onnx_int8 is switched on but its step 'quantize' produced no result"):
        pipeline.evaluate_candidates(settings, config_from_params({"distill": False, "prune": False}), "run",
                                     _result("data", tmp_path), produced)


def test_steps_know_when_their_technique_is_switched_off():
    """What the Kubeflow steps ask before running (the DAG's tasks check their own technique)."""
    from tasks.pipeline import step_switched_off

    no_quantize = config_from_params({"quantize": False})
    assert step_switched_off(no_quantize, "quantize_int8", "pruned_int8") == "quantize switched off in the run's params"
    assert step_switched_off(no_quantize, "export_onnx", "pruned_onnx_fp32") is None
    assert step_switched_off(no_quantize, "prune_student") is None
    nothing = config_from_params({"distill": False, "prune": False, "quantize": False})
    assert step_switched_off(nothing, "prune_student") == "distill and prune switched off in the run's params"
    assert step_switched_off(nothing, "export_onnx", "student_onnx_fp32") == "distill switched off in the run's params"
    assert step_switched_off(nothing, "finetune_teacher") is None
    assert step_switched_off(nothing, "export_onnx", "onnx_fp32") is None
