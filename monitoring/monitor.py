"""One monitoring window: read the served predictions, compare them with the champion's reference,
check the latency and error SLOs, measure live accuracy on the predictions whose true labels arrived
(label feedback), judge the window, decide whether to re-optimize, and record it all in MLflow (HTML
drift report, JSON summary, metrics)."""

from __future__ import annotations

import json
import logging
import math
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import sqlalchemy as sa

from serving import prediction_log as plog
from serving.replicas import ReplicasUnresolved, resolve_replicas
from monitoring import embedding
from monitoring.drift import EMBEDDING_REPORT, DriftConfig, detect
from monitoring.features import FEATURES, REFERENCE_FILE, window_features
from monitoring.feedback import feedback_evidence, live_quality, read_reference_accuracy
from monitoring.policy import Decision, PolicyConfig, WindowVerdict, accuracy_breach, decide, judge, serving_breaches

log = logging.getLogger(__name__)

EXPERIMENT = "monitoring"
HISTORY_KEPT = 200


@dataclass(frozen=True)
class MonitorSettings:
    """Where the monitor finds the prediction log, the models, MLflow and the servers' counters, and
    where it keeps its state; built by ``tasks.settings.PipelineSettings.monitor_settings``."""

    prediction_log_url: str
    model_repository: Path
    serving_model: str
    mlflow_tracking_uri: str
    state_dir: Path
    # Each replica is read on its own (``metrics_urls``): URLs joined by commas, or dns:<host>:<port>.
    gateway_url: str | None = None
    triton_metrics_url: str | None = None
    retrain_conf: str = ""  # optimize_model params (JSON object) for triggered runs when the param is empty


@dataclass(frozen=True)
class MonitorConfig:
    window_minutes: float = 15.0
    drift: DriftConfig = field(default_factory=DriftConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)


@dataclass(frozen=True)
class WindowRecord:
    """What the state keeps of one window: its verdict, the counters read at its end (by source:
    ``gateway``, ``triton``, then by replica's metrics URL; a source that could not be read is
    absent; a state saved before replicas were read one by one has one flat reading per source)
    and whether it triggered."""

    verdict: WindowVerdict
    counters: dict[str, dict] = field(default_factory=dict)
    triggered: bool = False

    @property
    def window_end(self) -> float:
        return self.verdict.window_end

    def to_dict(self) -> dict:
        return {"verdict": self.verdict.to_dict(), "counters": self.counters, "triggered": self.triggered}

    @classmethod
    def from_dict(cls, data: dict) -> WindowRecord:
        return cls(WindowVerdict.from_dict(data["verdict"]), data.get("counters", {}), bool(data.get("triggered")))


