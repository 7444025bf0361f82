"""The services of the local stack: what runs, with which environment, in which order."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from opsctl import databases, mlflow_auth
from opsctl.process import ProcessManager, ServiceError, ServiceSpec, free_port
from opsctl.settings import TELEMETRY_OFF, StackSettings, load_or_create_secrets
from serving.triton_server import TritonPorts, discover_runtime, prepare_backends, server_command, server_environment

AIRFLOW_COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")


def base_environment(settings: StackSettings, inherited: Mapping[str, str]) -> dict[str, str]:
    """The inherited environment plus telemetry off and the pipeline's own variables."""
    env = {key: value for key, value in inherited.items() if not key.startswith("AIRFLOW__")}
    env.update(TELEMETRY_OFF)
    env.update(settings.pipeline_environment())
    env["PATH"] = f"{settings.venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
    return env


def mlflow_spec(settings: StackSettings, env: dict[str, str],
                secrets: dict[str, str] | None = None) -> ServiceSpec:
    """MLflow on the stack's database (SQLite, or PostgreSQL) and local artifacts; with ``secrets`` (the stack's
    MLflow credentials), its basic-auth app: anonymous requests refused, the first admin password and the CSRF key passed by environment."""
    settings.mlflow_dir.mkdir(parents=True, exist_ok=True)
    argv = [str(settings.venv / "bin" / "mlflow"), "server", "--host", settings.host,
            "--port", str(settings.mlflow_port),
            "--backend-store-uri", settings.mlflow_backend_store_url,
            "--artifacts-destination", str(settings.mlflow_dir / "artifacts"), "--workers", "1"]
    server_env = dict(env)
    if secrets is not None:
        settings.mlflow_auth_config.write_text(mlflow_auth.auth_config(settings.mlflow_auth_database_url))
        argv += ["--app-name", "basic-auth"]
        server_env.update(mlflow_auth.server_environment(settings.mlflow_auth_config, secrets[mlflow_auth.ADMIN],
                                                         secrets["flask_secret_key"]))
    return ServiceSpec(
        name="mlflow",
        argv=argv,
        env=server_env,
        ports=(settings.mlflow_port,),
        health_url=f"{settings.mlflow_url}/health",
        cwd=settings.mlflow_dir,
    )


def mlflow_secrets(settings: StackSettings) -> dict[str, str] | None:
    """The stack's MLflow passwords and CSRF key (made at the first call, kept owner-only under the stack's
    home); None when the stack runs MLflow without authentication."""
    if not settings.mlflow_auth:
        return None
    return load_or_create_secrets(settings.mlflow_credentials_file, mlflow_auth.SECRET_NAMES)


def with_pipeline_credentials(env: dict[str, str], secrets: dict[str, str] | None) -> dict[str, str]:
    """``env`` plus the pipeline account's MLflow credentials (unchanged without authentication)."""
    if secrets is None:
        return dict(env)
    return env | mlflow_auth.client_environment(mlflow_auth.PIPELINE, secrets[mlflow_auth.PIPELINE])


def provision_mlflow_accounts(settings: StackSettings, secrets: dict[str, str]) -> list[str]:
    """The pipeline and reviewer accounts on the stack's MLflow (created at its first start; the reviewer may
    move the aliases of every served model's registered model)."""
    try:
        return mlflow_auth.provision_accounts(settings.mlflow_url, secrets[mlflow_auth.ADMIN], secrets,
                                              [model.registered for model in settings.served_models()])
    except mlflow_auth.AuthSetupError as error:
        raise ServiceError(f"{error}. Restore {settings.mlflow_credentials_file}, or delete it together with "
                           f"{settings.mlflow_dir / 'basic_auth.db'} and restart (the accounts are made again "
                           "with new passwords).") from None


