"""The soak (issue 20 item 5) against the fault suite's stack (MLflow, Triton, the gateway and the reconcile
loop on loopback): ``SOAK_SECONDS`` (default 600) of classify requests at 20/s through the gateway, a
warm-up promotion at the start (two versions loaded, as after any switch), a
promotion at a third of it and a rollback (`opsctl rollback`'s function) at two thirds, RSS of every
service sampled every 5 s. bench/soak.py judges the run; with ``SOAK_REPORT`` set (`make bench-soak`:
bench/results/soak.md) it writes the report and soak.json beside it.

Run by `make bench-soak` (marker ``soak``, outside `make test` and `make test-faults`)."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import pytest

from bench import soak
from tests.faults.test_faults import Promoter, logged_ids, promoter, stack  # noqa: F401 - fixtures
from tests.integration.test_registry_and_promotion import evaluated  # noqa: F401 - a fixture

SECONDS = float(os.environ.get("SOAK_SECONDS", "600"))
RATE_PER_S = 20.0
SERVICES = ("mlflow", "triton", "gateway", "reconcile")

NOTE = ("The stack starts serving one champion (one version of each Triton component loaded). The warm-up "
        "promotion, at the start, brings it to its steady state: Triton keeps the two newest versions of each "
        "component loaded, so every later switch loads one and unloads one. Its RSS step is inside the warm-up and "
        "shows in the phase medians (\"before warm-up promotion\").")

pytestmark = [pytest.mark.soak, pytest.mark.integration, pytest.mark.timeout(int(SECONDS) + 900)]


def _timed(name: str, reason: str, origin: float, action) -> tuple[soak.Window, dict]:
    """Run ``action`` and return its span as a 503 window, with what it returned (or raised)."""
    started = time.monotonic()
    try:
        result = action()
        event = {"ok": True, "status": result.status.value, "metrics": result.metrics, "info": result.info}
    except Exception as error:  # noqa: BLE001 - recorded; the promise "promotion and rollback succeeded" fails
        event = {"ok": False, "error": f"{type(error).__name__}: {error}"[:400]}
    ended = time.monotonic()
    event["seconds"] = round(ended - started, 2)
    return soak.Window(name, started - origin, ended - origin, reason), event


def _sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.monotonic()))


def _run_soak(stack, promoter: Promoter) -> soak.SoakRun:
    from tasks.modeling import generate_texts
    from tasks.reconcile import rollback

    before = set(logged_ids(stack))
    texts = generate_texts(200, seed=11)[0]
    origin, started_at = time.monotonic(), time.gmtime()
    windows, events = [], {}
    traffic = soak.RateTraffic(stack.settings.gateway_url, RATE_PER_S, SECONDS, texts, origin)
    with soak.RssSampler(stack.manager.read_pid, SERVICES, origin, every_s=5.0) as sampler:
        traffic.start()
        # Warm-up: a first promotion brings the stack to its steady state, two versions of each component
        # loaded (the serving one and the one before); the RSS step it makes is inside the warm-up.
        warm = promoter.register()
        window, events["warm-up promotion"] = _timed("warm-up promotion", f"Promoter.promote of MLflow version {warm}",
                                                     origin, lambda: promoter.promote(warm))
        windows.append(window)
        _sleep_until(origin + SECONDS / 3)
        version = promoter.register()
        window, events["promotion"] = _timed("promotion", f"Promoter.promote of MLflow version {version}", origin,
                                             lambda: promoter.promote(version))
        windows.append(window)
        _sleep_until(origin + 2 * SECONDS / 3)
        window, events["rollback"] = _timed("rollback", "tasks.reconcile.rollback (opsctl rollback)", origin,
                                            lambda: rollback(promoter.config, promoter.target))
        windows.append(window)
        traffic.join(timeout_s=SECONDS + 120)
    events["served_after"] = promoter.served()
    events["champion_after"] = promoter.champion()
    events["service_pids"] = {name: sorted(pids) for name, pids in sampler.pids.items()}
    logged = [pid for pid in logged_ids(stack, timeout_s=120) if pid not in before]
    header = (f"Run started {time.strftime('%Y-%m-%d %H:%M UTC', started_at)} on {platform.machine()} "
              f"({os.cpu_count()} CPUs): real MLflow, Triton, gateway and reconcile processes on loopback, the "
              "fault suite's tiny fixture model.")
    warmup_s = max(min(60.0, SECONDS / 6), windows[0].end_s + 1)
    return soak.SoakRun(duration_s=SECONDS, rate_per_s=RATE_PER_S, warmup_s=warmup_s, notes=[NOTE],
                        answers=list(traffic.answers), windows=windows, rss=sampler.series, logged_ids=logged,
                        events=events, late_starts=traffic.late_starts, header=header)


def test_soak(stack, promoter):
    """SOAK_SECONDS at 20 requests/s with a promotion and a rollback in the middle: no 5xx (nor a request
    without an answer) outside the promotion's and the rollback's spans, every service's RSS flat (last
    third's median < 10% over the first third's, after a warm-up), and the prediction log's new rows are
    exactly the prediction ids answered 200, one per text."""
    run = _run_soak(stack, promoter)
    report = soak.build_report(run)
    target = os.environ.get("SOAK_REPORT")
    if target:
        soak.write_report(report, Path(target))
    failed = [name for name, ok in report["promises"].items() if not ok]
    assert not failed, (failed, report["errors"], {k: v for k, v in report["rss"].items() if not v["flat"]},
                        report["predictions"], report["events"])