@dataclass
class MonitorState:
    """What persists between windows: one record per window end, in window-end order.

    Keyed by the window's end so that a retried window replaces its own record: its verdict counts
    once, its counter deltas are taken against the window before it, and a trigger it decided
    itself is no cooldown against it.
    """

    windows: list[WindowRecord] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> MonitorState:
        if not path.exists():
            return cls()
        data = json.loads(path.read_text())
        if "windows" not in data and "history" in data:
            return cls._from_history_file(data)
        return cls([WindowRecord.from_dict(item) for item in data.get("windows", [])])

    @classmethod
    def _from_history_file(cls, data: dict) -> MonitorState:
        """A state file of the earlier layout (a verdict list, the last trigger, the latest counters)."""
        state = cls()
        for item in data["history"]:
            verdict = WindowVerdict.from_dict(item)
            state.record(WindowRecord(verdict, triggered=verdict.window_end == data.get("last_trigger_at")))
        if state.windows:
            counters = {source: data[key] for source, key in (("gateway", "gateway_counts"),
                                                              ("triton", "triton_counts")) if data.get(key)}
            last = state.windows[-1]
            state.windows[-1] = WindowRecord(last.verdict, counters, last.triggered)
        return state

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.tmp")
        temp.write_text(json.dumps({"windows": [record.to_dict() for record in self.windows]}, indent=2, default=str))
        temp.replace(path)

    def before(self, window_end: float) -> list[WindowRecord]:
        """The records of the windows that ended before ``window_end`` (a retry's own record excluded)."""
        return [record for record in self.windows if record.window_end < window_end]

    def replica_baseline(self, window_end: float, source: str,
                         current: dict[str, dict[str, float]] | None = None) -> dict[str, dict[str, float]]:
        """Each replica's ``source`` counters as the latest earlier window that read that replica
        saw them. A window saved before replicas were read one by one holds one flat reading: it
        stands for the replica read now when only one is (``current``), else for none."""
        baseline: dict[str, dict[str, float]] = {}
        for record in reversed(self.before(window_end)):
            values = record.counters.get(source)
            if not values:
                continue
            if not all(isinstance(counters, dict) for counters in values.values()):
                if current and len(current) == 1 and not baseline:
                    baseline[next(iter(current))] = values
                break  # the earlier layout: every older record has it too
            for replica, counters in values.items():
                baseline.setdefault(replica, counters)
        return baseline

    def last_trigger_before(self, window_end: float) -> float | None:
        return next((record.window_end for record in reversed(self.before(window_end)) if record.triggered), None)

    def record(self, window: WindowRecord) -> None:
        """Add ``window``, replacing the record of the same window end, and keep the newest
        ``HISTORY_KEPT`` records plus the newest one that triggered (the cooldown counts from it)."""
        records = sorted([r for r in self.windows if r.window_end != window.window_end] + [window],
                         key=lambda r: r.window_end)
        kept = records[-HISTORY_KEPT:]
        last_trigger = next((r for r in reversed(records) if r.triggered), None)
        if last_trigger is not None and last_trigger.window_end < kept[0].window_end:
            kept.insert(0, last_trigger)
        self.windows = kept


def champion_version(repository: Path, model: str, served: pd.Series) -> str | None:
    """The version most predictions in the window came from, else the newest version with a reference."""
    if len(served):
        return str(served.mode().iloc[0])
    folder = repository / model
    candidates = sorted((int(p.name) for p in folder.iterdir() if p.name.isdigit() and (p / REFERENCE_FILE).exists()),
                        reverse=True) if folder.exists() else []
    return str(candidates[0]) if candidates else None


def reference_for(repository: Path, model: str, version: str) -> pd.DataFrame:
    path = repository / model / version / REFERENCE_FILE
    if not path.exists():
        raise FileNotFoundError(f"no drift reference for {model} version {version} at {path}: it was promoted "
                                "before references carried features; promote a new version")
    frame = pd.read_parquet(path)
    missing = [name for name in FEATURES if name not in frame]
    if missing:
        raise FileNotFoundError(f"{path} lacks the monitoring features {missing}: promote a new version")
    return frame[list(FEATURES) + [column for column in embedding.COLUMNS if column in frame]]


