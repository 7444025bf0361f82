"""optimize_model as a Kubeflow Pipelines (KFP 2) pipeline, for teams that run on Kubeflow.

    .venv-kfp/bin/python infra/kubeflow/pipeline.py --output optimize_model.yaml   # make kubeflow

The graph is the recipe's (``tasks/recipe.py``, standard library only, so the compiler imports it
from the repository: ``PYTHONPATH=.``): one ``run_stage`` component per stage, then evaluate every
candidate in one place, register in MLflow, score the champion, gate, promote to Triton, report:
the same ``tasks.pipeline`` functions the Airflow DAG calls, run in the project image
(``infra/project/Dockerfile``). The nothing-changed short-circuit is a ``dsl.If``; a stage whose
technique the params switch off returns at once with an empty result. KFP has no "all done"
trigger, so the report runs after a promotion that succeeded or had no winner; a failed promotion
leaves its record in ``decisions/promotion.json``. Step results (small JSON documents with URIs and
metrics) travel as KFP string outputs; the models themselves live on two shared volumes, as in the
docker-compose stack: ``pipeline-data`` (runs, assets) and ``triton-models`` (the Triton model
repository promotions write to).

Compiling needs only ``kfp`` and ``kfp-kubernetes`` (``requirements-kfp.lock``), not the project's
dependencies: the component bodies import ``tasks`` inside the container.
"""

# No `from __future__ import annotations`: KFP reads the component signatures' real types.
import argparse
import json
from pathlib import Path

from kfp import compiler, dsl, kubernetes

from tasks.recipe import OPTIMIZE_MODEL  # standard library only; run with the repository on PYTHONPATH

PROJECT_IMAGE = "transformer-optimization/project:0.1.0"
TRAINING_STEPS = ("finetune", "distill", "prune")
TRAINING_MEMORY = "8G"
EVALUATE_SLOTS = 20  # evaluate's s0..s19 inputs: one per candidate the recipe makes
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
             third: str = "") -> str:
    """Call ``tasks.<module>.<function>(settings, config, run_id, [data, first, second, third])`` for
    ``step`` = ``"<module>.<function>"`` (module: pipeline or decisions)."""
    import importlib
    import json
    import os

    from tasks import pipeline
    from tasks.settings import PipelineSettings

    settings = PipelineSettings.from_env(os.environ)
    config = pipeline.config_from_params(json.loads(params_json))
    upstream = [json.loads(value) if value not in ("", "null") else None for value in (data, first, second, third)
                if value]
    module, function = step.split(".")
    result = getattr(importlib.import_module(f"tasks.{module}"), function)(settings, config, run_id, *upstream)
    return json.dumps(result)


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def run_stage(stage_id: str, params_json: str, run_id: str, data: str, model: str = "", teacher: str = "") -> str:
    """``tasks.pipeline.run_stage`` for one stage of the recipe (its inputs by keyword: model, teacher)."""
    import json
    import os

    from tasks import pipeline
    from tasks.settings import PipelineSettings

    config = pipeline.config_from_params(json.loads(params_json))
    reason = pipeline.stage_switched_off(config, stage_id)
    if reason is not None:  # the DAG's tasks end SKIPPED here; KFP has no skip, so an empty result
        print(f"{stage_id} not run: {reason}")
        return ""
    upstream = {key: json.loads(value) for key, value in (("model", model), ("teacher", teacher)) if value}
    result = pipeline.run_stage(PipelineSettings.from_env(os.environ), config, run_id, stage_id, json.loads(data),
                                upstream)
    if result["status"] == "skipped":  # a GPU stage on a pod without a GPU or TensorRT, say
        print(f"{stage_id} SKIPPED: {result['reason']}")
        return ""
    return json.dumps(result)


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def changed_since_champion(params_json: str, data: str, force_retrain: bool) -> bool:
    """False when the serving champion was built from this data, configuration, teacher and code."""
    import json
    import os

    from tasks import pipeline
    from tasks.settings import PipelineSettings

    verdict = pipeline.changed_since_champion(PipelineSettings.from_env(os.environ),
                                              pipeline.config_from_params(json.loads(params_json)),
                                              json.loads(data), force_retrain)
    print(verdict["reason"])
    return bool(verdict["changed"])


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def evaluate(params_json: str, run_id: str, data: str, slot_stages: str, s0: str = "", s1: str = "", s2: str = "", s3: str = "", s4: str = "", s5: str = "", s6: str = "", s7: str = "", s8: str = "", s9: str = "", s10: str = "", s11: str = "", s12: str = "", s13: str = "", s14: str = "", s15: str = "", s16: str = "", s17: str = "", s18: str = "", s19: str = "") -> str:
    """Every candidate on the same test split, each in its own process (as in the DAG). ``slot_stages``
    (JSON list) names the stage whose result each slot ``s<i>`` holds ("": switched off)."""
    import json
    import os

    from tasks import pipeline
    from tasks.settings import PipelineSettings

    values = locals()
    produced = {stage: json.loads(values[f"s{index}"]) if values[f"s{index}"] else None
                for index, stage in enumerate(json.loads(slot_stages))}
    return json.dumps(pipeline.evaluate_candidates(PipelineSettings.from_env(os.environ),
                                                   pipeline.config_from_params(json.loads(params_json)), run_id,
                                                   json.loads(data), produced))


@dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
def report(run_id: str) -> str:
    """summary.json and the report from the decision records (after a failed promotion too)."""
    import json
    import os

    from tasks import decisions
    from tasks.settings import PipelineSettings

    return json.dumps(decisions.write_report(PipelineSettings.from_env(os.environ), run_id))


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
    """The pipeline's graph (KFP traces it when ``compile_pipeline`` decorates it): the recipe's stages,
    then the evaluation and the decisions, as in the Airflow DAG."""
    run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER

    def step(function: str, *upstream: dsl.PipelineTask, memory: str = "4G") -> dsl.PipelineTask:
        names = ("data", "first", "second", "third")
        task = run_step(step=function, params_json=params_json, run_id=run_id,
                        **{name: item.output for name, item in zip(names, upstream)})
        return _on_cluster(task, memory).set_display_name(function.split(".")[1])

    data = step("pipeline.prepare_data")
    changed = _on_cluster(changed_since_champion(params_json=params_json, data=data.output,
                                                 force_retrain=force_retrain),
                          memory="2G").set_display_name("changed_since_champion")
    with dsl.If(changed.output == True, name="changed-since-champion"):  # noqa: E712 - a KFP condition, not a Python test
        results: dict[str, dsl.PipelineTask] = {}
        for stage in OPTIMIZE_MODEL.stages:
            inputs = {key: results[source].output for key, source in stage.inputs.items()}
            task = run_stage(stage_id=stage.id, params_json=params_json, run_id=run_id, data=data.output, **inputs)
            results[stage.id] = _on_cluster(task, TRAINING_MEMORY if stage.step.value in TRAINING_STEPS else "4G")
            results[stage.id].set_display_name(stage.id)
        producers = [stage.id for stage in OPTIMIZE_MODEL.stages if stage.candidate]
        assert len(producers) <= EVALUATE_SLOTS, f"the recipe makes {len(producers)} candidates: add evaluate slots"
        evaluations = _on_cluster(evaluate(
            params_json=params_json, run_id=run_id, data=data.output, slot_stages=json.dumps(producers),
            **{f"s{index}": results[stage_id].output for index, stage_id in enumerate(producers)},
        ), memory=TRAINING_MEMORY).set_display_name("evaluate")
        registered = step("pipeline.register_candidates", data, evaluations)
        champion = step("decisions.score_champion", data)
        champion.after(registered)  # no Triton traffic while latencies are measured
        gated = step("decisions.gate_candidates", evaluations, registered, champion)
        promoted = step("decisions.promote_winner", data, evaluations, gated)
        _on_cluster(report(run_id=run_id), memory="2G").set_display_name("report").after(promoted)


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
