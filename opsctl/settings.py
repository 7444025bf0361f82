"""One settings object for the local stack, built from the environment at the entrypoint."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from opsctl import databases
from serving.model_repository import DEFAULT_MODEL
from tasks.config import REGISTERED_MODEL
from tasks.served_models import DEFAULT_EXTRA_MODELS, ServedModel, served_models

REPO_ROOT = Path(__file__).resolve().parent.parent

# Usage data off for every process the stack starts (MLflow 3, Evidently, Airflow).
TELEMETRY_OFF = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "AIRFLOW__USAGE_DATA_COLLECTION__ENABLED": "False",
    "SCARF_ANALYTICS": "false",
}


class SettingsError(ValueError):
    """A PIPELINE_* environment variable holds a value the stack cannot use."""


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None
    if not 0 < value < 65536:
        raise SettingsError(f"{name}={value} is outside 1..65535")
    return value


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = (env.get(name) or "").strip().lower()
    if raw == "":
        return default
    if raw not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise SettingsError(f"{name}={env[name]!r} is not a switch: use true or false")
    return raw in ("1", "true", "yes", "on")


def _production_urls(env: Mapping[str, str]) -> tuple[str | None, str | None]:
    """``PIPELINE_DATABASE_URL`` and ``PIPELINE_CELERY_BROKER_URL``, checked (None where unset)."""
    database = (env.get("PIPELINE_DATABASE_URL") or "").strip() or None
    broker = (env.get("PIPELINE_CELERY_BROKER_URL") or "").strip() or None
    try:
        if database is not None:
            databases.check_server_url(database)
        if broker is not None:
            databases.check_broker_url(broker)
    except ValueError as error:
        raise SettingsError(str(error)) from None
    if broker is not None and database is None:
        raise SettingsError("PIPELINE_CELERY_BROKER_URL needs PIPELINE_DATABASE_URL too: the CeleryExecutor keeps "
                            "Airflow's metadata and Celery's results in PostgreSQL (SQLite allows one process only). "
                            "Set PIPELINE_DATABASE_URL=postgresql://USER@HOST:PORT/postgres, or unset the broker")
    return database, broker


@dataclass(frozen=True)
class StackSettings:
    """Where the local stack keeps its state and which loopback ports it uses.

    Everything lives under ``home`` (default ``<repo>/.stack``): databases, artifacts, the
    Triton model repository, logs and pid files. Deleting that folder resets the stack.

    With ``database_url`` (a PostgreSQL server) the databases are on that server instead, one per
    component and stack (``opsctl/databases.py``); with ``celery_broker_url`` as well, Airflow runs
    the CeleryExecutor with ``celery_workers`` workers on that Redis broker.
    """

    home: Path
    repo_root: Path = REPO_ROOT
    host: str = "127.0.0.1"
    mlflow_port: int = 5000
    triton_http_port: int = 8000
    triton_grpc_port: int = 8001
    triton_metrics_port: int = 8002
    airflow_port: int = 8080
    gateway_port: int = 8090
    serving_model: str = DEFAULT_MODEL
    registered_model: str = REGISTERED_MODEL  # the MLflow registered model whose alias the reconcile loop follows
    extra_models: str = DEFAULT_EXTRA_MODELS  # served beside the default one (tasks/served_models.py)
    reconcile_interval_s: float = 15.0
    airflow_parallelism: int = 2
    # Seconds without a task heartbeat before the scheduler fails the task (a dead worker); Airflow's default.
    airflow_task_heartbeat_timeout_s: int = 300
    # MLflow's basic-auth app: anonymous requests refused, accounts for the pipeline and a reviewer.
    mlflow_auth: bool = True
    database_url: str | None = None  # a PostgreSQL server: the production configuration; None: SQLite files
    celery_broker_url: str | None = None  # a Redis broker: Airflow's CeleryExecutor; None: LocalExecutor
    celery_workers: int = 2
    celery_worker_concurrency: int = 1
    assets_cache: Path = Path.home() / ".cache" / "transformer-optimization-pipeline"
    venv: Path = REPO_ROOT / ".venv"
    triton_venv: Path = REPO_ROOT / ".venv-triton"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> StackSettings:
        """Build settings from ``PIPELINE_*`` variables; unset ones take the defaults."""
        home = Path(env.get("PIPELINE_HOME") or REPO_ROOT / ".stack").resolve()
        cache = env.get("PIPELINE_ASSETS_CACHE")
        database_url, celery_broker_url = _production_urls(env)
        return cls(
            home=home,
            mlflow_port=_int(env, "PIPELINE_MLFLOW_PORT", 5000),
            triton_http_port=_int(env, "PIPELINE_TRITON_HTTP_PORT", 8000),
            triton_grpc_port=_int(env, "PIPELINE_TRITON_GRPC_PORT", 8001),
            triton_metrics_port=_int(env, "PIPELINE_TRITON_METRICS_PORT", 8002),
            airflow_port=_int(env, "PIPELINE_AIRFLOW_PORT", 8080),
            airflow_task_heartbeat_timeout_s=_int(env, "PIPELINE_AIRFLOW_TASK_HEARTBEAT_TIMEOUT_S", 300),
            gateway_port=_int(env, "PIPELINE_GATEWAY_PORT", 8090),
            serving_model=env.get("PIPELINE_SERVING_MODEL") or DEFAULT_MODEL,
            registered_model=env.get("PIPELINE_REGISTERED_MODEL") or REGISTERED_MODEL,
            extra_models=env.get("PIPELINE_EXTRA_MODELS", DEFAULT_EXTRA_MODELS),
            reconcile_interval_s=float(env.get("PIPELINE_RECONCILE_INTERVAL_S") or 15.0),
            mlflow_auth=_flag(env, "PIPELINE_MLFLOW_AUTH", True),
            assets_cache=Path(cache).resolve() if cache else cls.assets_cache,
            database_url=database_url,
            celery_broker_url=celery_broker_url,
        )

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def pids_dir(self) -> Path:
        return self.home / "run"

    @property
    def mlflow_dir(self) -> Path:
        return self.home / "mlflow"

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.host}:{self.mlflow_port}"

    @property
    def mlflow_credentials_file(self) -> Path:
        """Passwords of MLflow's accounts (admin, pipeline, reviewer) and its CSRF key: owner-only JSON."""
        return self.home / "mlflow-credentials.json"

    @property
    def mlflow_auth_config(self) -> Path:
        """The basic-auth app's configuration (no secret in it: the admin password goes by environment)."""
        return self.mlflow_dir / "basic_auth.ini"

    @property
    def mlflow_backend_store_url(self) -> str:
        """MLflow's tracking store and model registry (SQLite in the stack's home, or the stack's PostgreSQL
        database)."""
        return self._database("mlflow", self.mlflow_dir / "mlflow.db")

    @property
    def mlflow_auth_database_url(self) -> str:
        """Where the basic-auth app keeps its users and permissions (beside the tracking store)."""
        return self._database("mlflow_auth", self.mlflow_dir / "basic_auth.db")

    @property
    def stack_name(self) -> str:
        """The name that sets this stack's databases and broker keys apart from other stacks' (its home's)."""
        return databases.stack_name(self.home)

    @property
    def database_names(self) -> dict[str, str]:
        """The stack's PostgreSQL database per role; empty when the stack runs on SQLite."""
        return databases.database_names(self.stack_name) if self.database_url else {}

    def _database(self, role: str, sqlite_file: Path) -> str:
        if self.database_url is None:
            return f"sqlite:///{sqlite_file}"
        return databases.database_url(self.database_url, self.database_names[role])

    @property
    def airflow_database_url(self) -> str:
        """Airflow's metadata database."""
        return self._database("airflow", self.airflow_home / "airflow.db")

    @property
    def celery_result_backend(self) -> str:
        """Where Celery keeps task results: Airflow's own database (Celery's ``db+`` SQLAlchemy form)."""
        return f"db+{self.airflow_database_url}"

    @property
    def broker_key_prefix(self) -> str:
        return databases.broker_key_prefix(self.stack_name)

    @property
    def triton_dir(self) -> Path:
        return self.home / "triton"

    @property
    def triton_model_repository(self) -> Path:
        return self.triton_dir / "models"

    @property
    def triton_http_url(self) -> str:
        return f"{self.host}:{self.triton_http_port}"

    @property
    def triton_grpc_url(self) -> str:
        return f"{self.host}:{self.triton_grpc_port}"

    @property
    def gateway_url(self) -> str:
        return f"http://{self.host}:{self.gateway_port}"

    @property
    def prediction_log_url(self) -> str:
        """SQLAlchemy URL of the prediction log (SQLite in the stack's home, or the stack's PostgreSQL database)."""
        return self._database("predictions", self.home / "predictions.db")

    @property
    def gateway_journal_dir(self) -> Path:
        """The gateway's prediction journal: under the stack's home in both configurations (beside the SQLite
        log as before, or a folder of its own when the log is on PostgreSQL)."""
        return self.home / ("prediction-journal" if self.database_url else "predictions.db.journal")

    @property
    def airflow_home(self) -> Path:
        return self.home / "airflow"

    @property
    def airflow_url(self) -> str:
        return f"http://{self.host}:{self.airflow_port}"

    @property
    def runs_dir(self) -> Path:
        """Run-scoped artifacts of pipeline runs (one folder per Airflow run id)."""
        return self.home / "runs"

    @property
    def airflow_passwords_file(self) -> Path:
        return self.airflow_home / "simple_auth_manager_passwords.json.generated"

    def pipeline_environment(self) -> dict[str, str]:
        """Variables the pipeline tasks read (see tasks.settings.PipelineSettings.from_env)."""
        return {
            "PIPELINE_HOME": str(self.home),
            "PIPELINE_ASSETS_CACHE": str(self.assets_cache),
            "PIPELINE_MLFLOW_TRACKING_URI": self.mlflow_url,
            "PIPELINE_TRITON_URL": self.triton_http_url,
            "PIPELINE_TRITON_MODEL_REPOSITORY": str(self.triton_model_repository),
            "PIPELINE_RUNS_DIR": str(self.runs_dir),
            "PIPELINE_GATEWAY_URL": self.gateway_url,
            "PIPELINE_TRITON_METRICS_URL": f"http://{self.host}:{self.triton_metrics_port}/metrics",
            "PIPELINE_PREDICTION_LOG_URL": self.prediction_log_url,
            "PIPELINE_SERVING_MODEL": self.serving_model,
            "PIPELINE_REGISTERED_MODEL": self.registered_model,
            "PIPELINE_EXTRA_MODELS": self.extra_models,
        }

    def served_models(self) -> tuple[ServedModel, ...]:
        """Every served model, the default first (a ConfigError names a bad ``PIPELINE_EXTRA_MODELS`` entry)."""
        return served_models({"PIPELINE_SERVING_MODEL": self.serving_model,
                              "PIPELINE_REGISTERED_MODEL": self.registered_model,
                              "PIPELINE_EXTRA_MODELS": self.extra_models})


AIRFLOW_SECRETS = ("jwt_secret", "api_secret_key")


def load_or_create_secrets(path: Path, names: tuple[str, ...] = AIRFLOW_SECRETS) -> dict[str, str]:
    """Random secrets named ``names``, kept in ``path`` (owner-only) across restarts.

    Names missing from an existing file are generated and added; the values already there are kept.
    """
    values: dict[str, str] = {}
    if path.exists():
        try:
            values = json.loads(path.read_text())
        except ValueError:
            raise SettingsError(f"{path} is corrupt: delete it and restart the stack (new secrets are made)") from None
    missing = [name for name in names if not values.get(name)]
    if not missing:
        return values
    values.update({name: secrets.token_urlsafe(32) for name in missing})
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_suffix(".tmp")
    temp.unlink(missing_ok=True)
    # Created owner-only from the start: the secrets are never readable by others, not even briefly.
    with os.fdopen(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as handle:
        handle.write(json.dumps(values))
    temp.rename(path)
    return values