def _scrape(url: str) -> str | None:
    """A Prometheus text page, or None when unreachable."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - configured endpoints only
            return response.read().decode()
    except (urllib.error.URLError, OSError):
        return None


def metrics_urls(spec: str, service: str, resolve: Callable = socket.getaddrinfo) -> list[str]:
    """The metrics page of every replica ``spec`` names: URLs joined by commas, ``/metrics`` added
    to one without a path, or ``dns:host:port`` for ``http://<address>:port/metrics`` of every
    address the name resolves to (``serving.replicas``: a headless Service, a scaled compose service)."""
    urls = []
    for entry in resolve_replicas(spec, service, resolve):
        url = entry if "://" in entry else f"http://{entry}"
        urls.append(url if urllib.parse.urlsplit(url).path not in ("", "/") else f"{url.rstrip('/')}/metrics")
    return urls


def replica_counts(spec: str | None, service: str, parse: Callable[[str], dict[str, float]],
                   resolve: Callable = socket.getaddrinfo) -> dict[str, dict[str, float]] | None:
    """Each replica's counters (``parse`` of its own page) by its metrics URL, read one replica at
    a time, never through a load balancer that would mix them. None when ``spec`` is empty or no
    replica could be read; a replica that could not be read is absent (logged)."""
    if not spec:
        return None
    try:
        urls = metrics_urls(spec, service, resolve)
    except ReplicasUnresolved as error:
        log.warning("%s counters not read: %s", service, error)
        return None
    counts: dict[str, dict[str, float]] = {}
    for url in urls:
        text = _scrape(url)
        try:
            counts[url] = parse(text) if text is not None else None
        except ValueError as error:  # not a Prometheus text page
            log.warning("%s metrics at %s unreadable: %s", service, url, error)
            counts[url] = None
    missing = [url for url, values in counts.items() if values is None]
    if missing:
        log.warning("%s replicas %s could not be read: what they served since they were last read counts in "
                    "the first window that reads them again", service, missing)
    return {url: values for url, values in counts.items() if values is not None} or None


def _samples(text: str) -> Iterator[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of each sample of a Prometheus text page (``prometheus_client``'s
    parser; ValueError for a page that is none). A counter's samples are named without ``_total``
    (the parser adds it to a declared counter's, not to an undeclared one's)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            yield sample.name.removesuffix("_total"), sample.labels, sample.value


def triton_counts(metrics_url: str | None, model: str) -> dict[str, dict[str, float]] | None:
    """Each Triton replica's view of the ensemble (``parse_triton_metrics``) by its metrics URL."""
    return replica_counts(metrics_url, "Triton", lambda text: parse_triton_metrics(text, model))


def parse_triton_metrics(text: str, model: str) -> dict[str, float]:
    """``success`` and ``failure`` request counters of ``model`` (all versions summed) and the
    ``p99_us`` request-latency quantile (``summary_latencies``; the newest version's on the page)."""
    counts = {"success": 0.0, "failure": 0.0}
    for name, labels, value in _samples(text):
        if labels.get("model") != model:
            continue
        if name == "nv_inference_request_success":
            counts["success"] += value
        elif name == "nv_inference_request_failure":
            counts["failure"] += value
        elif name == "nv_inference_request_summary_us" and labels.get("quantile") == "0.99" and not math.isnan(value):
            counts["p99_us"] = value
    return counts


def gateway_counts(gateway_url: str | None, model: str | None = None) -> dict[str, dict[str, float]] | None:
    """Each gateway replica's counters of the served ``model`` (``parse_gateway_metrics``) by its metrics
    URL; None when none could be read. ``gateway_url``: ``PIPELINE_GATEWAY_URL`` (see ``metrics_urls``)."""
    return replica_counts(gateway_url, "gateway", lambda text: parse_gateway_metrics(text, model))


INVALID_OUTPUTS = "invalid_outputs"  # the gateway counters' key of gateway_invalid_outputs_total


def parse_gateway_metrics(text: str, model: str | None = None) -> dict[str, float]:
    """``gateway_requests_total`` by status and, under ``INVALID_OUTPUTS``, the texts the model
    answered with non-finite outputs: those of the served ``model`` (samples labelled with another
    model are skipped; a gateway from before the ``model`` label counts as serving it), summed over
    every model when ``model`` is None."""
    counts: dict[str, float] = {}
    for name, labels, value in _samples(text):
        if model is not None and labels.get("model", model) != model:
            continue
        if name == "gateway_requests" and "status" in labels:
            counts[labels["status"]] = counts.get(labels["status"], 0.0) + value
        elif name == "gateway_invalid_outputs":
            counts[INVALID_OUTPUTS] = counts.get(INVALID_OUTPUTS, 0.0) + value
    return counts


