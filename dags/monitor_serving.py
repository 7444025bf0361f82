"""
### monitor_serving

Every 15 minutes (`PIPELINE_MONITOR_INTERVAL_MINUTES`), reads the last window of the gateway's
prediction log and compares the champion's served predictions with its reference predictions
(stored at promotion) using Evidently's distances: **output drift** (confidence, predicted label)
and **input drift** (text length, token count, unknown-token share, pooled input embeddings).
Thresholds are derived from the reference for the window's size so that a window like the
reference alarms in `false_alarm_rate` of windows (default 1%); `drift_triggers` says which kinds of
drift are a breach (both by default; the others are reported). It also checks latency (p95/p99
from the log) and the gateway's 5xx error rate against their SLOs, and counts the texts the model
answered with non-finite outputs (the gateway's `gateway_invalid_outputs_total`). When true labels
arrived in the window (the gateway's `POST /v1/feedback`, by the prediction ids it returns), it
reports the champion's live accuracy (95% Wilson interval) and macro-F1 (95% bootstrap interval).

Each window carries the kinds of breach it saw: **errors** (error rate over the SLO, or any invalid
model output), **accuracy** (at least `min_feedback` labels arrived and even the upper end of the
live accuracy's 95% interval is more than `max_accuracy_drop` below the champion's test accuracy),
**latency** (p95 or p99 over the SLO), **drift** (output drift on at least `min_rows` predictions,
of a kind in `drift_triggers`; judged beside the SLOs). A window with too little traffic for drift
and no other breach is reported, not judged. When breaches persist over `persist_windows` judged windows,
no optimize_model run is active and the cooldown has passed, it triggers **optimize_model** (run
id `monitor__<this run id>`) with `trigger_reason`, `trigger_kind` and `trigger_evidence` in its
conf, plus the params in `retrain_conf` (e.g. the labelled data location to retrain on).
`trigger_kind` is the kind in every one of those windows, errors before accuracy before latency before
drift (none in all: the latest window's first). optimize_model answers each kind its own way:

- **latency**: re-optimize from the champion's lineage within the latency budget;
- **drift** and **accuracy**: retrain on the newest labelled data, or stop SKIPPED when none arrived;
- **errors**: no retraining; alert, and roll back to `previous_champion` when the model itself
  produced invalid outputs.

Each window is an MLflow run in the `monitoring` experiment with the Evidently HTML report and a
JSON summary.

There is one such DAG per served model (`PIPELINE_EXTRA_MODELS`): `monitor_serving` watches the
default one, `monitor_serving__<served>` each other, with its own state under
`$PIPELINE_HOME/monitoring/<served>/`; the runs a monitor triggers carry its model's
`registered_model` and `triton_model`.
"""

from __future__ import annotations

import os
from datetime import timedelta

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import CronTriggerTimetable, Param, dag, task

from monitoring.policy import SLO_P95_MS  # standard library only: cheap at parse time
from tasks.served_models import ServedModel, monitor_dag_id, served_models  # standard library only

INTERVAL_MINUTES = int(os.environ.get("PIPELINE_MONITOR_INTERVAL_MINUTES", "15"))

