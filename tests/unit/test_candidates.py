"""Which candidates a run builds when techniques are switched off, and what evaluation does with
the steps that were skipped."""

import pytest

from tasks import pipeline
from tasks.errors import PipelineError
from tasks.pipeline import config_from_params, enabled_candidates, switched_off, switched_off_candidates
from tasks.recipe import OPTIMIZE_MODEL, Target
from tasks.results import StepResult, StepStatus

# sparse_onnx_fp32 is built only when the run switches sparsify on; the GPU branch only for a GPU target.
GPU = [stage.candidate for stage in OPTIMIZE_MODEL.on(Target.GPU) if stage.candidate]
ALL = [name for name in OPTIMIZE_MODEL.candidates if name != "sparse_onnx_fp32" and name not in GPU]


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
    config = config_from_params(params | {"target": "cpu"})
    assert enabled_candidates(config) == enabled
    assert list(switched_off_candidates(config)) == [name for name in ALL if name not in enabled] + [
        "sparse_onnx_fp32"] + GPU


def test_sparsify_adds_its_candidate_and_needs_distill():
    config = config_from_params({"sparsify": True, "sparsity": 0.7})
    assert enabled_candidates(config) == list(OPTIMIZE_MODEL.candidates)
    assert config.sparsify.unstructured_sparsity == 0.7 and not config.sparsify.structured
    assert config.sparsify.max_length == config.finetune.max_length  # follows fine-tuning, like distillation
    assert switched_off_candidates(config_from_params({}))["sparse_onnx_fp32"] == (
        "sparsify switched off in the run's params")
    from tasks.errors import ConfigError

    with pytest.raises(ConfigError, match="sparsify needs distill"):
        config_from_params({"sparsify": True, "distill": False, "prune": False})


def test_every_candidate_needs_what_its_upstream_stages_need():
    needed = {stage.candidate: OPTIMIZE_MODEL.techniques_needed(stage.id) for stage in OPTIMIZE_MODEL.stages
              if stage.candidate}
    assert needed["teacher_pytorch"] == needed["onnx_fp32"] == ()
    assert needed["pruned_int8"] == ("distill", "prune", "quantize")
    assert {technique for techniques in needed.values() for technique in techniques} == set(
        OPTIMIZE_MODEL.techniques) == {"distill", "prune", "sparsify", "quantize"}
    # A candidate's source (for the agreement gate) is built whenever the candidate is.
    for candidate, source in pipeline.SOURCE_OF.items():
        assert set(needed[source]) <= set(needed[candidate])


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

    def fake_run_isolated(config, candidate, model_dir, model_format, data_dir, out_dir, device="cpu"):
        measured.append(candidate)
        return StepResult("evaluate", StepStatus.SUCCESS, metrics={"accuracy": 0.8, "latency_p50_ms": 1.0,
                                                                   "latency_p95_ms": 2.0})

    monkeypatch.setattr(pipeline.evaluate_step, "run_isolated", fake_run_isolated)
    settings = type("Settings", (), {"run_dir": lambda self, run_id: tmp_path / run_id})()
    config = config_from_params({"distill": False, "prune": False, "quantize": False})
    # What XCom hands over for skipped tasks: None.
    produced = {"finetune_teacher": _result("finetune", tmp_path), "export_onnx": _result("export", tmp_path),
                "quantize_int8": None, "export_student": None, "quantize_student": None, "export_pruned": None,
                "quantize_pruned": None}
    with caplog.at_level("INFO", logger="tasks.pipeline"):
        evaluations = pipeline.evaluate_candidates(settings, config, "run", _result("data", tmp_path), produced)
    assert measured == list(evaluations) == ["teacher_pytorch", "onnx_fp32"]
    assert "student_int8 switched off, not evaluated: distill and quantize switched off in the run's params" in (
        caplog.text)

    # A switched-on candidate whose step produced nothing is an error that says so, not a KeyError.
    with pytest.raises(PipelineError, match="onnx_int8 is switched on but its stage 'quantize_int8' produced no result"):
        pipeline.evaluate_candidates(settings, config_from_params({"distill": False, "prune": False}), "run",
                                     _result("data", tmp_path), produced)


