"""Drift thresholds derived from the reference itself, for a stated false-alarm rate per window.

A window of ``n`` predictions is compared with the reference (the champion's outputs on its test
split) feature by feature, with Evidently's distances: normed Wasserstein for numbers,
Jensen-Shannon for the predicted label, MMD for the embeddings. How large a distance is "drift"
depends on the window's size and on the reference, so no fixed number fits: here each threshold
comes from a **two-sample bootstrap null**. Each draw resamples, with replacement, a pseudo-window
of ``n`` rows and a pseudo-reference of the reference's size from the reference and computes every
feature's distance between them: the distances a window of the reference's own distribution
shows by chance.

Several features are tested at once, and text length and token count move together, so the
multiplicity is handled by the min-p method (Westfall and Young): each draw's smallest p-value
over the features gives the null distribution of the smallest p-value, and the critical p-value is
its ``false_alarm_rate`` quantile. A feature drifts when its p-value is at or below the critical
one; a window of the reference's distribution then alarms in about ``false_alarm_rate`` of windows,
whatever the correlation between features.

Draws are multinomial counts over the reference's rows, so every statistic is a vectorised
function of the counts and a null of 2,000 draws takes well under a second for the scalar
features (the MMD costs a matrix product with the reference kernel).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats
from scipy.spatial import distance as scipy_distance

WASSERSTEIN, JENSEN_SHANNON, MMD = "wasserstein", "jensenshannon", "mmd"


# -- the statistics, as Evidently computes them (tests check they agree) ------------------------------

def normed_wasserstein(reference: np.ndarray, current: np.ndarray) -> float:
    """Evidently's "wasserstein": the first Wasserstein distance over the reference's std (floor 0.001)."""
    return float(scipy_stats.wasserstein_distance(reference, current) / max(float(np.std(reference)), 0.001))


def jensen_shannon(reference: np.ndarray, current: np.ndarray) -> float:
    """Evidently's "jensenshannon" for a categorical feature: the distance between the category shares."""
    keys = sorted(set(reference.tolist()) | set(current.tolist()))
    ref = np.array([np.sum(reference == key) for key in keys], dtype=float) / len(reference)
    cur = np.array([np.sum(current == key) for key in keys], dtype=float) / len(current)
    return float(scipy_distance.jensenshannon(ref, cur))


def rbf_gamma(reference: np.ndarray) -> float:
    """The RBF kernel's gamma by Evidently's median rule (1 / median pairwise distance squared),
    taken between reference rows: what the rule gives when the window is like the reference."""
    sample = reference[:1000]
    squared = np.maximum(_squared_distances(sample, sample), 0.0)
    off_diagonal = squared[~np.eye(len(sample), dtype=bool)]
    median = float(np.median(np.sqrt(off_diagonal))) if len(off_diagonal) else 1.0
    return 1.0 / max(median, 1e-12) ** 2


def _squared_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T


