"""Manual approval against a real MLflow store (SQLite): the winner becomes the challenger with its
serving bundle in the registry, and a reviewer's alias move, a rejection tag or the deadline decides."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tasks import approval, model_aliases, registry
from tasks.config import EvaluateConfig, PromoteConfig
from tasks.evaluate import run as evaluate
from tasks.promote import PromotionTarget
from tasks.results import ModelFormat
from tasks.serving_bundle import download_bundle

MODEL = "approval-model"
NOW = datetime(2026, 12, 5, 12, 0, tzinfo=timezone.utc)


@pytest.fixture()
def proposed(tmp_path, exported_onnx: Path, prepared_data: Path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.MlflowClient(uri).create_experiment("optimize_model", artifact_location=str(tmp_path / "artifacts"))
    evaluation = evaluate(EvaluateConfig(warmup=1, max_length=32), "onnx_fp32", exported_onnx, ModelFormat.ONNX,
                          prepared_data, tmp_path / "eval")
    parent = registry.parent_run_id(uri, "optimize_model", "run1", {})
    version = registry.log_candidate(uri, "optimize_model", parent, "run1", MODEL, registry.Candidate(
        "onnx_fp32", exported_onnx, evaluation.metrics, "finetune > onnx"), {})
    config = PromoteConfig(registered_model=MODEL, approval="manual", approval_timeout_hours=24, smoke_samples=4)
    target = PromotionTarget("127.0.0.1:1", tmp_path / "models", uri)
    proposal = approval.propose(config, target, exported_onnx, Path(evaluation.uri("predictions")), prepared_data,
                                version, 32, 0, NOW)
    return uri, config, target, proposal


def test_the_winner_waits_as_challenger_with_its_serving_files_in_the_registry(proposed, tmp_path):
    uri, config, _, proposal = proposed
    assert proposal.deadline == NOW + timedelta(hours=24)
    assert model_aliases.alias_version(uri, MODEL, approval.CHALLENGER_ALIAS) == proposal.version
    assert model_aliases.alias_version(uri, MODEL, "champion") is None
    assert model_aliases.version_tags(uri, MODEL, proposal.version)[approval.APPROVAL_TAG] == "pending"
    bundle = download_bundle(uri, MODEL, proposal.version, tmp_path / "download")
    assert len(bundle.smoke_texts) == 4 and (bundle.model_dir / "model.onnx").exists()
    assert "point the alias 'champion'" in proposal.describe(config)
    assert approval.decision(uri, config, proposal, NOW + timedelta(hours=23)) == "pending"
    assert approval.decision(uri, config, proposal, NOW + timedelta(hours=24)) == "expired"
    model_aliases.set_alias(uri, MODEL, "champion", proposal.version)  # what a reviewer does in the MLflow UI
    assert approval.decision(uri, config, proposal, NOW + timedelta(hours=30)) == "approved"


@pytest.mark.parametrize("outcome", ["rejected", "expired"])
def test_a_rejected_or_expired_challenger_is_not_served_and_says_why(proposed, outcome):
    uri, config, target, proposal = proposed
    if outcome == "rejected":
        model_aliases.tag_version(uri, MODEL, proposal.version, {approval.REJECTED_TAG: "too slow on p99"})
        assert approval.decision(uri, config, proposal, NOW) == "rejected"
    result = approval.conclude(config, target, proposal, outcome)
    assert result.status.value == "skipped"
    assert ("too slow on p99" if outcome == "rejected" else "within 24 h") in result.reason
    assert model_aliases.alias_version(uri, MODEL, approval.CHALLENGER_ALIAS) is None
    assert model_aliases.version_tags(uri, MODEL, proposal.version)[approval.APPROVAL_TAG] == outcome