def triton_spec(settings: StackSettings, env: dict[str, str], prepare: bool = True,
                model_repository: Path | None = None) -> ServiceSpec:
    """Triton's spec; ``prepare`` (re)builds its backends folder, which must not happen under a running server.
    ``model_repository`` serves another stack's repository (a second replica of the same models)."""
    runtime = discover_runtime(settings.triton_venv / "bin" / "python")
    repository = model_repository or settings.triton_model_repository
    repository.mkdir(parents=True, exist_ok=True)
    backends = settings.triton_dir / "backends"
    if prepare:
        prepare_backends(runtime, backends)
    ports = TritonPorts(settings.triton_http_port, settings.triton_grpc_port, settings.triton_metrics_port)
    return ServiceSpec(
        name="triton",
        argv=server_command(runtime, repository, backends, ports, host=settings.host),
        env=server_environment(runtime, env),
        ports=(ports.http, ports.grpc, ports.metrics),
        health_url=f"http://{settings.triton_http_url}/v2/health/ready",
        cwd=settings.triton_dir,
    )


@contextmanager
def standalone_triton(home: Path, model_repository: Path | None = None,
                      timeout_s: float = 180.0) -> Iterator[StackSettings]:
    """A Triton of its own on free loopback ports under ``home`` (serving ``model_repository``, by
    default its own), healthy on entry and stopped on exit: a benchmark's server, or a second
    replica of another stack's repository."""
    settings = StackSettings(home=home, triton_http_port=free_port(), triton_grpc_port=free_port(),
                             triton_metrics_port=free_port())
    spec = triton_spec(settings, base_environment(settings, os.environ), model_repository=model_repository)
    manager = ProcessManager(settings.pids_dir, settings.logs_dir)
    manager.start(spec)
    try:
        manager.wait_healthy(spec, timeout_s=timeout_s)
        yield settings
    finally:
        manager.stop("triton")


def gateway_spec(settings: StackSettings, env: dict[str, str]) -> ServiceSpec:
    """One gateway process (uvicorn) in front of Triton, logging predictions to the stack's database, its journal
    under the stack's home."""
    gateway_env = dict(env)
    gateway_env.update({
        "GATEWAY_TRITON_GRPC_URL": settings.triton_grpc_url,
        "GATEWAY_MODEL": settings.serving_model,
        "GATEWAY_MODELS": ",".join(model.served for model in settings.served_models()),
        "GATEWAY_PREDICTION_LOG_URL": settings.prediction_log_url,
        "GATEWAY_JOURNAL_DIR": str(settings.gateway_journal_dir),
    })
    return ServiceSpec(
        name="gateway",
        argv=[str(settings.venv / "bin" / "uvicorn"), "serving.gateway:app_from_env", "--factory",
              "--host", settings.host, "--port", str(settings.gateway_port), "--workers", "1", "--no-access-log"],
        env=gateway_env,
        ports=(settings.gateway_port,),
        health_url=f"{settings.gateway_url}/healthz",
        cwd=settings.repo_root,
    )


def reconcile_spec(settings: StackSettings, env: dict[str, str]) -> ServiceSpec:
    """The loop that makes Triton serve the version the MLflow alias names (tasks/reconcile.py), for each
    served model from its own registered model."""
    return ServiceSpec(
        name="reconcile",
        argv=[str(settings.venv / "bin" / "python"), "-m", "tasks.reconcile", "--mlflow", settings.mlflow_url,
              "--triton", settings.triton_http_url, "--repository", str(settings.triton_model_repository),
              *[argument for model in settings.served_models()
                for argument in ("--model", f"{model.served}={model.registered}")],
              "--interval", str(settings.reconcile_interval_s)],
        env=env,
        cwd=settings.repo_root,
    )


