"""The artifact manifest: a model folder's own description of what it holds.

Every step that produces a model writes ``manifest.json`` beside it: the format, the precision, the
runtime that serves it, the files that make it up, what it was made from, and a hash of the step
config that produced it. Evaluation (which predictor), registration (registrable or not) and
promotion (which Triton platform) read it instead of being told the format by their caller.

Standard library only: anything that handles a model folder can read a manifest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from enum import Enum
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any

from tasks.errors import PipelineError
from tasks.results import ModelFormat, write_json_atomic

MANIFEST_FILENAME = "manifest.json"
SCHEMA_VERSION = 1
# The steps that write a manifest into the folder they produce (named in the error for a folder without one).
WRITERS = ("tasks.finetune", "tasks.distill", "tasks.prune", "tasks.export", "tasks.quantize", "tasks.compile")


class ManifestError(PipelineError):
    """A model folder has no manifest, or its manifest is not valid."""


class Precision(str, Enum):
    """The numeric type the model's weights and compute are held in."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"


class Backend(str, Enum):
    """The runtime that runs the model."""

    TORCH = "torch"
    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"


class Structure(str, Enum):
    """The layout of the weights relative to the architecture's config.

    PRUNED: structurally pruned layers (each layer its own head and neuron count); loading needs
    ``pruning_plan.json`` from the same folder. SPARSE: dense shapes with zeroed weights.
    """

    DENSE = "dense"
    PRUNED = "pruned"
    SPARSE = "sparse"


# The runtime each format is served by unless a step says otherwise.
DEFAULT_BACKENDS: Mapping[ModelFormat, Backend] = MappingProxyType({
    ModelFormat.PYTORCH: Backend.TORCH,
    ModelFormat.PYTORCH_DYNAMIC_INT8: Backend.TORCH,
    ModelFormat.ONNX: Backend.ONNXRUNTIME,
    ModelFormat.TENSORRT_PLAN: Backend.TENSORRT,
})


@dataclass(frozen=True)
class ModelSource:
    """What a model was made from: a folder (or a hub model id) and its format."""

    path: str
    format: ModelFormat

    def __post_init__(self) -> None:
        object.__setattr__(self, "format", ModelFormat(self.format))


