"""Closed sets and the result every step returns."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any


class StepStatus(str, Enum):
    SUCCESS = "success"
    SKIPPED = "skipped"
    FAILED = "failed"


class ModelFormat(str, Enum):
    PYTORCH = "pytorch"
    PYTORCH_DYNAMIC_INT8 = "pytorch_dynamic_int8"  # torch.ao dynamic quantization: a baseline only
    ONNX = "onnx"
    TENSORRT_PLAN = "tensorrt_plan"  # a serialized TensorRT engine (model.plan), specific to a GPU model


@dataclass(frozen=True)
class StepResult:
    """What a step hands to the next one: where its outputs are and what it measured.

    ``uris`` maps a role ("model", "onnx", "predictions", ...) to a path or URI string;
    ``metrics`` holds scalars only; ``reason`` says why a step was SKIPPED or FAILED.
    """

    step: str
    status: StepStatus
    uris: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    info: dict[str, str] = field(default_factory=dict)
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = self.status.value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepResult:
        return cls(
            step=data["step"],
            status=StepStatus(data["status"]),
            uris=dict(data.get("uris", {})),
            metrics={key: float(value) for key, value in data.get("metrics", {}).items()},
            info=dict(data.get("info", {})),
            reason=data.get("reason", ""),
        )

    def uri(self, role: str) -> str:
        try:
            return self.uris[role]
        except KeyError:
            raise KeyError(f"step {self.step!r} produced no {role!r} output; it has {sorted(self.uris)}") from None

    def save(self, path: Path) -> None:
        write_json_atomic(path, self.to_dict())


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary name in the same folder, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    temp.replace(path)


@contextmanager
def staged_dir(out_dir: Path) -> Iterator[Path]:
    """Yield an empty ``<out_dir>.partial`` folder; when the block succeeds it replaces ``out_dir``.

    A step that fails part-way leaves the previous output (if any) untouched and its partial
    output beside it for inspection; a re-run starts the partial folder afresh. The previous
    output is moved aside (``.old``) before the new one is renamed in, so no moment exists at
    which a crash loses both.
    """
    staging = out_dir.with_name(out_dir.name + ".partial")
    previous = out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    yield staging
    shutil.rmtree(previous, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(previous)
    staging.rename(out_dir)
    shutil.rmtree(previous, ignore_errors=True)
