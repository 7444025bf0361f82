"""``make demo-latency``: the latency loop end to end on the local stack.

1. The champion's run also built the teacher's FP32 ONNX model: it is served instead, a deliberately
   slow champion (an operator's pin, no gates).
2. Traffic goes through the gateway and a monitor_serving run measures the window's served p95 (no
   trigger: it calibrates the demo's SLO, set between what the FP32 model and the champion run's
   fastest candidate can do through this serving path).
3. Traffic again; the monitor judges the window against that SLO: a latency breach, and it triggers
   optimize_model with the kind "latency" and its evidence.
4. The triggered run re-optimizes from the champion's lineage (teacher and data from MLflow, no
   fine-tuning) within the budget (SLO minus the serving overhead seen in the window) and promotes
   the most accurate candidate that meets it, or nothing, saying why.
5. Traffic a third time: the next window is judged against the same SLO.

Prints the served p95 and the accuracy before and after. Needs a serving champion (``make demo``).
"""

from __future__ import annotations

import json
import time

from opsctl.airflow_api import AirflowApi
from opsctl.services import LocalStack
from opsctl.settings import StackSettings

MONITOR_DAG, OPTIMIZE_DAG = "monitor_serving", "optimize_model"
SLOW_CANDIDATE = "onnx_fp32"
NO_TRIGGER = {"persist_windows": 1000, "cooldown_minutes": 0}  # a calibration window never triggers


def choose_slo(served_slow_p95: float, slow_p50: float, fastest_p95: float) -> float:
    """A p95 SLO (ms) the slow champion breaches and the champion run's fastest candidate meets with
    room: the serving overhead as the pipeline estimates it (served p95 minus the slow model's own
    batch-1 median) plus 2.5x the fastest model's own p95, at most 95% of the served p95."""
    overhead = max(0.0, served_slow_p95 - slow_p50)
    return round(min(0.95 * served_slow_p95, overhead + 2.5 * fastest_p95), 1)


def base_run(settings: StackSettings, registered_model: str, run_id: str | None = None) -> tuple[str, dict]:
    """The pipeline run whose FP32 model is pinned (default: the run that built the serving champion),
    and its summary."""
    from tasks import model_aliases
    from tasks.settings import safe_name

    if run_id is None:
        version = model_aliases.alias_version(settings.mlflow_url, registered_model, "champion")
        if version is None:
            raise RuntimeError(f"{registered_model} has no champion: run `make demo` first")
        run_id = model_aliases.version_tags(settings.mlflow_url, registered_model, version).get("pipeline_run_id")
    summary_path = settings.runs_dir / safe_name(run_id or "-") / "summary.json"
    if not summary_path.exists():
        raise RuntimeError(f"run {run_id} has no summary at {summary_path}: name a finished optimize_model run")
    return run_id, json.loads(summary_path.read_text())


def serve_candidate(settings: StackSettings, run_id: str, summary: dict, candidate: str) -> str:
    """Serve ``candidate`` of run ``run_id`` on Triton and make it the champion (no gates: a pin)."""
    from tasks import promote as promote_step
    from tasks.config import PromoteConfig
    from tasks.model_aliases import mlflow_client
    from tasks.recipe import OPTIMIZE_MODEL
    from tasks.settings import safe_name

    run_dir = settings.runs_dir / safe_name(run_id)
    version = summary["versions"].get(candidate)
    if not version:
        raise RuntimeError(f"run {run_id} registered no {candidate} version")
    params = mlflow_client(settings.mlflow_url).get_run(summary["mlflow_parent_run_id"]).data.params
    config = PromoteConfig(registered_model=summary["registered_model"], triton_model=settings.serving_model)
    target = promote_step.PromotionTarget(settings.triton_http_url, settings.triton_model_repository,
                                          settings.mlflow_url)
    promote_step.run(config, target, model_dir=run_dir / OPTIMIZE_MODEL.producer(candidate).output,
                     predictions=run_dir / "evaluation" / candidate / "predictions.parquet", data_dir=run_dir / "data",
                     mlflow_version=version, max_length=int(params.get("evaluate.max_length", 128)),
                     intra_op_threads=int(params.get("evaluate.threads", 0)),
                     truncation=params.get("evaluate.truncation", "head"))
    return version


