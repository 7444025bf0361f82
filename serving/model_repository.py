"""Write Triton model repositories: typed config -> ``config.pbtxt``; versions written atomically.

Config fields come only from Triton's model configuration schema, so a repository written here
loads unchanged in the official Triton container (real ONNX Runtime backend).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

_DATA_TYPES = {"int64": "TYPE_INT64", "int32": "TYPE_INT32", "fp32": "TYPE_FP32", "fp16": "TYPE_FP16",
               "string": "TYPE_STRING"}


class RepositoryError(RuntimeError):
    """The model repository is missing something or a config value is invalid."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str  # key of _DATA_TYPES
    dims: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.data_type not in _DATA_TYPES:
            raise RepositoryError(f"tensor {self.name}: data_type {self.data_type!r} not in {sorted(_DATA_TYPES)}")
        if not self.dims or any(dim == 0 or dim < -1 for dim in self.dims):
            raise RepositoryError(f"tensor {self.name}: dims {self.dims} must be positive or -1 (variable)")


@dataclass(frozen=True)
class OnnxModelConfig:
    """The Triton configuration of one ONNX classifier.

    Attributes:
        name: Triton model name (folder name).
        inputs / outputs: tensors without the batch dimension.
        max_batch_size: largest batch Triton may form (0 disables batching).
        instances: CPU model instances.
        intra_op_threads: ONNX Runtime threads per instance (0 = library default; Triton's backend is
            known to be slow on CPU with defaults, so the pipeline sets it).
        versions_kept: how many newest versions stay loaded (1: the new version replaces the old).
    """

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int = 32
    instances: int = 1
    intra_op_threads: int = 0
    versions_kept: int = 1
    labels: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise RepositoryError(f"model name {self.name!r} must be letters, digits, '_' or '-'")
        if self.max_batch_size < 0 or self.instances < 1 or self.intra_op_threads < 0 or self.versions_kept < 1:
            raise RepositoryError("max_batch_size >= 0, instances >= 1, intra_op_threads >= 0, versions_kept >= 1")


def classifier_config(name: str, num_labels: int, intra_op_threads: int = 0) -> OnnxModelConfig:
    """The config of a classifier exported by tasks.export (input_ids, attention_mask -> logits)."""
    return OnnxModelConfig(
        name=name,
        inputs=(TensorSpec("input_ids", "int64", (-1,)), TensorSpec("attention_mask", "int64", (-1,))),
        outputs=(TensorSpec("logits", "fp32", (num_labels,)),),
        intra_op_threads=intra_op_threads,
    )


def render_config(config: OnnxModelConfig) -> str:
    """``config.pbtxt`` text for ``config``."""

    def tensors(specs: tuple[TensorSpec, ...]) -> str:
        items = [
            f'  {{ name: "{spec.name}" data_type: {_DATA_TYPES[spec.data_type]} dims: [ {", ".join(map(str, spec.dims))} ] }}'
            for spec in specs
        ]
        return ",\n".join(items)

    lines = [
        f'name: "{config.name}"',
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {config.max_batch_size}",
        f"version_policy: {{ latest {{ num_versions: {config.versions_kept} }} }}",
        f"input [\n{tensors(config.inputs)}\n]",
        f"output [\n{tensors(config.outputs)}\n]",
        f"instance_group [ {{ count: {config.instances} kind: KIND_CPU }} ]",
        f'parameters {{ key: "intra_op_thread_count" value: {{ string_value: "{config.intra_op_threads}" }} }}',
        'parameters { key: "inter_op_thread_count" value: { string_value: "1" } }',
    ]
    return "\n".join(lines) + "\n"


def versions(repository: Path, model: str) -> list[int]:
    """Numeric version folders of ``model``, ascending."""
    folder = repository / model
    if not folder.exists():
        return []
    return sorted(int(entry.name) for entry in folder.iterdir() if entry.is_dir() and entry.name.isdigit())


def write_version(repository: Path, config: OnnxModelConfig, model_dir: Path,
                  files: tuple[str, ...] = ("model.onnx",)) -> int:
    """Copy ``files`` of ``model_dir`` into a new version folder and refresh ``config.pbtxt``.

    The version is assembled under a hidden temporary name and renamed into place, so Triton never
    sees a half-written version. Returns the new version number.
    """
    missing = [name for name in files if not (model_dir / name).exists()]
    if missing:
        raise RepositoryError(f"Could not find {missing} in {model_dir}")
    folder = repository / config.name
    folder.mkdir(parents=True, exist_ok=True)
    version = (versions(repository, config.name) or [0])[-1] + 1
    staging = folder / f".incoming-{version}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for name in files:
        shutil.copy2(model_dir / name, staging / name)
    # ONNX external data files travel with the model.
    for extra in model_dir.glob("*.onnx.data"):
        shutil.copy2(extra, staging / extra.name)
    _write_text_atomic(folder / "config.pbtxt", render_config(config))
    staging.rename(folder / str(version))
    return version


def remove_version(repository: Path, model: str, version: int) -> None:
    shutil.rmtree(repository / model / str(version), ignore_errors=True)


def _write_text_atomic(path: Path, text: str) -> None:
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(text)
    os.replace(temp, path)
