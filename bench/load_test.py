"""A bounded load test of the gateway: a steady rate of single-text requests on loopback for a fixed
time, reporting throughput, latency percentiles and errors, and checking that every served
prediction reached the prediction log.

    python -m bench.load_test --rate 20 --duration 60          # against the local stack (make up)

Requests are sent on a fixed schedule (open loop), at most ``--concurrency`` at a time; a request
that could not start on time is counted as late, so a saturated server shows up in the report
instead of silently lowering the rate. Results go to ``bench/results/load-<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
MAX_RATE, MAX_DURATION_S = 500.0, 600.0


@dataclass
class LoadResult:
    url: str
    rate: float
    duration_s: float
    sent: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    late_starts: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    logged_before: int | None = None
    logged_after: int | None = None

    def summary(self) -> dict:
        lat = np.array(self.latencies_ms) if self.latencies_ms else np.array([float("nan")])
        logged = None if self.logged_before is None else self.logged_after - self.logged_before
        return {
            "url": self.url, "target_rate_per_s": self.rate, "duration_s": self.duration_s, "sent": self.sent,
            "ok": self.ok, "errors": self.errors, "error_rate": (self.sent - self.ok) / self.sent if self.sent else 0.0,
            "late_starts": self.late_starts, "achieved_rate_per_s": self.sent / self.wall_s if self.wall_s else 0.0,
            "latency_p50_ms": float(np.percentile(lat, 50)), "latency_p95_ms": float(np.percentile(lat, 95)),
            "latency_p99_ms": float(np.percentile(lat, 99)), "latency_max_ms": float(lat.max()),
            "predictions_logged": logged, "all_logged": logged == self.ok if logged is not None else None,
        }


def sample_texts(count: int = 500) -> list[str]:
    """IMDB reviews from the demo cache when present (the traffic the demo model expects), else generated."""
    import pandas as pd

    from opsctl.settings import StackSettings

    imdb = StackSettings.from_env(os.environ).assets_cache / "imdb.csv"
    if imdb.exists():
        return pd.read_csv(imdb, nrows=count)["text"].astype(str).str.slice(0, 2000).tolist()
    from tasks.modeling import generate_texts

    return generate_texts(count, seed=3)[0]


async def run_load(url: str, rate: float, duration_s: float, concurrency: int, texts: list[str]) -> LoadResult:
    import httpx

    if not 0 < rate <= MAX_RATE or not 0 < duration_s <= MAX_DURATION_S:
        raise ValueError(f"rate must be in (0, {MAX_RATE}] and duration in (0, {MAX_DURATION_S}] s")
    if not url.startswith(("http://127.0.0.1", "http://localhost", "http://[::1]")):
        raise ValueError(f"{url} is not a loopback address: this load test only sends traffic to this machine")
    result = LoadResult(url=url, rate=rate, duration_s=duration_s)
    slots = asyncio.Semaphore(concurrency)
    total = int(rate * duration_s)
    async with httpx.AsyncClient(base_url=url, timeout=30.0,
                                 limits=httpx.Limits(max_connections=concurrency)) as client:
        async def one(index: int, due: float) -> None:
            async with slots:
                if time.perf_counter() - due > 0.010:
                    result.late_starts += 1
                started = time.perf_counter()
                try:
                    response = await client.post("/v1/classify", json={"texts": [texts[index % len(texts)]]})
                    status = str(response.status_code)
                except httpx.HTTPError as error:
                    status = type(error).__name__
                elapsed = (time.perf_counter() - started) * 1000.0
                result.sent += 1
                if status == "200":
                    result.ok += 1
                    result.latencies_ms.append(elapsed)
                else:
                    result.errors[status] = result.errors.get(status, 0) + 1

        began = time.perf_counter()
        pending = []
        for index in range(total):
            due = began + index / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            pending.append(asyncio.create_task(one(index, due)))
        await asyncio.gather(*pending)
        result.wall_s = time.perf_counter() - began
    return result


def markdown(name: str, summary: dict) -> str:
    return "\n".join([
        f"# Load test `{name}`", "",
        f"{summary['sent']} single-text requests to {summary['url']}/v1/classify at {summary['target_rate_per_s']}/s "
        f"for {summary['duration_s']:.0f} s (achieved {summary['achieved_rate_per_s']:.1f}/s, "
        f"{summary['late_starts']} late starts).", "",
        "| ok | errors | error rate | p50 ms | p95 ms | p99 ms | max ms | predictions logged |",
        "|---|---|---|---|---|---|---|---|",
        f"| {summary['ok']} | {summary['errors'] or 0} | {summary['error_rate']:.2%} | {summary['latency_p50_ms']:.1f} | "
        f"{summary['latency_p95_ms']:.1f} | {summary['latency_p99_ms']:.1f} | {summary['latency_max_ms']:.1f} | "
        f"{summary['predictions_logged']} ({'all' if summary['all_logged'] else 'NOT all'} of the ok ones) |", ""])


def main(argv: list[str] | None = None) -> int:
    from serving import prediction_log as plog
    from opsctl.settings import StackSettings

    stack = StackSettings.from_env(os.environ)
    parser = argparse.ArgumentParser(prog="python -m bench.load_test", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=stack.gateway_url)
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second (steady)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds")
    parser.add_argument("--concurrency", type=int, default=16, help="most requests in flight")
    parser.add_argument("--prediction-log", default=stack.prediction_log_url,
                        help="SQLAlchemy URL of the gateway's prediction log, to check every prediction reached it")
    parser.add_argument("--name", default="local")
    parser.add_argument("--results", type=Path, default=REPO_ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    texts = sample_texts()
    engine = plog.create_engine(args.prediction_log) if args.prediction_log else None
    before = plog.count(engine) if engine else None
    try:
        result = asyncio.run(run_load(args.url, args.rate, args.duration, args.concurrency, texts))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if engine is not None:
        deadline = time.monotonic() + 10  # the log writes in batches, off the request path
        while plog.count(engine) < before + result.ok and time.monotonic() < deadline:
            time.sleep(0.2)
        result.logged_before, result.logged_after = before, plog.count(engine)
    summary = result.summary()
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"load-{args.name}.json").write_text(
        json.dumps(summary | {"config": {k: str(v) for k, v in vars(args).items()}}, indent=2).replace(f"{REPO_ROOT}/", ""))
    (args.results / f"load-{args.name}.md").write_text(markdown(args.name, summary))
    print(markdown(args.name, summary))
    return 0 if summary["error_rate"] == 0 and summary["all_logged"] is not False else 1


if __name__ == "__main__":
    sys.exit(main())
