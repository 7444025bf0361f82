"""The monitor_serving DAG's task body: config from the params, the window judged and decided."""

from __future__ import annotations

import json
import time
from collections.abc import Collection, Mapping
from datetime import datetime
from typing import Any

from monitoring.drift import DriftConfig
from monitoring.errors import MonitoringConfigError
from monitoring.monitor import MonitorConfig, MonitorSettings, run_window
from monitoring.policy import PolicyConfig

POLICY_PARAMS = ("persist_windows", "cooldown_minutes", "max_p95_ms", "max_p99_ms", "max_error_rate", "min_feedback",
                 "max_accuracy_drop")


def config_from_params(params: Mapping[str, Any]) -> MonitorConfig:
    policy = PolicyConfig(**{name: params[name] for name in POLICY_PARAMS if name in params},
                          drift_triggers=tuple(params.get("drift_triggers", PolicyConfig().drift_triggers)))
    defaults = DriftConfig()
    drift = DriftConfig(min_rows=int(params.get("min_rows", defaults.min_rows)),
                        false_alarm_rate=float(params.get("false_alarm_rate", defaults.false_alarm_rate)))
    return MonitorConfig(window_minutes=float(params.get("window_minutes", 15)), drift=drift, policy=policy)


def retrain_conf(value: str | Mapping[str, Any] | None, known_params: Collection[str],
                 reserved: Collection[str]) -> dict[str, Any]:
    """The extra optimize_model params a trigger carries (e.g. the labelled data location), checked
    here so that a typo fails this monitor run instead of the re-optimization it starts.

    Args:
        value: a JSON object (text or mapping) of optimize_model params; empty or None: none.
        known_params: the params optimize_model accepts.
        reserved: the params the monitor fills in itself (the trigger's reason and evidence).
    """
    if value in (None, ""):
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise MonitoringConfigError(f"retrain_conf is not valid JSON ({error}): {value!r}") from None
    if not isinstance(value, Mapping):
        raise MonitoringConfigError(
            f"retrain_conf must be a JSON object of optimize_model params, not {type(value).__name__}")
    taken = sorted(set(value) & set(reserved))
    if taken:
        raise MonitoringConfigError(f"retrain_conf may not set {taken}: the monitor fills them in")
    allowed = set(known_params) - set(reserved)
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise MonitoringConfigError(
            f"retrain_conf has unknown optimize_model params {unknown}; known: {sorted(allowed)}")
    return dict(value)


def window_folder(window_end: float) -> str:
    """The folder name of a window's outputs: its end in UTC, so that a retry overwrites its own."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(window_end))


def check_window(settings: MonitorSettings, params: Mapping[str, Any], window_end: datetime,
                 optimization_active: bool, known_params: Collection[str], reserved: Collection[str]) -> dict:
    """Judge the window that ends at ``window_end`` and decide; outputs go to
    ``<state_dir>/windows/<window end>/``.

    ``trigger_conf`` in the result is what a trigger passes to optimize_model: the params from
    ``retrain_conf`` (the param, else ``settings.retrain_conf``) plus the reason and the evidence.
    ``known_params`` and ``reserved`` are optimize_model's param names (see ``retrain_conf``).
    """
    extra = retrain_conf(params.get("retrain_conf") or settings.retrain_conf, known_params, reserved)
    end = float(round(window_end.timestamp()))  # whole seconds: the window's key in the state and its folder
    out_dir = settings.state_dir / "windows" / window_folder(end)
    result = run_window(settings, config_from_params(params), end, optimization_active, out_dir)
    result["trigger_conf"] = extra | result["trigger_conf"]
    return result
