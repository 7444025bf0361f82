"""Promotion gates: every check of a candidate, with its observed value and threshold.

The quality gates judge the run's primary metric (``GateConfig.primary_metric``: accuracy, or
macro-F1 for imbalanced classes): against the teacher, over chance, and against the serving
champion on the same texts (accuracy by McNemar, macro-F1 by a paired bootstrap)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from monitoring.stats import PairedComparison, macro_f1, paired_bootstrap_macro_f1, paired_comparison
from tasks.champion import ChampionScore, TestAnswers
from tasks.config import GateConfig, PrimaryMetric


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


METRIC_NAMES = {PrimaryMetric.ACCURACY.value: "accuracy", PrimaryMetric.MACRO_F1.value: "macro-F1"}


def evaluate_gates(config: GateConfig, candidate: dict[str, float], teacher: dict[str, float],
                   champion: ChampionScore | None = None, candidate_correct: tuple[bool, ...] | None = None,
                   majority_share: float | None = None, *, class_shares: tuple[float, ...] | None = None,
                   candidate_answers: TestAnswers | None = None) -> list[GateCheck]:
    """All gate checks of ``candidate`` (metrics from tasks.evaluate, plus ``source_label_agreement``).

    The quality gates judge ``config.primary_metric``. ``champion`` is the serving champion measured
    on the same test split (None: no champion yet); ``candidate_correct`` whether the candidate got each
    test text right, or ``candidate_answers`` its answers (for the paired comparison with the champion's
    answers; macro-F1 needs the answers); ``majority_share`` the share of the test split's most common
    label, or ``class_shares`` the share of every label (macro-F1's chance level needs them).
    """
    if class_shares is not None and majority_share is None:
        majority_share = max(class_shares)
    if candidate_answers is not None and candidate_correct is None:
        candidate_correct = candidate_answers.correct
    checks = [teacher_check(config, candidate, teacher)]
    checks += floor_checks(config, candidate, majority_share, class_shares)
    finite = (candidate.get("nan_outputs", 0.0) == 0.0 and candidate.get("nan_on_edge_inputs", 0.0) == 0.0
              and all(math.isfinite(v) for v in candidate.values()))
    checks.append(_check("finite_outputs", finite, 0.0 if finite else 1.0, 0.0,
                         "all outputs finite, including empty, one-token and over-long inputs" if finite
                         else "NaN or Inf in outputs (test split or empty/one-token/over-long inputs) or metrics"))
    if champion is not None:
        if champion.accuracy is None:
            checks.append(GateCheck("champion_regression", GateDecision.PASS, float("nan"), float("nan"),
                                    f"not compared: {champion.note}"))
        elif (config.primary_metric == PrimaryMetric.MACRO_F1.value and candidate_answers is not None
              and champion.predicted is not None and len(champion.predicted) == len(candidate_answers.truth)):
            checks.append(champion_macro_f1_check(config, candidate_answers, champion))
        else:
            checks.append(champion_check(config, candidate["accuracy"], champion, candidate_correct))
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


def teacher_check(config: GateConfig, candidate: dict[str, float], teacher: dict[str, float]) -> GateCheck:
    """The primary metric against the teacher's on the same test split, less the allowed relative drop
    (named after the metric: ``accuracy`` or ``macro_f1``)."""
    metric, name = config.primary_metric, METRIC_NAMES[config.primary_metric]
    required = required_accuracy(config, teacher[metric])
    value = candidate[metric]
    return _check(metric, value >= required, value, required,
                  f"{name} {value:.4f} vs required {required:.4f} "
                  f"(teacher {teacher[metric]:.4f} minus {config.max_relative_accuracy_drop:.0%})")


def floor_checks(config: GateConfig, candidate: dict[str, float], majority_share: float | None,
                 class_shares: tuple[float, ...] | None) -> list[GateCheck]:
    """The floors: accuracy over the majority class (and ``min_accuracy``); with macro-F1 primary,
    macro-F1 over its chance level (``macro_f1_floor``) and accuracy only over ``min_accuracy``."""
    checks, accuracy = [], candidate["accuracy"]
    by_accuracy = config.primary_metric == PrimaryMetric.ACCURACY.value
    if by_accuracy and (majority_share is not None or config.min_accuracy > 0):
        floor = accuracy_floor(config, majority_share)
        checks.append(_check("accuracy_floor", accuracy >= floor, accuracy, floor,
                             f"accuracy {accuracy:.4f} vs floor {floor:.4f} ("
                             + (f"always answering the most common label scores {majority_share:.4f}, plus "
                                f"{config.min_margin_over_majority:.2f}" if majority_share is not None else "")
                             + ("; " if majority_share is not None and config.min_accuracy else "")
                             + (f"min_accuracy {config.min_accuracy:.4f}" if config.min_accuracy else "") + ")"))
    if not by_accuracy and config.min_accuracy > 0:
        checks.append(_check("accuracy_floor", accuracy >= config.min_accuracy, accuracy, config.min_accuracy,
                             f"accuracy {accuracy:.4f} vs min_accuracy {config.min_accuracy:.4f}"))
    if not by_accuracy and class_shares is not None:
        chance = chance_score(PrimaryMetric.MACRO_F1.value, class_shares)
        floor, value = chance + config.min_margin_over_majority, candidate["macro_f1"]
        checks.append(_check("macro_f1_floor", value >= floor, value, floor,
                             f"macro-F1 {value:.4f} vs floor {floor:.4f} (chance scores {chance:.4f} over "
                             f"{sum(share > 0 for share in class_shares)} classes, plus "
                             f"{config.min_margin_over_majority:.2f})"))
    return checks


def chance_score(metric: str, class_shares: tuple[float, ...]) -> float:
    """What answering without reading the text scores on a split with these label shares: for
    accuracy, always answering the most common label; for macro-F1, the better of that (F1
    2p / (1 + p) on the common class, 0 on the others) and guessing labels at their shares (each
    class's expected F1 is its share, so the mean is 1 / classes)."""
    present = [share for share in class_shares if share > 0]
    if not present:
        return 0.0
    majority = max(present)
    if metric == PrimaryMetric.ACCURACY.value:
        return majority
    return max(2 * majority / (1 + majority) / len(present), 1 / len(present))


def accuracy_floor(config: GateConfig, majority_share: float | None) -> float:
    """The accuracy no candidate may fall below: the absolute floor, and the majority-class share plus
    the margin (the higher of the two)."""
    chance = majority_share + config.min_margin_over_majority if majority_share is not None else 0.0
    return max(config.min_accuracy, chance)


def champion_check(config: GateConfig, accuracy: float, champion: ChampionScore,
                   candidate_correct: tuple[bool, ...] | None) -> GateCheck:
    """No accuracy regression against the serving champion on the same texts.

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
    return _regression_verdict(config, paired, f"accuracy {accuracy:.4f} vs champion {champion.accuracy:.4f}",
                               champion.note)


def champion_macro_f1_check(config: GateConfig, candidate: TestAnswers, champion: ChampionScore) -> GateCheck:
    """No macro-F1 regression against the serving champion on the same texts, by the accuracy rule
    (``champion_check``); the paired test is a bootstrap of the texts, both models' answers resampled
    together (``monitoring.stats.paired_bootstrap_macro_f1``)."""
    labels = [str(index) for index in range(1 + max((*candidate.truth, *candidate.predicted, *champion.predicted)))]
    truth = [str(value) for value in candidate.truth]
    theirs = [str(value) for value in champion.predicted]
    paired = paired_bootstrap_macro_f1(truth, [str(value) for value in candidate.predicted], theirs, labels)
    champion_f1 = macro_f1(truth, theirs, labels)
    return _regression_verdict(config, paired, f"macro-F1 {champion_f1 + paired.difference:.4f} vs champion "
                                               f"{champion_f1:.4f}", champion.note)


def _regression_verdict(config: GateConfig, paired: PairedComparison, versus: str, note: str) -> GateCheck:
    """The champion gate's rule on a paired comparison: fail only when the shortfall is beyond the
    allowed regression and the paired test says it is real."""
    shortfall = paired.difference < -config.max_champion_regression
    real = paired.p_worse < config.regression_significance
    verdict = ("worse beyond the allowed regression, and the paired test says it is real" if shortfall and real else
               "a shortfall beyond the allowed regression, but inside the noise: passes" if shortfall else
               "within the allowed regression")
    return GateCheck("champion_regression", GateDecision.FAIL if shortfall and real else GateDecision.PASS,
                     paired.difference, -config.max_champion_regression,
                     f"{versus} on the same {paired.texts} texts: difference {paired.describe()}; {verdict} "
                     f"(allowed regression {config.max_champion_regression:.4f}; {note}; significance "
                     f"{config.regression_significance})")


def latency_limit(config: GateConfig) -> float:
    """The largest batch-1 p95 (ms) the latency gate lets through: the budget less the noise margin."""
    return config.max_p95_latency_ms * (1.0 - config.latency_noise_margin)


def required_accuracy(config: GateConfig, teacher_score: float) -> float:
    """The primary metric a candidate needs: the teacher's less the allowed relative drop."""
    return teacher_score * (1.0 - config.max_relative_accuracy_drop)


def passed(checks: list[GateCheck]) -> bool:
    return all(check.decision is GateDecision.PASS for check in checks)


def failure_reasons(checks: list[GateCheck]) -> list[str]:
    return [check.detail for check in checks if check.decision is GateDecision.FAIL]


def _check(name: str, ok: bool, observed: float, threshold: float, detail: str) -> GateCheck:
    return GateCheck(name, GateDecision.PASS if ok else GateDecision.FAIL, float(observed), float(threshold), detail)
