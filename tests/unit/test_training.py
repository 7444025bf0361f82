"""The shared training loop: layer-wise learning rates and early stopping."""

import pytest
import torch

from tasks import training
from tasks.modeling import load_classifier


def test_layer_rates_decay_from_the_head_down():
    rates = training.layer_learning_rates(4, 1e-4, 0.5)
    assert rates == pytest.approx([1.25e-5, 2.5e-5, 5e-5, 1e-4])


def test_three_tier_rates_follow_the_reference():
    rates = training.layer_learning_rates(8, 1.0, 1.0, tiers=(1e-5, 5e-5, 1e-4))
    assert rates == [1e-5, 1e-5, 1e-5, 5e-5, 5e-5, 5e-5, 1e-4, 1e-4]


def test_parameter_groups_cover_every_parameter_once_with_depth_rates(tiny_model):
    model = load_classifier(tiny_model)
    groups = training.parameter_groups(model, 1e-3, 0.5, 0.01)
    grouped = [id(p) for group in groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())
    depths = training.layer_depths(model)
    assert depths["bert.embeddings.word_embeddings.weight"] == 0
    assert depths["bert.encoder.layer.1.output.dense.weight"] == 2
    assert depths["classifier.weight"] == 3
    rate_of = {id(p): group["lr"] for group in groups for p in group["params"]}
    assert rate_of[id(model.classifier.weight)] == pytest.approx(1e-3)
    assert rate_of[id(model.bert.embeddings.word_embeddings.weight)] == pytest.approx(1e-3 * 0.5**3)
    no_decay = {id(p) for group in groups if group["weight_decay"] == 0 for p in group["params"]}
    assert id(model.bert.embeddings.LayerNorm.weight) in no_decay and id(model.classifier.bias) in no_decay


def _train_with_early_stopping(tiny_model, model, score, **stopping):
    """20 steps on two repeated texts, scored every 2 steps with patience 2, never before step 4."""
    from tasks.modeling import load_tokenizer

    texts, labels = ["good movie", "bad film"] * 8, torch.tensor([1, 0] * 8)
    return training.train(model, load_tokenizer(tiny_model), texts,
                          lambda batch, index: model(**batch, labels=labels[index]).loss,
                          total_steps=20, batch_size=4, learning_rate=1e-2, weight_decay=0.0, warmup_ratio=0.0,
                          max_length=16, seed=0, name="test",
                          early_stopping=training.EarlyStopping(score, every=2, patience=2, min_steps=4, **stopping))


def test_early_stopping_stops_after_patience_and_restores_the_best_weights(tiny_model):
    model = load_classifier(tiny_model)
    scores = iter([0.5, 0.9, 0.6, 0.4, 0.3, 0.2])
    snapshots = []

    def score():
        snapshots.append(model.classifier.weight.detach().clone())
        return next(scores)

    run = _train_with_early_stopping(tiny_model, model, score)
    assert run.stopped_early and run.steps == 8
    assert run.validation_scores == (0.5, 0.9, 0.6, 0.4)
    assert run.best_step == 4
    assert torch.equal(model.classifier.weight, snapshots[1])


def test_early_stopping_waits_while_the_best_score_is_at_chance(tiny_model):
    """A model still scoring the majority share has not started learning: patience does not run out
    then (the likely cause of a CI scheduler run whose tiny teacher stayed at chance and promoted nothing)."""
    scores = iter([0.5, 0.5, 0.5, 0.5, 1.0, 1.0, 0.9, 0.9, 0.9, 0.9])
    run = _train_with_early_stopping(tiny_model, load_classifier(tiny_model), lambda: next(scores), floor=0.5)
    assert run.validation_scores == (0.5, 0.5, 0.5, 0.5, 1.0, 1.0, 0.9)
    assert run.stopped_early and run.best_step == 10


def test_chance_level_is_the_majority_share_plus_two_standard_errors():
    import pandas as pd

    from tasks.finetune import chance_level

    assert chance_level(pd.Series([0, 1] * 50)) == pytest.approx(0.5 + 2 * 0.05)
    assert chance_level(pd.Series([0] * 90 + [1] * 10)) == pytest.approx(0.9 + 2 * 0.03)


def _train_two_texts(tiny_model, model, precision: str, steps: int = 30):
    from tasks.modeling import load_tokenizer

    texts, labels = ["good movie", "bad film"] * 8, torch.tensor([1, 0] * 8)
    return training.train(model, load_tokenizer(tiny_model), texts,
                          lambda batch, index: model(**batch, labels=labels[index]).loss,
                          total_steps=steps, batch_size=4, learning_rate=1e-2, weight_decay=0.0, warmup_ratio=0.0,
                          max_length=16, seed=0, name="test", precision=precision)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_in_either_precision_learns_and_keeps_float32_weights(tiny_model, precision):
    """bf16 autocast computes the matrix products in bfloat16 (seen by a hook on the classifier) while the
    weights the optimiser updates, and those saved, stay float32; both precisions fit two texts."""
    from tasks.modeling import load_tokenizer

    model = load_classifier(tiny_model)
    seen = []
    model.classifier.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    before = model.classifier.weight.detach().clone()
    _train_two_texts(tiny_model, model, precision)
    assert seen[0] == (torch.bfloat16 if precision == "bf16" else torch.float32)
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())
    assert not torch.equal(model.classifier.weight, before)
    logits = training.predict_logits(model, load_tokenizer(tiny_model), ["good movie", "bad film"], 16)
    assert logits.dtype == "float32" and list(logits.argmax(axis=1)) == [1, 0]


def test_bf16_predictions_are_float32_and_close_to_fp32(tiny_model):
    from tasks.modeling import load_tokenizer

    model, tokenizer = load_classifier(tiny_model), load_tokenizer(tiny_model)
    texts = ["good movie", "bad film", "an ordinary evening at the cinema"]
    exact = training.predict_logits(model, tokenizer, texts, 16)
    approximate = training.predict_logits(model, tokenizer, texts, 16, precision="bf16")
    assert approximate.dtype == "float32"
    assert abs(approximate - exact).max() < 0.05  # bfloat16 keeps 8 bits of mantissa


def test_auto_precision_follows_the_cpu(monkeypatch):
    monkeypatch.setattr(training, "native_bf16", lambda: True)
    assert training.resolve_precision("auto") == "bf16"
    monkeypatch.setattr(training, "native_bf16", lambda: False)
    assert training.resolve_precision("auto") == "fp32"
    assert training.resolve_precision("bf16") == "bf16" and training.resolve_precision("fp32") == "fp32"
    with pytest.raises(ValueError, match="precision must be one of"):
        training.resolve_precision("fp16")