def run_latency_demo(settings: StackSettings, timeout_s: float = 2400.0, rate: float = 8.0,
                     duration_s: float = 40.0, run: str | None = None) -> int:
    from opsctl.demo import PROFILES, follow_run, print_summary, stack_is_running
    from tasks.config import REGISTERED_MODEL
    from tasks.settings import safe_name

    stack = LocalStack(settings)
    if not stack_is_running(stack):
        return 1
    api = AirflowApi(settings.airflow_url, "admin", stack.airflow_admin_password() or "")
    for dag_id in (MONITOR_DAG, OPTIMIZE_DAG):
        api.wait_for_dag(dag_id)
        api.unpause(dag_id)
    run_id, summary = base_run(settings, REGISTERED_MODEL, run)
    slow = summary["candidates"][SLOW_CANDIDATE]
    fastest = min(summary["candidates"].values(), key=lambda metrics: metrics["latency_p95_ms"])
    version = serve_candidate(settings, run_id, summary, SLOW_CANDIDATE)
    print(f"== serving {SLOW_CANDIDATE} of run {run_id} (MLflow v{version}, batch-1 p95 {slow['latency_p95_ms']:.1f} "
          f"ms, accuracy {slow['accuracy']:.3f}) as a deliberately slow champion")
    texts = _review_texts(settings)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    window = {"window_minutes": round((duration_s + 10) / 60, 3), "min_rows": 50}
    calibration = _window(settings, api, "calibrate", stamp, texts, rate, duration_s, window | NO_TRIGGER)
    if calibration is None:
        return 1
    served_slow = calibration["verdict"]["evidence"]["latency_p95_ms"]
    slo = choose_slo(served_slow, slow["latency_p50_ms"], fastest["latency_p95_ms"])
    print(f"== SLO for this demo: p95 <= {slo:.1f} ms (served p95 of the FP32 champion {served_slow:.1f} ms)")
    # The triggered run trains the way the demo did (the monitor passes retrain_conf through).
    policy = window | {"max_p95_ms": slo, "max_p99_ms": 10 * slo, "persist_windows": 1,
                       "retrain_conf": json.dumps(PROFILES["demo"])}
    breach = _window(settings, api, "breach", stamp, texts, rate, duration_s, policy | {"cooldown_minutes": 0})
    if breach is None or not breach["decision"]["trigger"]:
        print("the window did not trigger a re-optimization; see its report above")
        return 1
    optimize_run = f"monitor__demo_latency__breach__{stamp}"
    print(f"== {OPTIMIZE_DAG} run {optimize_run}, triggered by the latency breach")
    state = follow_run(api, OPTIMIZE_DAG, optimize_run, timeout_s=timeout_s)
    result_path = settings.runs_dir / safe_name(optimize_run) / "summary.json"
    if state != "success" or not result_path.exists():
        print(f"the run ended as {state!r} without a summary: {settings.airflow_url}/dags/{OPTIMIZE_DAG}/runs/"
              f"{optimize_run}")
        return 1
    result = json.loads(result_path.read_text())
    print_summary(settings, OPTIMIZE_DAG, optimize_run, result)
    after = _window(settings, api, "after", stamp, texts, rate, duration_s, policy | {"cooldown_minutes": 360})
    if after is None:
        return 1
    _print_before_after(slow, served_slow, breach, after, result, slo)
    return 0


def _print_before_after(slow: dict, served_slow: float, breach: dict, after: dict, result: dict, slo: float) -> None:
    winner = result.get("winner")
    accuracy_after = result["candidates"][winner]["accuracy"] if winner else slow["accuracy"]
    print()
    print(f"served p95: {breach['verdict']['evidence']['latency_p95_ms']:.1f} ms before (calibration "
          f"{served_slow:.1f} ms) -> {after['verdict']['evidence']['latency_p95_ms']:.1f} ms after; SLO {slo:.1f} ms; "
          f"the next window is {after['verdict']['status']}")
    print(f"accuracy on the run's test split: {slow['accuracy']:.3f} ({SLOW_CANDIDATE}) -> {accuracy_after:.3f} "
          f"({winner or 'nothing promoted: ' + result['promotion']['reason']})")


def _review_texts(settings: StackSettings) -> list[str]:
    import pandas as pd

    from opsctl.demo import GATEWAY_MAX_CHARS
    from tasks.assets import fetch_demo_assets

    assets = fetch_demo_assets(settings.assets_cache, progress=lambda message: print("  ", message))
    return pd.read_csv(assets.imdb_csv)["text"].astype(str).str.slice(0, GATEWAY_MAX_CHARS).sample(
        n=600, random_state=11).tolist()


def _window(settings: StackSettings, api: AirflowApi, phase: str, stamp: str, texts: list[str], rate: float,
            duration_s: float, conf: dict) -> dict | None:
    """Traffic through the gateway, then one monitor_serving run over it; its result (None: it failed)."""
    from opsctl.demo import monitored_traffic

    print(f"== {phase}: {int(rate * duration_s)} reviews through the gateway at {rate:.0f}/s")
    result = monitored_traffic(settings, api, f"demo_latency__{phase}__{stamp}", texts, rate, duration_s, 4, conf)
    if result is None:
        return None
    verdict, decision = result["verdict"], result["decision"]
    print(f"   window: {verdict['status']} (served p95 {verdict['evidence']['latency_p95_ms']:.1f} ms; "
          f"{'; '.join(verdict['reasons']) or 'within the SLOs'})")
    print(f"   decision: {'TRIGGER ' + decision.get('kind', '') if decision['trigger'] else 'no trigger'}: "
          f"{decision['reason']}")
    return result
