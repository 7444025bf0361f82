"""Gates with statistics: the paired comparison with the champion on the same texts, the accuracy
floor above the majority class, and the winner within the latency noise margin."""

from __future__ import annotations

import pytest

from monitoring.stats import binomial_tail, paired_comparison, wilson_interval
from tasks import gate
from tasks.champion import ChampionScore
from tasks.config import GateConfig
from tasks.decisions import choose_winner

TEACHER = {"accuracy": 0.9}
CLEAN = {"nan_outputs": 0.0, "nan_on_edge_inputs": 0.0, "latency_p95_ms": 1.0}


def test_mcnemar_and_the_paired_interval_on_known_counts():
    assert binomial_tail(0, 10) == 1.0 and binomial_tail(10, 10) == pytest.approx(1 / 1024)
    assert binomial_tail(8, 10) == pytest.approx(56 / 1024)  # C(10,8)+C(10,9)+C(10,10) = 45+10+1
    # 500 texts: both right on 400, candidate only on 5, champion only on 25, both wrong on 70.
    candidate = [True] * 400 + [True] * 5 + [False] * 25 + [False] * 70
    champion = [True] * 400 + [False] * 5 + [True] * 25 + [False] * 70
    paired = paired_comparison(candidate, champion)
    assert (paired.texts, paired.candidate_only, paired.reference_only) == (500, 5, 25)
    assert paired.difference == pytest.approx(-0.04)
    half = 1.959963984540054 * (30 - 400 / 500) ** 0.5 / 500
    assert (paired.low, paired.high) == (pytest.approx(-0.04 - half), pytest.approx(-0.04 + half))
    assert paired.p_worse == pytest.approx(binomial_tail(25, 30)) and paired.p_worse < 0.001
    with pytest.raises(ValueError, match="same texts"):
        paired_comparison([True], [True, False])
    low, high = wilson_interval(400, 500)
    assert low < 0.8 < high and high - low == pytest.approx(0.0699, abs=0.001)


def _answers(right: int, total: int = 500) -> tuple[bool, ...]:
    return tuple([True] * right + [False] * (total - right))


def test_a_candidate_a_few_points_worse_on_the_same_texts_is_rejected():
    config = GateConfig(max_relative_accuracy_drop=0.2, max_champion_regression=0.01)
    champion = ChampionScore(0.85, "Triton clf v3", _answers(425))
    candidate = _answers(405)  # 4 points worse: it misses 20 texts the champion gets right
    checks = {c.name: c for c in gate.evaluate_gates(config, CLEAN | {"accuracy": 0.81}, TEACHER, champion, candidate)}
    regression = checks["champion_regression"]
    assert regression.decision is gate.GateDecision.FAIL and regression.observed == pytest.approx(-0.04)
    assert "95% interval" in regression.detail and "McNemar p" in regression.detail
    assert "the paired test says it is real" in regression.detail


def test_a_shortfall_inside_the_noise_is_decided_by_the_documented_rule():
    """Beyond the allowed regression by the point estimate, but the paired test cannot tell it from
    noise (p >= 0.05): it passes, and says so."""
    config = GateConfig(max_relative_accuracy_drop=0.2, max_champion_regression=0.01)
    # 500 texts, 60 discordant: champion only right on 33, candidate only right on 27 -> -1.2 points.
    champion_answers = tuple([True] * 400 + [True] * 33 + [False] * 27 + [False] * 40)
    candidate_answers = tuple([True] * 400 + [False] * 33 + [True] * 27 + [False] * 40)
    champion = ChampionScore(433 / 500, "Triton clf v3", champion_answers)
    checks = {c.name: c for c in gate.evaluate_gates(config, CLEAN | {"accuracy": 427 / 500}, TEACHER, champion,
                                                     candidate_answers)}
    regression = checks["champion_regression"]
    assert regression.observed == pytest.approx(-0.012)
    assert regression.decision is gate.GateDecision.PASS and "inside the noise: passes" in regression.detail
    # The same shortfall with no answers per text (a champion scored before they were recorded): the
    # accuracies are compared as they are, and it fails.
    legacy = {c.name: c for c in gate.evaluate_gates(config, CLEAN | {"accuracy": 427 / 500}, TEACHER,
                                                     ChampionScore(433 / 500, "Triton clf v3"))}
    assert legacy["champion_regression"].decision is gate.GateDecision.FAIL


def test_a_near_chance_first_model_is_rejected():
    config = GateConfig(max_relative_accuracy_drop=0.2)
    weak_teacher = {"accuracy": 0.56}
    near_chance = CLEAN | {"accuracy": 0.55}
    checks = {c.name: c for c in gate.evaluate_gates(config, near_chance, weak_teacher, None, None, majority_share=0.52)}
    assert checks["accuracy"].decision is gate.GateDecision.PASS  # the teacher is weak too
    floor = checks["accuracy_floor"]
    assert floor.decision is gate.GateDecision.FAIL and floor.threshold == pytest.approx(0.57)
    assert "always answering the most common label scores 0.5200" in floor.detail
    assert gate.passed(gate.evaluate_gates(config, CLEAN | {"accuracy": 0.8}, weak_teacher, None, None, 0.52))
    absolute = gate.evaluate_gates(GateConfig(max_relative_accuracy_drop=0.2, min_accuracy=0.85),
                                   CLEAN | {"accuracy": 0.8}, weak_teacher, None, None, 0.52)
    assert {c.name for c in absolute if c.decision is gate.GateDecision.FAIL} == {"accuracy_floor"}
    assert gate.accuracy_floor(GateConfig(), None) == 0.0


def test_the_winner_is_the_most_accurate_within_the_latency_noise_margin():
    gated = {"pruned_int8": (True, {"latency_p50_ms": 10.0, "accuracy": 0.80}),
             "student_int8": (True, {"latency_p50_ms": 10.8, "accuracy": 0.83}),
             "onnx_int8": (True, {"latency_p50_ms": 11.5, "accuracy": 0.86}),
             "failed": (False, {"latency_p50_ms": 5.0, "accuracy": 0.99})}
    assert choose_winner(gated) == "pruned_int8"  # no margin: the fastest
    assert choose_winner(gated, noise_margin=0.1) == "student_int8"  # 10.8 is within 10% of 10.0; 11.5 is not
    assert choose_winner(gated, noise_margin=0.2) == "onnx_int8"
    assert choose_winner(gated, objective="most_accurate") == "onnx_int8"
