"""Output drift of served predictions against the champion's reference, with Evidently.

Every feature gets an explicit method and threshold: Evidently's defaults switch statistical
tests at 1,000 reference rows, which would make the verdict depend on traffic volume. Distance
measures are used throughout (normed Wasserstein for numbers, Jensen-Shannon for the predicted
label), so "drifted" always means score >= threshold and the score grows with the size of the shift,
not with the number of rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from monitoring.features import CATEGORICAL, FEATURES, NUMERICAL


def _default_methods() -> dict[str, tuple[str, float]]:
    return {
        "confidence": ("wasserstein", 0.25),
        "predicted": ("jensenshannon", 0.1),
        "text_chars": ("wasserstein", 0.25),
        "token_count": ("wasserstein", 0.25),
        "unknown_share": ("wasserstein", 0.25),
    }


@dataclass(frozen=True)
class DriftConfig:
    """methods: feature -> (Evidently drift method, threshold); drift_share: share of features that
    must drift for the window to count as drifted; min_rows: fewer predictions is "too little traffic"."""

    methods: dict[str, tuple[str, float]] = field(default_factory=_default_methods)
    drift_share: float = 0.4
    min_rows: int = 100

    def __post_init__(self) -> None:
        unknown = set(self.methods) - set(FEATURES)
        if unknown:
            raise ValueError(f"no such features {sorted(unknown)}; known: {FEATURES}")
        if not 0 < self.drift_share <= 1 or self.min_rows < 1:
            raise ValueError("drift_share must be in (0, 1] and min_rows >= 1")


@dataclass(frozen=True)
class DriftResult:
    rows_reference: int
    rows_current: int
    features: dict[str, dict]  # feature -> {method, threshold, score, drifted}
    drifted: bool
    insufficient: bool = False

    @property
    def drifted_features(self) -> list[str]:
        return [name for name, item in self.features.items() if item["drifted"]]


def _constant(series: pd.Series) -> bool:
    return series.nunique(dropna=True) <= 1


def detect(reference: pd.DataFrame, current: pd.DataFrame, config: DriftConfig,
           html_path: Path | None = None) -> DriftResult:
    """Compare ``current`` with ``reference`` feature by feature; write Evidently's HTML report if asked."""
    if len(current) < config.min_rows:
        return DriftResult(len(reference), len(current), {}, drifted=False, insufficient=True)
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import ValueDrift

    columns = [name for name in config.methods if name in reference and name in current]
    results: dict[str, dict] = {}
    measured = []
    for name in columns:
        method, threshold = config.methods[name]
        # A feature constant in the reference (e.g. no unknown tokens at all) has no spread to norm
        # a distance by: any change of value is drift, no change is none.
        if name in NUMERICAL and _constant(reference[name]):
            changed = bool((current[name] != reference[name].iloc[0]).mean() > 0.05)
            results[name] = {"method": "constant-reference", "threshold": 0.05, "score": float(changed),
                             "drifted": changed}
            continue
        measured.append(name)
    if measured:
        definition = DataDefinition(numerical_columns=[c for c in measured if c in NUMERICAL],
                                    categorical_columns=[c for c in measured if c in CATEGORICAL])
        report = Report([ValueDrift(column=name, method=config.methods[name][0], threshold=config.methods[name][1])
                         for name in measured])
        snapshot = report.run(reference_data=Dataset.from_pandas(reference[measured], data_definition=definition),
                              current_data=Dataset.from_pandas(current[measured], data_definition=definition))
        for metric in snapshot.dict()["metrics"]:
            name = metric["config"]["column"]
            method, threshold = config.methods[name]
            score = float(metric["value"])
            results[name] = {"method": method, "threshold": threshold, "score": score, "drifted": score >= threshold}
        if html_path is not None:
            html_path.parent.mkdir(parents=True, exist_ok=True)
            snapshot.save_html(str(html_path))
    drifted_share = sum(item["drifted"] for item in results.values()) / max(1, len(results))
    return DriftResult(len(reference), len(current), results, drifted=drifted_share >= config.drift_share)
