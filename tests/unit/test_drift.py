"""Drift detection on real model outputs: the tiny classifier's predictions on held-out texts from
the training distribution (no drift) and on shifted texts (short, unknown words, one-sided)."""

import random

import numpy as np
import pytest

from monitoring.drift import DriftConfig, detect
from monitoring.features import reference_features
from tasks.onnx_model import onnx_logits
from tasks.modeling import generate_texts, load_tokenizer

WINDOWS, WINDOW_ROWS = 20, 150


def _features(onnx_dir, texts):
    tokenizer = load_tokenizer(onnx_dir)
    logits = onnx_logits(onnx_dir / "model.onnx", tokenizer, texts, 32, batch_size=1)
    return reference_features(logits, texts, ["negative", "positive"], onnx_dir / "tokenizer.json", 32)


@pytest.fixture(scope="module")
def pools(exported_onnx):
    reference = _features(exported_onnx, generate_texts(400, seed=21)[0])
    held_out = _features(exported_onnx, generate_texts(WINDOWS * WINDOW_ROWS // 2, seed=22)[0])
    rng = random.Random(5)
    shifted_texts = [" ".join(rng.choice(["lol", "omg", "#fail", "@user", "great"]) for _ in range(rng.randint(1, 3)))
                     for _ in range(WINDOW_ROWS * 3)]
    return reference, held_out, _features(exported_onnx, shifted_texts)


def test_no_drift_windows_from_the_same_distribution_rarely_alarm(pools, tmp_path):
    reference, held_out, _ = pools
    rng = np.random.default_rng(0)
    alarms = 0
    for _ in range(WINDOWS):
        sample = held_out.iloc[rng.choice(len(held_out), WINDOW_ROWS, replace=False)].reset_index(drop=True)
        alarms += detect(reference, sample, DriftConfig()).drifted
    false_alarm_rate = alarms / WINDOWS
    print(f"false alarm rate over {WINDOWS} no-drift windows of {WINDOW_ROWS}: {false_alarm_rate:.0%}")
    assert false_alarm_rate <= 0.1  # 1% nominal; 20 windows cannot show more precision than this


def test_shifted_windows_drift_and_say_which_features(pools, tmp_path):
    reference, _, shifted = pools
    result = detect(reference, shifted.sample(WINDOW_ROWS, random_state=1).reset_index(drop=True), DriftConfig(),
                    html_path=tmp_path / "report.html")
    assert result.drifted and "input" in result.kinds
    assert {"text_chars", "token_count"} <= set(result.by_kind()["input"])
    assert (tmp_path / "report.html").stat().st_size > 10_000
    html = (tmp_path / "report.html").read_text()
    for name, item in result.features.items():  # the report's flags are the verdict's (calibrated thresholds)
        if "score" in item and name != "embedding":
            flag = "Data drift detected" if item["drifted"] else "Data drift not detected"
            assert f"Drift in column '{name}'\", \"label\": \"{flag}." in html, name


def test_tiny_windows_are_not_judged(pools):
    reference, held_out, _ = pools
    result = detect(reference, held_out.head(10), DriftConfig(min_rows=100))
    assert result.insufficient and not result.drifted and result.features == {}


def test_empty_windows_are_not_judged(pools):
    reference, _, _ = pools
    assert detect(reference, reference.iloc[0:0], DriftConfig()).insufficient


def test_unknown_features_and_unresolvable_rates_are_rejected():
    with pytest.raises(ValueError, match="no such features"):
        DriftConfig(features=("sentiment",))
    with pytest.raises(ValueError, match="cannot resolve"):
        DriftConfig(false_alarm_rate=0.001, null_draws=2000)
