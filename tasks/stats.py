"""Statistics behind the decisions: intervals of accuracy and paired comparisons of two models on the
same texts. Standard library only (numbers in, numbers out), so the gates and the report share it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

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

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return (f"{self.difference:+.4f} (95% interval {self.low:+.4f} to {self.high:+.4f}; "
                f"{self.candidate_only} texts only the candidate got right, {self.reference_only} only the "
                f"champion; McNemar p = {self.p_worse:.3g} that the candidate is worse)")


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
