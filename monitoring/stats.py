"""Statistics behind the decisions: intervals of accuracy, paired comparisons of two models on the
same texts (accuracy: McNemar; macro-F1: a paired bootstrap), macro-F1 with a bootstrap interval and
the per-class table. Numbers in, numbers out, so the gates, the report
and the monitor (live quality from label feedback) share it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

Z95 = 1.959963984540054  # the normal quantile of a two-sided 95% interval


def wilson_interval(successes: int, total: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (sound near 0 and 1, unlike the Wald interval)."""
    if total <= 0:
        return (0.0, 1.0)
    share = successes / total
    denominator = 1 + z * z / total
    centre = (share + z * z / (2 * total)) / denominator
    half = z * math.sqrt(share * (1 - share) / total + z * z / (4 * total * total)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def binomial_tail(at_least: int, trials: int) -> float:
    """P(X >= at_least) for X ~ Binomial(trials, 1/2): the exact one-sided McNemar p-value."""
    if at_least <= 0:
        return 1.0
    return sum(math.comb(trials, k) for k in range(at_least, trials + 1)) / 2 ** trials


@dataclass(frozen=True)
class PairedComparison:
    """Candidate vs reference on the same texts: the accuracy difference (candidate minus reference),
    its 95% interval, and the exact one-sided McNemar p-value that the candidate is worse.

    Attributes:
        texts: how many texts both answered.
        candidate_only / reference_only: texts only the candidate / only the reference got right
            (the discordant pairs; the texts both got right or wrong say nothing about the difference).
    """

    texts: int
    candidate_only: int
    reference_only: int
    difference: float
    low: float
    high: float
    p_worse: float
    metric: str = "accuracy"
    test: str = "McNemar"

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self, reference: str = "champion") -> str:
        return (f"{self.difference:+.4f} (95% interval {self.low:+.4f} to {self.high:+.4f}; "
                f"{self.candidate_only} texts only the candidate got right, {self.reference_only} only the "
                f"{reference}; {self.test} p = {self.p_worse:.3g} that the candidate is worse)")


def paired_comparison(candidate_correct: Sequence[bool], reference_correct: Sequence[bool]) -> PairedComparison:
    """Compare two models' per-text correctness on the same texts in the same order.

    The interval is the Wald interval of a paired difference of proportions,
    (b - c) / n +- 1.96 * sqrt(b + c - (b - c)^2 / n) / n, with b and c the discordant counts."""
    if len(candidate_correct) != len(reference_correct) or not candidate_correct:
        raise ValueError(f"a paired comparison needs the same texts: got {len(candidate_correct)} and "
                         f"{len(reference_correct)} answers")
    texts = len(candidate_correct)
    candidate_only = sum(1 for ours, theirs in zip(candidate_correct, reference_correct) if ours and not theirs)
    reference_only = sum(1 for ours, theirs in zip(candidate_correct, reference_correct) if theirs and not ours)
    difference = (candidate_only - reference_only) / texts
    spread = math.sqrt(max(0.0, candidate_only + reference_only - (candidate_only - reference_only) ** 2 / texts))
    half = Z95 * spread / texts
    return PairedComparison(texts, candidate_only, reference_only, difference, difference - half, difference + half,
                            binomial_tail(reference_only, candidate_only + reference_only))


def _class_codes(truth: Sequence[str], predicted: Sequence[str],
                 labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray, int, list[int]]:
    """Truth and predictions as integer codes, how many codes, and the codes of the ``labels`` that
    occur in the truth or the predictions (the classes macro-F1 averages over)."""
    if len(truth) != len(predicted):
        raise ValueError(f"macro-F1 needs one prediction per true label: got {len(truth)} and {len(predicted)}")
    if not len(truth):
        raise ValueError("macro-F1 of no predictions is undefined: pass at least one labelled prediction")
    classes = list(dict.fromkeys(labels))
    classes += sorted({str(value) for value in (*truth, *predicted)} - set(classes))
    code = {name: index for index, name in enumerate(classes)}
    truth_codes = np.array([code[str(value)] for value in truth], dtype=np.int64)
    predicted_codes = np.array([code[str(value)] for value in predicted], dtype=np.int64)
    present = set(truth_codes.tolist()) | set(predicted_codes.tolist())
    averaged = [code[name] for name in dict.fromkeys(labels) if code[name] in present]
    return truth_codes, predicted_codes, len(classes), averaged


def _macro_f1_of_confusions(confusions: np.ndarray, averaged: list[int]) -> np.ndarray:
    """Macro-F1 of each confusion matrix in ``confusions`` (draws x true x predicted) over ``averaged``;
    a class with no true and no predicted text in a draw is left out of that draw's mean."""
    hits = np.diagonal(confusions, axis1=1, axis2=2)
    wrong = confusions.sum(axis=1) + confusions.sum(axis=2) - 2 * hits  # false positives + false negatives
    denominator = (2 * hits + wrong)[:, averaged].astype(np.float64)
    f1 = np.divide(2 * hits[:, averaged], denominator, out=np.full_like(denominator, np.nan),
                   where=denominator > 0)
    counted = np.isfinite(f1).sum(axis=1)
    return np.where(counted > 0, np.nansum(f1, axis=1) / np.maximum(counted, 1), 0.0)


