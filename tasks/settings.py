"""Where a pipeline run finds its services and writes its files; read from the environment once,
at the entrypoint (a DAG task body, the CLI, a test), and passed down as plain values."""

from __future__ import annotations

import re
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.errors import ConfigError

if TYPE_CHECKING:
    from monitoring.monitor import MonitorSettings

# The Airflow connection that holds the pipeline's MLflow account (login and password).
MLFLOW_CONNECTION_ID = "mlflow_default"


@dataclass(frozen=True)
class PipelineSettings:
    runs_dir: Path
    mlflow_tracking_uri: str
    triton_url: str
    triton_model_repository: Path
    assets_cache: Path
    experiment: str = "optimize_model"
    # What the monitor_serving task reads (see monitor_settings); optimize_model's tasks do not need it.
    prediction_log_url: str | None = None
    serving_model: str = "text_classifier"
    monitor_state_dir: Path | None = None
    gateway_url: str | None = None
    triton_metrics_url: str | None = None
    retrain_conf: str = ""
    # The TensorRT of the Triton that serves the engines this worker builds (the GPU image sets it).
    triton_tensorrt: str | None = None

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
            prediction_log_url=env.get("PIPELINE_PREDICTION_LOG_URL") or None,
            serving_model=env.get("PIPELINE_SERVING_MODEL") or "text_classifier",
            monitor_state_dir=home / "monitoring" if env.get("PIPELINE_HOME") else None,
            gateway_url=env.get("PIPELINE_GATEWAY_URL") or None,
            triton_metrics_url=env.get("PIPELINE_TRITON_METRICS_URL") or None,
            retrain_conf=env.get("PIPELINE_RETRAIN_CONF") or "",
            triton_tensorrt=env.get("PIPELINE_TRITON_TENSORRT") or None,
        )

    @classmethod
    def in_airflow_task(cls, environ: MutableMapping[str, str]) -> PipelineSettings:
        """``from_env`` inside an Airflow task, after exporting the MLflow credentials of the connection
        ``mlflow_default`` into ``environ`` (the process environment, where every MLflow client of the
        task, and its subprocesses, read them). Without that connection ``environ`` is left as it is."""
        environ.update(mlflow_connection_credentials(MLFLOW_CONNECTION_ID))
        return cls.from_env(environ)

    def monitor_settings(self, served: str | None = None) -> MonitorSettings:
        """The settings of a monitor task, from the same environment as the pipeline's: of the default
        served model (``served`` None), else of the served model ``served``, with its state in its own
        folder (``monitoring/<served>/``)."""
        from monitoring.monitor import MonitorSettings

        missing = [name for name, value in (("PIPELINE_PREDICTION_LOG_URL", self.prediction_log_url),
                                            ("PIPELINE_HOME", self.monitor_state_dir)) if value is None]
        if missing:
            raise ConfigError(f"environment variables {missing} are not set: the monitor needs them; start the "
                              "stack with `make up` (it sets them for Airflow) or export them")
        return MonitorSettings(
            prediction_log_url=self.prediction_log_url,
            model_repository=self.triton_model_repository,
            serving_model=served or self.serving_model,
            mlflow_tracking_uri=self.mlflow_tracking_uri,
            state_dir=self.monitor_state_dir / served if served else self.monitor_state_dir,
            gateway_url=self.gateway_url,
            triton_metrics_url=self.triton_metrics_url,
            retrain_conf=self.retrain_conf,
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


def mlflow_connection_credentials(connection_id: str) -> dict[str, str]:
    """``MLFLOW_TRACKING_USERNAME`` and ``MLFLOW_TRACKING_PASSWORD`` from an Airflow connection's login and
    password ({} when the connection is not defined or has no login). Only for Airflow tasks: the one
    place in ``tasks`` that imports Airflow, inside the call."""
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        connection = BaseHook.get_connection(connection_id)
    except AirflowNotFoundException:
        return {}
    if not connection.login:
        return {}
    return {"MLFLOW_TRACKING_USERNAME": connection.login, "MLFLOW_TRACKING_PASSWORD": connection.password or ""}