def mmd2u(reference: np.ndarray, current: np.ndarray, gamma: float) -> float:
    """The unbiased squared MMD with an RBF kernel (Evidently's ``MMD2u``), for a given gamma."""
    m, n = len(reference), len(current)
    k_xx = np.exp(-gamma * np.maximum(_squared_distances(reference, reference), 0.0))
    k_yy = np.exp(-gamma * np.maximum(_squared_distances(current, current), 0.0))
    k_xy = np.exp(-gamma * np.maximum(_squared_distances(reference, current), 0.0))
    return float((k_xx.sum() - np.trace(k_xx)) / (m * (m - 1)) + (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
                 - 2.0 * k_xy.sum() / (m * n))


# -- the bootstrap null, vectorised over draws of counts ---------------------------------------------

def _null_wasserstein(values: np.ndarray, window: np.ndarray, pseudo: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    support = values[order]
    window_cdf = np.cumsum(window[:, order], axis=1) / window.sum(axis=1, keepdims=True)
    pseudo_cdf = np.cumsum(pseudo[:, order], axis=1) / pseudo.sum(axis=1, keepdims=True)
    distance = (np.abs(window_cdf - pseudo_cdf)[:, :-1] * np.diff(support)).sum(axis=1)
    weights = pseudo / pseudo.sum(axis=1, keepdims=True)
    mean = weights @ values
    spread = np.sqrt(np.maximum(weights @ (values * values) - mean * mean, 0.0))
    return distance / np.maximum(spread, 0.001)


def _null_jensen_shannon(categories: np.ndarray, window: np.ndarray, pseudo: np.ndarray) -> np.ndarray:
    keys = np.unique(categories)
    onehot = (categories[:, None] == keys[None, :]).astype(float)
    p = window @ onehot / window.sum(axis=1, keepdims=True)
    q = pseudo @ onehot / pseudo.sum(axis=1, keepdims=True)
    middle = (p + q) / 2

    def kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(a > 0, a * np.log(a / np.where(b > 0, b, 1.0)), 0.0)
        return terms.sum(axis=1)

    return np.sqrt(np.maximum((kl(p, middle) + kl(q, middle)) / 2, 0.0))


def _null_mmd(kernel: np.ndarray, window: np.ndarray, pseudo: np.ndarray) -> np.ndarray:
    """MMD2u between resampled sets given as counts over the kernel's rows, averaged over pairs of
    distinct reference rows only: a fresh window shares no point with the reference and repeats
    none, while a resample repeats rows, and counting a repeated row as a pair at distance 0 (as
    Evidently's bootstrap does) makes the null's distances too large."""
    window_k = window @ kernel
    same_window, same_pseudo, shared = (window * window).sum(1), (pseudo * pseudo).sum(1), (window * pseudo).sum(1)
    n, m = window.sum(axis=1), pseudo.sum(axis=1)
    within_window = ((window_k * window).sum(axis=1) - same_window) / (n * n - same_window)
    within_pseudo = (((pseudo @ kernel) * pseudo).sum(axis=1) - same_pseudo) / (m * m - same_pseudo)
    across = ((window_k * pseudo).sum(axis=1) - shared) / (n * m - shared)
    return within_window + within_pseudo - 2.0 * across


@dataclass(frozen=True)
class FeatureNull:
    """One feature's null distances (sorted), for p-values and thresholds."""

    name: str
    method: str
    draws: np.ndarray

    def p_value(self, score: float) -> float:
        """The chance of a distance at least ``score`` under the null, ``(1 + #>=) / (1 + draws)``."""
        at_least = len(self.draws) - np.searchsorted(self.draws, score, side="left")
        return float((1 + at_least) / (1 + len(self.draws)))

    def threshold(self, critical_p: float) -> float:
        """The smallest distance whose p-value is at or below ``critical_p`` (a distance drifts
        when it is at least this; inf when no distance can)."""
        allowed = int(np.floor(critical_p * (1 + len(self.draws)))) - 1  # null draws at or above it
        if allowed < 0:
            return float("inf")
        if allowed >= len(self.draws):
            return float("-inf")
        return float(np.nextafter(self.draws[len(self.draws) - allowed - 1], np.inf))


@dataclass(frozen=True)
class Calibration:
    """The null at one window size: every feature's null distances and the critical p-value that
    keeps the family-wise false-alarm rate at ``false_alarm_rate``."""

    rows: int
    false_alarm_rate: float
    critical_p: float
    nulls: dict[str, FeatureNull]


def _min_p_critical(null_stats: np.ndarray, false_alarm_rate: float) -> float:
    """The critical p-value: the largest c with P(min over features of p <= c) <= rate under the null."""
    draws = null_stats.shape[0]
    ranks = np.empty_like(null_stats)
    for column in range(null_stats.shape[1]):
        ordered = np.sort(null_stats[:, column])
        at_least = draws - np.searchsorted(ordered, null_stats[:, column], side="left")
        ranks[:, column] = at_least / (1 + draws)  # the draw's own p-value without itself: (#>= - 1 + 1)/(1+B)
    smallest = np.sort(ranks.min(axis=1))
    allowed = int(np.floor(false_alarm_rate * draws))
    if allowed < 1:
        return 1.0 / (1 + draws) * 0.5  # too few draws to resolve the rate: nothing can drift
    # The largest c such that at most ``allowed`` draws have their smallest p at or below c.
    return float(smallest[allowed - 1]) if smallest[allowed] > smallest[allowed - 1] else \
        float(np.nextafter(smallest[allowed], 0.0))


def calibrate(reference: dict[str, tuple[str, np.ndarray]], rows: int, false_alarm_rate: float, draws: int,
              seed: int = 0, embedding_rows: int | None = None) -> Calibration:
    """The null for windows of ``rows`` predictions.

    Args:
        reference: feature -> (method, reference values): 1-D for ``WASSERSTEIN`` and
            ``JENSEN_SHANNON``; for ``MMD`` a (rows x dims) array, whose null is drawn at
            ``embedding_rows`` (the window's embedding sample, at most ``rows``).
        false_alarm_rate: the family-wise rate per window.
        draws: bootstrap draws (resolution: the critical p-value needs ``rate x draws`` >= 1).
    """
    rng = np.random.default_rng(seed)
    size = len(next(iter(reference.values()))[1])
    uniform = np.full(size, 1.0 / size)
    window = rng.multinomial(rows, uniform, size=draws).astype(float)
    pseudo = rng.multinomial(size, uniform, size=draws).astype(float)
    columns = {}
    for name, (method, values) in reference.items():
        if method == WASSERSTEIN:
            columns[name] = _null_wasserstein(values.astype(float), window, pseudo)
        elif method == JENSEN_SHANNON:
            columns[name] = _null_jensen_shannon(np.asarray(values), window, pseudo)
        elif method == MMD:
            columns[name] = _null_mmd_for(values, rows if embedding_rows is None else embedding_rows, window,
                                          pseudo, rng)
        else:
            raise ValueError(f"unknown drift method {method!r}")
    null_stats = np.column_stack([columns[name] for name in reference])
    critical = _min_p_critical(null_stats, false_alarm_rate)
    nulls = {name: FeatureNull(name, method, np.sort(columns[name])) for name, (method, _) in reference.items()}
    return Calibration(rows, false_alarm_rate, critical, nulls)


def _null_mmd_for(embeddings: np.ndarray, embedding_rows: int, window: np.ndarray, pseudo: np.ndarray,
                  rng: np.random.Generator) -> np.ndarray:
    """The MMD null; the window's draws are shared with the other features when the embedding
    sample is the whole window, else drawn at the sample's size."""
    kernel = np.exp(-rbf_gamma(embeddings) * np.maximum(_squared_distances(embeddings, embeddings), 0.0))
    if embedding_rows != int(window[0].sum()):
        size = len(embeddings)
        window = rng.multinomial(embedding_rows, np.full(size, 1.0 / size), size=len(window)).astype(float)
    return _null_mmd(kernel, window, pseudo)