def airflow_environment(settings: StackSettings, env: dict[str, str],
                        mlflow_credentials: dict[str, str] | None = None) -> dict[str, str]:
    """Airflow 3 with simple auth manager, loopback only: on SQLite with the LocalExecutor, or on PostgreSQL (with
    the CeleryExecutor when the stack has a broker; ``executor_environment``). Its tasks get the pipeline's MLflow
    account from the connection ``mlflow_default`` (not from variables of their own)."""
    secrets = load_or_create_secrets(settings.home / "secrets.json")
    home = settings.airflow_home
    airflow_env = {name: value for name, value in env.items()
                   if name not in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    if mlflow_credentials is not None:
        airflow_env.update(mlflow_auth.airflow_connection_environment(
            settings.mlflow_url, mlflow_auth.PIPELINE, mlflow_credentials[mlflow_auth.PIPELINE]))
    airflow_env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(settings.repo_root / "dags"),
            "AIRFLOW__CORE__PARALLELISM": str(settings.airflow_parallelism),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(settings.airflow_passwords_file),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{settings.airflow_url}/execution/",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": settings.airflow_database_url,
            "AIRFLOW__API__HOST": settings.host,
            "AIRFLOW__API__PORT": str(settings.airflow_port),
            "AIRFLOW__API__BASE_URL": settings.airflow_url,
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__SECRET_KEY": secrets["api_secret_key"],
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets["jwt_secret"],
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "10",
            "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
            "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(settings.airflow_task_heartbeat_timeout_s),
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
        }
    )
    airflow_env.update(executor_environment(settings))
    return airflow_env


def executor_environment(settings: StackSettings) -> dict[str, str]:
    """The LocalExecutor, or with a broker the CeleryExecutor (the Celery provider's ``[celery]`` options): tasks
    queued on the stack's Redis under its own key prefix, results in Airflow's database, one task at a time per
    worker fetched (no prefetch: a free worker takes the next task)."""
    if settings.celery_broker_url is None:
        return {"AIRFLOW__CORE__EXECUTOR": "LocalExecutor"}
    return {
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__CELERY__BROKER_URL": settings.celery_broker_url,
        "AIRFLOW__CELERY__RESULT_BACKEND": settings.celery_result_backend,
        "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(settings.celery_worker_concurrency),
        "AIRFLOW__CELERY__WORKER_PREFETCH_MULTIPLIER": "1",
        "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__GLOBAL_KEYPREFIX": settings.broker_key_prefix,
    }


def celery_worker_names(settings: StackSettings) -> list[str]:
    """The Celery workers' Celery hostnames (``worker-<n>@<stack>``, unique per stack); none without a broker."""
    if settings.celery_broker_url is None:
        return []
    return [f"worker-{number}@{settings.stack_name}" for number in range(1, settings.celery_workers + 1)]


def celery_worker_specs(settings: StackSettings, env: dict[str, str], log_file) -> list[ServiceSpec]:
    """``airflow celery worker`` per name in ``celery_worker_names``. Each records its Celery hostname as the task
    instances' hostname (``opsctl.worker_hostname``), so the UI and the API say which worker ran a task."""
    specs = []
    for number, hostname in enumerate(celery_worker_names(settings), start=1):
        name = f"airflow-celery-worker-{number}"
        worker_env = env | {"AIRFLOW__CORE__HOSTNAME_CALLABLE": "opsctl.worker_hostname.worker_hostname",
                            "PIPELINE_CELERY_WORKER_HOSTNAME": hostname}
        specs.append(ServiceSpec(
            name=name,
            argv=[str(settings.venv / "bin" / "airflow"), "celery", "worker", "--celery-hostname", hostname,
                  "--concurrency", str(settings.celery_worker_concurrency), "--skip-serve-logs"],
            env=worker_env,
            cwd=settings.airflow_home,
            ready_check=_log_says_ready(log_file(name)),
        ))
    return specs


def _log_says_ready(log: Path):
    """A Celery worker is ready once its log, since its latest start, says ``ready.`` (connected to the broker)."""

    def check() -> bool:
        try:
            text = log.read_text(errors="replace")
        except FileNotFoundError:
            return False
        return " ready." in text.rsplit("==== starting", 1)[-1]

    return check


