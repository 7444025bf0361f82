"""Structured and unstructured pruning on the tiny teacher (2 layers x 2 heads, 64 FFN neurons)."""

import json

import pytest
import torch

from tasks import export, modeling, prune
from tasks.config import ExportConfig, PruneConfig
from tasks.errors import ConfigError
from tasks.manifest import ArtifactManifest, Precision, Structure
from tasks.modeling import load_classifier, load_tokenizer
from tasks.onnx_model import model_size_bytes
from tasks.results import ModelFormat
from tasks.training import predict_logits


def test_kept_indices_keep_the_highest_scores_in_order():
    assert prune.kept_indices(torch.tensor([0.1, 5.0, 0.2, 3.0]), 0.5) == (1, 3)
    assert prune.kept_indices(torch.tensor([0.1, 0.2]), 0.99) == (1,)  # at least one stays


def test_cubic_schedule_rises_to_the_target_and_holds():
    values = [prune.cubic_sparsity(step, 100, 0.8) for step in range(0, 101)]
    assert values[0] == 0.0
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert values[75] == pytest.approx(0.8) and values[100] == pytest.approx(0.8)
    assert 0.0 < values[20] < 0.8


def test_magnitude_masks_zero_the_smallest_weights():
    weight = torch.nn.Parameter(torch.tensor([[0.1, -3.0], [2.0, -0.2]]))
    (mask,) = prune.magnitude_masks([weight], 0.5)
    assert mask.tolist() == [[False, True], [True, False]]


def test_a_head_with_zero_weights_is_the_one_removed(trained_teacher, prepared_data):
    model = load_classifier(trained_teacher)
    tokenizer = load_tokenizer(trained_teacher)
    head_size = modeling.head_size_of(model)
    parts = modeling.block_parts(model)[0]
    with torch.no_grad():  # head 0 of layer 0 contributes nothing
        for linear in (parts.query, parts.key, parts.value):
            linear.weight[:head_size] = 0
            linear.bias[:head_size] = 0
        parts.attention_output.weight[:, :head_size] = 0
    batch = tokenizer(["good movie", "awful boring film"], return_tensors="pt", padding=True,
                      return_token_type_ids=False)
    labels = torch.tensor([1, 0])
    plan = prune.importance_plan(model, [lambda: model(**batch, labels=labels).loss], 0.5, 0.5)
    assert plan.heads[0] == (1,)
    assert all(len(neurons) == 32 for neurons in plan.neurons)


def test_structured_pruning_gives_a_smaller_model_that_reloads_and_exports(trained_teacher, exported_onnx, prepared_data,
                                                                           tmp_path):
    config = PruneConfig(head_fraction=0.5, ffn_fraction=0.5, importance_batches=4, recovery_epochs=2,
                         batch_size=16, learning_rate=5e-3, max_length=32)
    result = prune.run(config, trained_teacher, trained_teacher, prepared_data, tmp_path / "pruned")
    metrics = result.metrics
    assert (metrics["heads_before"], metrics["heads_after"]) == (4, 2)
    assert (metrics["ffn_neurons_before"], metrics["ffn_neurons_after"]) == (128, 64)
    assert metrics["parameters_after"] < metrics["parameters_before"]
    assert metrics["val_accuracy"] >= 0.8
    assert model_size_bytes(tmp_path / "pruned") < model_size_bytes(trained_teacher)
    plan = json.loads((tmp_path / "pruned" / modeling.PLAN_FILENAME).read_text())
    assert [len(heads) for heads in plan["heads"]] == [1, 1]
    manifest = ArtifactManifest.read(tmp_path / "pruned")
    assert (manifest.format, manifest.precision, manifest.structure) == (ModelFormat.PYTORCH, Precision.FP32,
                                                                         Structure.PRUNED)
    assert {modeling.PLAN_FILENAME, "model.safetensors", "tokenizer.json"} <= set(manifest.files)

    reloaded = load_classifier(tmp_path / "pruned")
    attention = modeling.encoder_layers(reloaded)[0].attention.self
    assert attention.query.out_features == modeling.head_size_of(reloaded)
    tokenizer = load_tokenizer(tmp_path / "pruned")
    texts = ["good great movie", "awful dull plot"]
    assert predict_logits(reloaded, tokenizer, texts, 32).shape == (2, 2)
    exported = export.run(ExportConfig(), tmp_path / "pruned", prepared_data, tmp_path / "onnx", max_length=32)
    assert exported.metrics["max_abs_diff"] < 1e-3
    assert exported.metrics["size_bytes"] < model_size_bytes(exported_onnx)


def test_unstructured_pruning_reaches_the_sparsity_without_changing_shapes(trained_teacher, prepared_data, tmp_path):
    config = PruneConfig.unstructured_only(0.6)
    config = PruneConfig(**{**config.__dict__, "recovery_epochs": 1, "batch_size": 16, "max_length": 32,
                            "learning_rate": 1e-3})
    result = prune.run(config, trained_teacher, trained_teacher, prepared_data, tmp_path / "sparse")
    assert result.metrics["encoder_weight_sparsity"] == pytest.approx(0.6, abs=0.01)
    assert result.metrics["parameters_after"] == result.metrics["parameters_before"]
    model = load_classifier(tmp_path / "sparse")
    assert prune.sparsity(prune.prunable_weights(model)) == pytest.approx(0.6, abs=0.01)
    assert ArtifactManifest.read(tmp_path / "sparse").structure is Structure.SPARSE


def test_prune_config_is_validated():
    with pytest.raises(ConfigError, match="head_fraction"):
        PruneConfig(head_fraction=1.0)
    with pytest.raises(ConfigError, match="needs recovery_epochs"):
        PruneConfig(unstructured_sparsity=0.5, recovery_epochs=0)