PARAMS = {
    "window_minutes": Param(INTERVAL_MINUTES, type="number", exclusiveMinimum=0,
                            description="how far back the window reaches"),
    "min_rows": Param(100, type="integer", minimum=10, description="fewer predictions than this: not judged"),
    "false_alarm_rate": Param(0.01, type="number", exclusiveMinimum=0, maximum=0.2,
                              description="drift: the chance that a window like the reference is called drifted"),
    "drift_triggers": Param(["output", "input"], type="array", items={"type": "string", "enum": ["output", "input"]},
                            description="the kinds of drift that are a breach (the others are reported only)"),
    "persist_windows": Param(2, type="integer", minimum=1,
                             description="consecutive breaching windows needed to trigger"),
    "cooldown_minutes": Param(360, type="number", minimum=0, description="no new trigger within this time"),
    "max_p95_ms": Param(SLO_P95_MS, type="number", exclusiveMinimum=0,
                        description="SLO: p95 latency (optimize_model's latency gate defaults to it)"),
    "max_p99_ms": Param(200.0, type="number", exclusiveMinimum=0, description="SLO: p99 latency"),
    "max_error_rate": Param(0.01, type="number", minimum=0, maximum=1, description="SLO: share of 5xx responses"),
    "min_feedback": Param(50, type="integer", minimum=1,
                          description="accuracy: fewer true labels in the window than this: accuracy not judged"),
    "max_accuracy_drop": Param(0.05, type="number", minimum=0, exclusiveMaximum=1,
                               description="accuracy: a breach when even the upper end of the live accuracy's 95% "
                                           "interval is more than this below the champion's test accuracy"),
    "retrain_conf": Param("", type="string",
                          description="optimize_model params (JSON object) for the runs this monitor triggers, e.g. "
                                      '{"data_source": "/data/labelled"}; empty: PIPELINE_RETRAIN_CONF, else defaults'),
}


def build_monitor(dag_id: str, served: ServedModel, default: bool):
    """The monitor DAG of one served model: its own prediction-log rows, counters, drift reference and
    state; the runs it triggers retrain that model (its registered and served names in their conf)."""

    @dag(
        dag_id=dag_id,
        schedule=CronTriggerTimetable(f"*/{INTERVAL_MINUTES} * * * *", timezone="UTC"),
        catchup=False,
        max_active_runs=1,
        default_args={"retries": 1, "retry_delay": timedelta(minutes=1)},
        params=PARAMS,
        render_template_as_native_obj=True,
        tags=["monitoring", "evidently", "triton", f"model:{served.served}"],
        doc_md=__doc__ + f"\n\nThis DAG watches the served model `{served.served}` (registered model "
                         f"`{served.registered}`).",
    )
    def monitor():
        @task
        def check_window() -> dict:
            """Judge the last window (drift, latency, errors, live accuracy) and decide whether to re-optimize."""
            from airflow.sdk import get_current_context

            from monitoring import pipeline
            from tasks.pipeline import PARAM_PATHS, RUN_PARAMS, TRIGGER_PARAMS
            from tasks.served_models import model_params
            from tasks.settings import PipelineSettings

            context = get_current_context()
            active = context["ti"].get_dr_count(dag_id="optimize_model", states=["queued", "running"]) > 0
            # Scheduled runs end their window at the tick; manual runs without a logical date when they were
            # triggered. Never "now": a retry judges the same window.
            window_end = context.get("data_interval_end") or context.get("logical_date") or context["dag_run"].run_after
            settings = PipelineSettings.in_airflow_task(os.environ)
            monitor_settings = settings.monitor_settings(None if default else served.served)
            result = pipeline.check_window(monitor_settings, dict(context["params"]), window_end, active,
                                           known_params=(*PARAM_PATHS, *RUN_PARAMS), reserved=TRIGGER_PARAMS)
            result["trigger_conf"] |= model_params(served)  # a retrain of this model, whatever retrain_conf says
            return result

        @task.short_circuit
        def should_trigger(result: dict) -> bool:
            """Continue to the trigger only when the policy says so (the reason is in the log either way)."""
            print(result["decision"]["reason"])
            return bool(result["decision"]["trigger"])

        trigger = TriggerDagRunOperator(
            task_id="trigger_optimize_model",
            trigger_dag_id="optimize_model",
            conf="{{ ti.xcom_pull(task_ids='check_window')['trigger_conf'] }}",
            trigger_run_id="monitor__{{ run_id }}",
            wait_for_completion=False,
        )

        result = check_window()
        should_trigger(result) >> trigger

    return monitor()


# One monitor per served model: monitor_serving for the default, monitor_serving__<served> for each of
# PIPELINE_EXTRA_MODELS (tasks/served_models.py; parsed from the environment only, no I/O).
SERVED = served_models(os.environ)
for model in SERVED:
    build_monitor(monitor_dag_id(model, SERVED[0]), model, default=model == SERVED[0])
