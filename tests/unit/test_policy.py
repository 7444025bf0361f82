"""The re-optimization policy: persistence, cooldown, active-run suppression, too little traffic, and
the kind of breach a trigger carries."""

import pytest

from monitoring.policy import (Breach, PolicyConfig, WindowVerdict, decide, judge, kinds_of, persistent_kind,
                               serving_breaches)

CONFIG = PolicyConfig(persist_windows=2, cooldown_minutes=60)
STATUS_KIND = {"drift": ("drift",), "slo_breach": ("latency",)}


def _verdict(minute: int, status: str, kinds: tuple[str, ...] | None = None) -> WindowVerdict:
    kinds = STATUS_KIND.get(status, ()) if kinds is None else kinds
    return WindowVerdict(minute * 60.0, status, (f"{status} at {minute}",), {}, kinds)


def test_one_breach_is_not_enough_two_in_a_row_trigger():
    one = decide([_verdict(0, "ok"), _verdict(15, "drift")], 900, None, False, CONFIG)
    assert not one.trigger and "1/2" in one.reason and one.kind == ""
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
    assert not active.trigger and "active" in active.reason and active.kind == ""
    cooling = decide(history, 900, 900 - 30 * 60, False, CONFIG)
    assert not cooling.trigger and "cooldown" in cooling.reason and cooling.kind == ""
    assert decide(history, 900, 900 - 61 * 60, False, CONFIG).trigger


def test_drift_that_goes_on_triggers_once_per_cooldown():
    history, last_trigger, triggered_at = [], None, []
    for minute in range(0, 181, 15):  # drift in every window for three hours; cooldown 60 minutes
        history.append(_verdict(minute, "drift"))
        decision = decide(history, minute * 60.0, last_trigger, False, CONFIG)
        if decision.trigger:
            assert decision.kind == "drift"
            last_trigger = minute * 60.0
            triggered_at.append(minute)
        elif len(history) >= 2:
            assert "cooldown" in decision.reason
    assert triggered_at == [15, 75, 135]  # the first window that persisted, then each cooldown's end


def test_slo_breaches_are_judged_even_on_little_traffic_but_drift_is_not():
    slo = serving_breaches(latency_p95_ms=150, latency_p99_ms=90, error_rate=0.0, config=PolicyConfig())
    assert slo == [Breach("latency", "p95 latency 150.0 ms > 100 ms")]
    assert judge(0, 5, 100, {}, slo, {}).status == "slo_breach"
    assert judge(0, 5, 100, {"output": ["confidence"]}, [], {}).status == "insufficient"
    assert judge(0, 500, 100, {"output": ["confidence"]}, [], {}).status == "drift"
    assert judge(0, 500, 100, {}, [], {}).status == "ok"
    assert serving_breaches(10, 10, 0.05, PolicyConfig()) == [Breach("errors", "error rate 5.00% > 1.00%")]


def test_a_window_carries_every_kind_it_saw():
    latency = serving_breaches(150, 250, 0.0, PolicyConfig())
    both = judge(0, 500, 100, {"output": ["confidence", "label"]}, latency, {})
    assert both.status == "slo_breach" and both.kinds == ("latency", "drift") and both.breach
    assert both.reasons[-1] == "output drift in confidence, label"
    few = judge(0, 5, 100, {"output": ["confidence"]}, latency, {})  # too few rows: drift is not judged
    assert few.kinds == ("latency",)
    assert judge(0, 500, 100, {"output": ["confidence"]}, [], {}).kinds == ("drift",)
    assert judge(0, 500, 100, {}, [], {}).kinds == () and judge(0, 5, 100, {}, [], {}).kinds == ()


def test_invalid_model_outputs_are_an_error_breach_whatever_the_traffic():
    breaches = serving_breaches(10, 10, 0.0, PolicyConfig(), invalid_outputs=3)
    assert breaches == [Breach("errors", "the model returned 3 non-finite outputs")]
    verdict = judge(0, 2, 100, {}, breaches, {})
    assert verdict.status == "slo_breach" and verdict.kinds == ("errors",)
    with pytest.raises(ValueError, match="not one of"):
        Breach("memory", "too much")


def test_the_trigger_names_the_kind_that_persisted_errors_before_latency_before_drift():
    def kind(*windows: tuple[str, ...]) -> str:
        history = [_verdict(15 * i, "drift" if kinds == ("drift",) else "slo_breach", kinds)
                   for i, kinds in enumerate(windows)]
        decision = decide(history, 15 * 60.0 * len(windows), None, False, CONFIG)
        assert decision.trigger
        return decision.kind

    assert kind(("latency", "drift"), ("latency", "drift")) == "latency"
    assert kind(("errors", "latency"), ("errors", "latency", "drift")) == "errors"
    assert kind(("errors",), ("latency", "drift"), ("drift",)) == "drift"  # only the last two count
    assert kind(("latency", "drift"), ("drift",)) == "drift"  # in every window beats higher priority in one
    assert kind(("errors",), ("latency", "drift")) == "latency"  # none in all: the latest window's highest
    assert persistent_kind([]) == ""


def test_verdicts_saved_without_kinds_get_them_from_their_status_and_reasons():
    def loaded(status: str, *reasons: str) -> tuple[str, ...]:
        return WindowVerdict.from_dict({"window_end": 900, "status": status, "reasons": list(reasons)}).kinds

    assert loaded("drift", "output drift in confidence") == ("drift",)
    assert loaded("slo_breach", "p95 latency 150.0 ms > 100 ms", "error rate 5.00% > 1.00%") == ("errors", "latency")
    assert loaded("slo_breach") == () and loaded("ok") == () and loaded("insufficient", "5 predictions") == ()
    assert kinds_of("slo_breach", ("the model returned 2 non-finite outputs",)) == ("errors",)
    verdict = WindowVerdict(900.0, "slo_breach", ("p99 latency 250.0 ms > 200 ms",), {"p95": 1.0}, ("latency",))
    assert WindowVerdict.from_dict(verdict.to_dict()) == verdict


def test_invalid_policy_settings_are_rejected():
    with pytest.raises(ValueError):
        PolicyConfig(persist_windows=0)


def test_the_policy_acts_on_the_drift_kinds_it_is_told_to_and_reports_the_others():
    both = {"output": ["predicted"], "input": ["embedding", "text_chars"]}
    assert judge(0, 500, 100, both, [], {}).reasons == ("output drift in predicted",
                                                        "input drift in embedding, text_chars")
    output_only = judge(0, 500, 100, both, [], {}, drift_triggers=("output",))
    assert output_only.status == "drift" and output_only.reasons == ("output drift in predicted",)
    assert output_only.evidence["drift_noted"] == [
        "input drift in embedding, text_chars (not a trigger: drift_triggers=output)"]
    input_ignored = judge(0, 500, 100, {"input": ["embedding"]}, [], {}, drift_triggers=("output",))
    assert input_ignored.status == "ok" and not input_ignored.breach and input_ignored.kinds == ()
    with pytest.raises(ValueError, match="not drift kinds"):
        PolicyConfig(drift_triggers=("labels",))