def airflow_db_migrate(settings: StackSettings, env: dict[str, str]) -> None:
    """Create or upgrade the Airflow metadata database (idempotent)."""
    settings.airflow_home.mkdir(parents=True, exist_ok=True)
    settings.logs_dir.mkdir(parents=True, exist_ok=True)
    with (settings.logs_dir / "airflow-db-migrate.log").open("ab") as log:
        result = subprocess.run(
            [str(settings.venv / "bin" / "airflow"), "db", "migrate"],
            env=env,
            cwd=settings.airflow_home,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            check=False,
        )
    if result.returncode != 0:
        raise ServiceError(
            f"`airflow db migrate` failed (exit {result.returncode}); see {settings.logs_dir / 'airflow-db-migrate.log'}"
        )


def airflow_specs(settings: StackSettings, env: dict[str, str]) -> list[ServiceSpec]:
    airflow = str(settings.venv / "bin" / "airflow")
    specs = []
    for component in AIRFLOW_COMPONENTS:
        argv = [airflow, component]
        if component == "api-server":
            argv += ["--host", settings.host, "--port", str(settings.airflow_port)]
        if component in ("scheduler", "triggerer"):
            # Their log servers would listen on all interfaces; the api-server reads task logs from disk.
            argv.append("--skip-serve-logs")
        specs.append(
            ServiceSpec(
                name=f"airflow-{component}",
                argv=argv,
                env=env,
                ports=(settings.airflow_port,) if component == "api-server" else (),
                health_url=f"{settings.airflow_url}/api/v2/monitor/health",
                cwd=settings.airflow_home,
                ready_check=_component_healthy(settings, component),
            )
        )
    return specs


def _component_healthy(settings: StackSettings, component: str):
    """Airflow's health endpoint reports scheduler, dag processor and triggerer heartbeats."""
    key = {"scheduler": "scheduler", "dag-processor": "dag_processor", "triggerer": "triggerer"}.get(component)

    def check() -> bool:
        if key is None:
            return True
        try:
            with urllib.request.urlopen(f"{settings.airflow_url}/api/v2/monitor/health", timeout=2) as response:  # noqa: S310
                body = json.load(response)
        except (urllib.error.URLError, OSError, ValueError):
            return False
        return (body.get(key) or {}).get("status") == "healthy"

    return check


