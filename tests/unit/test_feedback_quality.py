"""Live quality from label feedback: accuracy and macro-F1 with their intervals, the champion's test
accuracy from its reference, and the accuracy breach: a significant drop breaches, a small sample
or a drop the size of the noise does not; an accuracy breach is a window status of its own."""

from __future__ import annotations

import pandas as pd
import pytest

from monitoring.feedback import feedback_evidence, live_quality, read_reference_accuracy, reference_accuracy
from monitoring.policy import (BREACH_STATUSES, Breach, PolicyConfig, WindowVerdict, accuracy_breach, decide, judge,
                               kinds_of, persistent_kind)

LABELS = ["negative", "positive"]
CONFIG = PolicyConfig(min_feedback=50, max_accuracy_drop=0.05, persist_windows=2, cooldown_minutes=60)


def _labelled(right: int, wrong: int) -> pd.DataFrame:
    """``right`` predictions the labels confirm and ``wrong`` ones they contradict, both labels served."""
    served = [LABELS[i % 2] for i in range(right + wrong)]
    truth = served[:right] + [LABELS[(i + 1) % 2] for i in range(right, right + wrong)]
    return pd.DataFrame({"label": served, "true_label": truth})


def test_live_quality_has_accuracy_and_macro_f1_with_intervals():
    quality = live_quality(_labelled(80, 20), LABELS, draws=300)
    assert quality["labelled"] == 100 and quality["accuracy"] == pytest.approx(0.8)
    assert quality["accuracy_low"] < 0.8 < quality["accuracy_high"]
    assert quality["accuracy_high"] - quality["accuracy_low"] == pytest.approx(0.155, abs=0.01)  # Wilson at n=100
    assert quality["macro_f1_low"] <= quality["macro_f1"] <= quality["macro_f1_high"]
    assert quality["macro_f1"] == pytest.approx(0.8, abs=0.01)
    assert live_quality(_labelled(0, 0), LABELS) == {"labelled": 0}


def test_the_evidence_names_live_metrics_only_when_there_is_feedback():
    quality = live_quality(_labelled(40, 10), LABELS, draws=100)
    evidence = feedback_evidence(quality, 0.9)
    assert evidence["labelled"] == 50 and evidence["reference_accuracy"] == 0.9
    assert evidence["live_accuracy"] == pytest.approx(0.8) and "live_macro_f1_high" in evidence
    assert feedback_evidence({"labelled": 0}, None) == {"labelled": 0, "reference_accuracy": None}


def test_the_reference_accuracy_is_the_evaluations(tmp_path):
    reference = pd.DataFrame({"label": [0, 1, 1, 0], "prediction": [0, 1, 0, 0], "confidence": [0.9] * 4})
    assert reference_accuracy(reference) == 0.75
    assert reference_accuracy(reference.drop(columns=["prediction"])) is None  # an earlier release's reference
    reference.to_parquet(tmp_path / "ref.parquet")
    assert read_reference_accuracy(tmp_path / "ref.parquet") == 0.75
    reference[["confidence"]].to_parquet(tmp_path / "old.parquet")
    assert read_reference_accuracy(tmp_path / "old.parquet") is None
    assert read_reference_accuracy(tmp_path / "missing.parquet") is None


def test_a_significant_drop_breaches():
    quality = live_quality(_labelled(140, 60), LABELS, draws=100)  # 70% on 200 labels: interval ~63-76%
    breach = accuracy_breach(quality, 0.9, CONFIG)
    assert breach is not None and breach.kind == "accuracy"
    assert "live accuracy 70.0%" in breach.reason and "200 labels" in breach.reason and "< 85.0%" in breach.reason


def test_a_drop_the_size_of_the_noise_or_a_small_sample_does_not_breach():
    # 82% on 200 labels vs 90%: the point estimate is 8 points down, but the interval (76-87%) reaches 85%
    assert accuracy_breach(live_quality(_labelled(164, 36), LABELS, draws=100), 0.9, CONFIG) is None
    # 50% is far below, but on 40 labels (< min_feedback) it is not judged
    assert accuracy_breach(live_quality(_labelled(20, 20), LABELS, draws=100), 0.9, CONFIG) is None
    # no feedback, or no reference accuracy to compare with
    assert accuracy_breach({"labelled": 0}, 0.9, CONFIG) is None
    assert accuracy_breach(live_quality(_labelled(100, 100), LABELS, draws=100), None, CONFIG) is None
    with pytest.raises(ValueError, match="min_feedback"):
        PolicyConfig(min_feedback=0)


def test_an_accuracy_breach_is_its_own_status_and_slo_breaches_outrank_it():
    accuracy = Breach("accuracy", "live accuracy 70.0% < 85.0%")
    verdict = judge(900.0, 10, 100, {}, [accuracy], {})
    assert verdict.status == "accuracy" and verdict.kinds == ("accuracy",) and verdict.breach
    assert "accuracy" in BREACH_STATUSES
    with_latency = judge(900.0, 10, 100, {}, [Breach("latency", "p95 latency 150.0 ms > 100 ms"), accuracy], {})
    assert with_latency.status == "slo_breach" and with_latency.kinds == ("accuracy", "latency")
    with_drift = judge(900.0, 200, 100, {"output": ["predicted"]}, [accuracy], {})
    assert with_drift.status == "accuracy" and with_drift.kinds == ("accuracy", "drift")
    assert judge(900.0, 10, 100, {}, [], {}).status == "insufficient"
    assert kinds_of("accuracy", ("live accuracy 70.0% < 85.0%",)) == ("accuracy",)
    assert WindowVerdict.from_dict({"window_end": 1, "status": "accuracy", "reasons": ["x"]}).kinds == ("accuracy",)


def test_a_persistent_accuracy_drop_triggers_for_accuracy_and_errors_still_come_first():
    windows = [WindowVerdict(minute * 60.0, "accuracy", ("drop",), {}, ("accuracy", "latency"))
               for minute in (0, 15)]
    decision = decide(windows, 900.0, None, False, CONFIG)
    assert decision.trigger and decision.kind == "accuracy"
    assert persistent_kind([WindowVerdict(0.0, "slo_breach", (), {}, ("errors", "accuracy"))]) == "errors"
