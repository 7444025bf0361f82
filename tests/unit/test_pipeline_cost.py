"""Task cost records (tasks.cost) and the pipeline cost report built from Airflow's task instances."""

import json
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

from bench import pipeline_cost
from tasks import cost


def test_cost_record_has_the_wall_time_and_this_process_peak_memory():
    started = datetime(2026, 1, 1, tzinfo=timezone.utc)
    record = cost.cost_record("evaluate", started, started + timedelta(seconds=90))
    assert record["seconds"] == 90.0
    # This test process holds torch and friends: its peak is far above a few MB.
    assert record["peak_memory_self_mb"] > 50
    assert record["peak_memory_mb"] == max(record["peak_memory_self_mb"], record["peak_memory_children_mb"])


def test_callback_writes_the_record_in_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_RUNS_DIR", str(tmp_path))
    monkeypatch.setenv("PIPELINE_MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    monkeypatch.setenv("PIPELINE_TRITON_URL", "127.0.0.1:1")
    monkeypatch.setenv("PIPELINE_TRITON_MODEL_REPOSITORY", str(tmp_path / "models"))
    ti = SimpleNamespace(task_id="distill_student", start_date=datetime.now(timezone.utc) - timedelta(seconds=5))
    cost.record_task_cost({"ti": ti, "run_id": "manual__2026-01-01T00:00:00+00:00"})
    from tasks.settings import safe_name

    records = cost.read_costs(tmp_path / safe_name("manual__2026-01-01T00:00:00+00:00"))
    assert list(records) == ["distill_student"] and records["distill_student"]["seconds"] >= 5


def test_callback_never_fails_the_task(capsys):
    cost.record_task_cost({})  # no task instance, no settings: reported, not raised
    assert "task cost not recorded" in capsys.readouterr().err


def test_report_orders_tasks_by_start_and_judges_the_run_time():
    run = {"dag_run_id": "r", "state": "success", "conf": {"max_train": 1500},
           "start_date": "2026-01-01T00:00:00+00:00", "end_date": "2026-01-01T00:14:00+00:00"}
    instances = [
        {"task_id": "evaluate", "state": "success", "start_date": "2026-01-01T00:10:00+00:00", "duration": 120.0},
        {"task_id": "prepare_data", "state": "success", "start_date": "2026-01-01T00:00:05+00:00", "duration": 10.0},
        {"task_id": "prune_student", "state": "skipped", "start_date": None, "duration": None},
    ]
    costs = {"evaluate": {"peak_memory_mb": 900.0, "peak_memory_self_mb": 300.0, "peak_memory_children_mb": 900.0}}
    data = pipeline_cost.report(run, instances, costs)
    assert [row["task_id"] for row in data["tasks"]] == ["prepare_data", "evaluate", "prune_student"]
    assert data["run_seconds"] == 840.0 and data["task_seconds"] == 130.0 and data["peak_memory_mb"] == 900.0
    assert data["target"]["met"] is True
    page = pipeline_cost.markdown(data)
    assert "| evaluate | success | 120 | 92% | 900 |" in page and "14.0 min" in page
    assert json.loads(json.dumps(data)) == data
    slow = pipeline_cost.report(run | {"end_date": "2026-01-01T00:25:00+00:00"}, instances, costs)
    assert slow["target"]["met"] is False and "NOT met" in pipeline_cost.markdown(slow)
