"""One monitoring window: read the served predictions, compare them with the champion's reference,
check the latency and error SLOs, measure live accuracy on the predictions whose true labels arrived
(label feedback), judge the window, decide whether to re-optimize, and record it all in MLflow (HTML
drift report, JSON summary, metrics)."""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import sqlalchemy as sa

from serving import prediction_log as plog
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
    ``gateway``, ``triton``; a source that could not be read is absent) and whether it triggered."""

    verdict: WindowVerdict
    counters: dict[str, dict[str, float]] = field(default_factory=dict)
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

    def baseline(self, window_end: float, source: str) -> dict[str, float]:
        """The ``source`` counters read at the end of the latest earlier window that could read them
        (empty when none did: the counters count from the server's start)."""
        return next((record.counters[source] for record in reversed(self.before(window_end))
                     if source in record.counters), {})

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


def _scrape(url: str | None) -> str | None:
    """A Prometheus text page, or None when not configured or unreachable."""
    if not url:
        return None
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback only
            return response.read().decode()
    except (urllib.error.URLError, OSError):
        return None


def triton_counts(metrics_url: str | None, model: str) -> dict[str, float] | None:
    """Triton's own view of the ensemble: ``success`` and ``failure`` request counters (all versions
    summed) and the ``p99_us`` request-latency quantile (``summary_latencies``, newest version)."""
    text = _scrape(metrics_url)
    return None if text is None else parse_triton_metrics(text, model)


def parse_triton_metrics(text: str, model: str) -> dict[str, float]:
    counts = {"success": 0.0, "failure": 0.0}
    for line in text.splitlines():
        if f'model="{model}"' not in line:
            continue
        value = float(line.rsplit(" ", 1)[1])
        if line.startswith("nv_inference_request_success{"):
            counts["success"] += value
        elif line.startswith("nv_inference_request_failure{"):
            counts["failure"] += value
        elif line.startswith("nv_inference_request_summary_us{") and 'quantile="0.99"' in line and value == value:
            counts["p99_us"] = value
    return counts


def gateway_counts(gateway_url: str | None) -> dict[str, float] | None:
    """``gateway_requests_total`` by status and, under ``INVALID_OUTPUTS``, the texts the model
    answered with non-finite outputs, from the gateway's /metrics (None when unreachable)."""
    text = _scrape(f"{gateway_url}/metrics" if gateway_url else None)
    return None if text is None else parse_gateway_metrics(text)


INVALID_OUTPUTS = "invalid_outputs"  # the gateway counters' key of gateway_invalid_outputs_total


def parse_gateway_metrics(text: str) -> dict[str, float]:
    counts = {}
    for line in text.splitlines():
        if line.startswith("gateway_requests_total{"):
            status = line.split('status="', 1)[1].split('"', 1)[0]
            counts[status] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("gateway_invalid_outputs_total "):
            counts[INVALID_OUTPUTS] = float(line.rsplit(" ", 1)[1])
    return counts


def error_rate(previous: dict[str, float], current: dict[str, float]) -> tuple[float, int]:
    """Share of server-side failures (5xx) among the requests since the previous window; client errors
    (4xx) are the callers' problem and do not count against the SLO. Only HTTP statuses count."""
    delta = {status: current.get(status, 0.0) - previous.get(status, 0.0) for status in current if status.isdigit()}
    if any(value < 0 for value in delta.values()):  # the gateway restarted: its counters began again
        delta = {status: value for status, value in current.items() if status.isdigit()}
    total = sum(delta.values())
    failures = sum(value for status, value in delta.items() if status.startswith("5"))
    return (failures / total if total else 0.0), int(total)


def counter_delta(previous: dict[str, float], current: dict[str, float], name: str) -> int:
    """How much counter ``name`` grew since the previous window (its whole value after a restart)."""
    now, before = current.get(name, 0.0), previous.get(name, 0.0)
    return int(now - before if now >= before else now)


def server_evidence(settings: MonitorSettings, state: MonitorState,
                    window_end: float) -> tuple[dict, dict[str, dict[str, float]]]:
    """The window's evidence from the gateway's and Triton's counters, and the counters read (by
    source, for the next window's deltas; a source that could not be read is absent)."""
    # Deltas against the counters read at the end of the window before this one, not against what an
    # earlier attempt of this same window saved: a retry sees the same baseline.
    counts = gateway_counts(settings.gateway_url)
    gateway_before = state.baseline(window_end, "gateway")
    errors, requests = error_rate(gateway_before, counts) if counts is not None else (0.0, 0)
    triton = triton_counts(settings.triton_metrics_url, settings.serving_model)
    triton_errors = 0.0
    if triton is not None:
        before = state.baseline(window_end, "triton")
        triton_errors, _ = error_rate({"200": before.get("success", 0.0), "500": before.get("failure", 0.0)},
                                      {"200": triton["success"], "500": triton["failure"]})
    evidence = {
        "error_rate": max(errors, triton_errors), "requests": requests,
        "invalid_outputs": counter_delta(gateway_before, counts, INVALID_OUTPUTS) if counts is not None else 0,
        "gateway_metrics": counts is not None, "triton_metrics": triton is not None,
        "triton_error_rate": triton_errors,
        "triton_p99_ms": triton["p99_us"] / 1000.0 if triton and "p99_us" in triton else None,
    }
    counters = {source: values for source, values in (("gateway", counts), ("triton", triton)) if values is not None}
    return evidence, counters


def token_count_p99(rows: pd.DataFrame) -> float | None:
    """The 99th percentile of the logged token counts (None when the rows have none)."""
    counts = pd.to_numeric(rows["token_count"], errors="coerce").dropna() if "token_count" in rows else []
    return float(np.percentile(counts, 99)) if len(counts) else None


def window_quality(engine: sa.Engine, settings: MonitorSettings, version: str, reference_labels: pd.Series,
                   start: float, end: float) -> tuple[dict, float | None]:
    """The live quality (``feedback.live_quality``) of the champion's predictions whose true labels
    arrived in [start, end), and the champion's test accuracy from its reference (None: unknown)."""
    labelled = plog.read_labelled(engine, start, end)
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
    rows = plog.read_window(engine, window_start, window_end)
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
