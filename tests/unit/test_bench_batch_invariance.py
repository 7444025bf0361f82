"""bench.batch_invariance on a run folder holding the tiny exported model and generated texts."""

import json
import shutil

from bench import batch_invariance


def test_equal_length_batches_join_only_texts_of_one_length():
    assert batch_invariance.equal_length_batches([3, 5, 3, 3, 7, 5], size=2) == [[0, 2], [1, 5]]
    assert sorted(sum(batch_invariance.random_requests(10, 4, seed=0), [])) == list(range(10))


def test_the_bench_measures_every_format_and_writes_its_figures(exported_onnx, prepared_data, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(exported_onnx, run_dir / "onnx_fp32")
    shutil.copytree(prepared_data, run_dir / "data")
    report = batch_invariance.run(run_dir, tmp_path / "results", limit=40, batch=8, seed=0, rounds=1)
    formats = report["models"]["onnx_fp32"]["formats"]
    assert set(formats) == set(batch_invariance.FORMATS) and report["max_length"] == 32
    per_tensor, per_token = formats["dynamic_int8_per_tensor"], formats["dynamic_int8_per_token"]
    assert per_tensor["padded_requests"]["max_logit_change"] > per_token["padded_requests"]["max_logit_change"]
    assert per_token["padded_requests"]["max_logit_change"] < 1e-5 and per_token["padded_requests"]["texts"] == 40
    assert formats["fp32"]["padded_requests"]["flips"] == 0 and report["met"]
    assert formats["fp32"]["agreement_with_fp32"] == 1.0 and per_token["agreement_with_fp32"] >= 0.8
    assert 0 < per_token["equal_length_batches"]["texts"] <= 40
    assert all(len(ratios) == 1 for ratios in report["models"]["onnx_fp32"]["per_token_over_per_tensor"].values())
    assert json.loads((tmp_path / "results" / "batch-invariance.json").read_text())["met"] is True
    page = (tmp_path / "results" / "batch-invariance.md").read_text()
    assert "| onnx_fp32 | dynamic_int8_per_token |" in page and "**met**" in page and "Processor:" in page
