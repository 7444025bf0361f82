"""``make demo-drift``: the monitoring loop end to end on the local stack.

1. Normal traffic (IMDB reviews, what the champion was trained on) goes through the gateway; a
   monitor_serving run judges that window: no drift, no trigger.
2. Shifted traffic (tweets about self-driving cars) goes through the gateway; the next window
   drifts and the monitor triggers optimize_model.
3. The triggered run retrains on a versioned data folder: the IMDB base file plus a later file of
   labelled tweets (as if a sample of the shifted traffic had been labelled), and promotes the new
   model only if it passes the gates.
4. The champion before and after is scored on labelled tweets that were neither trained on nor
   sent as traffic.

Needs a serving champion (``make demo`` first).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from opsctl.airflow_api import AirflowApi
from opsctl.services import LocalStack
from opsctl.settings import StackSettings

MONITOR_DAG, OPTIMIZE_DAG = "monitor_serving", "optimize_model"
BASE_FILE, LABELLED_FILE = "0001-imdb-base.csv", "0002-tweets-labelled.csv"


@dataclass(frozen=True)
class DriftDemoSizes:
    imdb_base: int = 2000  # training data the retrain starts from
    tweets_labelled: int = 1000  # the labelled sample of the shifted domain
    traffic: int = 400  # requests per phase
    held_out: int = 300  # labelled tweets for the before/after score, never trained on nor sent


@dataclass(frozen=True)
class DriftDemoData:
    folder: Path  # the versioned labelled data location the retrain reads
    normal_texts: list[str]
    shifted_texts: list[str]
    held_out: pd.DataFrame  # text, label


def prepare_data(imdb_csv: Path, tweets_csv: Path, folder: Path, sizes: DriftDemoSizes = DriftDemoSizes(),
                 seed: int = 7) -> DriftDemoData:
    """Split the demo assets into disjoint parts and write the versioned data folder.

    Files in the folder are read in name order and a later file's label wins for a repeated text
    (``tasks.data.load_frame``), so the labelled tweets are the newer file.
    """
    imdb = pd.read_csv(imdb_csv).sample(frac=1.0, random_state=seed).reset_index(drop=True)
    tweets = pd.read_csv(tweets_csv).drop_duplicates("text").sample(frac=1.0, random_state=seed)
    tweets = tweets.reset_index(drop=True)
    needed = sizes.tweets_labelled + sizes.traffic + sizes.held_out
    if len(tweets) < needed or len(imdb) < sizes.imdb_base + sizes.traffic:
        raise ValueError(f"the demo assets are too small: {len(tweets)} tweets (need {needed}), {len(imdb)} reviews")
    labelled = tweets.iloc[:sizes.tweets_labelled]
    shifted = tweets.iloc[sizes.tweets_labelled:sizes.tweets_labelled + sizes.traffic]
    held_out = tweets.iloc[sizes.tweets_labelled + sizes.traffic:needed].reset_index(drop=True)
    folder.mkdir(parents=True, exist_ok=True)
    imdb.iloc[:sizes.imdb_base][["text", "label"]].to_csv(folder / BASE_FILE, index=False)
    labelled[["text", "label"]].to_csv(folder / LABELLED_FILE, index=False)
    from opsctl.demo import GATEWAY_MAX_CHARS

    normal = imdb.iloc[sizes.imdb_base:sizes.imdb_base + sizes.traffic]["text"].astype(str).str.slice(
        0, GATEWAY_MAX_CHARS)
    return DriftDemoData(folder, normal.tolist(), shifted["text"].astype(str).tolist(), held_out[["text", "label"]])


def score(client, model: str, held_out: pd.DataFrame) -> float:
    """Accuracy of the serving champion on labelled texts, one text per request."""
    served = client.labels(model, held_out["text"].tolist())
    return float(np.mean([guess == truth for guess, truth in zip(served, held_out["label"])]))


def run_drift_demo(settings: StackSettings, profile: str = "demo", timeout_s: float = 2400.0, rate: float = 16.0,
                   force: bool = False) -> int:
    from opsctl.demo import PROFILES, follow_run, print_summary, stack_is_running
    from serving.triton_client import TritonClient
    from tasks.settings import safe_name

    stack = LocalStack(settings)
    if not stack_is_running(stack):
        return 1
    model = settings.serving_model
    triton = TritonClient(settings.triton_http_url)
    if not triton.is_ready(model):
        print(f"error: no champion serves as {model!r} yet. Run `make demo` first.")
        return 1
    data = _prepare_labelled_data(settings)
    before = score(triton, model, data.held_out)
    print(f"   champion {model} v{triton.ready_versions(model)[-1]}: accuracy {before:.3f} on "
          f"{len(data.held_out)} held-out labelled tweets")

    api = AirflowApi(settings.airflow_url, "admin", stack.airflow_admin_password() or "")
    for dag_id in (MONITOR_DAG, OPTIMIZE_DAG):
        api.wait_for_dag(dag_id)
        api.unpause(dag_id)
    retrain = PROFILES[profile] | {"data_source": str(data.folder)} | ({"force_retrain": True} if force else {})
    results = _traffic_phases(settings, api, data, rate, retrain)
    if results is None:
        return 1
    shifted_run, shifted = results["shifted"]
    if not shifted["decision"]["trigger"]:
        print("the shifted window did not trigger a re-optimization; see the window's report above")
        return 1
    optimize_run = f"monitor__{shifted_run}"
    print(f"== {OPTIMIZE_DAG} run {optimize_run}, triggered by the monitor, retrains on {data.folder}")
    state = follow_run(api, OPTIMIZE_DAG, optimize_run, timeout_s=timeout_s)
    if state != "success":
        print(f"error: the run ended as {state!r}: {settings.airflow_url}/dags/{OPTIMIZE_DAG}/runs/{optimize_run}")
        return 1
    summary_path = settings.runs_dir / safe_name(optimize_run) / "summary.json"
    if not summary_path.exists():
        print("nothing changed: the champion was already trained on this data with this code "
              "(`opsctl demo-drift --force` retrains anyway)")
        return 0
    print_summary(settings, OPTIMIZE_DAG, optimize_run, json.loads(summary_path.read_text()))
    after = score(triton, model, data.held_out)
    print(f"== champion {model} v{triton.ready_versions(model)[-1]} on the {len(data.held_out)} held-out labelled "
          f"tweets: accuracy {before:.3f} before, {after:.3f} after")
    print()
    _print_links(settings, results)
    return 0


def _prepare_labelled_data(settings: StackSettings) -> DriftDemoData:
    """The demo assets, written as the labelled data location the retraining reads."""
    from tasks.assets import fetch_demo_assets

    assets = fetch_demo_assets(settings.assets_cache, progress=lambda message: print("  ", message))
    data = prepare_data(assets.imdb_csv, assets.tweets_csv, settings.home / "data" / "labelled")
    print(f"== labelled data location {data.folder}: {BASE_FILE} (IMDB reviews), {LABELLED_FILE} "
          f"({DriftDemoSizes().tweets_labelled} labelled tweets; a later file's label wins)")
    return data


def _traffic_phases(settings: StackSettings, api: AirflowApi, data: DriftDemoData, rate: float,
                    retrain: dict) -> dict[str, tuple[str, dict]] | None:
    """Normal, then shifted traffic through the gateway, each followed by a monitoring window run.

    Returns each phase's monitor run id and result, or None when a monitoring run failed."""
    from opsctl.demo import monitored_traffic

    duration = len(data.normal_texts) / rate
    # Each window covers one phase only: it reaches back just past that phase's traffic.
    monitor_conf = {"window_minutes": round((duration + 10) / 60, 3), "min_rows": 100, "persist_windows": 1,
                    "cooldown_minutes": 0, "retrain_conf": json.dumps(retrain)}
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    results = {}
    for phase, texts, what in (("normal", data.normal_texts, "IMDB reviews"),
                               ("shifted", data.shifted_texts, "tweets about self-driving cars")):
        print(f"== {phase} traffic: {len(texts)} {what} through the gateway at {rate:.0f}/s")
        run_id = f"demo_drift__{phase}__{stamp}"
        result = monitored_traffic(settings, api, run_id, texts, rate, duration, 8, monitor_conf)
        if result is None:
            return None
        verdict, decision = result["verdict"], result["decision"]
        print(f"   window: {verdict['status']} ({'; '.join(verdict['reasons']) or 'no drift, within the SLOs'})")
        print(f"   decision: {'TRIGGER' if decision['trigger'] else 'no trigger'}: {decision['reason']}")
        results[phase] = (run_id, result)
    return results


def _print_links(settings: StackSettings, results: dict[str, tuple[str, dict]]) -> None:
    for phase, (run_id, result) in results.items():
        print(f"{phase} window: {settings.airflow_url}/dags/{MONITOR_DAG}/runs/{run_id}"
              + (f"  (MLflow run {result['mlflow_run_id']}, Evidently report drift_report.html)"
                 if result.get("mlflow_run_id") else ""))
    print(f"monitoring experiment: {settings.mlflow_url}/#/experiments (experiment 'monitoring')")
