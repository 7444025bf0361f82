"""The compression benchmark end to end on the tiny profile: every row built, measured, and reported."""

import json

import numpy as np
import pytest

from bench import compress
from tasks.recipe import OPTIMIZE_MODEL, Target


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    work = tmp_path_factory.mktemp("bench")
    return (compress.run(compress.PROFILES["tiny"], work / "work", work / "results", isolate=False, rounds=2),
            work / "results")


def test_every_technique_has_a_row_with_ratios_against_the_teacher(report):
    data, _ = report
    rows = {line["name"]: line for line in data["table"]}
    assert {stage.candidate for stage in OPTIMIZE_MODEL.on(Target.CPU) if stage.candidate} | {
        "teacher_torch_int8", "onnx_fp32_fused", "onnx_int8_per_tensor", "onnx_fused_int8", "onnx_static_int8",
        "onnx_fp16", "teacher_pruned_onnx", "teacher_pruned_int8", "sparse_int8", "tensorrt_fp16",
        compress.OPTIMUM_ROW} == set(rows)
    assert len(rows) == len(data["table"])  # one name per row
    teacher = rows["teacher_pytorch"]
    assert teacher["p50_speedup"] == 1.0 and teacher["size_reduction"] == 1.0 and teacher["accuracy_retention"] == 1.0
    for line in rows.values():
        if line["status"] == "measured":
            assert line["size_reduction"] == pytest.approx(teacher["size_mb"] / line["size_mb"])
            assert line["p50_speedup"] == pytest.approx(teacher["latency_p50_ms"] / line["latency_p50_ms"])
            assert 0 <= line["teacher_label_agreement"] <= 1
            # Interleaved: every model timed in every round in its own worker; ratios per round.
            assert line["interleaved_speedup_min"] <= line["interleaved_speedup"] <= line["interleaved_speedup_max"]
            assert line["interleaved_p50_ms"] > 0
    assert teacher["interleaved_speedup"] == teacher["interleaved_speedup_min"] == 1.0
    promoted = rows[compress.PROMOTED_ROW]
    assert promoted["interleaved_speedup_q1"] <= promoted["interleaved_speedup"] <= promoted["interleaved_speedup_q3"]
    assert data["targets"]["interleaved_speedup"]["middle_half"] == [promoted["interleaved_speedup_q1"],
                                                                     promoted["interleaved_speedup_q3"]]
    assert len(promoted["interleaved_round_speedups"]) == data["latency_rounds"] == 2


def test_one_thread_ratios_come_from_workers_of_their_own(report):
    data, results = report
    one_thread = data["one_thread"]
    assert {f"{compress.REFERENCE_ROW}_vs_promoted", f"{compress.OPTIMUM_ROW}_vs_promoted"} <= set(one_thread)
    figures = one_thread[f"{compress.REFERENCE_ROW}_vs_promoted"]
    assert figures["q1"] <= figures["median"] <= figures["q3"] and figures["promoted_p50_ms"] > 0
    # They are not rows of the table, and the page shows them apart from the targets.
    assert not any(compress.ONE_THREAD in line["name"] for line in data["table"])
    assert "on one thread each" in (results / "compress-tiny.md").read_text()


def test_pipeline_candidates_are_the_recipes_stages_under_their_candidate_names(report):
    """Built by the recipe's stages (step results under the stage ids), in the recipe's output folders."""
    data, results = report
    work = results.parent / "work"
    candidates = [stage for stage in OPTIMIZE_MODEL.on(Target.CPU) if stage.candidate]
    assert [line["name"] for line in data["table"][:len(candidates)]] == [stage.candidate for stage in candidates]
    assert not set(data["steps"]) & {stage.id for stage in OPTIMIZE_MODEL.on(Target.GPU)}  # bench/gpu.py's
    for stage in OPTIMIZE_MODEL.on(Target.CPU):
        assert data["steps"][stage.id]["status"] == "success", stage.id
        assert (work / stage.output).is_dir()
    assert compress.PROMOTED_ROW in OPTIMIZE_MODEL.candidates and compress.REFERENCE_ROW in OPTIMIZE_MODEL.candidates
    techniques = {line["name"]: line["technique"] for line in data["table"]}
    assert techniques[compress.PROMOTED_ROW].startswith(OPTIMIZE_MODEL.technique_chain("quantize_pruned"))


