"""The TensorRT compile step: SKIPPED with the reason where it cannot run; a real build on a GPU."""

import pytest

from tasks import compile as compile_step
from tasks.config import CompileConfig
from tasks.errors import ConfigError
from tasks.results import StepStatus


def test_skipped_without_a_gpu_and_says_why(exported_onnx, tmp_path):
    result = compile_step.run(CompileConfig(), exported_onnx, tmp_path / "trt", gpus=[], trt_version=None)
    assert result.status is StepStatus.SKIPPED
    assert "no NVIDIA GPU" in result.reason
    assert not (tmp_path / "trt").exists()


def test_skipped_on_a_gpu_without_tensorrt_names_the_package(exported_onnx, tmp_path):
    result = compile_step.run(CompileConfig(), exported_onnx, tmp_path / "trt", gpus=["NVIDIA H100"], trt_version=None)
    assert result.status is StepStatus.SKIPPED
    assert "tensorrt Python package is not installed" in result.reason and "H100" in result.reason


def test_this_machine_reports_what_it_has(exported_onnx, tmp_path):
    """Whatever this machine is, the step either builds an engine or says exactly why not."""
    result = compile_step.run(CompileConfig(max_sequence=32, opt_sequence=32), exported_onnx, tmp_path / "trt",
                              precision="fp32")
    if result.status is StepStatus.SKIPPED:
        assert result.reason == compile_step.unavailable_reason(compile_step.gpu_names(), compile_step.tensorrt_version())
    else:
        assert (tmp_path / "trt" / compile_step.ENGINE_FILENAME).stat().st_size > 0


def test_profile_shapes_are_validated():
    assert CompileConfig().shapes() == ((1, 1), (8, 128), (32, 128))
    with pytest.raises(ConfigError):
        CompileConfig(min_batch=4, opt_batch=2)


def tensorrt_provider_missing() -> str | None:
    """Why ONNX Runtime here cannot run the TensorRT execution provider, or None when it can."""
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed"
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        return (f"onnxruntime here has no TensorRT provider (has {ort.get_available_providers()}); "
                "install onnxruntime-gpu with TensorRT")
    return None


# The GPU tests skip at collection, before their fixtures train and export a model they would not use
# (and on a GPU machine that lacks the pipeline's other dependencies, could not).
@pytest.mark.gpu
@pytest.mark.skipif(compile_step.tensorrt_version() is None,
                    reason=str(compile_step.unavailable_reason(compile_step.gpu_names(), None)))
def test_engine_builds_on_the_gpu(exported_onnx, tmp_path):
    result = compile_step.run(CompileConfig(max_sequence=32, opt_sequence=32), exported_onnx, tmp_path / "trt",
                              precision="fp32")
    assert result.status is StepStatus.SUCCESS
    assert result.info["gpu"] and result.metrics["size_bytes"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(tensorrt_provider_missing() is not None, reason=str(tensorrt_provider_missing()))
def test_tritons_tensorrt_accelerator_settings_give_the_cpu_logits(exported_onnx, prepared_data):
    """What the GPU config asks of Triton's onnxruntime backend (TensorRT provider, FP16, workspace),
    run through ONNX Runtime's TensorRT execution provider: the logits match the CPU ones within
    FP16 tolerance and the labels agree."""
    import onnxruntime as ort
    from dataclasses import replace

    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from serving import model_repository as repo
    from tasks.evaluate import tokenize
    from tasks.modeling import load_tokenizer
    from tasks.splits import read_split

    config = replace(repo.classifier_config("clf", 2), gpu=True, tensorrt_precision="FP16",
                          tensorrt_workspace_mb=512)
    parsed = text_format.Parse(repo.render_config(config), model_config_pb2.ModelConfig())
    (accelerator,) = parsed.optimization.execution_accelerators.gpu_execution_accelerator
    options = {"trt_fp16_enable": accelerator.parameters["precision_mode"] == "FP16",
               "trt_max_workspace_size": int(accelerator.parameters["max_workspace_size_bytes"])}
    model = str(exported_onnx / "model.onnx")
    gpu = ort.InferenceSession(model, providers=[("TensorrtExecutionProvider", options), "CUDAExecutionProvider"])
    assert gpu.get_providers()[0] == "TensorrtExecutionProvider"
    cpu = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    texts = read_split(prepared_data, "test")["text"].head(16).tolist()
    tokenizer = load_tokenizer(exported_onnx)
    for text in texts:
        feeds = tokenize(tokenizer, [text], 32)
        expected, served = cpu.run(["logits"], feeds)[0], gpu.run(["logits"], feeds)[0]
        assert abs(served - expected).max() < 5e-2 and served.argmax() == expected.argmax()
