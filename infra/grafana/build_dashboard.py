"""Writes ``dashboards/serving.json``, the Grafana dashboard of the serving path (run after editing).

    PYTHONPATH=. python infra/grafana/build_dashboard.py

The panels follow the reference text's monitoring list: latency p50/p95/p99, throughput, CPU/GPU
utilization, memory, error rate. ``tests/integration/test_gateway.py`` checks every metric named
here against the live /metrics of the gateway and Triton.
"""

from __future__ import annotations

import json
from pathlib import Path

from serving.model_repository import DEFAULT_MODEL

DASHBOARD = Path(__file__).parent / "dashboards" / "serving.json"
MODEL = 'model="$model"'

PANELS: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("Gateway latency (request in to response out)", "s", [
        (f"histogram_quantile({q}, sum by (le) (rate(gateway_request_latency_seconds_bucket{{{MODEL}}}[5m])))", f"p{p}")
        for q, p in (("0.5", "50"), ("0.95", "95"), ("0.99", "99"))
    ]),
    ("Triton ensemble latency", "µs", [
        (f'nv_inference_request_summary_us{{{MODEL}, quantile="{q}"}}', f"p{p}")
        for q, p in (("0.5", "50"), ("0.9", "90"), ("0.99", "99"))
    ]),
    ("Throughput", "reqps", [
        (f"sum(rate(gateway_predictions_total{{{MODEL}}}[1m]))", "texts/s (gateway)"),
        (f"sum by (model) (rate(nv_inference_count{{{MODEL}}}[1m]))", "inferences/s (Triton)"),
    ]),
    ("Error rate", "percentunit", [
        (f'sum(rate(gateway_requests_total{{{MODEL}, status=~"5.."}}[5m])) '
         f'/ clamp_min(sum(rate(gateway_requests_total{{{MODEL}}}[5m])), 1e-9)', "gateway 5xx share"),
        ("sum(rate(nv_inference_request_failure[5m])) / clamp_min(sum(rate(nv_inference_request_success[5m]))"
         " + sum(rate(nv_inference_request_failure[5m])), 1e-9)", "Triton failure share"),
    ]),
    ("CPU and GPU utilization", "percentunit", [
        ("nv_cpu_utilization", "CPU"),
        ("avg(nv_gpu_utilization)", "GPU (GPU hosts only)"),
    ]),
    ("Memory", "bytes", [
        ("nv_cpu_memory_used_bytes", "CPU memory used"),
        ("sum(nv_gpu_memory_used_bytes)", "GPU memory used (GPU hosts only)"),
    ]),
    ("Queueing", "short", [
        (f"sum(gateway_in_flight_requests{{{MODEL}}})", "gateway requests in flight"),
        (f"sum(nv_inference_pending_request_count{{{MODEL}}})", "Triton pending requests"),
        ("sum(prediction_log_queue_depth)", "predictions in the journals, not yet in the database"),
    ]),
    ("Prediction journal (share of its bound, per gateway)", "percentunit", [
        ("max by (instance) (prediction_journal_bytes / prediction_journal_max_bytes)", "{{instance}}"),
    ]),
]


def panel(index: int, title: str, unit: str, targets: list[tuple[str, str]]) -> dict:
    return {
        "id": index + 1, "type": "timeseries", "title": title,
        "gridPos": {"h": 8, "w": 12, "x": 12 * (index % 2), "y": 8 * (index // 2)},
        "datasource": {"type": "prometheus", "uid": "prometheus"},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [{"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend}
                    for i, (expr, legend) in enumerate(targets)],
    }


def dashboard() -> dict:
    return {
        "uid": "serving", "title": "Serving: gateway and Triton", "schemaVersion": 39, "version": 1,
        "editable": False, "refresh": "30s", "time": {"from": "now-6h", "to": "now"}, "tags": ["serving", "triton"],
        "templating": {"list": [{
            "name": "model", "type": "query", "label": "served model",
            "datasource": {"type": "prometheus", "uid": "prometheus"},
            "query": "label_values(gateway_predictions_total, model)", "current": {"text": DEFAULT_MODEL,
                                                                            "value": DEFAULT_MODEL},
        }]},
        "panels": [panel(index, *spec) for index, spec in enumerate(PANELS)],
    }


if __name__ == "__main__":
    DASHBOARD.parent.mkdir(parents=True, exist_ok=True)
    DASHBOARD.write_text(json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {DASHBOARD}")
