"""Where a pipeline run finds its services and writes its files; read from the environment once,
at the entrypoint (a DAG task body, the CLI, a test), and passed down as plain values."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tasks.errors import ConfigError


@dataclass(frozen=True)
class PipelineSettings:
    runs_dir: Path
    mlflow_tracking_uri: str
    triton_url: str
    triton_model_repository: Path
    assets_cache: Path
    experiment: str = "optimize_model"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> PipelineSettings:
        missing = [
            name
            for name in ("PIPELINE_RUNS_DIR", "PIPELINE_MLFLOW_TRACKING_URI", "PIPELINE_TRITON_URL",
                         "PIPELINE_TRITON_MODEL_REPOSITORY")
            if not env.get(name)
        ]
        if missing:
            raise ConfigError(
                f"environment variables {missing} are not set: start the stack with `make up` "
                "(it sets them for Airflow) or export them"
            )
        home = Path(env.get("PIPELINE_HOME", "."))
        return cls(
            runs_dir=Path(env["PIPELINE_RUNS_DIR"]),
            mlflow_tracking_uri=env["PIPELINE_MLFLOW_TRACKING_URI"],
            triton_url=env["PIPELINE_TRITON_URL"],
            triton_model_repository=Path(env["PIPELINE_TRITON_MODEL_REPOSITORY"]),
            assets_cache=Path(env.get("PIPELINE_ASSETS_CACHE") or home / "assets"),
            experiment=env.get("PIPELINE_EXPERIMENT", "optimize_model"),
        )

    def run_dir(self, run_id: str) -> Path:
        """The run-scoped folder of one pipeline run (stable for a given run id)."""
        return self.runs_dir / safe_name(run_id)


def safe_name(run_id: str) -> str:
    """A file-system-safe, deterministic folder name for an Airflow run id."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", run_id).strip("._")
    if not cleaned:
        raise ConfigError(f"run id {run_id!r} has no usable characters")
    return cleaned
