"""What an optimize_model run does about why it started: the run plan.

monitor_serving triggers a run with the kind of breach that persisted (``trigger_kind``) and its
evidence; nightly and manual runs carry no kind. The first task turns that into a plan, written to
``<run>/decisions/plan.json`` and read by the tasks after it:

- no kind (nightly, manual): **train**, unless nothing changed since the champion was trained;
- ``latency``: **reoptimize** from the champion's lineage (``tasks/reoptimize.py``): no fine-tuning,
  a more aggressive search, a latency budget gate, the most accurate candidate within budget wins;
- ``drift``: **retrain** on the newest labelled data; stop when no labelled data arrived since the
  champion was trained (retraining on the same labels cannot fix drift);
- ``accuracy``: live accuracy from label feedback dropped significantly below the champion's test
  accuracy: **retrain** on the newest labelled data, as for drift (and stop the same way);
- ``errors``: a serving fault, **no retraining**: record and alert, and roll back to
  ``previous_champion`` when the model itself produced invalid (non-finite) outputs.

A plan that stops the run says why; the reason goes to the task log and to an MLflow run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from tasks.errors import ConfigError
from tasks.results import write_json_atomic

log = logging.getLogger(__name__)

PLAN_FILE = "decisions/plan.json"


class TriggerKind(str, Enum):
    NONE = ""  # nightly or manual
    LATENCY = "latency"
    ERRORS = "errors"
    DRIFT = "drift"
    ACCURACY = "accuracy"


class Action(str, Enum):
    TRAIN = "train"
    REOPTIMIZE = "reoptimize"
    RETRAIN = "retrain"
    ROLLBACK = "rollback"
    ALERT = "alert"
    STOP = "stop"


@dataclass(frozen=True)
class Trigger:
    kind: TriggerKind
    reason: str
    evidence: dict[str, Any]


@dataclass(frozen=True)
class RunPlan:
    """What this run does, and why. ``stop`` set: the run ends after the plan with that reason."""

    kind: str
    action: str
    reason: str
    stop: str | None = None
    champion_version: str | None = None
    champion_run: str | None = None
    budget: dict[str, float | None] | None = None
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    reused: dict[str, str] = field(default_factory=dict)  # "teacher"/"data" -> folder fetched from the lineage

    @property
    def objective(self) -> str:
        """How the winner is chosen among the candidates that pass every gate."""
        return "most_accurate" if self.action == Action.REOPTIMIZE.value else "fastest"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunPlan:
        return cls(**dict(data))


def parse_trigger(params: Mapping[str, Any]) -> Trigger:
    """The trigger of a run from its params; ConfigError for an unknown kind or evidence that is not JSON."""
    raw_kind = str(params.get("trigger_kind") or "")
    try:
        kind = TriggerKind(raw_kind)
    except ValueError:
        raise ConfigError(f"trigger_kind {raw_kind!r} is not one of {[k.value for k in TriggerKind]}") from None
    raw = params.get("trigger_evidence") or "{}"
    try:
        evidence = json.loads(raw) if isinstance(raw, str) else dict(raw)
    except (json.JSONDecodeError, TypeError, ValueError) as error:
        raise ConfigError(f"trigger_evidence is not a JSON object ({error}): {str(raw)[:200]!r}") from None
    if not isinstance(evidence, dict):
        raise ConfigError("trigger_evidence must be a JSON object")
    return Trigger(kind, str(params.get("trigger_reason") or "manual or nightly"), evidence)


def errors_plan(trigger: Trigger) -> RunPlan:
    """A serving fault: no retraining. Invalid model outputs in the evidence -> roll back, else alert."""
    invalid = int(trigger.evidence.get("invalid_outputs") or 0)
    if invalid > 0:
        return RunPlan(trigger.kind.value, Action.ROLLBACK.value,
                       f"the model returned {invalid} non-finite outputs in the breaching windows: roll back to "
                       "previous_champion; no retraining",
                       stop="error-rate breach handled by a rollback; nothing is retrained")
    return RunPlan(trigger.kind.value, Action.ALERT.value,
                   f"error-rate breach ({trigger.reason}): a serving fault, not the model's; recorded and alerted, "
                   "no retraining",
                   stop="error-rate breach is a serving fault: recorded and alerted, nothing is retrained")


def rollback_after_switch(trigger: Trigger, champion: str, switched_at: float | None, previous: str | None,
                          window_minutes: float, now: float) -> RunPlan | None:
    """A latency or error-rate breach within ``window_minutes`` of the switch to ``champion``: roll back
    to ``previous`` (the switch is the likeliest cause). None: older switch, no previous version, or off."""
    if trigger.kind not in (TriggerKind.LATENCY, TriggerKind.ERRORS) or window_minutes <= 0:
        return None
    if switched_at is None or previous is None or previous == champion:
        return None
    minutes = (now - switched_at) / 60.0
    if not 0 <= minutes <= window_minutes:
        return None
    return RunPlan(trigger.kind.value, Action.ROLLBACK.value,
                   f"{trigger.kind.value} breach ({trigger.reason}) {minutes:.0f} min after the switch to v{champion} "
                   f"(rollback_window_minutes {window_minutes:g}): roll back to previous_champion v{previous}",
                   stop="a serving breach right after a switch is handled by a rollback; nothing is retrained",
                   champion_version=champion)


def plan_path(run_dir: Path) -> Path:
    return run_dir / PLAN_FILE


def write_plan(run_dir: Path, plan: RunPlan) -> None:
    write_json_atomic(plan_path(run_dir), plan.to_dict())


def read_plan(run_dir: Path) -> RunPlan:
    """The run's plan; a run without one (a Kubeflow run, a task run alone) trains as usual."""
    path = plan_path(run_dir)
    if not path.exists():
        return RunPlan(TriggerKind.NONE.value, Action.TRAIN.value, "no plan recorded: a normal run")
    return RunPlan.from_dict(json.loads(path.read_text()))


def merge_overrides(base: Mapping[str, Any] | None, extra: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``base`` overrides (section -> key -> value) updated with ``extra``'s, section by section."""
    merged = {section: dict(values) for section, values in (base or {}).items() if isinstance(values, Mapping)}
    for section, values in extra.items():
        merged.setdefault(section, {}).update(values)
    return merged
