"""The environment of a throw-away local stack for tests: its home, asset cache and a free port for
every service (``PIPELINE_<SERVICE>_PORT``), and opsctl run against it as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SERVICES = ("MLFLOW", "TRITON_HTTP", "TRITON_GRPC", "TRITON_METRICS", "AIRFLOW", "GATEWAY")


def stack_env(home: Path, settings: dict[str, str] | None = None) -> dict[str, str]:
    """``PIPELINE_HOME`` and the asset cache under ``home``, a free port per service, then ``settings``
    (``PIPELINE_*`` names and their values)."""
    from opsctl.process import free_port

    env = {"PIPELINE_HOME": str(home), "PIPELINE_ASSETS_CACHE": str(home / "assets")}
    env.update({f"PIPELINE_{name}_PORT": str(free_port()) for name in SERVICES})
    return env | (settings or {})


def opsctl(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """opsctl as a user runs it: no MLflow account of their own (it signs in as the pipeline from the stack's home)."""
    user_env = {name: value for name, value in os.environ.items() if not name.startswith("MLFLOW_TRACKING_")}
    return subprocess.run([sys.executable, "-m", "opsctl.cli", *args], env=user_env | env, capture_output=True,
                          text=True, timeout=120)