def counter_deltas(previous: dict[str, float], current: dict[str, float]) -> dict[str, float]:
    """How much each counter of one replica grew since ``previous``; every current value when one
    went down (the replica restarted: its counters began again)."""
    delta = {name: value - previous.get(name, 0.0) for name, value in current.items()}
    restarted = any(value < 0 for value in delta.values()) or any(name not in current for name in previous)
    return dict(current) if restarted else delta


def replica_deltas(previous: dict[str, dict[str, float]], current: dict[str, dict[str, float]]) -> dict[str, float]:
    """The counters' growth summed over the replicas read now, each against its own previous
    reading (a replica never read before: everything it counted since it started)."""
    total: dict[str, float] = {}
    for replica, counters in current.items():
        for name, value in counter_deltas(previous.get(replica, {}), counters).items():
            total[name] = total.get(name, 0.0) + value
    return total


def failure_share(deltas: dict[str, float]) -> tuple[float, int]:
    """Share of server-side failures (5xx) among the requests counted in ``deltas``; client errors
    (4xx) are the callers' problem and do not count against the SLO. Only HTTP statuses count."""
    statuses = {status: value for status, value in deltas.items() if status.isdigit()}
    total = sum(statuses.values())
    failures = sum(value for status, value in statuses.items() if status.startswith("5"))
    return (failures / total if total else 0.0), int(total)


def error_rate(previous: dict[str, float], current: dict[str, float]) -> tuple[float, int]:
    """``failure_share`` of one replica's requests since ``previous``."""
    return failure_share(counter_deltas(previous, current))


TRITON_COUNTERS = ("success", "failure")  # of parse_triton_metrics' keys; ``p99_us`` is a gauge


