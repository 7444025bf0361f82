"""Promotion gates: every check of a candidate, with its observed value and threshold."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from monitoring.stats import paired_comparison
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
                   champion: ChampionScore | None = None, candidate_correct: tuple[bool, ...] | None = None,
                   majority_share: float | None = None) -> list[GateCheck]:
    """All gate checks of ``candidate`` (metrics from tasks.evaluate, plus ``source_label_agreement``).

    ``champion`` is the serving champion measured on the same test split (None: no champion yet);
    ``candidate_correct`` whether the candidate got each test text right (for the paired comparison
    with the champion's answers); ``majority_share`` the share of the test split's most common label.
    """
    checks = []
    required = required_accuracy(config, teacher["accuracy"])
    accuracy = candidate["accuracy"]
    checks.append(_check("accuracy", accuracy >= required, accuracy, required,
                         f"accuracy {accuracy:.4f} vs required {required:.4f} "
                         f"(teacher {teacher['accuracy']:.4f} minus {config.max_relative_accuracy_drop:.0%})"))
    if majority_share is not None or config.min_accuracy > 0:
        floor = accuracy_floor(config, majority_share)
        checks.append(_check("accuracy_floor", accuracy >= floor, accuracy, floor,
                             f"accuracy {accuracy:.4f} vs floor {floor:.4f} ("
                             + (f"always answering the most common label scores {majority_share:.4f}, plus "
                                f"{config.min_margin_over_majority:.2f}" if majority_share is not None else "")
                             + ("; " if majority_share is not None and config.min_accuracy else "")
                             + (f"min_accuracy {config.min_accuracy:.4f}" if config.min_accuracy else "") + ")"))
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
            checks.append(champion_check(config, accuracy, champion, candidate_correct))
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


def accuracy_floor(config: GateConfig, majority_share: float | None) -> float:
    """The accuracy no candidate may fall below: the absolute floor, and the majority-class share plus
    the margin (the higher of the two)."""
    chance = majority_share + config.min_margin_over_majority if majority_share is not None else 0.0
    return max(config.min_accuracy, chance)


def champion_check(config: GateConfig, accuracy: float, champion: ChampionScore,
                   candidate_correct: tuple[bool, ...] | None) -> GateCheck:
    """No regression against the serving champion on the same texts.

    With both models' answer to each text, the paired test decides: the candidate fails when it is
    worse beyond ``max_champion_regression`` and the exact one-sided McNemar test says the shortfall
    is real (p < ``regression_significance``); a shortfall inside the noise passes, and the detail
    gives the difference with its 95% interval. Without them (a champion scored before answers were
    recorded), the accuracies are compared as they are."""
    floor = champion.accuracy - config.max_champion_regression
    where = f"allowed regression {config.max_champion_regression:.4f}; {champion.note}"
    if candidate_correct is None or champion.correct is None or len(candidate_correct) != len(champion.correct):
        return _check("champion_regression", accuracy >= floor, accuracy, floor,
                      f"accuracy {accuracy:.4f} vs champion {champion.accuracy:.4f} on the same test split ({where})")
    paired = paired_comparison(candidate_correct, champion.correct)
    shortfall = paired.difference < -config.max_champion_regression
    real = paired.p_worse < config.regression_significance
    verdict = ("worse beyond the allowed regression, and the paired test says it is real" if shortfall and real else
               "a shortfall beyond the allowed regression, but inside the noise: passes" if shortfall else
               "within the allowed regression")
    return GateCheck("champion_regression", GateDecision.FAIL if shortfall and real else GateDecision.PASS,
                     paired.difference, -config.max_champion_regression,
                     f"accuracy {accuracy:.4f} vs champion {champion.accuracy:.4f} on the same {paired.texts} texts: "
                     f"difference {paired.describe()}; {verdict} ({where}; significance "
                     f"{config.regression_significance})")


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
