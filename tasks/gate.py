"""Promotion gates: every check of a candidate, with its observed value and threshold."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from tasks.champion import ChampionScore
from tasks.config import GateConfig


class GateDecision(str, Enum):
    PASS = "pass"
    FAIL = "fail"


@dataclass(frozen=True)
class GateCheck:
    name: str
    decision: GateDecision
    observed: float
    threshold: float
    detail: str


def evaluate_gates(config: GateConfig, candidate: dict[str, float], teacher: dict[str, float],
                   champion: ChampionScore | None = None) -> list[GateCheck]:
    """All gate checks of ``candidate`` (metrics from tasks.evaluate, plus ``source_label_agreement``).

    ``champion`` is the serving champion measured on the same test split (None: no champion yet).
    """
    checks = []
    required = required_accuracy(config, teacher["accuracy"])
    accuracy = candidate["accuracy"]
    checks.append(_check("accuracy", accuracy >= required, accuracy, required,
                         f"accuracy {accuracy:.4f} vs required {required:.4f} "
                         f"(teacher {teacher['accuracy']:.4f} minus {config.max_relative_accuracy_drop:.0%})"))
    finite = (candidate.get("nan_outputs", 0.0) == 0.0 and candidate.get("nan_on_edge_inputs", 0.0) == 0.0
              and all(math.isfinite(v) for v in candidate.values()))
    checks.append(_check("finite_outputs", finite, 0.0 if finite else 1.0, 0.0,
                         "all outputs finite, including empty, one-token and over-long inputs" if finite
                         else "NaN or Inf in outputs (test split or empty/one-token/over-long inputs) or metrics"))
    if champion is not None:
        if champion.accuracy is None:
            checks.append(GateCheck("champion_regression", GateDecision.PASS, float("nan"), float("nan"),
                                    f"not compared: {champion.note}"))
        else:
            floor = champion.accuracy - config.max_champion_regression
            checks.append(_check("champion_regression", accuracy >= floor, accuracy, floor,
                                 f"accuracy {accuracy:.4f} vs champion {champion.accuracy:.4f} on the same test split "
                                 f"(allowed regression {config.max_champion_regression:.4f}; {champion.note})"))
    if "source_label_agreement" in candidate:
        agreement = candidate["source_label_agreement"]
        checks.append(_check("source_agreement", agreement >= config.min_source_agreement, agreement,
                             config.min_source_agreement,
                             f"label agreement with source {agreement:.4f} (min {config.min_source_agreement:.4f})"))
    if config.max_p95_latency_ms > 0:
        p95, limit = candidate["latency_p95_ms"], latency_limit(config)
        checks.append(_check("latency_p95", p95 <= limit, p95, limit,
                             f"batch-1 p95 {p95:.2f} ms vs {limit:.2f} ms allowed (budget "
                             f"{config.max_p95_latency_ms:.2f} ms less a {config.latency_noise_margin:.0%} noise margin)"))
    return checks


def latency_limit(config: GateConfig) -> float:
    """The largest batch-1 p95 (ms) the latency gate lets through: the budget less the noise margin."""
    return config.max_p95_latency_ms * (1.0 - config.latency_noise_margin)


def required_accuracy(config: GateConfig, teacher_accuracy: float) -> float:
    return teacher_accuracy * (1.0 - config.max_relative_accuracy_drop)


def passed(checks: list[GateCheck]) -> bool:
    return all(check.decision is GateDecision.PASS for check in checks)


def failure_reasons(checks: list[GateCheck]) -> list[str]:
    return [check.detail for check in checks if check.decision is GateDecision.FAIL]


def _check(name: str, ok: bool, observed: float, threshold: float, detail: str) -> GateCheck:
    return GateCheck(name, GateDecision.PASS if ok else GateDecision.FAIL, float(observed), float(threshold), detail)