def test_rows_read_the_arithmetic_of_their_pytorch_source():
    rows = {row.name: row for row in compress.row_list(compress.PROFILES["tiny"], compress.REPO_ROOT / "w", {})}
    sources = {name: row.source for name, row in rows.items()}
    assert sources["teacher_pytorch"] == sources["onnx_int8"] == sources["onnx_static_int8"] == "teacher"
    assert sources["student_onnx_fp32"] == sources["student_int8"] == "student"
    assert sources["pruned_onnx_fp32"] == sources[compress.PROMOTED_ROW] == "pruned"
    assert sources["sparse_onnx_fp32"] == sources["sparse_int8"] == "sparse"
    assert sources["teacher_pruned_int8"] == "teacher_pruned"
    assert rows[compress.PROMOTED_ROW].precision == "int8" and rows["pruned_onnx_fp32"].precision == "fp32"
    # A stage the run switched off (or a variant that could not be built) is a skipped row with the reason.
    skipped = {"export_sparse": {"status": "skipped", "reason": "sparsify switched off in the run's params"},
               compress.TENSORRT_STEP: {"status": "skipped", "reason": "no NVIDIA GPU"}}
    rows = {row.name: row for row in compress.row_list(compress.PROFILES["tiny"], compress.REPO_ROOT / "w", skipped)}
    assert rows["sparse_onnx_fp32"].model_format is None and "sparsify" in rows["sparse_onnx_fp32"].skipped_reason
    assert rows[compress.TENSORRT_ROW].skipped_reason == "no NVIDIA GPU"


def test_latency_workers_time_a_slice_of_texts_per_turn_on_the_threads_asked(exported_onnx):
    from bench import latency_workers

    candidates = [latency_workers.Candidate("default", exported_onnx, "onnx"),
                  latency_workers.Candidate("one", exported_onnx, "onnx", threads=1)]
    texts = [f"text number {index} is fine" for index in range(5)]
    latency = latency_workers.measure(candidates, texts, 32, warmup=1, rounds=3, turn_texts=4)
    # Three rounds of four texts each, slices wrapping around the five texts.
    for name in ("default", "one"):
        assert len(latency.calls[name]) == 12 and len(latency.per_round_p50[name]) == 3
        assert all(value > 0 for value in latency.calls[name])
    with pytest.raises(ValueError):
        latency_workers.measure(candidates, texts, 32, rounds=1, turn_texts=0)


