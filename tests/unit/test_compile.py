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


@pytest.mark.gpu
def test_engine_builds_on_the_gpu(exported_onnx, tmp_path):
    if compile_step.tensorrt_version() is None:
        pytest.skip("tensorrt is not installed on this GPU machine")
    result = compile_step.run(CompileConfig(max_sequence=32, opt_sequence=32), exported_onnx, tmp_path / "trt",
                              precision="fp32")
    assert result.status is StepStatus.SUCCESS
    assert result.info["gpu"] and result.metrics["size_bytes"] > 0
