"""When a window's findings become a re-optimization: persistence, cooldown, and no overlap.

Pure functions over plain data, so every rule is tested without servers: a window is judged
("ok", "drift", "slo_breach", or "insufficient" when traffic was too low to judge); a trigger needs
the last ``persist_windows`` judged windows to be breaches, no optimization run active, and the
cooldown since the last trigger to have passed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


# The serving SLO on p95 latency (ms): the monitor judges windows by it, and promotion gates
# candidates by it by default (tasks.config.GateConfig), so a promoted model meets it on arrival.
SLO_P95_MS = 100.0


@dataclass(frozen=True)
class PolicyConfig:
    persist_windows: int = 2
    cooldown_minutes: float = 360.0
    max_p95_ms: float = SLO_P95_MS
    max_p99_ms: float = 200.0
    max_error_rate: float = 0.01

    def __post_init__(self) -> None:
        if self.persist_windows < 1 or self.cooldown_minutes < 0:
            raise ValueError("persist_windows >= 1 and cooldown_minutes >= 0")
        if self.max_p95_ms <= 0 or self.max_p99_ms <= 0 or not 0 <= self.max_error_rate <= 1:
            raise ValueError("latency budgets must be > 0 and max_error_rate in [0, 1]")


@dataclass(frozen=True)
class WindowVerdict:
    window_end: float  # unix seconds
    status: str  # ok | drift | slo_breach | insufficient
    reasons: tuple[str, ...] = ()
    evidence: dict = field(default_factory=dict)

    @property
    def breach(self) -> bool:
        return self.status in ("drift", "slo_breach")

    def to_dict(self) -> dict:
        return asdict(self) | {"reasons": list(self.reasons)}

    @classmethod
    def from_dict(cls, data: dict) -> WindowVerdict:
        return cls(float(data["window_end"]), data["status"], tuple(data.get("reasons", ())), data.get("evidence", {}))


@dataclass(frozen=True)
class Decision:
    trigger: bool
    reason: str
    evidence: dict = field(default_factory=dict)


def slo_reasons(latency_p95_ms: float, latency_p99_ms: float, error_rate: float, config: PolicyConfig) -> list[str]:
    reasons = []
    if latency_p95_ms > config.max_p95_ms:
        reasons.append(f"p95 latency {latency_p95_ms:.1f} ms > {config.max_p95_ms:.0f} ms")
    if latency_p99_ms > config.max_p99_ms:
        reasons.append(f"p99 latency {latency_p99_ms:.1f} ms > {config.max_p99_ms:.0f} ms")
    if error_rate > config.max_error_rate:
        reasons.append(f"error rate {error_rate:.2%} > {config.max_error_rate:.2%}")
    return reasons


def judge(window_end: float, rows: int, min_rows: int, drifted_features: list[str], drifted: bool,
          slo: list[str], evidence: dict) -> WindowVerdict:
    """One window's verdict. SLO breaches are judged even on little traffic; drift is not."""
    if slo:
        return WindowVerdict(window_end, "slo_breach", tuple(slo), evidence)
    if rows < min_rows:
        return WindowVerdict(window_end, "insufficient", (f"{rows} predictions < {min_rows}: not judged",), evidence)
    if drifted:
        return WindowVerdict(window_end, "drift", (f"output drift in {', '.join(drifted_features)}",), evidence)
    return WindowVerdict(window_end, "ok", (), evidence)


def decide(history: list[WindowVerdict], now: float, last_trigger_at: float | None, optimization_active: bool,
           config: PolicyConfig) -> Decision:
    """Whether to trigger optimize_model now, and why (or why not)."""
    judged = [verdict for verdict in history if verdict.status != "insufficient"]
    recent = judged[-config.persist_windows:]
    if len(recent) < config.persist_windows or not all(verdict.breach for verdict in recent):
        streak = next((i for i, v in enumerate(reversed(recent)) if not v.breach), len(recent))
        return Decision(False, f"no persistent breach ({streak}/{config.persist_windows} judged windows in a row)")
    evidence = {"windows": [verdict.to_dict() for verdict in recent]}
    reasons = "; ".join(sorted({reason for verdict in recent for reason in verdict.reasons}))
    if optimization_active:
        return Decision(False, f"breach persists ({reasons}) but an optimize_model run is active", evidence)
    if last_trigger_at is not None and now - last_trigger_at < config.cooldown_minutes * 60:
        left = config.cooldown_minutes - (now - last_trigger_at) / 60
        return Decision(False, f"breach persists ({reasons}) but the cooldown has {left:.0f} more minutes", evidence)
    return Decision(True, f"{config.persist_windows} windows in a row: {reasons}", evidence)
