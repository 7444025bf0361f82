"""Injected faults through the real decision tasks (score the champion, gate, promote, report; real
MLflow and Triton): a candidate
whose quantization destroyed its accuracy, one that outputs NaN, and one with its label order
swapped are each registered, gated, and not promoted; the champion keeps serving."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from serving.triton_client import TritonClient
from tasks import decisions, model_aliases, registry
from tasks.config import GateConfig, PipelineConfig, PromoteConfig
from tasks.evaluate import run as evaluate
from tasks.results import ModelFormat, StepResult, StepStatus
from tasks.settings import PipelineSettings

pytestmark = pytest.mark.integration


def _edited_copy(source: Path, target: Path, edit) -> Path:
    """A copy of an exported model folder whose initializers were changed by ``edit(name, array)``."""
    shutil.copytree(source, target)
    model = onnx.load(str(target / "model.onnx"))
    for index, initializer in enumerate(model.graph.initializer):
        array = numpy_helper.to_array(initializer)
        changed = edit(initializer.name, array)
        if changed is not None:
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(changed.astype(array.dtype),
                                                                            initializer.name))
    onnx.save(model, str(target / "model.onnx"))
    return target


def _quantized_to_nothing(name: str, array: np.ndarray):
    """Every weight matrix rounded to a single level (zero): what a broken quantization produces."""
    return np.zeros_like(array) if array.ndim == 2 else None


def _nan_bias(name: str, array: np.ndarray):
    return np.full_like(array, np.nan) if name.endswith("classifier.bias") else None


def _swapped_labels(name: str, array: np.ndarray):
    return array[::-1].copy() if name.startswith("model.classifier.") else None


def _register(settings: PipelineSettings, config: PipelineConfig, run_id: str,
              evaluations: dict[str, StepResult]) -> dict:
    uri, model = settings.mlflow_tracking_uri, config.promote.registered_model
    parent = registry.parent_run_id(uri, settings.experiment, run_id, {"test": "gate-injection"})
    versions = {}
    for name, result in evaluations.items():
        if name != "teacher_pytorch":  # the reference: not a gated candidate (not registered here)
            versions[name] = registry.log_candidate(
                uri, settings.experiment, parent, run_id, model,
                registry.Candidate(name, Path(result.uri("model")), result.metrics, f"injected: {name}"),
                {"data_hash": "test"})
    return {"parent_run_id": parent, "versions": versions, "reference_version": None}


def _promote(settings: PipelineSettings, config: PipelineConfig, run_id: str, data_dir: Path,
             evaluations: dict[str, StepResult], registered: dict) -> dict:
    """The decision tasks in the DAG's order; the report is written after a failed promotion too."""
    data = StepResult("prepare_data", StepStatus.SUCCESS, uris={"data": str(data_dir)}).to_dict()
    evaluated = {name: result.to_dict() for name, result in evaluations.items()}
    champion = decisions.score_champion(settings, config, run_id, data)
    gated = decisions.gate_candidates(settings, config, run_id, evaluated, registered, champion)
    try:
        promoted = decisions.promote_winner(settings, config, run_id, data, evaluated, gated)
    finally:
        written = decisions.write_report(settings, run_id)
    return promoted | {"summary": written["summary"]}


def _gate_and_promote(settings: PipelineSettings, config: PipelineConfig, run_id: str, data_dir: Path,
                      evaluations: dict[str, StepResult]) -> dict:
    return _promote(settings, config, run_id, data_dir, evaluations, _register(settings, config, run_id, evaluations))


def _config(model: str, gate: GateConfig | None = None) -> PipelineConfig:
    """A pipeline config for gating and promoting into ``model`` (registered and Triton name)."""
    return PipelineConfig.from_dict({
        "data": {"source": "unused"}, "finetune": {"model": "unused"},
        "evaluate": {"warmup": 1, "max_length": 32, "batch_size": 0},
        "gate": asdict(gate or GateConfig()),
        "promote": asdict(PromoteConfig(registered_model=model, triton_model=model, smoke_samples=4)),
    })


