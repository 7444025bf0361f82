"""What each pipeline task cost: wall time and peak memory, written next to the run's artifacts.

``record_task_cost`` is the DAG's ``on_success_callback``: Airflow runs it in the task's own process
right after the task, so the process's peak resident set size is the task's (plus the Airflow task
runner it was forked from, which a no-op task shows). Processes a task started and waited for
(each candidate's evaluation runs in one) count through their largest peak.

Read by ``bench.pipeline_cost``; stdlib only, so the DAG file can import it when parsed.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from datetime import datetime, timezone
from pathlib import Path

COST_DIR = "cost"


def peak_memory_mb() -> dict[str, float]:
    """Peak RSS of this process and of its largest waited-for child, in MB (ru_maxrss is KiB on Linux)."""
    scale = 1 / 1e6 if sys.platform == "darwin" else 1024 / 1e6
    return {"self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale,
            "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale}


def cost_record(task_id: str, started: datetime | None, now: datetime) -> dict:
    memory = peak_memory_mb()
    return {"task_id": task_id, "seconds": (now - started).total_seconds() if started else None,
            "peak_memory_mb": max(memory.values()), "peak_memory_self_mb": memory["self"],
            "peak_memory_children_mb": memory["children"]}


def cost_file(run_dir: Path, task_id: str) -> Path:
    return run_dir / COST_DIR / f"{task_id}.json"


def record_task_cost(context) -> None:
    """Airflow ``on_success_callback``: write ``<run dir>/cost/<task>.json``. Never fails the task."""
    try:
        from tasks.settings import PipelineSettings

        task_instance = context["ti"]
        settings = PipelineSettings.from_env(os.environ)
        record = cost_record(task_instance.task_id, getattr(task_instance, "start_date", None),
                             datetime.now(timezone.utc))
        path = cost_file(settings.run_dir(context["run_id"]), task_instance.task_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2))
    except Exception as error:  # noqa: BLE001 - bookkeeping must not turn a good task red
        print(f"task cost not recorded: {error}", file=sys.stderr)


def read_costs(run_dir: Path) -> dict[str, dict]:
    folder = run_dir / COST_DIR
    if not folder.is_dir():
        return {}
    return {path.stem: json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))}
