"""bench.attention on a run folder holding the tiny fine-tuned teacher and generated texts."""

import shutil

from bench import attention


def test_eager_and_sdpa_are_timed_per_workload_and_agree(trained_teacher, prepared_data, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_teacher, run_dir / "teacher")
    shutil.copytree(prepared_data, run_dir / "data")
    report = attention.run(run_dir, tmp_path / "results", rounds=2)
    assert set(report["eager_over_sdpa_per_round"]) == {"batch1_per_text", "batch32", "train_step32"}
    assert all(len(ratios) == 2 and all(r > 0 for r in ratios) for ratios in report["eager_over_sdpa_per_round"].values())
    assert report["max_logit_difference"] < 1e-4  # the same function, two kernels
    assert "| train_step32 |" in (tmp_path / "results" / "attention.md").read_text()
