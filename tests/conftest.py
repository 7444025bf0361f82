"""Shared fixtures: tiny random models and generated data (no download), and the real local
services (MLflow, Triton) started once per test session on free loopback ports."""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    # Telemetry off, and Airflow's config kept away from ~/airflow, before anything imports them.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("AIRFLOW__USAGE_DATA_COLLECTION__ENABLED", "False")
    airflow_home = REPO_ROOT / ".pytest_cache" / "airflow_home"
    airflow_home.mkdir(parents=True, exist_ok=True)
    os.environ["AIRFLOW_HOME"] = str(airflow_home)
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO_ROOT / "dags")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tasks.modeling import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture(scope="session")
def labelled_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tasks.modeling import generate_texts

    texts, labels = generate_texts(300, seed=1)
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    pd.DataFrame({"text": texts, "label": ["positive" if label else "negative" for label in labels]}).to_csv(
        path, index=False
    )
    return path


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory: pytest.TempPathFactory, labelled_csv: Path) -> Path:
    from tasks import data
    from tasks.config import DataConfig

    out = tmp_path_factory.mktemp("run") / "data"
    data.run(DataConfig(source=str(labelled_csv)), out)
    return out


@pytest.fixture(scope="session")
def trained_teacher(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, prepared_data: Path) -> Path:
    from tasks import finetune
    from tasks.config import FinetuneConfig

    out = tmp_path_factory.mktemp("run") / "teacher"
    # No early stopping: the tiny model's validation accuracy can sit at chance for a while before it
    # learns, and every test downstream needs a teacher that learned.
    config = FinetuneConfig(model=str(tiny_model), epochs=3, batch_size=16, learning_rate=5e-3, max_length=32,
                            early_stopping_patience=0)
    finetune.run(config, prepared_data, out)
    return out


@pytest.fixture(scope="session")
def exported_onnx(tmp_path_factory: pytest.TempPathFactory, trained_teacher: Path, prepared_data: Path) -> Path:
    from tasks import export
    from tasks.config import ExportConfig

    out = tmp_path_factory.mktemp("run") / "onnx_fp32"
    export.run(ExportConfig(), trained_teacher, prepared_data, out, max_length=32)
    return out


@pytest.fixture(scope="session")
def airflow_database(tmp_path_factory: pytest.TempPathFactory):
    """``install(home)``: an Airflow home at ``home`` with a migrated SQLite database, returning the env
    vars that point Airflow at it. `airflow db migrate` runs once per session (a minute of CPU on a
    small machine); every ``dag.test()`` module gets a copy of that database of its own."""
    template = tmp_path_factory.mktemp("airflow-template")

    def airflow_vars(home: Path) -> dict[str, str]:
        return {"AIRFLOW_HOME": str(home), "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
                "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}

    migrate = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=os.environ | airflow_vars(template),
                             capture_output=True, text=True, timeout=300)
    assert migrate.returncode == 0, migrate.stdout[-2000:] + migrate.stderr[-2000:]

    def install(home: Path) -> dict[str, str]:
        home.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template / "airflow.db", home / "airflow.db")
        return airflow_vars(home)

    return install


@pytest.fixture(scope="session")
def local_services(tmp_path_factory: pytest.TempPathFactory):
    """Real MLflow (without authentication) and Triton servers on free ports, in a throw-away stack home."""
    from opsctl.process import free_port
    from opsctl.services import LocalStack
    from opsctl.settings import StackSettings

    home = tmp_path_factory.mktemp("stack")
    ports = {name: str(free_port())
             for name in ("MLFLOW", "TRITON_HTTP", "TRITON_GRPC", "TRITON_METRICS", "AIRFLOW", "GATEWAY")}
    # MLflow without authentication here: tests/integration/test_mlflow_auth.py checks the stack's
    # authenticated MLflow, and test_local_stack.py the whole stack with it.
    env = {"PIPELINE_HOME": str(home), "PIPELINE_ASSETS_CACHE": str(home / "assets"), "PIPELINE_MLFLOW_AUTH": "false"}
    env.update({f"PIPELINE_{name}_PORT": port for name, port in ports.items()})
    settings = StackSettings.from_env(env)
    stack = LocalStack(settings)
    stack.up(with_airflow=False, progress=lambda _: None)
    yield stack
    # Clients the tests left unclosed (in reference cycles) keep HTTP connections open, and Triton waits
    # its whole exit timeout (30 s) for them before it stops: collect them first.
    gc.collect()
    stack.down(progress=lambda _: None)
