"""The serving champion's score: promotion measures it, the gates compare candidates with it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChampionScore:
    """The serving champion's accuracy on this run's test split, or why it could not be measured."""

    accuracy: float | None
    note: str
