"""Render the fault suite's results (tests/faults) as ``bench/results/faults.md``.

The suite's conftest collects, per test, the promise (its docstring), what was observed (counts,
statuses, durations the test recorded), the outcome and the duration, and calls ``write_report``
at the end of the session. Nothing here runs a fault: the table is only ever produced from a run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class FaultResult:
    """One fault test of a real run."""

    fault: str
    promise: str
    observed: dict[str, object] = field(default_factory=dict)
    outcome: str = "not run"  # passed / failed / skipped
    duration_s: float = 0.0


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _observed(observed: dict[str, object]) -> str:
    return "; ".join(f"{key}: {value}" for key, value in observed.items()) or "(nothing recorded)"


def render(results: list[FaultResult], header: str) -> str:
    """The Markdown report: one row per fault, in the order the tests ran."""
    lines = [
        "# Fault suite results",
        "",
        _cell(header),
        "",
        "Produced by `make test-faults` (tests/faults, written by bench/faults.py); do not edit by hand.",
        "",
        "| fault | promise | observed | result | duration |",
        "|---|---|---|---|---|",
    ]
    for result in results:
        lines.append(f"| {_cell(result.fault)} | {_cell(result.promise)} | {_cell(_observed(result.observed))} | "
                     f"{result.outcome} | {result.duration_s:.1f} s |")
    return "\n".join(lines) + "\n"


def write_report(results: list[FaultResult], path: Path, header: str) -> Path:
    """Write the report to ``path`` (a temp name, then renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(render(results, header))
    temp.replace(path)
    return path
