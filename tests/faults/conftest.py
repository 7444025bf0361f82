"""The fault suite's report: each test's promise (its docstring), what it observed (``observe``
fixture), its outcome and duration, written by bench/faults.py to ``FAULTS_REPORT`` when set
(`make test-faults` sets it to bench/results/faults.md)."""

from __future__ import annotations

import inspect
import os
import platform
import time
from pathlib import Path

import pytest

from bench.faults import FaultResult, write_report

_OBSERVED: dict[str, dict[str, object]] = {}
_RESULTS: dict[str, FaultResult] = {}


@pytest.fixture
def observe(request):
    """``observe(key=value, ...)``: record what the fault test saw, for the report."""
    observed = _OBSERVED.setdefault(request.node.nodeid, {})

    def record(**values: object) -> None:
        observed.update(values)

    return record


def _promise(item: pytest.Item) -> str:
    doc = inspect.getdoc(getattr(item, "function", None)) or ""
    return doc


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    outcome = yield
    report = outcome.get_result()
    if item.get_closest_marker("faults") is None:
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        fault = item.name.removeprefix("test_").replace("_", " ")
        _RESULTS[item.nodeid] = FaultResult(fault=fault, promise=_promise(item),
                                            observed=_OBSERVED.get(item.nodeid, {}), outcome=report.outcome,
                                            duration_s=report.duration)


def pytest_sessionfinish(session: pytest.Session) -> None:
    target = os.environ.get("FAULTS_REPORT")
    if not target or not _RESULTS:
        return
    header = (f"Run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.machine()} "
              f"({os.cpu_count()} CPUs), real MLflow, Triton, gateway and reconcile processes on loopback; the Airflow "
              "faults on a stack of their own with Airflow 3 (CeleryExecutor, two workers) on PostgreSQL and Redis; the "
              "database outage on a stack of its own whose prediction log is on PostgreSQL through a TCP proxy.")
    write_report(list(_RESULTS.values()), Path(target), header)
