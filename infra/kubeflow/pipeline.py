"""optimize_model as a Kubeflow Pipelines (KFP 2) pipeline, for teams that run on Kubeflow.

    .venv-kfp/bin/python infra/kubeflow/pipeline.py --output optimize_model.yaml   # make kubeflow

The steps are the same ``tasks.pipeline`` functions the Airflow DAG calls, run in the project
image (``infra/project/Dockerfile``): fine-tune, distill, prune, export, quantize (teacher, student
and pruned student), evaluate every candidate in one place, register in MLflow, gate and promote
to Triton. The data-unchanged short-circuit is a ``dsl.If``; a step whose technique the params
switch off (``distill``, ``prune``, ``quantize``) returns at once with an empty result. Step results (small JSON documents
with URIs and metrics) travel as KFP string outputs; the models themselves live on two shared
volumes, as in the docker-compose stack: ``pipeline-data`` (runs, assets) and ``triton-models``
(the Triton model repository promotions write to).

Compiling needs only ``kfp`` and ``kfp-kubernetes`` (``requirements-kfp.lock``), not the project's
dependencies: the component bodies import ``tasks`` inside the container.
"""

# No `from __future__ import annotations`: KFP reads the component signatures' real types.
import argparse
from pathlib import Path

from kfp import compiler, dsl, kubernetes

PROJECT_IMAGE = "transformer-optimization/project:0.1.0"
VOLUMES = {"pipeline-data": "/data", "triton-models": "/models"}
STEP_ENV = {
    "PIPELINE_RUNS_DIR": "/data/runs",
    "PIPELINE_ASSETS_CACHE": "/data/assets",
    "PIPELINE_TRITON_MODEL_REPOSITORY": "/models",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
}
# Where the steps find MLflow and Triton in the cluster (compile-time: --mlflow-url, --triton-url).
SERVICES = {"PIPELINE_MLFLOW_TRACKING_URI": "http://mlflow:5000", "PIPELINE_TRITON_URL": "dns:triton-replicas:8000"}


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def run_step(step: str, params_json: str, run_id: str, data: str = "", first: str = "", second: str = "",
             name: str = "") -> str:
    """Call ``tasks.pipeline.<step>(settings, config, run_id, [data, first, second], [name=])``."""
    import json
    import os

    from tasks import pipeline
    from tasks.settings import PipelineSettings

    settings = PipelineSettings.from_env(os.environ)
    config = pipeline.config_from_params(json.loads(params_json))
    reason = pipeline.step_switched_off(config, step, name)
    if reason is not None:  # the DAG's tasks end SKIPPED here; KFP has no skip, so an empty result
        print(f"{name or step} not run: {reason}")
        return ""
    upstream = [json.loads(value) for value in (data, first, second) if value]
    options = {"name": name} if name else {}
    return json.dumps(getattr(pipeline, step)(settings, config, run_id, *upstream, **options))


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def data_changed(params_json: str, data: str, force_retrain: bool) -> bool:
    """False when the serving champion was trained on exactly this data by exactly this code."""
    import json
    import os

    from tasks import pipeline
    from tasks.settings import PipelineSettings

    verdict = pipeline.data_changed(PipelineSettings.from_env(os.environ),
                                    pipeline.config_from_params(json.loads(params_json)), json.loads(data),
                                    force_retrain)
    print(verdict["reason"])
    return bool(verdict["changed"])


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def evaluate(params_json: str, run_id: str, data: str, finetune: str, export: str, quantize: str,
             export_student: str, quantize_student: str, export_pruned: str, quantize_pruned: str) -> str:
    """Every candidate on the same test split, each in its own process (as in the DAG)."""
    import json
    import os

    from tasks import pipeline
    from tasks.settings import PipelineSettings

    produced = {key: json.loads(value) if value else None for key, value in {  # "": switched off
        "finetune": finetune, "export": export, "quantize": quantize, "export_student": export_student,
        "quantize_student": quantize_student, "export_pruned": export_pruned, "quantize_pruned": quantize_pruned,
    }.items()}
    return json.dumps(pipeline.evaluate_candidates(PipelineSettings.from_env(os.environ),
                                                   pipeline.config_from_params(json.loads(params_json)), run_id,
                                                   json.loads(data), produced))


