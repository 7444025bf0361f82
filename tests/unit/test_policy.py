"""The re-optimization policy: persistence, cooldown, active-run suppression, too little traffic."""

import pytest

from monitoring.policy import PolicyConfig, WindowVerdict, decide, judge, slo_reasons

CONFIG = PolicyConfig(persist_windows=2, cooldown_minutes=60)


def _verdict(minute: int, status: str) -> WindowVerdict:
    return WindowVerdict(minute * 60.0, status, (f"{status} at {minute}",))


def test_one_breach_is_not_enough_two_in_a_row_trigger():
    one = decide([_verdict(0, "ok"), _verdict(15, "drift")], 900, None, False, CONFIG)
    assert not one.trigger and "1/2" in one.reason
    assert "0/2" in decide([_verdict(0, "drift"), _verdict(15, "ok")], 900, None, False, CONFIG).reason
    decision = decide([_verdict(0, "drift"), _verdict(15, "slo_breach")], 900, None, False, CONFIG)
    assert decision.trigger and "drift at 0" in decision.reason and len(decision.evidence["windows"]) == 2


def test_a_good_window_resets_the_streak():
    history = [_verdict(0, "drift"), _verdict(15, "ok"), _verdict(30, "drift")]
    assert not decide(history, 1800, None, False, CONFIG).trigger


def test_windows_with_too_little_traffic_are_not_judged_either_way():
    history = [_verdict(0, "drift"), _verdict(15, "insufficient"), _verdict(30, "drift")]
    assert decide(history, 1800, None, False, CONFIG).trigger
    assert not decide([_verdict(0, "insufficient"), _verdict(15, "insufficient")], 900, None, False, CONFIG).trigger


def test_no_trigger_while_an_optimization_runs_or_within_the_cooldown():
    history = [_verdict(0, "drift"), _verdict(15, "drift")]
    active = decide(history, 900, None, True, CONFIG)
    assert not active.trigger and "active" in active.reason
    cooling = decide(history, 900, 900 - 30 * 60, False, CONFIG)
    assert not cooling.trigger and "cooldown" in cooling.reason
    assert decide(history, 900, 900 - 61 * 60, False, CONFIG).trigger


def test_slo_breaches_are_judged_even_on_little_traffic_but_drift_is_not():
    slo = slo_reasons(latency_p95_ms=150, latency_p99_ms=90, error_rate=0.0, config=PolicyConfig())
    assert slo == ["p95 latency 150.0 ms > 100 ms"]
    assert judge(0, 5, 100, [], False, slo, {}).status == "slo_breach"
    assert judge(0, 5, 100, ["confidence"], True, [], {}).status == "insufficient"
    assert judge(0, 500, 100, ["confidence"], True, [], {}).status == "drift"
    assert judge(0, 500, 100, [], False, [], {}).status == "ok"
    assert "error rate" in slo_reasons(10, 10, 0.05, PolicyConfig())[0]


def test_invalid_policy_settings_are_rejected():
    with pytest.raises(ValueError):
        PolicyConfig(persist_windows=0)