def test_each_injected_fault_is_gated_out_and_the_champion_keeps_serving(
        local_services, trained_teacher, exported_onnx, prepared_data, tmp_path):
    settings = PipelineSettings.from_env(local_services.environment())
    config = _config("injected", GateConfig(max_relative_accuracy_drop=0.05))

    def evaluated(name: str, model_dir: Path, model_format: ModelFormat = ModelFormat.ONNX) -> StepResult:
        return evaluate(config.evaluate, name, model_dir, model_format, prepared_data, tmp_path / "eval" / name)

    teacher = evaluated("teacher_pytorch", trained_teacher, ModelFormat.PYTORCH)
    good = evaluated("good", exported_onnx)
    first = _gate_and_promote(settings, config, "run-good", prepared_data, {"teacher_pytorch": teacher, "good": good})
    assert first["status"] == "success"
    champion = model_aliases.alias_version(settings.mlflow_tracking_uri, "injected", "champion")
    assert champion is not None

    faulty = {
        "destroyed": evaluated("destroyed", _edited_copy(exported_onnx, tmp_path / "destroyed", _quantized_to_nothing)),
        "nan_model": evaluated("nan_model", _edited_copy(exported_onnx, tmp_path / "nan", _nan_bias)),
        "swapped": evaluated("swapped", _edited_copy(exported_onnx, tmp_path / "swapped", _swapped_labels)),
    }
    assert faulty["nan_model"].metrics["nan_outputs"] == 1.0
    second = _gate_and_promote(settings, config, "run-faulty", prepared_data, {"teacher_pytorch": teacher, **faulty})
    assert second["status"] == "skipped" and second["reason"].startswith("no candidate meets 90.0 ms p95 at >= ")
    assert "nothing is promoted and the champion stays" in second["reason"]

    summary = json.loads(Path(second["summary"]).read_text())
    failed = {name: {gate["name"] for gate in gates if gate["decision"] == "fail"}
              for name, gates in summary["gates"].items()}
    assert "accuracy" in failed["destroyed"]
    assert {"finite_outputs"} <= failed["nan_model"]
    assert "accuracy" in failed["swapped"] and "champion_regression" in failed["swapped"]
    assert summary["winner"] is None

    assert model_aliases.alias_version(settings.mlflow_tracking_uri, "injected", "champion") == champion
    client = TritonClient(settings.triton_url)
    assert client.ready_versions("injected") == [1]
    served = client.classify("injected", ["good great film"])
    assert np.isfinite(served["PROBABILITIES"]).all()
    from mlflow import MlflowClient

    mlflow = MlflowClient(settings.mlflow_tracking_uri)
    for name in faulty:
        description = mlflow.get_model_version("injected", summary["versions"][name]).description
        assert "not promoted by run run-faulty" in description


def test_a_candidate_that_passes_the_gates_but_cannot_load_still_leaves_a_summary(
        local_services, trained_teacher, exported_onnx, prepared_data, tmp_path):
    from tasks.errors import PromotionFailed

    settings = PipelineSettings.from_env(local_services.environment())
    config = _config("unloadable")
    teacher = evaluate(config.evaluate, "teacher_pytorch", trained_teacher, ModelFormat.PYTORCH, prepared_data,
                       tmp_path / "eval" / "teacher")
    copy = tmp_path / "good"
    shutil.copytree(exported_onnx, copy)
    good = evaluate(config.evaluate, "good", copy, ModelFormat.ONNX, prepared_data, tmp_path / "eval" / "good")
    evaluations = {"teacher_pytorch": teacher, "good": good}
    registered = _register(settings, config, "run-unloadable", evaluations)
    (copy / "model.onnx").write_bytes(b"corrupted after registration")  # gates pass, Triton cannot load it
    with pytest.raises(PromotionFailed):
        _promote(settings, config, "run-unloadable", prepared_data, evaluations, registered)
    summary = json.loads((settings.run_dir("run-unloadable") / "summary.json").read_text())
    assert summary["winner"] == "good"
    assert summary["promotion"]["status"] == "failed" and "was not promoted" in summary["promotion"]["reason"]
    assert all(gate["decision"] == "pass" for gate in summary["gates"]["good"])