def _counters_only(replicas: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {replica: {name: values[name] for name in TRITON_COUNTERS if name in values}
            for replica, values in replicas.items()}


def server_evidence(settings: MonitorSettings, state: MonitorState,
                    window_end: float) -> tuple[dict, dict[str, dict[str, dict[str, float]]]]:
    """The window's evidence from the gateway's and Triton's counters, replica by replica, and the
    counters read (by source, then replica, for the next window's deltas; a source that could not
    be read is absent)."""
    # Deltas against the counters read before this window, not against what an earlier attempt of
    # this same window saved: a retry sees the same baseline.
    gateway = gateway_counts(settings.gateway_url, settings.serving_model)
    gateway_delta = replica_deltas(state.replica_baseline(window_end, "gateway", gateway), gateway or {})
    errors, requests = failure_share(gateway_delta)
    triton = triton_counts(settings.triton_metrics_url, settings.serving_model)
    triton_delta = replica_deltas(_counters_only(state.replica_baseline(window_end, "triton", triton)),
                                  _counters_only(triton or {}))
    triton_errors, _ = failure_share({"200": triton_delta.get("success", 0.0), "500": triton_delta.get("failure", 0.0)})
    p99s = [values["p99_us"] for values in (triton or {}).values() if "p99_us" in values]
    evidence = {
        "error_rate": max(errors, triton_errors), "requests": requests,
        "invalid_outputs": int(gateway_delta.get(INVALID_OUTPUTS, 0.0)),
        "gateway_metrics": gateway is not None, "gateway_replicas": len(gateway or {}),
        "triton_metrics": triton is not None, "triton_error_rate": triton_errors,
        "triton_p99_ms": max(p99s) / 1000.0 if p99s else None,  # the slowest replica's
    }
    counters = {source: values for source, values in (("gateway", gateway), ("triton", triton)) if values is not None}
    return evidence, counters


def of_model(rows: pd.DataFrame, model: str) -> pd.DataFrame:
    """The rows the served ``model`` logged (several models log to one prediction log)."""
    return rows[rows["model"] == model] if "model" in rows else rows


def token_count_p99(rows: pd.DataFrame) -> float | None:
    """The 99th percentile of the logged token counts (None when the rows have none)."""
    counts = pd.to_numeric(rows["token_count"], errors="coerce").dropna() if "token_count" in rows else []
    return float(np.percentile(counts, 99)) if len(counts) else None


def window_quality(engine: sa.Engine, settings: MonitorSettings, version: str, reference_labels: pd.Series,
                   start: float, end: float) -> tuple[dict, float | None]:
    """The live quality (``feedback.live_quality``) of the champion's predictions whose true labels
    arrived in [start, end), and the champion's test accuracy from its reference (None: unknown)."""
    labelled = of_model(plog.read_labelled(engine, start, end), settings.serving_model)
    labelled = labelled[labelled["model_version"] == version]
    labels = sorted(set(reference_labels.astype(str)) | set(labelled["label"].astype(str)))
    reference = read_reference_accuracy(settings.model_repository / settings.serving_model / version / REFERENCE_FILE)
    return live_quality(labelled, labels), reference


def trigger_conf(decision: Decision, policy: PolicyConfig, latest: dict) -> dict[str, str]:
    """What a trigger passes to optimize_model: ``trigger_reason``, ``trigger_kind`` (the breach kind
    that persisted) and ``trigger_evidence`` (JSON: the kind, the windows behind it, the latency SLO
    and, from ``latest`` (the evidence of the window just judged), the observed p95, the token-count
    p99, the champion version, the labelled predictions, the live accuracy and its interval, and the
    reference accuracy; the invalid outputs are summed over the trigger's windows)."""
    windows = decision.evidence.get("windows", [])
    evidence = {
        "kind": decision.kind, "windows": windows, "slo_p95_ms": policy.max_p95_ms,
        "latency_p95_ms": latest.get("latency_p95_ms"), "token_count_p99": latest.get("token_count_p99"),
        "invalid_outputs": sum(int(window.get("evidence", {}).get("invalid_outputs") or 0) for window in windows),
        "champion_version": latest.get("champion_version"), "labelled": latest.get("labelled", 0),
        "live_accuracy": latest.get("live_accuracy"), "live_accuracy_low": latest.get("live_accuracy_low"),
        "live_accuracy_high": latest.get("live_accuracy_high"), "reference_accuracy": latest.get("reference_accuracy"),
    }
    return {"trigger_reason": decision.reason, "trigger_kind": decision.kind, "trigger_evidence": json.dumps(evidence)}


def run_window(settings: MonitorSettings, config: MonitorConfig, window_end: float, optimization_active: bool,
               out_dir: Path, log_to_mlflow: bool = True) -> dict:
    """Judge the window ending at ``window_end`` and decide; returns the summary (also written as JSON)."""
    started = time.monotonic()
    state_path = settings.state_dir / "state.json"
    state = MonitorState.load(state_path)
    engine = plog.create_engine(settings.prediction_log_url)
    window_start = window_end - config.window_minutes * 60
    rows = of_model(plog.read_window(engine, window_start, window_end), settings.serving_model)
    version = champion_version(settings.model_repository, settings.serving_model, rows["model_version"])
    champion_rows = rows[rows["model_version"] == version] if version else rows.iloc[0:0]
    out_dir.mkdir(parents=True, exist_ok=True)
    html = out_dir / "drift_report.html"
    drift, quality, reference_accuracy = None, {"labelled": 0}, None
    if version is not None:
        reference = reference_for(settings.model_repository, settings.serving_model, version)
        drift = detect(reference, window_features(champion_rows), config.drift, html_path=html)
        quality, reference_accuracy = window_quality(engine, settings, version, reference["predicted"], window_start,
                                                     window_end)
    latencies = rows["latency_ms"].to_numpy(dtype=float)
    p95 = float(np.percentile(latencies, 95)) if len(latencies) else 0.0
    p99 = float(np.percentile(latencies, 99)) if len(latencies) else 0.0
    servers, counters = server_evidence(settings, state, window_end)
    evidence = {
        "window": [window_start, window_end], "predictions": len(rows), "champion_version": version,
        "latency_p95_ms": p95, "latency_p99_ms": p99, "token_count_p99": token_count_p99(champion_rows), **servers,
        "drift": {name: item for name, item in (drift.features.items() if drift else [])},
        "drift_kinds": list(drift.kinds) if drift else [],
        "drift_false_alarm_rate": config.drift.false_alarm_rate,
        "drift_critical_p": drift.critical_p if drift else None, **feedback_evidence(quality, reference_accuracy),
    }
    # Latency and error rate only mean something when something was served (or Triton failed);
    # invalid outputs are the model's fault however little was served.
    served = len(rows) > 0 or servers["triton_error_rate"] > 0
    breaches = serving_breaches(p95, p99, evidence["error_rate"] if served else 0.0, config.policy,
                                invalid_outputs=servers["invalid_outputs"])
    accuracy = accuracy_breach(quality, reference_accuracy, config.policy)
    if accuracy is not None:
        breaches.append(accuracy)
    verdict = judge(window_end, len(champion_rows), config.drift.min_rows, drift.by_kind() if drift else {},
                    breaches, evidence, config.policy.drift_triggers)
    history = [record.verdict for record in state.before(window_end)] + [verdict]
    decision: Decision = decide(history, window_end, state.last_trigger_before(window_end), optimization_active,
                                config.policy)
    state.record(WindowRecord(verdict, counters, decision.trigger))
    state.save(state_path)
    summary = {
        "verdict": verdict.to_dict(), "decision": asdict(decision),
        "trigger_conf": trigger_conf(decision, config.policy, evidence),
        "seconds": time.monotonic() - started, "drift_report": str(html) if html.exists() else None,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    log.info("window ending %s: %s %s; decision: %s", time.strftime("%H:%M", time.gmtime(window_end)),
             verdict.status, "; ".join(verdict.reasons), decision.reason)
    if log_to_mlflow:
        summary["mlflow_run_id"] = _log_to_mlflow(settings, verdict, decision, evidence, out_dir)
    return summary


def _log_to_mlflow(settings: MonitorSettings, verdict: WindowVerdict, decision: Decision, evidence: dict,
                   out_dir: Path) -> str:
    import mlflow

    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    experiment = mlflow.set_experiment(EXPERIMENT)
    name = "window " + time.strftime("%Y-%m-%dT%H:%M", time.gmtime(verdict.window_end))
    with mlflow.start_run(experiment_id=experiment.experiment_id, run_name=name) as run:
        mlflow.set_tags({"status": verdict.status, "kinds": ",".join(verdict.kinds),
                         "drift_kinds": ",".join(evidence.get("drift_kinds", [])), "trigger": str(decision.trigger),
                         "trigger_kind": decision.kind, "decision": decision.reason[:500],
                         "model": settings.serving_model, "champion_version": str(evidence["champion_version"])})
        metrics = {"predictions": evidence["predictions"], "latency_p95_ms": evidence["latency_p95_ms"],
                   "latency_p99_ms": evidence["latency_p99_ms"], "error_rate": evidence["error_rate"],
                   "invalid_outputs": evidence["invalid_outputs"]}
        metrics |= {f"drift_{name}": item["score"] for name, item in evidence["drift"].items() if "score" in item}
        metrics |= {f"drift_p_{name}": item["p_value"] for name, item in evidence["drift"].items() if "p_value" in item}
        metrics |= {name: value for name, value in evidence.items()
                    if (name == "labelled" or name.startswith("live_")) and value is not None}
        mlflow.log_metrics(metrics)
        for path in (out_dir / "summary.json", out_dir / "drift_report.html", out_dir / EMBEDDING_REPORT):
            if path.exists():
                mlflow.log_artifact(str(path))
        return run.info.run_id
