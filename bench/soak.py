"""The soak benchmark (issue 20 item 5): a bounded request rate through the gateway on loopback for a long
stretch (`make bench-soak`: 600 s), with a promotion at a third of it and a rollback at two thirds.

Its promises, judged from what one run recorded:

- no 5xx (and no request without an answer) outside the documented 503 windows: the spans of the
  promotion's and the rollback's switch (the architecture promises none inside them either; they are
  counted);
- each service's memory flat: the resident set (RSS, summed over the service's process tree, sampled
  every few seconds) after the warm-up, median of the last third against the median of the first third,
  grows by less than ``GROWTH_LIMIT``; the least-squares slope (MiB per minute) is reported beside it;
- every prediction answered 200 is in the prediction log exactly once, and nothing else was logged.

The pure functions (window classification, RSS trend, latency percentiles, the prediction check, the
report) take plain values; ``RateTraffic`` and ``RssSampler`` are the driver's threads, started only by
their caller. tests/faults/test_soak.py runs it against the fault suite's stack and writes
bench/results/soak.{json,md} when ``SOAK_REPORT`` names the Markdown file.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

GROWTH_LIMIT = 0.10  # "flat": the last third's median RSS at most 10% over the first third's
MIB = 1024 * 1024
MAX_RATE, MAX_DURATION_S = 100.0, 3600.0
BATCH_PATTERN = (1, 1, 2, 1, 4)  # texts per request, in turn: mostly single texts, some small batches


@dataclass(frozen=True)
class Answer:
    """One classify request: when it was sent (seconds since the soak began), how long it took, its status
    (0: no answer, the connection failed or timed out), the texts sent and the prediction ids returned."""

    sent_s: float
    latency_ms: float
    status: int
    texts: int
    prediction_ids: tuple[str, ...] = ()
    error: str = ""

    @property
    def done_s(self) -> float:
        return self.sent_s + self.latency_ms / 1000.0


@dataclass(frozen=True)
class Window:
    """A span (seconds since the soak began) in which the docs allow a 503, and why."""

    name: str
    start_s: float
    end_s: float
    reason: str

    def overlaps(self, answer: Answer) -> bool:
        return answer.sent_s <= self.end_s and answer.done_s >= self.start_s


def classify_errors(answers: Iterable[Answer], windows: Sequence[Window]) -> dict:
    """Counts by status, and every 5xx or unanswered request placed inside a window (by the window's name)
    or outside all of them (``outside``: each one breaks the promise)."""
    by_status: Counter[int] = Counter()
    inside: dict[str, Counter[int]] = {window.name: Counter() for window in windows}
    outside: Counter[int] = Counter()
    for answer in answers:
        by_status[answer.status] += 1
        if answer.status != 0 and answer.status < 500:
            continue
        window = next((w for w in windows if w.overlaps(answer)), None)
        (inside[window.name] if window else outside)[answer.status] += 1
    return {"by_status": {str(k): v for k, v in sorted(by_status.items())},
            "inside_windows": {name: {str(k): v for k, v in sorted(c.items())} for name, c in inside.items()},
            "outside_windows": {str(k): v for k, v in sorted(outside.items())},
            "outside_count": sum(outside.values())}


def rss_trend(samples: Sequence[tuple[float, int]], warmup_s: float) -> dict:
    """RSS after the warm-up: first and last sample, medians of the first and last thirds, their growth
    (MiB and share of the first third's median), the least-squares slope in MiB/min, and whether the
    growth is under ``GROWTH_LIMIT``. Too few samples (fewer than 3) is not flat: there is no evidence."""
    kept = [(t, rss) for t, rss in samples if t >= warmup_s]
    if len(kept) < 3:
        return {"samples": len(kept), "flat": False, "why": f"{len(kept)} samples after the warm-up (need 3)"}
    times = np.array([t for t, _ in kept])
    mib = np.array([rss for _, rss in kept]) / MIB
    third = len(kept) // 3
    first, last = float(np.median(mib[:third])), float(np.median(mib[-third:]))
    slope = float(np.polyfit(times / 60.0, mib, 1)[0]) if np.ptp(times) > 0 else 0.0
    growth = last - first
    share = growth / first if first > 0 else float("inf")
    return {"samples": len(kept), "start_mib": round(float(mib[0]), 1), "end_mib": round(float(mib[-1]), 1),
            "max_mib": round(float(mib.max()), 1), "first_third_median_mib": round(first, 1),
            "last_third_median_mib": round(last, 1), "growth_mib": round(growth, 1),
            "growth_pct": round(100 * share, 2), "slope_mib_per_min": round(slope, 3), "flat": share < GROWTH_LIMIT}


def phase_medians(samples: Sequence[tuple[float, int]], marks: Sequence[tuple[str, float]]) -> dict[str, float]:
    """Median RSS (MiB) between consecutive marks (name, start second): e.g. before the promotion, between
    it and the rollback, after the rollback. A phase without samples is left out."""
    result = {}
    for index, (name, start) in enumerate(marks):
        end = marks[index + 1][1] if index + 1 < len(marks) else float("inf")
        values = [rss for t, rss in samples if start <= t < end]
        if values:
            result[name] = round(float(np.median(values)) / MIB, 1)
    return result


def latency_summary(answers: Iterable[Answer]) -> dict:
    """p50/p95/p99/max (ms) of the requests answered 200, with their count."""
    values = np.array([a.latency_ms for a in answers if a.status == 200])
    if values.size == 0:
        return {"count": 0}
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"count": int(values.size), "p50_ms": round(float(p50), 1), "p95_ms": round(float(p95), 1),
            "p99_ms": round(float(p99), 1), "max_ms": round(float(values.max()), 1)}


def latency_by_phase(answers: Sequence[Answer], windows: Sequence[Window],
                     marks: Sequence[tuple[str, float]]) -> dict[str, dict]:
    """Latency of the 200 answers inside each window, and in each phase between marks outside every window
    (so a switch's cost shows apart from the steady state's)."""
    result = {f"during {w.name}": latency_summary(a for a in answers if w.overlaps(a)) for w in windows}
    steady = [a for a in answers if not any(w.overlaps(a) for w in windows)]
    for index, (name, start) in enumerate(marks):
        end = marks[index + 1][1] if index + 1 < len(marks) else float("inf")
        result[name] = latency_summary(a for a in steady if start <= a.sent_s < end)
    return result


def latency_series(answers: Sequence[Answer], bucket_s: float = 30.0) -> list[dict]:
    """Per ``bucket_s`` of sending time: requests, 200 answers, p50 and p99 (ms) of those answers."""
    buckets: dict[int, list[Answer]] = {}
    for answer in answers:
        buckets.setdefault(int(answer.sent_s // bucket_s), []).append(answer)
    return [{"from_s": key * bucket_s, "requests": len(group)} | latency_summary(group)
            for key, group in sorted(buckets.items())]


def prediction_check(answers: Iterable[Answer], logged: Sequence[str]) -> dict:
    """The 200 answers against the prediction log's new rows: one id per text answered, each id logged
    exactly once, no logged id that was not answered."""
    answered = [a for a in answers if a.status == 200]
    served = [pid for a in answered for pid in a.prediction_ids]
    counts = Counter(logged)
    served_set = set(served)
    result = {"texts_answered": sum(a.texts for a in answered), "prediction_ids_answered": len(served),
              "distinct_ids_answered": len(served_set), "log_rows": len(logged),
              "log_rows_for_answered_ids": sum(counts[pid] for pid in served_set),
              "answered_not_logged": len(served_set - set(counts)),
              "logged_twice_or_more": sum(1 for c in counts.values() if c > 1),
              "logged_not_answered": len(set(counts) - served_set)}
    result["equal"] = (result["texts_answered"] == len(served) == len(served_set) == len(logged)
                       == result["log_rows_for_answered_ids"] and not result["answered_not_logged"]
                       and not result["logged_twice_or_more"] and not result["logged_not_answered"])
    return result


@dataclass
class SoakRun:
    """What one soak recorded: the plan, the answers, the 503 windows, RSS series per service and the
    prediction log's new ids; ``events`` holds what the promotion and rollback returned."""

    duration_s: float
    rate_per_s: float
    warmup_s: float
    answers: list[Answer]
    windows: list[Window]
    rss: dict[str, list[tuple[float, int]]]
    logged_ids: list[str]
    events: dict[str, object] = field(default_factory=dict)
    late_starts: int = 0
    header: str = ""
    notes: list[str] = field(default_factory=list)


def _switches_succeeded(events: dict[str, object]) -> bool:
    """Every recorded switch (an event with an ``ok`` flag) succeeded, and there was at least one."""
    switches = [event for event in events.values() if isinstance(event, dict) and "ok" in event]
    return bool(switches) and all(event["ok"] for event in switches)


def build_report(run: SoakRun) -> dict:
    """Every figure of the run, and a verdict per promise."""
    errors = classify_errors(run.answers, run.windows)
    marks = [(f"before {run.windows[0].name}" if run.windows else "all", 0.0)]
    marks += [(f"after {w.name}", w.end_s) for w in run.windows]
    rss = {name: rss_trend(series, run.warmup_s) | {"phase_medians_mib": phase_medians(series, marks)}
           for name, series in run.rss.items()}
    predictions = prediction_check(run.answers, run.logged_ids)
    wall = max((a.done_s for a in run.answers), default=0.0)
    promises = {"no 5xx outside the 503 windows": errors["outside_count"] == 0,
                f"memory flat (growth < {GROWTH_LIMIT:.0%}) for every service": all(r["flat"] for r in rss.values()),
                "prediction log rows = texts answered": predictions["equal"],
                "promotions and rollback succeeded": _switches_succeeded(run.events)}
    return {"header": run.header, "notes": run.notes, "duration_s": run.duration_s,
            "target_rate_per_s": run.rate_per_s,
            "achieved_rate_per_s": round(len(run.answers) / wall, 2) if wall else 0.0,
            "requests": len(run.answers), "late_starts": run.late_starts, "warmup_s": run.warmup_s,
            "growth_limit": GROWTH_LIMIT, "windows": [asdict(w) | {"duration_s": round(w.end_s - w.start_s, 2)}
                                                      for w in run.windows],
            "errors": errors, "latency": latency_summary(run.answers),
            "latency_by_phase": latency_by_phase(run.answers, run.windows, marks), "rss": rss,
            "predictions": predictions,
            "events": run.events, "promises": promises, "passed": all(promises.values()),
            "latency_series": latency_series(run.answers),
            "rss_series": {name: [[round(t, 1), rss] for t, rss in series] for name, series in run.rss.items()}}


def _rss_rows(rss: dict) -> list[str]:
    rows = ["| service | samples | start MiB | end MiB | first-third median | last-third median | growth | slope "
            "MiB/min | by phase (median MiB) | flat |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rss.items():
        if "growth_mib" not in r:
            rows.append(f"| {name} | {r['samples']} | - | - | - | - | - | - | - | no ({r.get('why', '')}) |")
            continue
        phases = "; ".join(f"{k}: {v}" for k, v in r["phase_medians_mib"].items())
        rows.append(f"| {name} | {r['samples']} | {r['start_mib']} | {r['end_mib']} | {r['first_third_median_mib']} | "
                    f"{r['last_third_median_mib']} | {r['growth_mib']:+.1f} MiB ({r['growth_pct']:+.1f}%) | "
                    f"{r['slope_mib_per_min']:+.2f} | {phases} | {'yes' if r['flat'] else '**no**'} |")
    return rows


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{'no answer' if status == '0' else status}: {n}" for status, n in counts.items()) or "none"


def _window_rows(report: dict) -> list[str]:
    rows = ["| window | reason | from s | to s | duration s | 5xx / unanswered inside |", "|---|---|---|---|---|---|"]
    inside = report["errors"]["inside_windows"]
    for w in report["windows"]:
        rows.append(f"| {w['name']} | {w['reason']} | {w['start_s']:.1f} | {w['end_s']:.1f} | {w['duration_s']} | "
                    f"{_counts(inside.get(w['name'], {}))} |")
    return rows


def _prediction_rows(p: dict) -> list[str]:
    return ["| texts answered 200 | prediction ids returned | distinct | log rows (new) | rows for answered ids | "
            "answered, not logged | logged twice | logged, not answered | equal |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| {p['texts_answered']} | {p['prediction_ids_answered']} | {p['distinct_ids_answered']} | "
            f"{p['log_rows']} | "
            f"{p['log_rows_for_answered_ids']} | {p['answered_not_logged']} | {p['logged_twice_or_more']} | "
            f"{p['logged_not_answered']} | {'yes' if p['equal'] else '**no**'} |"]


def _event_line(name: str, event: object) -> str:
    if not (isinstance(event, dict) and "ok" in event):
        return f"- {name}: {event}"
    if not event["ok"]:
        return f"- {name}: **failed** after {event['seconds']} s: {event['error']}"
    info, metrics = event.get("info", {}), event.get("metrics", {})
    return (f"- {name}: {event.get('status')} in {event.get('seconds')} s, MLflow version "
            f"{info.get('mlflow_version')} served as Triton version {int(metrics.get('triton_version', 0))}")


def render(report: dict) -> str:
    """The Markdown page of one run."""
    lat, errors = report["latency"], report["errors"]
    lines = ["# Soak benchmark", "", report["header"], "",
             "Produced by `make bench-soak` (tests/faults/test_soak.py, bench/soak.py); do not edit by hand.", "",
             f"{report['requests']} classify requests in {report['duration_s']:.0f} s at "
             f"{report['target_rate_per_s']}/s (achieved {report['achieved_rate_per_s']}/s, "
             f"{report['late_starts']} started over 50 ms late), texts per "
             f"request cycling {BATCH_PATTERN}.", "", *[f"{note}\n" for note in report["notes"]], "## Promises", "",
             "| promise | result |", "|---|---|"]
    lines += [f"| {name} | {'pass' if ok else '**FAIL**'} |" for name, ok in report["promises"].items()]
    lines += ["", "## Requests", "", "| status | count |", "|---|---|"]
    lines += [f"| {'no answer' if s == '0' else s} | {n} |" for s, n in errors["by_status"].items()]
    lines += ["", f"5xx or unanswered outside the windows: {errors['outside_count']} "
              f"({_counts(errors['outside_windows'])}).", "", "## 503 windows", ""] + _window_rows(report)
    lines += ["", "## Latency of the 200 answers", "", "| requests | p50 ms | p95 ms | p99 ms | max ms |",
              "|---|---|---|---|---|"]
    lines.append(f"| {lat['count']} | {lat.get('p50_ms', '-')} | {lat.get('p95_ms', '-')} | {lat.get('p99_ms', '-')} | "
                 f"{lat.get('max_ms', '-')} |")
    lines += ["", "By phase (a request overlapping a window counts in the window, not in its phase):", "",
              "| span | requests | p50 ms | p95 ms | p99 ms | max ms |", "|---|---|---|---|---|---|"]
    lines += [f"| {name} | {r['count']} | {r.get('p50_ms', '-')} | {r.get('p95_ms', '-')} | {r.get('p99_ms', '-')} | "
              f"{r.get('max_ms', '-')} |" for name, r in report["latency_by_phase"].items()]
    lines += ["", "## Memory (RSS of each service's process tree)", "",
              f"Sampled every few seconds; the first {report['warmup_s']:.0f} s are warm-up and left out. Flat: the "
              f"last third's median at most {report['growth_limit']:.0%} over the first third's. The series are in "
              "soak.json.", ""] + _rss_rows(report["rss"])
    lines += ["", "## Prediction log", ""] + _prediction_rows(report["predictions"])
    lines += ["", "## Promotions and rollback", ""]
    lines += [_event_line(name, value) for name, value in report["events"].items()]
    return "\n".join(lines) + "\n"


def write_report(report: dict, markdown_path: Path) -> tuple[Path, Path]:
    """soak.md and soak.json beside it, each written to a temp name and renamed into place."""
    json_path = markdown_path.with_suffix(".json")
    markdown_path.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((markdown_path, render(report)), (json_path, json.dumps(report, indent=1) + "\n")):
        temp = path.with_name(f".{path.name}.tmp")
        temp.write_text(text)
        temp.replace(path)
    return markdown_path, json_path


# -- the driver's threads ------------------------------------------------------------------------------


def process_tree_rss(pid: int) -> int:
    """RSS in bytes of ``pid`` and all its descendants (0 when it is gone); shared pages count in each."""
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


class RssSampler:
    """Samples each service's process-tree RSS every ``every_s`` seconds in a thread; ``read_pid(name)``
    gives the service's recorded pid (None: not running, no sample)."""

    def __init__(self, read_pid: Callable[[str], int | None], services: Sequence[str], origin: float,
                 every_s: float = 5.0) -> None:
        self.read_pid, self.services, self.origin, self.every_s = read_pid, services, origin, every_s
        self.series: dict[str, list[tuple[float, int]]] = {name: [] for name in services}
        self.pids: dict[str, set[int]] = {name: set() for name in services}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        for name in self.services:
            pid = self.read_pid(name)
            if pid is not None:
                self.pids[name].add(pid)
                self.series[name].append((time.monotonic() - self.origin, process_tree_rss(pid)))

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.every_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


class RateTraffic:
    """Classify requests on a fixed schedule (open loop) at ``rate_per_s`` for ``duration_s``, at most
    ``concurrency`` in flight, in a thread; each answer is recorded with its time since ``origin``."""

    def __init__(self, url: str, rate_per_s: float, duration_s: float, texts: Sequence[str], origin: float,
                 concurrency: int = 8) -> None:
        if not 0 < rate_per_s <= MAX_RATE or not 0 < duration_s <= MAX_DURATION_S:
            raise ValueError(f"rate must be in (0, {MAX_RATE}] /s and duration in (0, {MAX_DURATION_S}] s")
        if not url.startswith(("http://127.0.0.1", "http://localhost", "http://[::1]")):
            raise ValueError(f"{url} is not a loopback address: the soak only sends traffic to this machine")
        self.url, self.rate, self.duration_s, self.texts = url, rate_per_s, duration_s, list(texts)
        self.origin, self.concurrency = origin, concurrency
        self.answers: list[Answer] = []
        self.late_starts = 0
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def batch(self, index: int) -> list[str]:
        size = BATCH_PATTERN[index % len(BATCH_PATTERN)]
        return [self.texts[(index * 7 + k) % len(self.texts)] for k in range(size)]

    async def _one(self, client, slots: asyncio.Semaphore, index: int, due: float) -> None:
        import httpx

        async with slots:
            if time.monotonic() - due > 0.050:
                self.late_starts += 1
            texts, started = self.batch(index), time.monotonic()
            try:
                response = await client.post("/v1/classify", json={"texts": texts})
                status, body = response.status_code, response.json() if response.status_code == 200 else {}
                error = "" if status == 200 else response.text[:200]
            except httpx.HTTPError as exc:
                status, body, error = 0, {}, type(exc).__name__
            ids = tuple(item["prediction_id"] for item in body.get("predictions", []))
            self.answers.append(Answer(started - self.origin, (time.monotonic() - started) * 1000.0, status,
                                       len(texts), ids, error))

    async def _run(self) -> None:
        import httpx

        slots = asyncio.Semaphore(self.concurrency)
        began = time.monotonic()
        async with httpx.AsyncClient(base_url=self.url, timeout=30.0,
                                     limits=httpx.Limits(max_connections=self.concurrency)) as client:
            pending = []
            for index in range(int(self.rate * self.duration_s)):
                due = began + index / self.rate
                if due > time.monotonic():
                    await asyncio.sleep(due - time.monotonic())
                pending.append(asyncio.create_task(self._one(client, slots, index, due)))
            await asyncio.gather(*pending)

    def start(self) -> RateTraffic:
        self._thread.start()
        return self

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout=timeout_s)
