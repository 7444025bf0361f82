"""``make demo``: run optimize_model through the real Airflow scheduler and print what it did."""

from __future__ import annotations

import json
import time
from pathlib import Path

from opsctl.airflow_api import AirflowApi
from opsctl.services import LocalStack
from opsctl.settings import StackSettings

DAG_ID = "optimize_model"
MONITOR_DAG = "monitor_serving"
PROFILES = {
    # ~8 minutes on 2 CPU cores: 1,500 IMDB reviews, one epoch of MiniLM-L6, two epochs of
    # distillation into a 3-layer student, 500 test reviews.
    "demo": {"max_train": 1500, "max_eval": 500, "epochs": 1.0, "batch_size": 32, "learning_rate": 1e-4,
             "max_length": 128},
    # ~2-3 minutes: a smoke run of the same flow.
    "quick": {"max_train": 300, "max_eval": 100, "epochs": 1.0, "batch_size": 16, "learning_rate": 1e-4,
              "max_length": 64, "distill_epochs": 1.0},
    # make bench-full (issue 23): every training review, three epochs at the reference's three layer-wise
    # rates with early stopping, 256 tokens, 5,000 validation and test reviews, bfloat16 training where
    # the CPU has it (about 1.3x faster training steps with AMX), head+tail truncation (a long review's
    # verdict is often at its end). Hours on a CPU.
    "full": {"max_train": 0, "max_eval": 5000, "epochs": 3.0, "batch_size": 32,
             "layer_learning_rates": [1e-5, 5e-5, 1e-4], "max_length": 256, "distill_epochs": 2.0,
             "prune_epochs": 1.0, "train_precision": "auto", "truncation": "head_tail"},
}
# The gateway's default limit on one text (serving.gateway.GatewaySettings.max_chars). Demo traffic is
# cut to it and no shorter: the champion's drift reference has the reviews uncut, so cutting them
# shorter would itself be a length shift the monitor rightly flags.
GATEWAY_MAX_CHARS = 10_000
SAMPLE_TEXTS = (
    "An absolute delight from start to finish, with wonderful acting.",
    "Dull, predictable and far too long. I want my two hours back.",
    "The plot had holes but the music and the cast carried it.",
)


def run_demo(settings: StackSettings, profile: str = "demo", timeout_s: float = 1800.0, force: bool = False) -> int:
    stack = LocalStack(settings)
    if not stack_is_running(stack):
        return 1
    conf = PROFILES[profile] | ({"force_retrain": True} if force else {})
    api, run_id, state = trigger_and_follow(settings, stack, conf, f"demo__{profile}", timeout_s)
    if state != "success":
        print(f"error: the run ended as {state!r}. Task logs: {settings.airflow_url}/dags/{DAG_ID}/runs/{run_id}")
        return 1
    from tasks.settings import safe_name

    summary_path = settings.runs_dir / safe_name(run_id) / "summary.json"
    if not summary_path.exists() and api.task_states(DAG_ID, run_id).get("finetune_teacher") == "skipped":
        print(f"nothing changed: the serving champion was trained on this data, with this configuration, this "
              f"teacher and this code, so the run stopped at changed_since_champion (its log says which version). "
              f"`opsctl demo --force` trains anyway.\n"
              f"Airflow run: {settings.airflow_url}/dags/{DAG_ID}/runs/{run_id}")
        return 0
    summary = json.loads(summary_path.read_text())
    print_summary(settings, DAG_ID, run_id, summary)
    return 0


def trigger_and_follow(settings: StackSettings, stack: LocalStack, conf: dict, prefix: str,
                       timeout_s: float) -> tuple[AirflowApi, str, str]:
    """Fetch the demo assets, trigger optimize_model with ``conf`` and follow it to its end: the API
    client, the run id and the run's final state."""
    from tasks.assets import fetch_demo_assets

    print("== demo assets (fetched once, cached in", settings.assets_cache, ")")
    fetch_demo_assets(settings.assets_cache, progress=lambda message: print("  ", message))
    api = AirflowApi(settings.airflow_url, "admin", stack.airflow_admin_password() or "")
    api.wait_for_dag(DAG_ID)
    api.unpause(DAG_ID)
    run_id = f"{prefix}__{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
    api.trigger(DAG_ID, conf, run_id=run_id)
    print(f"== triggered {DAG_ID} run {run_id} with {json.dumps(conf)}")
    return api, run_id, follow_run(api, DAG_ID, run_id, timeout_s)


def stack_is_running(stack: LocalStack) -> bool:
    """True when every service runs; otherwise says which do not and how to start them."""
    not_running = [name for name, state in stack.status().items() if not state["running"]]
    if not_running:
        print(f"error: services not running: {', '.join(not_running)}. Start them with `make up`.")
    return not not_running


def follow_run(api: AirflowApi, dag_id: str, run_id: str, timeout_s: float) -> str:
    """Print each task state change until the run finishes; returns its final state."""
    started = time.monotonic()
    seen: dict[str, str | None] = {}
    state = ""
    while time.monotonic() - started < timeout_s:
        previous, state = state, _run_state(api, dag_id, run_id)
        if state != "waiting":
            for task_id, task_state in api.task_states(dag_id, run_id).items():
                if seen.get(task_id) != task_state and task_state is not None:
                    print(f"   [{time.monotonic() - started:6.0f}s] {task_id:22s} {task_state}")
                seen[task_id] = task_state
        if state != previous:
            print(f"   [{time.monotonic() - started:6.0f}s] run is {state}")
        if state in ("success", "failed"):
            return state
        time.sleep(3)
    return f"still {state} after {timeout_s:.0f}s"