def test_pruning_rows_show_what_pruning_did(report):
    data, _ = report
    structured = data["steps"]["prune_student"]["metrics"]
    assert structured["ffn_neurons_after"] < structured["ffn_neurons_before"]
    sparse = data["steps"]["sparsify_student"]["metrics"]
    assert sparse["encoder_weight_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert sparse["parameters_after"] == sparse["parameters_before"]


def test_tensorrt_row_is_skipped_with_the_reason_on_a_cpu_machine(report):
    from tasks import compile as compile_step

    data, _ = report
    trt = next(line for line in data["table"] if line["name"] == "tensorrt_fp16")
    if compile_step.unavailable_reason(compile_step.gpu_names(), compile_step.tensorrt_version()):
        assert trt["status"] == "skipped" and trt["reason"]


def test_report_files_are_written_and_targets_are_judged(report):
    data, results = report
    written = json.loads((results / "compress-tiny.json").read_text())
    assert written["targets"] == data["targets"]
    assert set(data["targets"]) == set(compress.TARGETS) | set(compress.PEER_TARGETS)
    page = (results / "compress-tiny.md").read_text()
    assert "| pruned_int8 |" in page and "| tensorrt_fp16 |" in page
    assert "## Targets" in page and "## Cost and compute" in page and "| optimum_int8 |" in page


def test_optimum_peer_baseline_is_built_by_optimum_and_measured_like_every_row(report):
    """Built in .venv-optimum by Optimum itself (make test creates it), evaluated by the same code."""
    data, _ = report
    step = data["steps"][compress.OPTIMUM_ROW]
    assert step["status"] == "success", step.get("reason")
    assert step["info"]["optimum-onnx"] and step["info"]["per_channel"] is False
    peer = next(line for line in data["table"] if line["name"] == compress.OPTIMUM_ROW)
    assert peer["status"] == "measured" and 0 <= peer["accuracy"] <= 1
    assert data["targets"]["speedup_vs_optimum"]["measured"] > 0
    gap = data["targets"]["accuracy_points_below_optimum"]
    low, high = gap["interval_95"]
    assert low <= gap["measured"] <= high


def test_accuracy_gap_interval_is_paired_and_shrinks_with_more_texts():
    rng = np.random.default_rng(1)
    reference = rng.random(500) < 0.8
    assert compress.paired_gap_interval(reference, reference) == (0.0, 0.0)  # same answers: no gap at all
    assert compress.paired_gap_interval(np.ones(50, bool), np.zeros(50, bool)) == (100.0, 100.0)
    # The candidate answers differently on 10% of texts: the interval spans about 2 x 1.96 standard
    # errors of the mean per-text difference.
    flips = rng.random(500) < 0.1
    candidate = np.where(flips, ~reference, reference)
    low, high = compress.paired_gap_interval(reference, candidate)
    differences = reference.astype(float) - candidate.astype(float)
    assert low < differences.mean() * 100 < high
    expected_width = 2 * 1.96 * differences.std() / np.sqrt(len(differences)) * 100
    assert expected_width * 0.85 < high - low < expected_width * 1.15
    many = np.tile(reference, 4), np.tile(candidate, 4)
    wide, narrow = high - low, np.subtract(*compress.paired_gap_interval(*many)[::-1])
    assert narrow < wide * 0.6


def test_compute_share_and_cost_rows(report):
    data, _ = report
    rows = {line["name"]: line for line in data["table"] if line["status"] == "measured"}
    operations = data["operations_per_text"]
    # Half the layers, then pruned heads and FFN neurons: less arithmetic per text at each step.
    assert operations["pruned"] < operations["student"] < operations["teacher"]
    for line in rows.values():
        assert line["achieved_gops"] == pytest.approx(line["gops_per_text"] * line["throughput_per_s"])
        ceiling = data["ceilings"]["int8_gops" if line["ceiling"] == "int8" else "fp32_gops"]
        assert line["ceiling_share"] == pytest.approx(line["achieved_gops"] / ceiling)
        assert line["cost_reduction"] == pytest.approx(1 - 1 / line["throughput_gain"])
    assert rows["teacher_pytorch"]["cost_reduction"] == 0.0
    assert rows[compress.PROMOTED_ROW]["ceiling"] == "int8" and rows["onnx_fp32"]["ceiling"] == "fp32"


def test_interleaved_speedup_is_the_median_of_per_round_ratios():
    from bench.latency_workers import InterleavedLatency

    latency = InterleavedLatency(rounds=3, texts=2, per_round_p50={"ref": [10.0, 30.0, 12.0], "m": [1.0, 2.0, 2.0]},
                                 calls={"m": [1.0, 1.0, 2.0, 2.0, 2.0, 2.0]})
    # Rounds 10/1, 30/2, 12/2: a slow spell in round 2 moves the median, not the verdict.
    assert latency.speedup("ref", "m") == {"median": 10.0, "q1": 8.0, "q3": 12.5, "min": 6.0, "max": 15.0}
    assert latency.percentiles("m")["p50"] == 2.0 and latency.percentiles("m")["calls"] == 6.0


def test_measure_only_finds_the_models_where_the_build_put_them(report, tmp_path):
    """Run last: it measures the module's models again (no interleaved rounds), from a copy of the report."""
    data, results = report
    (tmp_path / "compress-tiny.json").write_text((results / "compress-tiny.json").read_text())
    again = compress.run(compress.PROFILES["tiny"], results.parent / "work", tmp_path, isolate=False,
                         measure_only=True, rounds=0)
    assert [line["name"] for line in again["table"]] == [line["name"] for line in data["table"]]
    assert again["models_built"] == data["models_built"] and again["steps"].keys() == data["steps"].keys()
    with pytest.raises(FileNotFoundError, match="without --measure-only"):
        compress.run(compress.PROFILES["tiny"], tmp_path / "empty", tmp_path, isolate=False, measure_only=True,
                     rounds=0)
