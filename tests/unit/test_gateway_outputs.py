"""The gateway's check of the model's outputs: NaN or infinite probabilities are the model's fault
(a 502 that says how many texts, nothing logged), counted in a metric the monitor reads."""

import math

from monitoring.monitor import INVALID_OUTPUTS, parse_gateway_metrics
from serving.gateway import Metrics, invalid_outputs_message, non_finite_rows
from serving.prediction_log import PredictionLog


def test_rows_with_a_nan_or_an_infinity_are_found():
    probabilities = [[0.2, 0.8], [math.nan, 0.5], [0.5, 0.5], [math.inf, 0.0], [-math.inf, 1.0]]
    assert non_finite_rows(probabilities) == [1, 3, 4]
    assert non_finite_rows([[0.0, 1.0], [1e-30, 1.0]]) == [] and non_finite_rows([]) == []


def test_the_message_says_how_many_texts_and_whose_fault():
    message = invalid_outputs_message(2, 5)
    assert message.startswith("the model returned non-finite outputs for 2 of 5 texts")


def test_the_counter_the_gateway_exports_is_the_one_the_monitor_reads():
    from prometheus_client import generate_latest

    metrics = Metrics(PredictionLog("sqlite://"), ("sentiment", "topics"))
    metrics.requests.labels("sentiment", "200").inc(4)
    metrics.requests.labels("sentiment", "502").inc()
    metrics.invalid_outputs.labels("sentiment").inc(3)
    metrics.requests.labels("topics", "200").inc(10)
    page = generate_latest(metrics.registry).decode()
    assert parse_gateway_metrics(page, "sentiment") == {"200": 4.0, "502": 1.0, INVALID_OUTPUTS: 3.0}
    assert parse_gateway_metrics(page, "topics") == {"200": 10.0, INVALID_OUTPUTS: 0.0}  # each model judged alone
    assert parse_gateway_metrics(page) == {"200": 14.0, "502": 1.0, INVALID_OUTPUTS: 3.0}