def _on_cluster(task: dsl.PipelineTask, memory: str = "4G", cpu: str = "2") -> dsl.PipelineTask:
    """Shared volumes, service addresses and resources of one step."""
    for name, value in (STEP_ENV | SERVICES).items():
        task.set_env_variable(name, value)
    for claim, path in VOLUMES.items():
        kubernetes.mount_pvc(task, pvc_name=claim, mount_path=path)
    task.set_memory_limit(memory).set_cpu_limit(cpu).set_retry(1)
    task.set_caching_options(False)  # every step writes run-scoped files and registers models
    return task


def optimize_model(params_json: str = "{}", force_retrain: bool = False) -> None:
    """The pipeline's graph (KFP traces it when ``compile_pipeline`` decorates it)."""
    run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER

    def step(function: str, memory: str = "4G", **inputs) -> dsl.PipelineTask:
        task = run_step(step=function, params_json=params_json, run_id=run_id, **inputs)
        return _on_cluster(task, memory).set_display_name(inputs.get("name") or function)

    data = step("prepare_data")
    changed = _on_cluster(data_changed(params_json=params_json, data=data.output, force_retrain=force_retrain),
                          memory="2G").set_display_name("data_changed")
    with dsl.If(changed.output == True, name="data-changed"):  # noqa: E712 - a KFP condition, not a Python test
        teacher = step("finetune_teacher", memory="8G", data=data.output)
        onnx = step("export_onnx", data=data.output, first=teacher.output, name="onnx_fp32")
        int8 = step("quantize_int8", data=data.output, first=onnx.output, name="onnx_int8")
        student = step("distill_student", memory="8G", data=data.output, first=teacher.output)
        student_onnx = step("export_onnx", data=data.output, first=student.output, name="student_onnx_fp32")
        student_int8 = step("quantize_int8", data=data.output, first=student_onnx.output, name="student_int8")
        pruned = step("prune_student", memory="8G", data=data.output, first=teacher.output, second=student.output)
        pruned_onnx = step("export_onnx", data=data.output, first=pruned.output, name="pruned_onnx_fp32")
        pruned_int8 = step("quantize_int8", data=data.output, first=pruned_onnx.output, name="pruned_int8")
        evaluations = _on_cluster(evaluate(
            params_json=params_json, run_id=run_id, data=data.output, finetune=teacher.output, export=onnx.output,
            quantize=int8.output, export_student=student_onnx.output, quantize_student=student_int8.output,
            export_pruned=pruned_onnx.output, quantize_pruned=pruned_int8.output,
        ), memory="8G").set_display_name("evaluate")
        registered = step("register_candidates", data=data.output, first=evaluations.output)
        step("gate_and_promote", data=data.output, first=evaluations.output, second=registered.output)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("optimize_model.yaml"), help="pipeline YAML to write")
    parser.add_argument("--mlflow-url", default=SERVICES["PIPELINE_MLFLOW_TRACKING_URI"], help="MLflow in the cluster")
    parser.add_argument("--triton-url", default=SERVICES["PIPELINE_TRITON_URL"], help="Triton HTTP host:port, several joined by commas, or dns:<name>:<port> for every replica")
    args = parser.parse_args(argv)
    compile_pipeline(args.output, mlflow_url=args.mlflow_url, triton_url=args.triton_url)
    print(f"wrote {args.output}")
    return 0


def compile_pipeline(output: Path, mlflow_url: str, triton_url: str) -> None:
    # KFP builds the graph when the function is decorated, so the addresses are set first.
    SERVICES.update({"PIPELINE_MLFLOW_TRACKING_URI": mlflow_url, "PIPELINE_TRITON_URL": triton_url})
    pipeline = dsl.pipeline(name="optimize-model", description="Fine-tune, distill, prune, quantize, evaluate, "
                                                               "register and gate-promote a text classifier")
    compiler.Compiler().compile(pipeline(optimize_model), str(output))


if __name__ == "__main__":
    raise SystemExit(main())
