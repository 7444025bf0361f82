"""``make bench-pipeline``: what one ``optimize_model`` run costs, task by task.

Runs ``optimize_model`` on the demo profile through the real Airflow scheduler of the local stack
(``make up``; ``force_retrain`` so it cannot stop early), or reads a finished run (``--run-id``).
Per task: wall time from Airflow's task instances, and peak memory from the record each task
writes when it succeeds (``tasks.cost``). The run's own wall time (started to finished) is judged
against the benchmark issue's target: under 20 minutes on this machine.

    python -m bench.pipeline_cost                 # trigger a demo-profile run and report it
    python -m bench.pipeline_cost --run-id RUN    # report a finished run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"
DAG_ID = "optimize_model"
TARGET_RUN_SECONDS = 20 * 60


def _seconds(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def task_rows(instances: list[dict], costs: dict[str, dict]) -> list[dict]:
    """One row per task in the order they started: state, wall time, peak memory."""
    rows = []
    for item in sorted(instances, key=lambda item: item.get("start_date") or "~"):
        cost = costs.get(item["task_id"], {})
        seconds = item.get("duration")
        rows.append({"task_id": item["task_id"], "state": item["state"],
                     "seconds": float(seconds) if seconds is not None else None,
                     "peak_memory_mb": cost.get("peak_memory_mb"),
                     "peak_memory_self_mb": cost.get("peak_memory_self_mb"),
                     "peak_memory_children_mb": cost.get("peak_memory_children_mb")})
    return rows


def report(run: dict, instances: list[dict], costs: dict[str, dict]) -> dict:
    rows = task_rows(instances, costs)
    wall = _seconds(run.get("start_date"), run.get("end_date"))
    busy = sum(row["seconds"] or 0.0 for row in rows)
    peaks = [row["peak_memory_mb"] for row in rows if row["peak_memory_mb"] is not None]
    return {
        "dag_id": DAG_ID, "run_id": run["dag_run_id"], "state": run["state"], "conf": run.get("conf", {}),
        "run_seconds": wall, "task_seconds": busy, "peak_memory_mb": max(peaks) if peaks else None,
        "tasks": rows,
        "target": {"target_seconds": TARGET_RUN_SECONDS, "measured": wall,
                   "met": bool(wall is not None and run["state"] == "success" and wall < TARGET_RUN_SECONDS)},
    }


def markdown(data: dict) -> str:
    wall = data["run_seconds"]
    out = ["# optimize_model: what one run costs", "",
           f"Run `{data['run_id']}` ({data['state']}) through the local stack's Airflow scheduler, params "
           f"`{json.dumps(data['conf'])}`. Wall time per task from Airflow; peak memory: the task process's "
           "peak resident set (it includes the Airflow task runner it was forked from) or, when larger, the "
           "largest process the task started (each candidate's evaluation runs in one).", "",
           "| task | state | wall s | share of task time | peak memory MB |", "|---|---|---|---|---|"]
    for row in data["tasks"]:
        seconds = "" if row["seconds"] is None else f"{row['seconds']:.0f}"
        share = "" if not row["seconds"] or not data["task_seconds"] else f"{row['seconds'] / data['task_seconds']:.0%}"
        memory = "" if row["peak_memory_mb"] is None else f"{row['peak_memory_mb']:.0f}"
        out.append(f"| {row['task_id']} | {row['state']} | {seconds} | {share} | {memory} |")
    verdict = "met" if data["target"]["met"] else "NOT met"
    shown = "unknown" if wall is None else f"{wall / 60:.1f} min"
    out += ["", f"Run wall time, started to finished: {shown} (tasks ran for {data['task_seconds'] / 60:.1f} min in "
                f"all; two run at once here). Target: under {TARGET_RUN_SECONDS // 60} minutes: **{verdict}**.", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-id", help="report this finished optimize_model run instead of starting one")
    parser.add_argument("--profile", default="demo", help="params profile of opsctl demo (default demo)")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    for name, value in (("MLFLOW_DISABLE_TELEMETRY", "true"), ("DO_NOT_TRACK", "true")):
        os.environ.setdefault(name, value)
    from opsctl.airflow_api import AirflowApi
    from opsctl.demo import PROFILES, follow_run, stack_is_running
    from opsctl.services import LocalStack
    from opsctl.settings import StackSettings
    from tasks.cost import read_costs
    from tasks.settings import safe_name

    settings = StackSettings.from_env(os.environ)
    stack = LocalStack(settings)
    if not stack_is_running(stack):
        return 1
    api = AirflowApi(settings.airflow_url, "admin", stack.airflow_admin_password() or "")
    run_id = args.run_id
    if run_id is None:
        if args.profile not in PROFILES:
            print(f"error: unknown profile {args.profile!r}; one of {', '.join(PROFILES)}", file=sys.stderr)
            return 1
        api.wait_for_dag(DAG_ID)
        api.unpause(DAG_ID)
        run_id = f"bench__{args.profile}__{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
        api.trigger(DAG_ID, PROFILES[args.profile] | {"force_retrain": True}, run_id=run_id)
        print(f"== triggered {DAG_ID} run {run_id}")
        follow_run(api, DAG_ID, run_id, timeout_s=3600)
    data = report(api.run(DAG_ID, run_id), api.task_instances(DAG_ID, run_id),
                  read_costs(settings.runs_dir / safe_name(run_id)))
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "pipeline-cost.json").write_text(json.dumps(data, indent=2))
    (args.results / "pipeline-cost.md").write_text(markdown(data))
    print(markdown(data))
    print(f"written: {args.results}/pipeline-cost.json and .md")
    return 0 if data["target"]["met"] else 2


if __name__ == "__main__":
    sys.exit(main())
