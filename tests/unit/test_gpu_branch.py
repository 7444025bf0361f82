"""The GPU branch of optimize_model: the target param resolved against the worker, the recipe's GPU
stages, their SKIPPED reasons, the engine profile arithmetic, the TensorRT-ready quantization, the
registry's engine tags and the promotion preference. The last test runs the branch for real where a
GPU is present (``-m gpu``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks import hardware
from tasks.config import CompileConfig, PipelineConfig, QuantizeConfig
from tasks.recipe import OPTIMIZE_MODEL, Step, Target
from tasks.results import ModelFormat, StepStatus
from tasks.settings import PipelineSettings

GPU = ["NVIDIA H200"]


@pytest.mark.parametrize(("requested", "gpus", "branch", "prefer", "said"), [
    ("cpu", GPU, False, False, "target is cpu"),
    ("auto", [], False, False, "target auto: no NVIDIA GPU visible to CUDA on this worker"),
    ("gpu", [], False, False, "target gpu asked for, but no NVIDIA GPU is visible"),
    ("both", [], False, False, "target both asked for, but no NVIDIA GPU is visible"),
    ("auto", GPU, True, True, "building for NVIDIA H200"),
    ("gpu", GPU, True, True, "GPU candidates are preferred"),
    ("both", GPU, True, False, "every candidate competes"),
])
def test_the_target_resolves_against_what_the_worker_sees(requested, gpus, branch, prefer, said):
    resolution = hardware.resolve(requested, gpus, "10.5.0")
    assert (resolution.gpu_branch, resolution.prefer_gpu) == (branch, prefer)
    assert said in resolution.reason


def test_a_gpu_without_tensorrt_still_runs_the_branch_and_says_which_route_is_left():
    resolution = hardware.resolve("gpu", GPU, None)
    assert resolution.gpu_branch and "no TensorRT engines (the tensorrt package is not installed" in resolution.reason


def test_the_resolution_is_written_once_and_read_back(tmp_path):
    assert hardware.read_resolution(tmp_path) is None
    resolution = hardware.resolve("gpu", GPU, "10.5.0")
    hardware.write_resolution(tmp_path / "decisions", resolution)
    assert hardware.read_resolution(tmp_path / "decisions") == resolution


def test_gpu_tasks_are_placed_only_where_the_deployment_says():
    assert hardware.task_placement({}) == {}
    assert hardware.task_placement({"PIPELINE_GPU_QUEUE": "gpu"}) == {"queue": "gpu"}
    assert hardware.task_placement({"PIPELINE_GPU_POD_TEMPLATE": "/t/gpu.yaml"}) == {
        "executor_config": {"pod_template_file": "/t/gpu.yaml"}}


def test_each_model_has_fp16_and_int8_routes_to_an_engine():
    stages = {stage.id: stage for stage in OPTIMIZE_MODEL.on(Target.GPU)}
    assert len(stages) == 12
    for model, prefix, fp32 in (("teacher", "", "onnx_fp32"), ("student", "student_", "student_onnx_fp32"),
                                ("pruned", "pruned_", "pruned_onnx_fp32")):
        fp16, qdq = stages[f"fp16_{model}"], stages[f"qdq_{model}"]
        engine16, engine8 = stages[f"compile_{model}_fp16"], stages[f"compile_{model}_int8"]
        assert fp16.candidate == f"{prefix}onnx_fp16" and fp16.model_format is ModelFormat.ONNX
        assert dict(fp16.settings) == {"mode": "fp16"}
        assert qdq.candidate is None and dict(qdq.settings) == {"mode": "static_int8", "symmetric_activations": True}
        assert (engine16.step, engine16.inputs["model"], engine16.candidate) == (Step.COMPILE, fp16.id,
                                                                                f"{prefix}trt_fp16")
        assert (engine8.inputs["model"], engine8.candidate) == (qdq.id, f"{prefix}trt_int8")
        assert engine16.model_format is engine8.model_format is ModelFormat.TENSORRT_PLAN
        # Each conversion is judged by its agreement with the model's FP32 ONNX candidate.
        assert {fp16.compared_with, engine16.compared_with, engine8.compared_with} == {fp32}
    assert OPTIMIZE_MODEL.techniques_needed("compile_pruned_int8") == ("distill", "prune", "quantize")
    assert OPTIMIZE_MODEL.techniques_needed("compile_teacher_fp16") == ()


def _config(target: str = "auto", **sections) -> PipelineConfig:
    return PipelineConfig.from_dict({"data": {"source": "x.csv"}, "finetune": {"model": "m"},
                                     "compile": {"target": target}} | sections)


def test_target_cpu_switches_the_gpu_branch_off_in_the_params():
    from tasks.pipeline import enabled_candidates, stage_switched_off, switched_off_candidates

    assert stage_switched_off(_config("cpu"), "fp16_teacher") == \
        "target is cpu: the GPU branch is switched off in the run's params"
    assert stage_switched_off(_config("cpu"), "export_onnx") is None
    assert stage_switched_off(_config("gpu"), "fp16_teacher") is None
    gpu_candidates = {stage.candidate for stage in OPTIMIZE_MODEL.on(Target.GPU) if stage.candidate}
    assert gpu_candidates <= set(switched_off_candidates(_config("cpu")))
    assert gpu_candidates <= set(enabled_candidates(_config("auto")))
    with pytest.raises(Exception, match="compile.target must be one of"):
        _config("tpu")


def _settings(tmp_path: Path) -> PipelineSettings:
    return PipelineSettings(runs_dir=tmp_path / "runs", mlflow_tracking_uri=f"sqlite:///{tmp_path / 'm.db'}",
                            triton_url="127.0.0.1:1", triton_model_repository=tmp_path / "models",
                            assets_cache=tmp_path / "assets")


def test_a_gpu_stage_on_a_worker_without_a_gpu_ends_skipped_with_the_reason(tmp_path, monkeypatch):
    from tasks import pipeline

    monkeypatch.setattr(hardware, "gpu_names", lambda: [])
    settings = _settings(tmp_path)
    config = _config("gpu")
    assert pipeline.resolve_target(settings, config, "run1").gpu_branch is False
    result = pipeline.run_stage(settings, config, "run1", "fp16_student", {}, {"model": None})
    assert result["status"] == "skipped" and "no NVIDIA GPU is visible to CUDA" in result["reason"]
    # The engine stage below it never ran (the scheduler skipped it): the evaluation still says why.
    reason = pipeline.not_built_reason(settings, "run1", OPTIMIZE_MODEL.stage("compile_student_fp16"))
    assert reason.startswith("fp16_student SKIPPED: target gpu asked for")
    assert pipeline.not_built_candidates(settings, config, "run1", {"onnx_fp32": {}})["trt_fp16"].startswith(
        "target gpu asked for")


def test_the_engine_profile_is_widened_to_what_triton_sends():
    assert CompileConfig().shapes() == ((1, 1), (8, 128), (32, 128))
    from tasks import compile as compile_step

    wide = compile_step.serving_profile(CompileConfig(), max_length=256, max_batch_size=64)
    assert wide.shapes() == ((1, 1), (8, 128), (64, 256))
    narrow = compile_step.serving_profile(CompileConfig(opt_batch=16, opt_sequence=128, max_batch=16,
                                                        max_sequence=128), max_length=32, max_batch_size=8)
    assert narrow.shapes() == ((1, 1), (16, 128), (16, 128))  # never narrower than the config asked
    big_optimum = CompileConfig(min_batch=4, opt_batch=4, max_batch=4, min_sequence=8, opt_sequence=8, max_sequence=8)
    assert compile_step.serving_profile(big_optimum, 64, 32).shapes() == ((4, 8), (4, 8), (32, 64))


def test_the_engine_precision_follows_the_source_models_manifest(exported_onnx, tmp_path):
    from tasks import compile as compile_step

    assert compile_step.source_precision(exported_onnx) == "fp32"
    (tmp_path / "bare").mkdir()
    assert compile_step.source_precision(tmp_path / "bare") == "fp32"
    skipped = compile_step.run(CompileConfig(), exported_onnx, tmp_path / "trt", gpus=GPU, trt_version=None)
    assert skipped.status is StepStatus.SKIPPED and skipped.step == "compile_tensorrt_fp32"


def test_an_engine_is_built_only_with_the_tensorrt_of_the_triton_that_serves_it(exported_onnx, tmp_path):
    from tasks import compile as compile_step

    assert compile_step.same_release("10.5.0", "10.5.0.18") and not compile_step.same_release("10.4.0", "10.5.0.18")
    assert compile_step.unavailable_reason(GPU, "10.5.0", "10.5.0.18") is None
    result = compile_step.run(CompileConfig(), exported_onnx, tmp_path / "trt", gpus=GPU, trt_version="10.7.0",
                              serving_tensorrt="10.5.0")
    assert result.status is StepStatus.SKIPPED and not (tmp_path / "trt").exists()
    assert "TensorRT 10.7.0 is installed here, but the Triton that serves the engines runs TensorRT 10.5.0" in \
        result.reason


def test_an_engine_tensorrt_cannot_build_ends_skipped_naming_the_fallback(exported_onnx, tmp_path, monkeypatch):
    from tasks import compile as compile_step
    from tasks.errors import CompileError

    def refuse(*args, **kwargs):
        raise CompileError("TensorRT could not parse model.onnx: unsupported operator")

    monkeypatch.setattr(compile_step, "build_engine", refuse)
    result = compile_step.run(CompileConfig(), exported_onnx, tmp_path / "trt", gpus=GPU, trt_version="10.5.0")
    assert result.status is StepStatus.SKIPPED
    assert "unsupported operator" in result.reason and "Triton's TensorRT accelerator" in result.reason
    assert not (tmp_path / "trt").exists()


def test_tensorrt_ready_int8_has_signed_symmetric_activations(exported_onnx, prepared_data, tmp_path):
    import onnx

    from tasks import quantize

    assert quantize.static_options(QuantizeConfig(mode="static_int8"), "/s") == {"TmpDir": "/s"}
    symmetric = QuantizeConfig(mode="static_int8", symmetric_activations=True, calibration_samples=8)
    assert quantize.static_options(symmetric, "/s")["ActivationSymmetric"] is True
    quantize.run(symmetric, exported_onnx, prepared_data, tmp_path / "qdq", max_length=32, check_samples=4)
    model = onnx.load(str(tmp_path / "qdq" / "model.onnx"))
    zero_points = {init.name: init for init in model.graph.initializer if "zero_point" in init.name}
    assert zero_points
    arrays = [onnx.numpy_helper.to_array(init) for init in zero_points.values()]
    assert all(array.dtype.name == "int8" and not array.any() for array in arrays)  # int8, zero point 0
    assert not any("bias_quantized" in name for name in zero_points)  # biases stay float for TensorRT


def test_target_gpu_prefers_a_passing_gpu_candidate():
    from tasks.decisions import choose_winner

    gated = {"pruned_int8": (True, {"latency_p50_ms": 5.0, "accuracy": 0.9}),
             "pruned_trt_fp16": (True, {"latency_p50_ms": 7.0, "accuracy": 0.9}),
             "trt_int8": (False, {"latency_p50_ms": 1.0, "accuracy": 0.5})}
    assert choose_winner(gated) == "pruned_int8"
    assert choose_winner(gated, preferred=frozenset({"pruned_trt_fp16", "trt_int8"})) == "pruned_trt_fp16"
    failing = gated | {"pruned_trt_fp16": (False, {"latency_p50_ms": 7.0, "accuracy": 0.9})}
    assert choose_winner(failing, preferred=frozenset({"pruned_trt_fp16", "trt_int8"})) == "pruned_int8"


def test_gpu_evaluation_says_what_the_worker_lacks():
    from tasks.evaluate import gpu_unavailable_reason

    assert gpu_unavailable_reason(ModelFormat.ONNX, gpus=[], trt_version=None, ort_providers=[]) == \
        "no NVIDIA GPU visible to CUDA on this worker"
    assert "tensorrt Python package is not installed" in gpu_unavailable_reason(
        ModelFormat.TENSORRT_PLAN, gpus=GPU, trt_version=None, ort_providers=[])
    assert "install onnxruntime-gpu" in gpu_unavailable_reason(ModelFormat.ONNX, gpus=GPU, trt_version=None,
                                                               ort_providers=[])
    assert gpu_unavailable_reason(ModelFormat.ONNX, gpus=GPU, trt_version=None,
                                  ort_providers=["CUDAExecutionProvider"]) is None
    assert gpu_unavailable_reason(ModelFormat.TENSORRT_PLAN, gpus=GPU, trt_version="10.5.0", ort_providers=[]) is None


def test_an_fp16_onnx_model_is_promoted_to_the_gpu_and_the_rest_as_before(exported_onnx, tmp_path):
    from tasks import promote
    from tasks.manifest import ArtifactManifest, ModelSource, write_manifest

    assert promote.gpu_serving(exported_onnx) == {}
    half = tmp_path / "half"
    half.mkdir()
    (half / "model.onnx").write_bytes(b"onnx")
    write_manifest(half, format=ModelFormat.ONNX, precision="fp16", step="quantize_fp16", created_by="test",
                   source=ModelSource(str(exported_onnx), ModelFormat.ONNX), config={"mode": "fp16"})
    assert ArtifactManifest.read(half).precision.value == "fp16"
    assert promote.gpu_serving(half) == {"gpu": True, "tensorrt_precision": "FP16"}


def _engine_folder(tmp_path: Path) -> Path:
    """A folder as the compile step leaves it (the engine's bytes are a stand-in: nothing loads them here)."""
    from tasks.manifest import ModelSource, write_manifest

    folder = tmp_path / "trt_fp16"
    folder.mkdir()
    (folder / "model.plan").write_bytes(b"serialized engine")
    (folder / "tokenizer.json").write_text("{}")
    (folder / "compile_config.json").write_text(json.dumps({"max_batch": 32, "max_sequence": 128}))
    write_manifest(folder, format=ModelFormat.TENSORRT_PLAN, precision="fp16", step="compile_tensorrt_fp16",
                   created_by="tasks.compile", source=ModelSource(str(tmp_path / "onnx_fp16"), ModelFormat.ONNX),
                   config={"max_batch": 32}, config_file="compile_config.json",
                   details={"gpu": "NVIDIA H200", "tensorrt_version": "10.5.0"})
    return folder


def test_an_engine_is_registered_with_the_gpu_and_tensorrt_it_is_valid_for(tmp_path):
    import mlflow

    from tasks import model_aliases, registry

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.MlflowClient(uri).create_experiment("optimize_model", artifact_location=str(tmp_path / "artifacts"))
    parent = registry.parent_run_id(uri, "optimize_model", "run1", {})
    engine = registry.Candidate("trt_fp16", _engine_folder(tmp_path), {"accuracy": 0.9, "latency_p95_ms": 1.5,
                                                                       "gpu_memory_mb": 120.0}, "... > TensorRT engine")
    version = registry.log_candidate(uri, "optimize_model", parent, "run1", "gpu-model", engine, {"data_hash": "d"})
    tags = model_aliases.version_tags(uri, "gpu-model", version)
    assert (tags["tensorrt_version"], tags["gpu"]) == ("10.5.0", "NVIDIA H200")
    assert tags["engine_valid_for"] == "NVIDIA H200 with TensorRT 10.5.0 only"
    assert tags["candidate"] == "trt_fp16" and tags["metric.gpu_memory_mb"] == "120"
    described = model_aliases.mlflow_client(uri).get_model_version("gpu-model", version)
    assert "(batch 1, GPU)" in described.description
    artifacts = mlflow.artifacts.download_artifacts(f"{described.source}", tracking_uri=uri)
    assert {"model.plan", "manifest.json", "compile_config.json"} <= {path.name for path in Path(artifacts).iterdir()}
    # A retry registers nothing twice.
    assert registry.log_candidate(uri, "optimize_model", parent, "run1", "gpu-model", engine, {}) == version


@pytest.mark.gpu
def test_the_gpu_branch_on_this_machine_builds_or_says_why(tmp_path, trained_teacher, exported_onnx, prepared_data):
    """On a machine with a GPU: the FP16 stage builds, the engine stage builds or SKIPs naming what is
    missing, and each GPU candidate is evaluated on the GPU (with its GPU memory) or says why not."""
    from tasks import evaluate, pipeline
    from tasks.config import EvaluateConfig

    if not hardware.gpu_names():
        pytest.skip("no NVIDIA GPU visible to CUDA")
    settings = _settings(tmp_path)
    config = _config("gpu", finetune={"model": str(trained_teacher), "max_length": 32})
    resolution = pipeline.resolve_target(settings, config, "gpu-run")
    assert resolution.gpu_branch and resolution.gpus
    data = {"step": "data", "status": "success", "uris": {"data": str(prepared_data)}}
    fp32 = {"step": "export", "status": "success", "uris": {"model": str(exported_onnx)}}
    half = pipeline.run_stage(settings, config, "gpu-run", "fp16_teacher", data, {"model": fp32})
    assert half["status"] == "success"
    engine = pipeline.run_stage(settings, config, "gpu-run", "compile_teacher_fp16", data, {"model": half})
    if hardware.tensorrt_version() is None:
        assert engine["status"] == "skipped" and "tensorrt Python package is not installed" in engine["reason"]
    else:
        assert engine["status"] == "success"
    for model_format, folder in ((ModelFormat.ONNX, half["uris"]["model"]),
                                 (ModelFormat.TENSORRT_PLAN, engine.get("uris", {}).get("model"))):
        unable = evaluate.gpu_unavailable_reason(model_format)
        if unable is not None or folder is None:
            print(f"{model_format.value} not evaluated on the GPU: {unable}")
            continue
        result = evaluate.run(EvaluateConfig(warmup=2, max_length=32, batch_size=8, throughput_batches=2),
                              model_format.value, Path(folder), model_format, prepared_data,
                              tmp_path / f"eval-{model_format.value}", device="cuda")
        assert result.metrics["accuracy"] > 0 and result.metrics["gpu_memory_mb"] >= 0
        print(model_format.value, {key: round(value, 3) for key, value in result.metrics.items()})
