"""Reading the gateway's and Triton's Prometheus counters (prometheus_client's parser), replica by
replica, and error rates between windows summed over the replicas' own deltas."""

import socket

import pytest

from monitoring.monitor import (INVALID_OUTPUTS, counter_deltas, error_rate, failure_share, metrics_urls,
                                parse_gateway_metrics, parse_triton_metrics, replica_counts, replica_deltas)
from serving.gateway import Metrics
from serving.prediction_log import PredictionLog
from serving.replicas import ReplicasUnresolved

TRITON = """# HELP nv_inference_request_success Number of successful inference requests
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="text_classifier",version="2"} 120
nv_inference_request_success{model="text_classifier",version="3"} 880
nv_inference_request_success{model="text_classifier_onnx",version="3"} 880
nv_inference_request_failure{model="text_classifier",version="3"} 10
nv_inference_request_summary_us{model="text_classifier",version="3",quantile="0.99"} 42000
nv_inference_request_summary_us{model="text_classifier",version="3",quantile="0.5"} 9000
nv_inference_request_summary_us{model="text_classifier",version="2",quantile="0.99"} NaN
"""
GATEWAY = """gateway_requests_total{status="200"} 950.0
gateway_requests_total{status="422"} 30.0
gateway_requests_total{status="503"} 20.0
gateway_requests_created{status="200"} 1.7e9
"""


def _gateway_page(statuses: dict[str, int], invalid: int = 0) -> str:
    """The page a real gateway's ``Metrics`` exports (``generate_latest``) after these answers."""
    from prometheus_client import generate_latest

    metrics = Metrics(PredictionLog("sqlite://"))
    for status, times in statuses.items():
        metrics.requests.labels("text_classifier", status).inc(times)
    metrics.invalid_outputs.labels("text_classifier").inc(invalid)
    metrics.feedback_requests.labels("text_classifier", "500").inc(7)  # feedback is not a classify request
    return generate_latest(metrics.registry).decode()


def test_triton_counters_are_summed_over_versions_of_the_ensemble_only():
    counts = parse_triton_metrics(TRITON, "text_classifier")
    assert counts == {"success": 1000.0, "failure": 10.0, "p99_us": 42000.0}


def test_gateway_counters_by_status():
    assert parse_gateway_metrics(GATEWAY) == {"200": 950.0, "422": 30.0, "503": 20.0}


def test_a_real_gateway_page_is_read_by_the_parser():
    counts = parse_gateway_metrics(_gateway_page({"200": 4, "500": 2, "422": 1}, invalid=3))
    assert counts == {"200": 4.0, "500": 2.0, "422": 1.0, INVALID_OUTPUTS: 3.0}
    assert parse_gateway_metrics(_gateway_page({})) == {INVALID_OUTPUTS: 0.0}


def test_a_page_that_is_not_prometheus_text_is_an_error():
    with pytest.raises(ValueError):
        parse_gateway_metrics("<html>502 Bad Gateway</html>\n{")


def test_error_rate_counts_5xx_since_the_last_window_and_survives_restarts():
    before = {"200": 900.0, "422": 30.0, "503": 10.0}
    rate, requests = error_rate(before, parse_gateway_metrics(GATEWAY))
    assert requests == 60 and rate == pytest.approx(10 / 60)  # client errors (4xx) are not SLO errors
    restarted, total = error_rate(before, {"200": 5.0, "503": 5.0})
    assert total == 10 and restarted == pytest.approx(0.5)
    assert error_rate({}, {}) == (0.0, 0)


def test_invalid_outputs_are_read_beside_the_statuses_and_are_no_request_status():
    counts = parse_gateway_metrics(GATEWAY + "# HELP gateway_invalid_outputs_total Texts\n"
                                   "gateway_invalid_outputs_total 7.0\ngateway_invalid_outputs_created 1.7e9\n")
    assert counts[INVALID_OUTPUTS] == 7.0 and len(counts) == 4
    rate, requests = error_rate({"200": 900.0, "422": 30.0, "503": 10.0, INVALID_OUTPUTS: 2.0}, counts)
    assert requests == 60 and rate == pytest.approx(10 / 60)
    assert counter_deltas({"200": 900.0, INVALID_OUTPUTS: 2.0}, counts)[INVALID_OUTPUTS] == 5
    assert counter_deltas({INVALID_OUTPUTS: 9.0}, counts)[INVALID_OUTPUTS] == 7  # the gateway restarted
    assert INVALID_OUTPUTS not in counter_deltas({}, {"200": 1.0})


def test_two_replicas_each_against_its_own_previous_counters_one_restarted():
    previous = {"http://a/metrics": parse_gateway_metrics(_gateway_page({"200": 1000, "503": 10})),
                "http://b/metrics": parse_gateway_metrics(_gateway_page({"200": 50, "500": 5}, invalid=4))}
    current = {"http://a/metrics": parse_gateway_metrics(_gateway_page({"200": 1090, "503": 20})),
               # b restarted: 30 answers since, fewer than before, so its whole counters are the delta
               "http://b/metrics": parse_gateway_metrics(_gateway_page({"200": 27, "500": 3}, invalid=1))}
    deltas = replica_deltas(previous, current)
    assert deltas == {"200": 90.0 + 27.0, "503": 10.0, "500": 3.0, INVALID_OUTPUTS: 1.0}
    rate, requests = failure_share(deltas)
    assert requests == 130 and rate == pytest.approx(13 / 130)
    # The totals of the two pages mixed as one reading would have gone down and hidden b's restart.
    mixed = error_rate({"200": 1050.0, "503": 10.0, "500": 5.0}, {"200": 1117.0, "503": 20.0, "500": 3.0})
    assert mixed != (rate, requests)


def test_a_replica_read_for_the_first_time_counts_from_its_start():
    previous = {"http://a/metrics": {"200": 100.0}}
    current = {"http://a/metrics": {"200": 110.0}, "http://new/metrics": {"200": 5.0, "502": 5.0}}
    assert failure_share(replica_deltas(previous, current)) == (pytest.approx(5 / 20), 20)


def _resolver(table: dict[str, list[str]]):
    def resolve(host, port, family, kind):
        if host not in table:
            raise socket.gaierror(f"unknown host {host}")
        return [(family, kind, 6, "", (address, port)) for address in table[host]]
    return resolve


def test_metrics_urls_from_a_list_or_a_dns_name():
    resolve = _resolver({"gateway-replicas": ["10.0.0.7", "10.0.0.5"]})
    assert metrics_urls("dns:gateway-replicas:8090", "gateway", resolve) == [
        "http://10.0.0.5:8090/metrics", "http://10.0.0.7:8090/metrics"]
    assert metrics_urls("http://g1:8090, http://g2:8090/ ,triton:8002", "gateway", resolve) == [
        "http://g1:8090/metrics", "http://g2:8090/metrics", "http://triton:8002/metrics"]
    assert metrics_urls("http://triton:8002/metrics", "Triton", resolve) == ["http://triton:8002/metrics"]
    with pytest.raises(ReplicasUnresolved, match="cannot resolve the gateway replicas of 'dns:nowhere:8090'"):
        metrics_urls("dns:nowhere:8090", "gateway", resolve)


def test_replicas_that_cannot_be_read_are_left_out():
    resolve = _resolver({})
    assert replica_counts(None, "gateway", parse_gateway_metrics) is None
    assert replica_counts("dns:nowhere:8090", "gateway", parse_gateway_metrics, resolve) is None
    with socket.socket() as unused:  # a port nothing listens on
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    assert replica_counts(f"http://127.0.0.1:{port}", "gateway", parse_gateway_metrics) is None
