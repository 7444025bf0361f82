"""Reading the gateway's and Triton's Prometheus counters, and error rates between windows."""

import pytest

from monitoring.monitor import INVALID_OUTPUTS, counter_delta, error_rate, parse_gateway_metrics, parse_triton_metrics

TRITON = """# HELP nv_inference_request_success Number of successful inference requests
nv_inference_request_success{model="text_classifier",version="2"} 120
nv_inference_request_success{model="text_classifier",version="3"} 880
nv_inference_request_success{model="text_classifier_onnx",version="3"} 880
nv_inference_request_failure{model="text_classifier",version="3"} 10
nv_inference_request_summary_us{model="text_classifier",version="3",quantile="0.99"} 42000
nv_inference_request_summary_us{model="text_classifier",version="3",quantile="0.5"} 9000
"""
GATEWAY = """gateway_requests_total{status="200"} 950.0
gateway_requests_total{status="422"} 30.0
gateway_requests_total{status="503"} 20.0
gateway_requests_created{status="200"} 1.7e9
"""


def test_triton_counters_are_summed_over_versions_of_the_ensemble_only():
    counts = parse_triton_metrics(TRITON, "text_classifier")
    assert counts == {"success": 1000.0, "failure": 10.0, "p99_us": 42000.0}


def test_gateway_counters_by_status():
    assert parse_gateway_metrics(GATEWAY) == {"200": 950.0, "422": 30.0, "503": 20.0}


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
    assert counter_delta({INVALID_OUTPUTS: 2.0}, counts, INVALID_OUTPUTS) == 5
    assert counter_delta({INVALID_OUTPUTS: 9.0}, counts, INVALID_OUTPUTS) == 7  # the gateway restarted
    assert counter_delta({}, {"200": 1.0}, INVALID_OUTPUTS) == 0
