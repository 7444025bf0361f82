"""The serving champion's score: promotion measures it, the gates compare candidates with it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChampionScore:
    """The serving champion's accuracy on this run's test split, or why it could not be measured, and
    whether it got each test text right (in the split's order), for the paired comparison."""

    accuracy: float | None
    note: str
    correct: tuple[bool, ...] | None = None
