"""Macro-F1 and its bootstrap interval (monitoring.stats), against scikit-learn where it is installed
and against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from monitoring.stats import bootstrap_macro_f1, macro_f1

LABELS = ("negative", "positive", "neutral")


def test_macro_f1_by_hand():
    truth = ["positive", "positive", "positive", "negative"]
    predicted = ["positive", "positive", "negative", "negative"]
    # positive: tp 2, fp 0, fn 1 -> F1 4/5; negative: tp 1, fp 1, fn 0 -> F1 2/3; neutral occurs nowhere.
    assert macro_f1(truth, predicted, LABELS) == pytest.approx((4 / 5 + 2 / 3) / 2)
    assert macro_f1(["positive"] * 3, ["positive"] * 3, LABELS) == 1.0
    # a class only predicted (never true) scores 0 and is averaged in
    assert macro_f1(["positive", "positive"], ["positive", "neutral"], LABELS) == pytest.approx((2 / 3 + 0) / 2)


def test_macro_f1_matches_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics", reason="scikit-learn is not installed")
    rng = np.random.default_rng(3)
    for size in (5, 40, 500):
        truth = rng.choice(LABELS, size=size, p=[0.5, 0.4, 0.1]).tolist()
        predicted = [t if rng.random() < 0.7 else rng.choice(LABELS) for t in truth]
        present = [label for label in LABELS if label in set(truth) | set(predicted)]
        expected = metrics.f1_score(truth, predicted, labels=present, average="macro", zero_division=0)
        assert macro_f1(truth, predicted, LABELS) == pytest.approx(expected)


def test_macro_f1_refuses_what_it_cannot_compute():
    with pytest.raises(ValueError, match="at least one"):
        macro_f1([], [], LABELS)
    with pytest.raises(ValueError, match="one prediction per true label"):
        macro_f1(["positive"], [], LABELS)


def test_the_bootstrap_interval_holds_the_estimate_narrows_with_more_data_and_is_reproducible():
    rng = np.random.default_rng(0)
    labels = ("negative", "positive")

    def sample(size: int) -> tuple[list[str], list[str]]:
        truth = rng.choice(labels, size=size).tolist()
        return truth, [t if rng.random() < 0.8 else ("negative" if t == "positive" else "positive") for t in truth]

    small_truth, small_predicted = sample(60)
    large_truth, large_predicted = sample(3000)
    low, high = bootstrap_macro_f1(small_truth, small_predicted, labels, draws=500)
    assert low <= macro_f1(small_truth, small_predicted, labels) <= high
    large_low, large_high = bootstrap_macro_f1(large_truth, large_predicted, labels, draws=500)
    assert large_low < 0.8 < large_high  # the true macro-F1 of an 80% symmetric error model is 0.8
    assert large_high - large_low < (high - low) / 3
    assert bootstrap_macro_f1(small_truth, small_predicted, labels, draws=500) == (low, high)
    assert bootstrap_macro_f1(["positive"] * 4, ["positive"] * 4, labels) == (1.0, 1.0)