class LocalStack:
    """The whole local stack: MLflow, Triton, the gateway and the Airflow services."""

    def __init__(self, settings: StackSettings, inherited_env: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        self.manager = ProcessManager(settings.pids_dir, settings.logs_dir, settings.host)
        self._env = base_environment(settings, os.environ if inherited_env is None else inherited_env)

    @property
    def service_names(self) -> list[str]:
        workers = [f"airflow-celery-worker-{number}"
                   for number, _ in enumerate(celery_worker_names(self.settings), start=1)]
        return ["mlflow", "triton", "gateway", "reconcile", *[f"airflow-{c}" for c in AIRFLOW_COMPONENTS], *workers]

    def up(self, *, with_airflow: bool = True, progress=print) -> None:
        """Start every service not yet running and wait until each is healthy (idempotent). MLflow comes
        first: with authentication its accounts must exist before any client signs in."""
        self.settings.home.mkdir(parents=True, exist_ok=True)
        self._create_databases(progress)
        secrets = mlflow_secrets(self.settings)
        env = with_pipeline_credentials(self._env, secrets)
        self._start([mlflow_spec(self.settings, env, secrets)], progress)
        if secrets is not None:
            created = provision_mlflow_accounts(self.settings, secrets)
            if created:
                progress(f"mlflow: created the accounts {', '.join(created)} (passwords in "
                         f"{self.settings.mlflow_credentials_file})")
        triton_running = self.manager.state("triton").running
        specs = [triton_spec(self.settings, env, prepare=not triton_running),
                 gateway_spec(self.settings, env), reconcile_spec(self.settings, env)]
        if with_airflow:
            airflow_env = airflow_environment(self.settings, env, secrets)
            if not all(self.manager.state(spec.name).running for spec in airflow_specs(self.settings, airflow_env)):
                progress("airflow: migrating the metadata database")
                airflow_db_migrate(self.settings, airflow_env)
            specs += airflow_specs(self.settings, airflow_env)
            specs += celery_worker_specs(self.settings, airflow_env, self.manager.log_file)
        self._start(specs, progress)

    def _create_databases(self, progress) -> None:
        """The stack's PostgreSQL databases, created when missing (nothing to do on SQLite)."""
        names = list(self.settings.database_names.values())
        if not names:
            return
        try:
            created = databases.create_databases(self.settings.database_url, names)
        except databases.DatabaseSetupError as error:
            raise ServiceError(str(error)) from None
        if created:
            progress(f"postgresql: created the databases {', '.join(created)}")

    def purge(self, progress=print) -> list[str]:
        """Drop the stack's PostgreSQL databases and delete its keys on the Celery broker; refuses while any of its
        services runs (it stops nothing). Returns what it dropped; the files under the stack's home stay."""
        running = [name for name in self._known_services() if self.manager.state(name).running]
        if running:
            raise ServiceError(f"the stack still runs ({', '.join(running)}): stop it with `opsctl down` (or "
                               "`make down-postgres`) first; purge stops nothing")
        if self.settings.database_url is None:
            progress("nothing to drop: the stack runs on SQLite (PIPELINE_DATABASE_URL is not set); its files are "
                     f"under {self.settings.home}")
            return []
        try:
            names = list(self.settings.database_names.values())
            dropped = databases.drop_databases(self.settings.database_url, names)
            keys = (databases.delete_broker_keys(self.settings.celery_broker_url, self.settings.broker_key_prefix)
                    if self.settings.celery_broker_url else None)
        except databases.DatabaseSetupError as error:
            raise ServiceError(str(error)) from None
        progress(f"postgresql: dropped {', '.join(dropped) if dropped else 'nothing (no database of this stack)'}")
        if keys is not None:
            progress(f"redis: deleted {keys} keys under {self.settings.broker_key_prefix!r}")
        return dropped + ([f"{keys} broker keys"] if keys else [])

    def _start(self, specs: list[ServiceSpec], progress) -> None:
        for spec in specs:
            pid, started = self.manager.start(spec)
            progress(f"{spec.name}: {'started' if started else 'already running'} (pid {pid})")
        for spec in specs:
            self.manager.wait_healthy(spec, timeout_s=180.0)
            progress(f"{spec.name}: healthy")

    def _known_services(self) -> list[str]:
        """``service_names`` plus Celery workers a start with other settings left recorded (a stack started with a
        broker and stopped without it set still has its workers stopped)."""
        recorded = sorted(path.stem for path in self.settings.pids_dir.glob("airflow-celery-worker-*.pid"))
        return self.service_names + [name for name in recorded if name not in self.service_names]

    def down(self, progress=print) -> None:
        """Stop every running service, the Celery workers and Airflow first (its tasks talk to MLflow and Triton)."""
        for name in reversed(self._known_services()):
            if self.manager.stop(name):
                progress(f"{name}: stopped")

    def status(self) -> dict[str, dict]:
        return {
            name: {"running": state.running, "pid": state.pid, "log": str(state.log_file)}
            for name in self.service_names
            for state in [self.manager.state(name)]
        }

    def airflow_admin_password(self) -> str | None:
        path = self.settings.airflow_passwords_file
        if not path.exists():
            return None
        return json.loads(path.read_text()).get("admin")

    def environment(self) -> dict[str, str]:
        """The environment tools need to reach this stack (used by the demo and tests), with the pipeline's
        MLflow account when MLflow runs with authentication."""
        return with_pipeline_credentials(self._env, mlflow_secrets(self.settings))

    def mlflow_password(self, account: str) -> str | None:
        """An MLflow account's password from the stack's credentials file (None: no such file or account)."""
        path = self.settings.mlflow_credentials_file
        if not path.exists():
            return None
        return json.loads(path.read_text()).get(account)