def config_hash(config: Any) -> str:
    """sha256 of ``config`` (a dataclass or a mapping) as canonical JSON: sorted keys, no whitespace."""
    data = asdict(config) if is_dataclass(config) and not isinstance(config, type) else dict(config)
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ArtifactManifest:
    """What a model folder holds and how it was made.

    Attributes:
        format: the file format of the model.
        precision: its weights' numeric type.
        backend: the runtime that serves it.
        files: the files that make up the model, relative to its folder (weights, external data,
            tokenizer, model config, pruning plan).
        source: the folder (or model id) it was made from, and that one's format.
        config_hash: sha256 of the step config that produced it (``config_hash``).
        step: the step's name, as in its ``StepResult`` (e.g. ``quantize_dynamic_int8``).
        created_by: the module that wrote it (e.g. ``tasks.quantize``).
        config_file: the record of that config written beside the model ("" when none).
        structure: dense, structurally pruned or sparse (see ``Structure``).
        details: further facts as strings (quantization mode, GPU, TensorRT version, ...).
    """

    format: ModelFormat
    precision: Precision
    backend: Backend
    files: tuple[str, ...]
    source: ModelSource
    config_hash: str
    step: str
    created_by: str
    config_file: str = ""
    structure: Structure = Structure.DENSE
    details: Mapping[str, str] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        for name, kind in (("format", ModelFormat), ("precision", Precision), ("backend", Backend),
                           ("structure", Structure)):
            object.__setattr__(self, name, kind(getattr(self, name)))
        object.__setattr__(self, "files", tuple(sorted(self.files)))
        object.__setattr__(self, "details", MappingProxyType({str(k): str(v) for k, v in self.details.items()}))
        if not self.files:
            raise ManifestError(f"a {self.format.value} manifest must list the model's files")
        for name in self.files:
            path = PurePosixPath(name)
            if path.is_absolute() or ".." in path.parts or name == MANIFEST_FILENAME:
                raise ManifestError(f"manifest file {name!r} must be a path inside the model folder")
        if len(self.config_hash) != 64 or any(char not in "0123456789abcdef" for char in self.config_hash):
            raise ManifestError(f"config_hash {self.config_hash!r} is not a sha256 hex digest (use config_hash())")
        if not self.step or not self.created_by:
            raise ManifestError("a manifest names its step and the module that created it")

    def to_dict(self) -> dict[str, Any]:
        data = {item.name: getattr(self, item.name) for item in fields(self)}
        data |= {"format": self.format.value, "precision": self.precision.value, "backend": self.backend.value,
                 "structure": self.structure.value, "files": list(self.files), "details": dict(self.details),
                 "source": {"path": self.source.path, "format": self.source.format.value}}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ArtifactManifest:
        source = data["source"]
        known = {item.name for item in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known}
                   | {"source": ModelSource(source["path"], source["format"]), "files": tuple(data["files"])})

    def write(self, folder: Path) -> Path:
        """Write ``folder/manifest.json`` atomically; every listed file must be in ``folder``."""
        missing = [name for name in self.files if not (Path(folder) / name).is_file()]
        if missing:
            raise ManifestError(f"{self.step}: manifest lists {missing}, which are not in {folder}")
        path = Path(folder) / MANIFEST_FILENAME
        write_json_atomic(path, self.to_dict())
        return path

    @classmethod
    def read(cls, folder: Path) -> ArtifactManifest:
        """The manifest of ``folder``; ``ManifestError`` when it is missing or invalid."""
        path = Path(folder) / MANIFEST_FILENAME
        if not path.is_file():
            raise ManifestError(
                f"{folder} has no {MANIFEST_FILENAME}: it is written by the step that made the model "
                f"({', '.join(WRITERS)}); re-run that step, or pass the model's format explicitly")
        try:
            data = json.loads(path.read_text())
            if data.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
                raise ValueError(f"schema_version {data['schema_version']} is not {SCHEMA_VERSION}")
            return cls.from_dict(data)
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ManifestError(f"{path} is not a valid manifest ({type(error).__name__}: {error}); re-run the step "
                                f"that made the model ({', '.join(WRITERS)})") from error


def read_manifest(folder: Path) -> ArtifactManifest | None:
    """The manifest of ``folder``, or None when it has none (a folder made by another tool or an older
    version of the pipeline); an invalid manifest still raises ``ManifestError``."""
    if not (Path(folder) / MANIFEST_FILENAME).exists():
        return None
    return ArtifactManifest.read(folder)


def model_files(folder: Path, records: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Every file under ``folder`` (relative, POSIX), except the manifest and the step's ``records``."""
    skipped = {MANIFEST_FILENAME, *records}
    root = Path(folder)
    return tuple(sorted(path.relative_to(root).as_posix() for path in root.rglob("*")
                        if path.is_file() and path.relative_to(root).as_posix() not in skipped))


def write_manifest(folder: Path, *, format: ModelFormat, precision: Precision, step: str, created_by: str,
                   source: ModelSource, config: Any, config_file: str = "", backend: Backend | None = None,
                   structure: Structure = Structure.DENSE, details: Mapping[str, str] | None = None,
                   ) -> ArtifactManifest:
    """Describe the model a step has just written into ``folder`` and write ``manifest.json`` there.

    Lists every file of the folder but the manifest and ``config_file`` (the config record), so call
    it last, once the folder is complete."""
    manifest = ArtifactManifest(
        format=format, precision=precision, backend=backend or DEFAULT_BACKENDS[ModelFormat(format)],
        files=model_files(folder, (config_file,) if config_file else ()), source=source,
        config_hash=config_hash(config), step=step, created_by=created_by, config_file=config_file,
        structure=structure, details=details or {},
    )
    manifest.write(folder)
    return manifest
