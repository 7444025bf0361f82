"""The monitor_serving DAG's task body: settings from the environment, config from the params."""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from monitoring.drift import DriftConfig
from monitoring.monitor import MonitorConfig, MonitorSettings, run_window
from monitoring.policy import PolicyConfig

POLICY_PARAMS = ("persist_windows", "cooldown_minutes", "max_p95_ms", "max_p99_ms", "max_error_rate")


def config_from_params(params: Mapping[str, Any]) -> MonitorConfig:
    policy = PolicyConfig(**{name: params[name] for name in POLICY_PARAMS if name in params})
    drift = DriftConfig(min_rows=int(params.get("min_rows", DriftConfig().min_rows)))
    return MonitorConfig(window_minutes=float(params.get("window_minutes", 15)), drift=drift, policy=policy)


def check_window(env: Mapping[str, str], params: Mapping[str, Any], window_end: datetime | None,
                 optimization_active: bool, run_id: str) -> dict:
    """Judge the window that ends at ``window_end`` (now when None) and decide."""
    from tasks.settings import safe_name

    settings = MonitorSettings.from_env(env)
    end = window_end.timestamp() if window_end is not None else time.time()
    out_dir = settings.state_dir / "windows" / safe_name(run_id)
    return run_window(settings, config_from_params(params), end, optimization_active, out_dir)
