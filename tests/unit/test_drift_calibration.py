"""The calibrated drift decision on synthetic data: Evidently's distances, a null window passing at
the stated rate, and a shift planted in one feature alone flagged under its own kind."""

import numpy as np
import pandas as pd
import pytest

from monitoring import embedding as emb
from monitoring.calibration import (WASSERSTEIN, FeatureNull, _null_jensen_shannon, _null_mmd,
                                    _null_wasserstein, jensen_shannon, mmd2u, normed_wasserstein, rbf_gamma)
from monitoring.drift import DriftConfig, describe, detect, prepare_reference

WINDOWS = 300


def _frame(rows: int, rng: np.random.Generator, confidence_shift: float = 0.0, positive: float = 0.5,
           embedding_shift: float = 0.0) -> pd.DataFrame:
    chars = rng.lognormal(6.6, 0.6, rows)
    frame = pd.DataFrame({
        "confidence": 0.5 + 0.5 * rng.beta(4 - confidence_shift, 1.5, rows),
        "predicted": np.where(rng.random(rows) < positive, "positive", "negative"),
        "text_chars": chars.round(),
        "token_count": np.minimum(128, np.round(chars / 4.5 + 2)),  # moves with text_chars
        "unknown_share": np.zeros(rows),
    })
    vectors = rng.normal(size=(rows, emb.DIMS))
    vectors[:, 0] += embedding_shift
    return frame.join(pd.DataFrame(vectors, columns=list(emb.COLUMNS)))


def test_the_distances_are_evidentlys():
    from evidently.legacy.calculations.stattests.jensenshannon import _jensenshannon
    from evidently.legacy.calculations.stattests.wasserstein_distance_norm import _wasserstein_distance_norm
    from evidently.legacy.core import ColumnType
    from evidently.legacy.metrics.data_drift.embedding_drift_methods import MMD2u
    from sklearn.metrics import pairwise_kernels

    rng = np.random.default_rng(0)
    reference, current = rng.gamma(2.0, size=300), rng.gamma(2.5, size=120)
    expected, _ = _wasserstein_distance_norm(pd.Series(reference), pd.Series(current), ColumnType.Numerical, 0.1)
    assert normed_wasserstein(reference, current) == pytest.approx(expected, rel=1e-12)
    labels, window = rng.choice(["a", "b", "c"], 300), rng.choice(["a", "b"], 120)
    expected, _ = _jensenshannon(pd.Series(labels), pd.Series(window), ColumnType.Categorical, 0.1)
    assert jensen_shannon(labels, window) == pytest.approx(expected, rel=1e-12)
    x, y = rng.normal(size=(80, 4)), rng.normal(0.3, size=(50, 4))
    gamma = rbf_gamma(x)
    kernel = pairwise_kernels(np.vstack([x, y]), metric="rbf", gamma=gamma)
    assert mmd2u(x, y, gamma) == pytest.approx(MMD2u(kernel, 80, 50), rel=1e-9)


def test_the_null_statistics_from_counts_equal_the_direct_ones():
    rng = np.random.default_rng(1)
    values = rng.normal(size=40)
    window_rows, pseudo_rows = rng.choice(40, 25, replace=False), rng.choice(40, 30, replace=False)
    window, pseudo = np.zeros((1, 40)), np.zeros((1, 40))
    window[0, window_rows], pseudo[0, pseudo_rows] = 1, 1
    assert _null_wasserstein(values, window, pseudo)[0] == pytest.approx(
        normed_wasserstein(values[pseudo_rows], values[window_rows]), rel=1e-9)
    labels = rng.choice(["x", "y", "z"], 40)
    assert _null_jensen_shannon(labels, window, pseudo)[0] == pytest.approx(
        jensen_shannon(labels[pseudo_rows], labels[window_rows]), rel=1e-9)
    points = rng.normal(size=(40, 3))
    gamma = rbf_gamma(points)
    kernel = np.exp(-gamma * ((points[:, None, :] - points[None, :, :]) ** 2).sum(-1))
    shared = np.intersect1d(window_rows, pseudo_rows)  # a point in both sets is not a pair across them
    disjoint_pseudo = np.setdiff1d(pseudo_rows, shared)
    pseudo_only = np.zeros((1, 40))
    pseudo_only[0, disjoint_pseudo] = 1
    assert _null_mmd(kernel, window, pseudo_only)[0] == pytest.approx(
        mmd2u(points[disjoint_pseudo], points[window_rows], gamma), rel=1e-9)


def test_a_threshold_and_a_p_value_say_the_same_thing():
    null = FeatureNull("f", WASSERSTEIN, np.sort(np.random.default_rng(2).gamma(2.0, size=999)))
    critical = 0.01
    threshold = null.threshold(critical)
    assert null.p_value(threshold) <= critical < null.p_value(np.nextafter(threshold, -np.inf))


@pytest.mark.parametrize("rate, most", [(0.01, 9), (0.05, 27)])
def test_windows_of_the_reference_distribution_alarm_at_the_stated_rate(rate, most):
    """300 fresh windows of 200 drawn from the reference's distribution (not from the reference):
    at 1% nominal, 9 or more alarms happen with probability 0.1%; at 5% (expected 15), fewer
    than 5 or more than 27 with probability < 0.1%, so a calibration far too strict also fails."""
    rng = np.random.default_rng(3)
    reference = _frame(500, rng)
    config = DriftConfig(false_alarm_rate=rate)
    prepared, cache = prepare_reference(reference, config), {}
    alarms = sum(detect(reference, _frame(200, rng), config, cache=cache, prepared=prepared).drifted
                 for _ in range(WINDOWS))
    assert alarms < most
    if rate == 0.05:
        assert alarms >= 5


@pytest.mark.parametrize("shift, kind, feature", [
    ({"confidence_shift": 1.5}, "output", "confidence"),
    ({"positive": 0.75}, "output", "predicted"),
    ({"embedding_shift": 0.6}, "input", "embedding"),
])
def test_a_shift_planted_in_one_feature_alone_is_flagged_as_its_kind(shift, kind, feature):
    rng = np.random.default_rng(4)
    reference = _frame(500, rng)
    result = detect(reference, _frame(200, rng, **shift), DriftConfig())
    assert result.drifted and result.kinds == (kind,) and result.drifted_features == [feature]
    assert describe(result)[0].startswith(f"{kind} drift: {feature} (p ")


def test_a_feature_constant_in_the_reference_is_not_judged_and_needs_no_embeddings():
    rng = np.random.default_rng(5)
    reference = _frame(300, rng).drop(columns=list(emb.COLUMNS))
    result = detect(reference, _frame(150, rng), DriftConfig())
    assert result.features["unknown_share"]["judged"] is False
    assert "constant in the reference" in result.features["unknown_share"]["reason"]
    assert result.features["embedding"]["judged"] is False
    assert {"confidence", "predicted", "text_chars", "token_count"} == {
        name for name, item in result.features.items() if "score" in item}
