"""Compile an ONNX classifier into a TensorRT engine for the NVIDIA GPU it runs on.

TensorRT needs an NVIDIA GPU and the ``tensorrt`` Python package; without either the step returns
SKIPPED with the reason and changes nothing. Engines are specific to the GPU model and TensorRT
version they were built with, so the engine is built where it will be served (or on the same GPU
model) and the plan records both.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, replace
from pathlib import Path

from serving.model_repository import ENGINE_PROFILE_FILE  # where Triton's writer reads the engine's profile
from tasks.config import CompileConfig
from tasks.errors import CompileError, ConfigError
from tasks.hardware import gpu_names, tensorrt_missing, tensorrt_version
from tasks.manifest import ModelSource, Precision, read_manifest, write_manifest
from tasks.onnx_model import ENGINE_FILENAME, INPUT_NAMES, MODEL_FILENAME, copy_tokenizer_files
from tasks.results import ModelFormat, StepResult, StepStatus, staged_dir, write_json_atomic

log = logging.getLogger(__name__)



def same_release(installed: str, wanted: str) -> bool:
    """Whether two TensorRT versions are one release: ``10.5.0`` (pip) is ``10.5.0.18`` (a container's)."""
    ours, theirs = installed.split("."), wanted.split(".")
    length = max(3, min(len(ours), len(theirs)))
    return ours[:length] == theirs[:length]


def unavailable_reason(gpus: list[str], trt_version: str | None, serving_tensorrt: str | None = None) -> str | None:
    """Why a TensorRT engine cannot be built here, or None when it can. ``serving_tensorrt``: the
    TensorRT of the Triton that will load the engine (an engine loads only in the release that built it)."""
    if not gpus:
        return "no NVIDIA GPU visible to CUDA: TensorRT engines are built and run on the GPU they target"
    if trt_version is None:
        return tensorrt_missing(gpus, trt_version)
    if serving_tensorrt and not same_release(trt_version, serving_tensorrt):
        return (f"TensorRT {trt_version} is installed here, but the Triton that serves the engines runs TensorRT "
                f"{serving_tensorrt} (PIPELINE_TRITON_TENSORRT): an engine built here would not load there; install "
                f"tensorrt-cu12=={serving_tensorrt} on this worker (infra/project/Dockerfile, docs/gpu.md)")
    return None


def serving_profile(config: CompileConfig, max_length: int, max_batch_size: int) -> CompileConfig:
    """The profile widened to what the engine will be served with: Triton forms batches of up to
    ``max_batch_size`` and the tokenizer sends up to ``max_length`` tokens, so the engine's maximum
    shapes must cover both (an engine rejects a shape outside its profile). The optimum shapes stay
    where the config put them, clipped into the widened range."""
    max_batch = max(config.max_batch, max_batch_size)
    max_sequence = max(config.max_sequence, max_length)
    return replace(config, max_batch=max_batch, max_sequence=max_sequence,
                   opt_batch=min(max(config.opt_batch, config.min_batch), max_batch),
                   opt_sequence=min(max(config.opt_sequence, config.min_sequence), max_sequence))


def source_precision(onnx_dir: Path) -> str:
    """The precision the ONNX model holds (its manifest's; FP32 for a folder without one)."""
    manifest = read_manifest(onnx_dir)
    return manifest.precision.value if manifest is not None else Precision.FP32.value


def build_engine(onnx_path: Path, engine_path: Path, config: CompileConfig, precision: str) -> dict[str, str]:
    """Parse ``onnx_path`` and serialize an engine with one optimization profile over the dynamic
    batch and sequence axes. ``precision`` ("fp32", "fp16", "int8") names what the ONNX model holds."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(index)) for index in range(parser.num_errors))
        raise CompileError(f"TensorRT could not parse {onnx_path}: {errors}")
    build_config = builder.create_builder_config()
    build_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_mb << 20)
    if major < 11:  # TensorRT 10 types the network weakly: precision is allowed by flags
        if precision == "fp16":
            build_config.set_flag(trt.BuilderFlag.FP16)
        elif precision == "int8":
            build_config.set_flag(trt.BuilderFlag.INT8)
            build_config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    low, optimum, high = config.shapes()
    for name in INPUT_NAMES:
        profile.set_shape(name, low, optimum, high)
    build_config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, build_config)
    if serialized is None:
        raise CompileError(f"TensorRT failed to build an engine from {onnx_path}; see the TensorRT log above")
    engine_path.write_bytes(bytes(serialized))
    return {"tensorrt_version": trt.__version__}


def run(config: CompileConfig, onnx_dir: Path, out_dir: Path, precision: str | None = None,
        gpus: list[str] | None = None, trt_version: str | None = None,
        serving_tensorrt: str | None = None) -> StepResult:
    """Build ``out_dir/model.plan`` from ``onnx_dir/model.onnx``; SKIPPED (with the reason) where impossible:
    no GPU, no TensorRT, or an engine TensorRT could not build (the FP16 ONNX model, served with
    Triton's TensorRT accelerator, is then the GPU route). ``precision``: what the ONNX model holds
    (default: its manifest's)."""
    precision = precision or source_precision(onnx_dir)
    if precision not in {item.value for item in Precision}:
        raise ConfigError(f"compile precision {precision!r} must be one of {[item.value for item in Precision]}")
    gpus = gpu_names() if gpus is None else gpus
    trt_version = tensorrt_version() if trt_version is None else trt_version
    reason = unavailable_reason(gpus, trt_version, serving_tensorrt)
    if reason is not None:
        log.warning("TensorRT compile SKIPPED: %s", reason)
        return StepResult(step=f"compile_tensorrt_{precision}", status=StepStatus.SKIPPED, reason=reason)
    try:
        return _build(config, onnx_dir, out_dir, precision, gpus[0])
    except CompileError as error:
        reason = (f"{error}; the FP16 ONNX candidate, served with Triton's TensorRT accelerator, is the GPU route "
                  "instead")
        log.warning("TensorRT compile SKIPPED: %s", reason)
        return StepResult(step=f"compile_tensorrt_{precision}", status=StepStatus.SKIPPED, reason=reason)


def _build(config: CompileConfig, onnx_dir: Path, out_dir: Path, precision: str, gpu: str) -> StepResult:
    with staged_dir(out_dir) as staging:
        info = build_engine(onnx_dir / MODEL_FILENAME, staging / ENGINE_FILENAME, config, precision)
        copy_tokenizer_files(onnx_dir, staging)
        info |= {"gpu": gpu, "precision": precision, "source": str(onnx_dir / MODEL_FILENAME)}
        write_json_atomic(staging / ENGINE_PROFILE_FILE, asdict(config) | info)
        write_manifest(staging, format=ModelFormat.TENSORRT_PLAN, precision=precision,
                       step=f"compile_tensorrt_{precision}", created_by=__name__,
                       source=ModelSource(str(onnx_dir), ModelFormat.ONNX),
                       config=asdict(config) | {"precision": precision}, config_file=ENGINE_PROFILE_FILE,
                       details={key: info[key] for key in ("gpu", "tensorrt_version") if key in info})
    return StepResult(
        step=f"compile_tensorrt_{precision}",
        status=StepStatus.SUCCESS,
        uris={"model": str(out_dir), "engine": str(out_dir / ENGINE_FILENAME)},
        metrics={"size_bytes": float((out_dir / ENGINE_FILENAME).stat().st_size)},
        info=info,
    )
