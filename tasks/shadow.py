"""Shadow before switching: the challenger answers a copy of live traffic, and is judged on it.

Called by the promotion (``tasks.promote.serve_bundle``, param ``shadow_requests`` > 0) once the
challenger's components are loaded beside the serving ones and before anything switches:

1. ``<model>_shadow``, an ensemble over the challenger's components, is written and loaded on every
   replica; the gateways copy each answered request to it (``serving/shadow.py``) and write one
   comparison row per copy to the prediction log's database.
2. The promotion waits until ``shadow_requests`` copied requests have been compared, or
   ``shadow_minutes`` have passed.
3. The shadow ensemble is unloaded and removed, whatever happened.
4. The comparisons are judged: label agreement with the champion at least ``shadow_min_agreement``,
   the median of the challenger's call latency at most ``shadow_max_latency_ratio`` times the
   champion's on the same requests, no failed copy, and enough requests. The figures (p50 and p95 of
   both) are logged on the challenger's MLflow version run (metrics ``shadow_*``, side by side with
   the champion's) and its verdict as the version tag ``shadow``. A failed shadow raises
   ``PromotionFailed``: the switch does not happen.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from serving import model_repository as repo
from serving.shadow import Comparison, ShadowSummary, read_comparisons
from serving.triton_client import TritonReplicas, load_and_wait
from tasks import model_aliases
from tasks.config import PromoteConfig
from tasks.errors import PromotionFailed

log = logging.getLogger(__name__)

SHADOW_TAG = "shadow"
POLL_S = 2.0


@dataclass(frozen=True)
class ShadowVerdict:
    passed: bool
    reason: str
    summary: ShadowSummary


def judge(config: PromoteConfig, summary: ShadowSummary) -> ShadowVerdict:
    """The shadow's verdict under ``config``'s thresholds (every problem named)."""
    problems = []
    if summary.requests < config.shadow_requests:
        problems.append(f"only {summary.requests} of {config.shadow_requests} requests were copied in "
                        f"{config.shadow_minutes:g} min (too little traffic to judge)")
    if summary.failed:
        problems.append(f"the challenger failed {summary.failed} of {summary.requests} copied requests")
    if summary.texts and summary.agreement < config.shadow_min_agreement:
        problems.append(f"it agreed with the champion on {summary.agreement:.1%} of {summary.texts} texts "
                        f"(< {config.shadow_min_agreement:.1%})")
    # The median, not the p95: over tens of requests a p95 is the slowest one or two, noise on a shared host.
    limit = config.shadow_max_latency_ratio * summary.champion_p50_ms
    if summary.texts and summary.shadow_p50_ms > limit:
        problems.append(f"its median call latency was {summary.shadow_p50_ms:.1f} ms against the champion's "
                        f"{summary.champion_p50_ms:.1f} ms (> {config.shadow_max_latency_ratio:g}x)")
    figures = (f"{summary.requests} requests, {summary.texts} texts, agreement {summary.agreement:.1%}, p50/p95 "
               f"{summary.shadow_p50_ms:.1f}/{summary.shadow_p95_ms:.1f} ms vs the champion's "
               f"{summary.champion_p50_ms:.1f}/{summary.champion_p95_ms:.1f} ms")
    if problems:
        return ShadowVerdict(False, f"shadow failed: {'; '.join(problems)} ({figures})", summary)
    return ShadowVerdict(True, f"shadow passed: {figures}", summary)


def wait_for_comparisons(database_url: str, model: str, version: int, since: float, requests: int,
                         minutes: float, poll_s: float = POLL_S) -> list[Comparison]:
    """The comparisons of shadow version ``version`` once ``requests`` are in, or all there are after ``minutes``."""
    deadline = time.monotonic() + minutes * 60.0
    logged_at = 0
    while True:
        found = read_comparisons(database_url, model, since, shadow_version=str(version))
        failed = [c for c in found if c.shadow_ms is None]
        # A failed copy decides the verdict (its error in the log): no need to wait for more.
        if len(found) >= requests or failed or time.monotonic() >= deadline:
            return found
        if len(found) >= logged_at + max(1, requests // 10):
            logged_at = len(found)
            log.info("shadow of %s v%d: %d of %d requests compared", model, version, len(found), requests)
        time.sleep(poll_s)


def run_shadow(config: PromoteConfig, replicas: TritonReplicas, repository: Path, ensemble: repo.ClassifierEnsemble,
               version: int, database_url: str | None, tracking_uri: str, mlflow_version: str) -> ShadowVerdict:
    """Shadow component version ``version`` of ``ensemble`` on live traffic and judge it (module doc).
    ``PromotionFailed`` when it fails or cannot run; the verdict otherwise."""
    if not database_url:
        raise PromotionFailed("a shadow was asked for (shadow_requests > 0), but the prediction log's database "
                              "is not configured for this worker (PIPELINE_PREDICTION_LOG_URL): nothing was switched")
    name = repo.write_shadow_ensemble(repository, ensemble, version)
    since = time.time()
    try:
        load_and_wait(replicas, (name,), version)
        log.info("shadow %s v%d loaded: waiting for %d copied requests (at most %g min)", name, version,
                 config.shadow_requests, config.shadow_minutes)
        comparisons = wait_for_comparisons(database_url, ensemble.name, version, since, config.shadow_requests,
                                           config.shadow_minutes)
    finally:
        _take_down(replicas, repository, name)
    verdict = judge(config, ShadowSummary.of(comparisons))
    for failure in {c.error for c in comparisons if c.error}:
        log.warning("shadow copy failed: %s", failure)
    record(tracking_uri, config, mlflow_version, verdict)
    log.info("%s", verdict.reason)
    if not verdict.passed:
        raise PromotionFailed(verdict.reason)
    return verdict


def _take_down(replicas: TritonReplicas, repository: Path, name: str) -> None:
    try:
        replicas.unload(name)
    except Exception as error:  # noqa: BLE001 - the folder goes anyway; Triton drops the model on its next load
        log.warning("could not unload %s: %s", name, error)
    repo.remove_model(repository, name)


def record(tracking_uri: str, config: PromoteConfig, mlflow_version: str, verdict: ShadowVerdict) -> None:
    """The shadow's figures on the challenger's version run, side by side with the champion's, and
    its verdict as a version tag (reviewers see both in the MLflow UI)."""
    import mlflow

    summary = verdict.summary
    metrics = {"shadow_requests": summary.requests, "shadow_texts": summary.texts,
               "shadow_agreement": summary.agreement, "shadow_failed_requests": summary.failed,
               "shadow_p50_ms": summary.shadow_p50_ms, "shadow_p95_ms": summary.shadow_p95_ms,
               "shadow_champion_p50_ms": summary.champion_p50_ms, "shadow_champion_p95_ms": summary.champion_p95_ms}
    client = mlflow.MlflowClient(tracking_uri)
    run_id = client.get_model_version(config.registered_model, mlflow_version).run_id
    if run_id:
        for key, value in metrics.items():
            if value == value:  # NaN (no answered copy) is not logged
                client.log_metric(run_id, key, float(value))
    model_aliases.tag_version(tracking_uri, config.registered_model, mlflow_version, {SHADOW_TAG: verdict.reason})
