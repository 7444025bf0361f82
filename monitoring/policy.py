"""When a window's findings become a re-optimization: persistence, cooldown, and no overlap.

Pure functions over plain data, so every rule is tested without servers: a window is judged
("ok", "drift", "accuracy", "slo_breach", or "insufficient" when traffic was too low to judge) and
carries the kinds of breach it saw ("errors", "accuracy", "latency", "drift"); a trigger needs the
last ``persist_windows`` judged windows to be breaches, no optimization run active, and the
cooldown since the last trigger to have passed. The trigger names the kind that persisted, so
optimize_model can answer each kind its own way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from monitoring.drift import DRIFT_KINDS

# Breach kinds, highest priority first: the model's or the server's errors outrank a measured accuracy
# drop (true labels say the model got worse), which outranks latency, which outranks drift (a sign
# the model may be getting worse; a re-optimization for drift cannot help a model that fails its requests).
KINDS = ("errors", "accuracy", "latency", "drift")
BREACH_STATUSES = ("drift", "accuracy", "slo_breach")


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
    # Which kinds of drift (monitoring.drift: "output", "input") are a breach; the others are reported only.
    drift_triggers: tuple[str, ...] = DRIFT_KINDS
    # Live accuracy from label feedback: judged on windows with at least min_feedback true labels.
    min_feedback: int = 50
    max_accuracy_drop: float = 0.05

    def __post_init__(self) -> None:
        unknown = sorted(set(self.drift_triggers) - set(DRIFT_KINDS))
        if unknown:
            raise ValueError(f"drift_triggers {unknown} are not drift kinds; known: {', '.join(DRIFT_KINDS)}")
        if self.persist_windows < 1 or self.cooldown_minutes < 0:
            raise ValueError("persist_windows >= 1 and cooldown_minutes >= 0")
        if self.max_p95_ms <= 0 or self.max_p99_ms <= 0 or not 0 <= self.max_error_rate <= 1:
            raise ValueError("latency budgets must be > 0 and max_error_rate in [0, 1]")
        if self.min_feedback < 1 or not 0 <= self.max_accuracy_drop < 1:
            raise ValueError("min_feedback >= 1 and max_accuracy_drop in [0, 1)")


@dataclass(frozen=True)
class Breach:
    """One finding of a window: its kind (one of ``KINDS``) and the reason in words."""

    kind: str
    reason: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"breach kind {self.kind!r} is not one of {KINDS}")


@dataclass(frozen=True)
class WindowVerdict:
    window_end: float  # unix seconds
    status: str  # ok | drift | accuracy | slo_breach | insufficient
    reasons: tuple[str, ...] = ()
    evidence: dict = field(default_factory=dict)
    kinds: tuple[str, ...] = ()  # the breach kinds seen, in KINDS order

    @property
    def breach(self) -> bool:
        return self.status in BREACH_STATUSES

    def to_dict(self) -> dict:
        return asdict(self) | {"reasons": list(self.reasons), "kinds": list(self.kinds)}

    @classmethod
    def from_dict(cls, data: dict) -> WindowVerdict:
        """A verdict as ``to_dict`` wrote it; one saved before verdicts had kinds gets them from its
        status and reasons."""
        reasons = tuple(data.get("reasons", ()))
        kinds = tuple(data["kinds"]) if "kinds" in data else kinds_of(data["status"], reasons)
        return cls(float(data["window_end"]), data["status"], reasons, data.get("evidence", {}), kinds)


@dataclass(frozen=True)
class Decision:
    trigger: bool
    reason: str
    evidence: dict = field(default_factory=dict)
    kind: str = ""  # the breach kind that persisted (one of KINDS); empty when not triggering


def kinds_of(status: str, reasons: tuple[str, ...]) -> tuple[str, ...]:
    """The breach kinds of a verdict saved without them, read from its status and reasons (empty when
    the reasons do not say)."""
    if status in ("drift", "accuracy"):
        return (status,)
    if status != "slo_breach":
        return ()
    text = " ".join(reasons)
    found = {"latency"} if "latency" in text else set()
    found |= {"errors"} if "error rate" in text or "non-finite" in text else set()
    return tuple(kind for kind in KINDS if kind in found)


def serving_breaches(latency_p95_ms: float, latency_p99_ms: float, error_rate: float, config: PolicyConfig,
                     invalid_outputs: int = 0) -> list[Breach]:
    """The window's latency and error findings: SLO breaches, and outputs the model got wrong
    (non-finite probabilities, answered 502 by the gateway), which are errors whatever the rate."""
    breaches = []
    if latency_p95_ms > config.max_p95_ms:
        breaches.append(Breach("latency", f"p95 latency {latency_p95_ms:.1f} ms > {config.max_p95_ms:.0f} ms"))
    if latency_p99_ms > config.max_p99_ms:
        breaches.append(Breach("latency", f"p99 latency {latency_p99_ms:.1f} ms > {config.max_p99_ms:.0f} ms"))
    if error_rate > config.max_error_rate:
        breaches.append(Breach("errors", f"error rate {error_rate:.2%} > {config.max_error_rate:.2%}"))
    if invalid_outputs > 0:
        breaches.append(Breach("errors", f"the model returned {invalid_outputs} non-finite outputs"))
    return breaches


def accuracy_breach(quality: dict, reference_accuracy: float | None, config: PolicyConfig) -> Breach | None:
    """An accuracy breach when true labels show the champion got significantly worse than at promotion.

    The rule: the window has at least ``config.min_feedback`` labelled predictions, and the upper end
    of the live accuracy's 95% interval (``quality["accuracy_high"]``, Wilson) is below
    ``reference_accuracy - config.max_accuracy_drop``: even the most favourable accuracy the labels
    allow is more than the allowed drop below the test accuracy, so the drop is not noise of a small
    sample. None otherwise, and when the reference accuracy is unknown.

    Args:
        quality: ``monitoring.feedback.live_quality`` of the window's labelled predictions.
        reference_accuracy: the champion's accuracy on its test split (its reference).
    """
    labelled = int(quality.get("labelled") or 0)
    if reference_accuracy is None or labelled < config.min_feedback or "accuracy_high" not in quality:
        return None
    floor = reference_accuracy - config.max_accuracy_drop
    if quality["accuracy_high"] >= floor:
        return None
    return Breach("accuracy", f"live accuracy {quality['accuracy']:.1%} (95% interval {quality['accuracy_low']:.1%}"
                              f"-{quality['accuracy_high']:.1%}, {labelled} labels) < {floor:.1%} (test accuracy "
                              f"{reference_accuracy:.1%} - {config.max_accuracy_drop:.1%})")


def judge(window_end: float, rows: int, min_rows: int, drift: dict[str, list[str]], breaches: list[Breach],
          evidence: dict, drift_triggers: tuple[str, ...] = DRIFT_KINDS) -> WindowVerdict:
    """One window's verdict. Latency, error and accuracy breaches (``breaches``) are judged even on
    little traffic; drift only on ``min_rows`` predictions or more, and independently of them (one
    window can carry several).

    ``drift`` maps each drift kind found ("output", "input") to its drifted features; the kinds in
    ``drift_triggers`` are a breach, the others are only reported (in ``evidence["drift_noted"]``).
    The status is "slo_breach" when there is a latency or error breach, else "accuracy" when there
    is an accuracy breach, else "drift" when a triggering kind drifted; ``kinds`` has every breach
    kind found.
    """
    found = list(breaches)
    judged = rows >= min_rows
    for kind, features in drift.items() if judged else ():
        if kind in drift_triggers:
            found.append(Breach("drift", f"{kind} drift in {', '.join(features)}"))
        else:
            evidence = evidence | {"drift_noted": evidence.get("drift_noted", []) +
                                   [f"{kind} drift in {', '.join(features)} (not a trigger: drift_triggers="
                                    f"{','.join(drift_triggers) or 'none'})"]}
    kinds = tuple(kind for kind in KINDS if any(breach.kind == kind for breach in found))
    reasons = tuple(breach.reason for breach in found)
    if any(breach.kind != "accuracy" for breach in breaches):
        return WindowVerdict(window_end, "slo_breach", reasons, evidence, kinds)
    if breaches:
        return WindowVerdict(window_end, "accuracy", reasons, evidence, kinds)
    if not judged:
        return WindowVerdict(window_end, "insufficient", (f"{rows} predictions < {min_rows}: not judged",), evidence)
    if found:
        return WindowVerdict(window_end, "drift", reasons, evidence, kinds)
    return WindowVerdict(window_end, "ok", (), evidence)


def persistent_kind(windows: list[WindowVerdict]) -> str:
    """The highest-priority kind found in every one of ``windows``; when none is in all of them, the
    highest-priority kind of the latest window (empty when it has none)."""
    if not windows:
        return ""
    in_all = [kind for kind in KINDS if all(kind in verdict.kinds for verdict in windows)]
    latest = [kind for kind in KINDS if kind in windows[-1].kinds]
    return (in_all or latest or [""])[0]


def decide(history: list[WindowVerdict], now: float, last_trigger_at: float | None, optimization_active: bool,
           config: PolicyConfig) -> Decision:
    """Whether to trigger optimize_model now, why (or why not), and for which kind of breach."""
    judged = [verdict for verdict in history if verdict.status != "insufficient"]
    recent = judged[-config.persist_windows:]
    if len(recent) < config.persist_windows or not all(verdict.breach for verdict in recent):
        streak = next((i for i, v in enumerate(reversed(recent)) if not v.breach), len(recent))
        return Decision(False, f"no persistent breach ({streak}/{config.persist_windows} judged windows in a row)")
    kind = persistent_kind(recent)
    evidence = {"windows": [verdict.to_dict() for verdict in recent]}
    breach = f"{kind} breach" if kind else "breach"
    reasons = "; ".join(sorted({reason for verdict in recent for reason in verdict.reasons}))
    if optimization_active:
        return Decision(False, f"{breach} persists ({reasons}) but an optimize_model run is active", evidence)
    if last_trigger_at is not None and now - last_trigger_at < config.cooldown_minutes * 60:
        left = config.cooldown_minutes - (now - last_trigger_at) / 60
        return Decision(False, f"{breach} persists ({reasons}) but the cooldown has {left:.0f} more minutes",
                        evidence)
    return Decision(True, f"{breach}, {config.persist_windows} windows in a row: {reasons}", evidence, kind)
