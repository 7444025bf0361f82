"""The drift benchmark: texts cut to the reference's lengths, the target checks, and a whole run of
the tiny profile (a tiny model fine-tuned by the pipeline's stages, real windows judged)."""

import numpy as np

from bench import drift


def test_out_of_domain_texts_are_cut_to_the_reference_lengths():
    rng = np.random.default_rng(0)
    lengths = np.array([120, 400, 900])
    texts = drift.cut_to_lengths(["short words here", "another text of some length"], lengths, 60, rng)
    assert len(texts) == 60
    for text in texts:  # at a space, or exactly at the drawn length
        assert any(0.8 * target <= len(text) <= target for target in lengths)


def test_a_tiny_run_judges_every_family_and_checks_the_targets(tmp_path):
    report = drift.run(drift.PROFILES["tiny"], tmp_path / "work", tmp_path / "results")
    rows = [row for row in report["rows"] if "rate" in row]
    no_drift = [row for row in rows if not row["shifted"]]
    assert {row["size"] for row in no_drift} == set(drift.SIZES)
    assert all(row["rate"] <= 0.2 for row in no_drift)  # 1% nominal; 30 windows
    assert any(row["family"].startswith("out-of-domain, reference lengths") for row in rows)
    assert all(row["rate"] >= 0.9 for row in rows if row["shifted"] and row["size"] == 400)
    assert report["window_10k"]["embedding_judged"]
    checks = {check["target"].split(":")[0]: check["met"] for check in report["targets"]}
    assert checks[f"false alarms <= 2% over >= 100 no-drift windows of 200 ({drift.REFERENCES} references)"] is False
    over = [row for row in no_drift if row["family"] == drift.OVER_REFERENCES]
    assert [row["windows"] for row in over] == [drift.REFERENCES * max(1, 30 // drift.REFERENCES)] * len(drift.SIZES)
    assert all(len(row["per_reference_rates"]) == drift.REFERENCES for row in over)
    markdown = (tmp_path / "results" / "drift-tiny.md").read_text()
    assert "| no drift | 200 | 30 |" in markdown and "| no drift, over references | 200 | 40 |" in markdown
    assert "## Targets" in markdown
