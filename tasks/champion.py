"""The serving champion's score: promotion measures it, the gates compare candidates with it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChampionScore:
    """The serving champion's accuracy on this run's test split, or why it could not be measured, and
    whether it got each test text right (in the split's order), for the paired comparison, and the
    label id it answered for each (for the paired comparison of macro-F1)."""

    accuracy: float | None
    note: str
    correct: tuple[bool, ...] | None = None
    predicted: tuple[int, ...] | None = None


@dataclass(frozen=True)
class TestAnswers:
    """A model's answers on the test split, in the split's order: the true label id of each text and
    the label id the model answered."""

    truth: tuple[int, ...]
    predicted: tuple[int, ...]

    @property
    def correct(self) -> tuple[bool, ...]:
        return tuple(true == guess for true, guess in zip(self.truth, self.predicted))