def test_stages_know_when_their_technique_is_switched_off():
    from tasks.pipeline import stage_switched_off

    no_quantize = config_from_params({"quantize": False})
    assert stage_switched_off(no_quantize, "quantize_pruned") == "quantize switched off in the run's params"
    assert stage_switched_off(no_quantize, "export_pruned") is None
    assert stage_switched_off(no_quantize, "prune_student") is None
    nothing = config_from_params({"distill": False, "prune": False, "quantize": False})
    assert stage_switched_off(nothing, "prune_student") == "distill and prune switched off in the run's params"
    assert stage_switched_off(nothing, "export_student") == "distill switched off in the run's params"
    assert stage_switched_off(nothing, "finetune_teacher") is None
    assert stage_switched_off(nothing, "export_onnx") is None


def test_the_recipe_rejects_a_stage_before_its_inputs():
    from tasks.recipe import Recipe, Stage, Step

    export = Stage("export", Step.EXPORT, "ONNX export", {"model": "train"}, candidate="onnx")
    with pytest.raises(ValueError, match="which no earlier stage makes"):
        Recipe((export, Stage("train", Step.FINETUNE, "finetune", candidate="torch")), techniques=())
    with pytest.raises(ValueError, match="a candidate is made twice"):
        Recipe((Stage("train", Step.FINETUNE, "finetune", candidate="torch"),
                Stage("again", Step.EXPORT, "ONNX export", {"model": "train"}, candidate="torch")), techniques=())


def test_technique_chains_follow_the_model_inputs():
    assert OPTIMIZE_MODEL.technique_chain("quantize_pruned") == (
        "finetune > distill > prune > ONNX export (FP32) > dynamic INT8")
    assert OPTIMIZE_MODEL.technique_chain("export_sparse") == (
        "finetune > distill > unstructured sparsity > ONNX export (FP32)")


def test_candidates_of_a_stage_that_ended_skipped_are_not_built_with_its_reason(monkeypatch, tmp_path, caplog):
    """distill_student SKIPPED by its step (say, the teacher's encoder family is not supported): the
    student's and the pruned student's candidates are left out with that reason, the rest evaluated."""
    measured = []

    def fake_run_isolated(config, candidate, model_dir, model_format, data_dir, out_dir, device="cpu"):
        measured.append(candidate)
        return StepResult("evaluate", StepStatus.SUCCESS, metrics={"accuracy": 0.8, "latency_p50_ms": 1.0,
                                                                   "latency_p95_ms": 2.0})

    monkeypatch.setattr(pipeline.evaluate_step, "run_isolated", fake_run_isolated)
    settings = type("Settings", (), {"run_dir": lambda self, run_id: tmp_path / run_id})()
    config = config_from_params({"target": "cpu"})
    pipeline.record_skip(settings, "run", "distill_student", "model_type 'deberta-v2' is not a supported encoder family")
    produced = {"finetune_teacher": _result("finetune", tmp_path), "export_onnx": _result("export", tmp_path),
                "quantize_int8": _result("quantize", tmp_path)}
    with caplog.at_level("INFO", logger="tasks.pipeline"):
        evaluations = pipeline.evaluate_candidates(settings, config, "run", _result("data", tmp_path), produced)
    assert measured == list(evaluations) == ["teacher_pytorch", "onnx_fp32", "onnx_int8"]
    assert "pruned_int8 not built, not evaluated: distill_student SKIPPED: model_type 'deberta-v2'" in caplog.text
    not_built = pipeline.not_built_candidates(settings, config, "run", evaluations)
    assert set(not_built) == {"student_onnx_fp32", "student_int8", "pruned_onnx_fp32", "pruned_int8"}
    assert all("deberta-v2" in reason for reason in not_built.values())
