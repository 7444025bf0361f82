"""The monitor_serving DAG's task body: settings from the environment, config from the params."""

from __future__ import annotations

import json
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


def retrain_conf(value: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """The extra optimize_model params a trigger carries (e.g. the labelled data location), checked
    here so that a typo fails this monitor run instead of the re-optimization it starts."""
    from tasks.errors import ConfigError
    from tasks.pipeline import PARAM_PATHS, RUN_PARAMS

    if value in (None, ""):
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ConfigError(f"retrain_conf is not valid JSON ({error}): {value!r}") from None
    if not isinstance(value, Mapping):
        raise ConfigError(f"retrain_conf must be a JSON object of optimize_model params, not {type(value).__name__}")
    reserved = sorted(set(value) & (set(RUN_PARAMS) - {"force_retrain"}))
    if reserved:
        raise ConfigError(f"retrain_conf may not set {reserved}: the monitor fills them in")
    unknown = sorted(set(value) - set(PARAM_PATHS) - {"force_retrain"})
    if unknown:
        raise ConfigError(f"retrain_conf has unknown optimize_model params {unknown}; known: {sorted(PARAM_PATHS)}")
    return dict(value)


def check_window(env: Mapping[str, str], params: Mapping[str, Any], window_end: datetime | None,
                 optimization_active: bool, run_id: str) -> dict:
    """Judge the window that ends at ``window_end`` (now when None) and decide.

    ``trigger_conf`` in the result is what a trigger passes to optimize_model: the params from
    ``retrain_conf`` (param, or ``PIPELINE_RETRAIN_CONF``) plus the reason and the evidence.
    """
    from tasks.settings import safe_name

    extra = retrain_conf(params.get("retrain_conf") or env.get("PIPELINE_RETRAIN_CONF"))
    settings = MonitorSettings.from_env(env)
    end = window_end.timestamp() if window_end is not None else time.time()
    out_dir = settings.state_dir / "windows" / safe_name(run_id)
    result = run_window(settings, config_from_params(params), end, optimization_active, out_dir)
    result["trigger_conf"] = extra | result["trigger_conf"]
    return result
