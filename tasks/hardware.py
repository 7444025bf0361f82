"""What the worker can build for: the run's ``target`` param resolved against the GPUs CUDA sees and
the TensorRT it has, and where the DAG places its GPU tasks.

The CPU branch always runs (its FP32 ONNX models are the GPU branch's sources, and it is what serves
when no GPU can). The GPU branch runs when the target asks for it and the worker sees an NVIDIA GPU;
``resolve`` says why when it does not. The resolution of a run is written once, by the DAG's
``resolve_target`` task on the worker that runs the GPU tasks, to ``<run>/decisions/target.json``,
and the later tasks read it from there.

Standard library only at import time: the DAG file imports ``task_placement`` when it is parsed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

TARGET_FILE = "target.json"
# Where the DAG sends its GPU tasks (docs/gpu.md): a Celery queue served by the GPU worker, and a pod
# template with a GPU for the KubernetesExecutor. Unset: the default queue, no template.
GPU_QUEUE_ENV = "PIPELINE_GPU_QUEUE"
GPU_POD_TEMPLATE_ENV = "PIPELINE_GPU_POD_TEMPLATE"


def gpu_names() -> list[str]:
    """Names of the NVIDIA GPUs CUDA sees (empty without a GPU, driver or CUDA build of torch)."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())]


def tensorrt_version() -> str | None:
    try:
        import tensorrt
    except ImportError:
        return None
    return str(tensorrt.__version__)


def tensorrt_missing(gpus: list[str] | tuple[str, ...], trt_version: str | None) -> str | None:
    """Why TensorRT cannot be used on this worker's GPU (None: it can, or there is no GPU to say it of)."""
    if gpus and trt_version is None:
        return (f"the tensorrt Python package is not installed (GPU {gpus[0]} is present): install "
                "tensorrt matching the CUDA driver, or serve the ONNX model with Triton's TensorRT accelerator")
    return None


def onnxruntime_gpu_providers() -> list[str]:
    """The GPU execution providers of the installed ONNX Runtime (empty for the CPU build)."""
    try:
        import onnxruntime
    except ImportError:
        return []
    return [name for name in onnxruntime.get_available_providers()
            if name in ("TensorrtExecutionProvider", "CUDAExecutionProvider")]


@dataclass(frozen=True)
class TargetResolution:
    """The run's target as the worker resolved it.

    Attributes:
        requested: the ``target`` param (auto, cpu, gpu, both).
        gpu_branch: whether the GPU stages run.
        prefer_gpu: whether promotion prefers a GPU candidate that passed every gate.
        gpus: the GPUs CUDA saw.
        tensorrt_version: the TensorRT the engines are built with (None: not installed).
        reason: why the GPU branch does not run, or what it will do.
    """

    requested: str
    gpu_branch: bool
    prefer_gpu: bool
    gpus: tuple[str, ...]
    tensorrt_version: str | None
    reason: str

    def to_dict(self) -> dict:
        return asdict(self) | {"gpus": list(self.gpus)}

    @classmethod
    def from_dict(cls, data: Mapping) -> TargetResolution:
        return cls(str(data["requested"]), bool(data["gpu_branch"]), bool(data["prefer_gpu"]), tuple(data["gpus"]),
                   data.get("tensorrt_version"), str(data["reason"]))


def resolve(requested: str, gpus: list[str] | tuple[str, ...], trt_version: str | None) -> TargetResolution:
    """The GPU branch runs for ``gpu``, ``both`` and ``auto`` when a GPU is visible; ``gpu`` and ``auto``
    (on a GPU) prefer GPU candidates for promotion, ``both`` lets every candidate compete."""
    gpus = tuple(gpus)
    if requested == "cpu":
        return TargetResolution(requested, False, False, gpus, trt_version,
                                "target is cpu: the GPU branch is switched off in the run's params")
    if not gpus:
        if requested == "auto":
            reason = "target auto: no NVIDIA GPU visible to CUDA on this worker, so the run builds for the CPU"
        else:
            reason = (f"target {requested} asked for, but no NVIDIA GPU is visible to CUDA on this worker: the GPU "
                      "tasks are skipped and the CPU candidates compete (run the GPU tasks on a GPU worker: "
                      f"{GPU_QUEUE_ENV} / {GPU_POD_TEMPLATE_ENV}, docs/gpu.md)")
        return TargetResolution(requested, False, False, gpus, trt_version, reason)
    engines = (f"TensorRT {trt_version} engines" if trt_version else
               "no TensorRT engines (the tensorrt package is not installed; the FP16 ONNX models are the GPU route)")
    prefer = requested in ("auto", "gpu")
    return TargetResolution(requested, True, prefer, gpus, trt_version,
                            f"target {requested}: building for {gpus[0]} with {engines}; "
                            + ("GPU candidates are preferred for promotion" if prefer else "every candidate competes"))


def write_resolution(decisions_dir: Path, resolution: TargetResolution) -> Path:
    decisions_dir.mkdir(parents=True, exist_ok=True)
    path = decisions_dir / TARGET_FILE
    temp = path.with_name(path.name + ".partial")
    temp.write_text(json.dumps(resolution.to_dict(), indent=2))
    temp.replace(path)
    return path


def read_resolution(decisions_dir: Path) -> TargetResolution | None:
    """The run's resolution, or None before ``resolve_target`` ran (a run from before the GPU branch)."""
    path = decisions_dir / TARGET_FILE
    return TargetResolution.from_dict(json.loads(path.read_text())) if path.exists() else None


def task_placement(environ: Mapping[str, str]) -> dict:
    """Operator arguments that put a GPU task on a GPU worker: the Celery queue and the Kubernetes pod
    template the deployment names (``PIPELINE_GPU_QUEUE``, ``PIPELINE_GPU_POD_TEMPLATE``); empty when
    neither is set (the local stack: one worker runs everything)."""
    placement: dict = {}
    if environ.get(GPU_QUEUE_ENV):
        placement["queue"] = environ[GPU_QUEUE_ENV]
    if environ.get(GPU_POD_TEMPLATE_ENV):
        placement["executor_config"] = {"pod_template_file": environ[GPU_POD_TEMPLATE_ENV]}
    return placement