def macro_f1(truth: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> float:
    """The unweighted mean of the per-class F1 over the ``labels`` that occur in ``truth`` or
    ``predicted`` (a class in neither has no F1 and is left out, as in scikit-learn's
    ``f1_score(average="macro")`` without ``labels``); values outside ``labels`` count as errors of
    the classes they were confused with. 0.0 when no class of ``labels`` occurs."""
    truth_codes, predicted_codes, classes, averaged = _class_codes(truth, predicted, labels)
    confusion = np.bincount(truth_codes * classes + predicted_codes, minlength=classes * classes)
    return float(_macro_f1_of_confusions(confusion.reshape(1, classes, classes), averaged)[0])


def bootstrap_macro_f1(truth: Sequence[str], predicted: Sequence[str], labels: Sequence[str], draws: int = 1000,
                       seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of ``macro_f1``: ``draws`` resamples of the (truth,
    prediction) pairs with replacement, the 2.5th and 97.5th percentiles of their macro-F1."""
    if draws < 1:
        raise ValueError(f"draws must be >= 1, not {draws}")
    truth_codes, predicted_codes, classes, averaged = _class_codes(truth, predicted, labels)
    pairs = truth_codes * classes + predicted_codes
    rng = np.random.default_rng(seed)
    scores = []
    chunk = max(1, 2_000_000 // len(pairs))  # draws per chunk: bounded memory for large windows
    for first in range(0, draws, chunk):
        count = min(chunk, draws - first)
        sampled = pairs[rng.integers(0, len(pairs), size=(count, len(pairs)))]
        offsets = (np.arange(count) * classes * classes)[:, None]
        confusions = np.bincount((sampled + offsets).ravel(), minlength=count * classes * classes)
        scores.append(_macro_f1_of_confusions(confusions.reshape(count, classes, classes), averaged))
    low, high = np.percentile(np.concatenate(scores), [2.5, 97.5])
    return float(low), float(high)


def paired_bootstrap_macro_f1(truth: Sequence[str], candidate: Sequence[str], reference: Sequence[str],
                              labels: Sequence[str], draws: int = 2000, seed: int = 0) -> PairedComparison:
    """Candidate vs reference macro-F1 on the same texts: the observed difference (candidate minus
    reference), the 95% percentile interval of the difference over ``draws`` resamples of the texts
    (the same resampled texts for both models, so what they share cancels), and a one-sided p-value
    that the candidate is worse: the share of resamples in which it is not, (1 + #{d* >= 0}) / (1 + draws)."""
    if not (len(truth) == len(candidate) == len(reference)) or not len(truth):
        raise ValueError(f"a paired comparison needs the same texts: got {len(truth)} true labels, "
                         f"{len(candidate)} and {len(reference)} answers")
    if draws < 1:
        raise ValueError(f"draws must be >= 1, not {draws}")
    names = [*labels, *sorted({str(value) for value in (*truth, *candidate, *reference)} - set(map(str, labels)))]
    ours = _class_codes(truth, candidate, names)
    theirs = _class_codes(truth, reference, names)
    every_text = np.arange(len(truth))[None, :]
    observed = float((_macro_f1_of_draws(ours, every_text) - _macro_f1_of_draws(theirs, every_text))[0])
    rng = np.random.default_rng(seed)
    differences = []
    chunk = max(1, 1_000_000 // len(truth))  # draws per chunk: bounded memory for large test splits
    for first in range(0, draws, chunk):
        rows = rng.integers(0, len(truth), size=(min(chunk, draws - first), len(truth)))
        differences.append(_macro_f1_of_draws(ours, rows) - _macro_f1_of_draws(theirs, rows))
    samples = np.concatenate(differences)
    low, high = np.percentile(samples, [2.5, 97.5])
    candidate_right = np.asarray(ours[0]) == np.asarray(ours[1])
    reference_right = np.asarray(theirs[0]) == np.asarray(theirs[1])
    return PairedComparison(len(truth), int((candidate_right & ~reference_right).sum()),
                            int((reference_right & ~candidate_right).sum()), observed, float(low), float(high),
                            float((1 + (samples >= 0).sum()) / (1 + len(samples))), "macro_f1", "paired bootstrap")


def _macro_f1_of_draws(coded: tuple[np.ndarray, np.ndarray, int, list[int]], rows: np.ndarray) -> np.ndarray:
    """Macro-F1 of each row of text indices ``rows`` (draws x texts) of one model's coded answers."""
    truth_codes, predicted_codes, classes, averaged = coded
    pairs = (truth_codes * classes + predicted_codes)[rows]
    offsets = (np.arange(len(rows)) * classes * classes)[:, None]
    confusions = np.bincount((pairs + offsets).ravel(), minlength=len(rows) * classes * classes)
    return _macro_f1_of_confusions(confusions.reshape(len(rows), classes, classes), averaged)


def per_class_scores(truth: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> list[dict]:
    """Precision, recall, F1 and support (true texts) of each of ``labels``, in their order. A class
    never predicted has precision 0; a class with no true text has recall and F1 0 (support says so)."""
    truth_codes, predicted_codes, classes, _ = _class_codes(truth, predicted, labels)
    confusion = np.bincount(truth_codes * classes + predicted_codes, minlength=classes * classes)
    confusion = confusion.reshape(classes, classes)
    rows = []
    for index, name in enumerate(dict.fromkeys(labels)):
        hits, support, answered = int(confusion[index, index]), int(confusion[index].sum()), int(confusion[:, index].sum())
        precision = hits / answered if answered else 0.0
        recall = hits / support if support else 0.0
        f1 = 2 * hits / (support + answered) if support + answered else 0.0
        rows.append({"label": str(name), "precision": precision, "recall": recall, "f1": f1, "support": support})
    return rows