def monitored_traffic(settings: StackSettings, api: AirflowApi, run_id: str, texts: list[str], rate: float,
                      duration_s: float, concurrency: int, conf: dict) -> dict | None:
    """Texts through the gateway (``rate`` per second for ``duration_s``), then one monitor_serving run
    ``run_id`` over that window with ``conf``; its ``check_window`` result (None: the run failed)."""
    import asyncio

    from bench.load_test import run_load

    load = asyncio.run(run_load(settings.gateway_url, rate, duration_s, concurrency, texts)).summary()
    print(f"   {load['ok']} ok, {load['sent'] - load['ok']} errors, client-side p95 {load['latency_p95_ms']:.1f} ms")
    time.sleep(3)  # the prediction log writes in batches, off the request path
    api.trigger(MONITOR_DAG, conf, run_id=run_id)
    state = follow_run(api, MONITOR_DAG, run_id, timeout_s=600)
    if state != "success":
        print(f"error: {MONITOR_DAG} run {run_id} ended as {state!r}: "
              f"{settings.airflow_url}/dags/{MONITOR_DAG}/runs/{run_id}")
        return None
    return api.xcom(MONITOR_DAG, run_id, "check_window")


def _run_state(api: AirflowApi, dag_id: str, run_id: str) -> str:
    """The run's state; "waiting" while a run another DAG triggers does not exist yet."""
    from opsctl.airflow_api import AirflowApiError

    try:
        return api.run_state(dag_id, run_id)
    except AirflowApiError as error:
        if " 404 " in str(error):
            return "waiting"
        raise


def print_summary(settings: StackSettings, dag_id: str, run_id: str, summary: dict,
                  samples: tuple[str, ...] = SAMPLE_TEXTS) -> None:
    from tasks.settings import safe_name

    print()
    print(f"== {dag_id} run {run_id}: success")
    print(f"{'candidate':18s} {'accuracy':>9s} {'macro F1':>9s} {'p50 ms':>8s} {'p95 ms':>8s} {'texts/s':>8s} "
          f"{'size MB':>8s} {'peak MB':>8s}  MLflow version")
    from tasks.recipe import OPTIMIZE_MODEL, REFERENCE_CANDIDATE
    from tasks.report import version_of

    switched_off = summary.get("switched_off") or {}
    for name in OPTIMIZE_MODEL.candidates:
        if name in switched_off:
            print(f"{name:18s} switched off: {switched_off[name]}")
            continue
        metrics = summary["candidates"][name]
        version = version_of(summary, name)
        print(f"{name:18s} {metrics['accuracy']:9.4f} {metrics['macro_f1']:9.4f} {metrics['latency_p50_ms']:8.2f} "
              f"{metrics['latency_p95_ms']:8.2f} {metrics.get('throughput_per_s', 0):8.0f} "
              f"{metrics['size_bytes'] / 1e6:8.2f} {metrics.get('peak_memory_mb', 0):8.0f}  {version}")
    teacher = summary["candidates"][REFERENCE_CANDIDATE]
    for name in ("onnx_int8", "student_int8", "pruned_int8"):
        if name not in summary["candidates"]:
            continue
        other = summary["candidates"][name]
        print(f"{name} vs PyTorch teacher: p50 {teacher['latency_p50_ms'] / other['latency_p50_ms']:.1f}x faster, "
              f"{teacher['size_bytes'] / other['size_bytes']:.1f}x smaller, "
              f"accuracy {other['accuracy'] - teacher['accuracy']:+.4f}")
    for name, gates in summary["gates"].items():
        failed = [gate["detail"] for gate in gates if gate["decision"] != "pass"]
        print(f"gates {name:18s} {'pass' if not failed else 'FAIL: ' + '; '.join(failed)}")
    promotion = summary["promotion"]
    if promotion["status"] != "success":
        print(f"not promoted: {promotion['reason']}")
        return
    info = promotion["info"]
    chosen = "most accurate" if summary.get("objective") == "most_accurate" else "fastest"
    print(f"winner: {summary['winner']} (the {chosen} candidate that passed every gate)")
    triton_version = int(promotion["metrics"]["triton_version"])
    print(f"promoted: MLflow {info['registered_model']} version {info['mlflow_version']} (alias {info['alias']!r})"
          f" -> Triton {info['triton_model']} version {triton_version}")
    _send_samples(settings, info["triton_model"], Path(promotion["uris"]["triton_version_dir"]), samples)
    print()
    print(f"Airflow run:  {settings.airflow_url}/dags/{dag_id}/runs/{run_id}")
    print(f"MLflow model: {settings.mlflow_url}/#/models/{info['registered_model']}/versions/{info['mlflow_version']}")
    print(f"MLflow run:   {settings.mlflow_url}/#/experiments (run {summary['mlflow_parent_run_id']}: report.html, "
          f"report.md, pareto.png)")
    print(f"Report:       {settings.runs_dir / safe_name(run_id) / 'report' / 'report.html'}")
    print(f"Triton:       http://{settings.triton_http_url}/v2/models/{info['triton_model']}")


def _send_samples(settings: StackSettings, triton_model: str, version_dir: Path,
                  samples: tuple[str, ...] = SAMPLE_TEXTS) -> None:
    """Classify a few raw texts through the Triton ensemble (tokenizer -> model -> probabilities)."""
    from serving.triton_client import TritonClient

    client = TritonClient(settings.triton_http_url)
    print(f"sample requests to Triton {triton_model} v{version_dir.name} (raw text in, label out):")
    for text in samples:
        started = time.perf_counter()
        result = client.classify(triton_model, [text])
        elapsed = (time.perf_counter() - started) * 1000
        probability = float(result["PROBABILITIES"][0].max())
        print(f"   {result['LABEL'][0]:9s} p={probability:.3f} {elapsed:6.1f} ms  {text}")
