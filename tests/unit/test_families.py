"""Every supported encoder family on a tiny random model of its own (tokenizer of the family's kind):
the student keeps the chosen layers, pruning keeps the chosen heads and neurons and reloads with the
same logits, export and quantization reproduce the logits, and the Triton tokenizer model's
encoding of ``tokenizer.json`` (pad token included) gives the ids the model was checked on."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tasks import distill, export, modeling, prune, quantize
from tasks.config import DistillConfig, ExportConfig, PruneConfig, QuantizeConfig
from tasks.errors import ConfigError
from tasks.families import FAMILIES, family_of, supported_model_types
from tasks.modeling import TINY_FAMILIES, load_classifier, load_tokenizer
from tasks.onnx_model import MODEL_FILENAME, onnx_logits
from tasks.results import StepStatus
from tasks.training import predict_logits

TEXTS = ["good great movie", "awful dull plot and a boring ending", "the film was not really fun"]


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def family_model(request, tmp_path_factory) -> tuple[str, object]:
    folder = tmp_path_factory.mktemp("families") / request.param
    return request.param, modeling.build_tiny_model(folder, family=request.param)


def _logits(model: torch.nn.Module, tokenizer, texts: list[str] = TEXTS) -> torch.Tensor:
    batch = tokenizer(texts, padding=True, return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        return model(**batch).logits


def test_every_tiny_family_is_a_supported_one():
    assert set(TINY_FAMILIES) == set(supported_model_types())
    names = {family.name for family in FAMILIES}
    assert names >= {"BERT", "DistilBERT", "RoBERTa", "ELECTRA", "XLM-RoBERTa", "ALBERT"}


def test_an_unsupported_family_is_named_with_the_supported_ones():
    from transformers import DebertaV2Config

    with pytest.raises(ConfigError, match=r"'deberta-v2' is not a supported encoder family.*DistilBERT \(distilbert\)"):
        family_of(DebertaV2Config())


def test_student_keeps_the_chosen_layers_and_runs(family_model):
    name, folder = family_model
    teacher = load_classifier(folder).eval()
    tokenizer = load_tokenizer(folder)
    student, chosen = modeling.build_student(teacher, 1)
    assert chosen == [1] and modeling.encoder_depth(student) == 1 and modeling.encoder_depth(teacher) == 2
    layers, teacher_layers = modeling.encoder_layers(student), modeling.encoder_layers(teacher)
    source = teacher_layers[0 if family_of(teacher.config).shared_layers else 1]
    assert all(torch.equal(value, source.state_dict()[key]) for key, value in layers[0].state_dict().items())
    logits = _logits(student.eval(), tokenizer)
    assert logits.shape == (3, 2) and torch.isfinite(logits).all()
    out = student(**tokenizer(TEXTS[:1], return_tensors="pt", return_token_type_ids=False), output_hidden_states=True)
    assert len(out.hidden_states) == 2  # embeddings + the one kept layer: the hidden-state loss aligns on it
    if family_of(teacher.config).shared_layers:  # one block applied fewer times: same weights, fewer passes
        assert modeling.parameter_count(student) == modeling.parameter_count(teacher)
    else:
        assert modeling.parameter_count(student) < modeling.parameter_count(teacher)


def _pruned(folder, tmp_path) -> tuple[torch.nn.Module, modeling.PruningPlan, object]:
    model = load_classifier(folder)
    tokenizer = load_tokenizer(folder)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt", return_token_type_ids=False)
    labels = torch.tensor([1, 0, 0])
    plan = prune.importance_plan(model, [lambda: model(**batch, labels=labels).loss], 0.5, 0.5)
    modeling.apply_plan(model, plan)
    target = tmp_path / "pruned"
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    (target / modeling.PLAN_FILENAME).write_text(json.dumps(plan.to_dict()))
    return model.eval(), plan, target


def test_pruning_keeps_the_chosen_heads_and_neurons_and_reloads_identically(family_model, tmp_path):
    name, folder = family_model
    model, plan, target = _pruned(folder, tmp_path)
    head_size = modeling.head_size_of(model)
    unique_blocks = 1 if family_of(model.config).shared_layers else 2
    assert len(plan.heads) == unique_blocks and all(len(heads) == 1 for heads in plan.heads)
    assert all(len(neurons) == 32 for neurons in plan.neurons)
    for parts in modeling.block_parts(model):
        assert parts.query.out_features == parts.value.out_features == head_size
        assert parts.attention_output.in_features == head_size
        assert (parts.intermediate.out_features, parts.output.in_features) == (32, 32)
    assert prune.count_structure(model) == (unique_blocks, 32 * unique_blocks)
    tokenizer = load_tokenizer(target)
    reloaded = load_classifier(target)
    assert torch.equal(_logits(reloaded, tokenizer), _logits(model, tokenizer))


def test_export_and_quantize_reproduce_the_logits(family_model, prepared_data, tmp_path):
    name, folder = family_model
    exported = export.run(ExportConfig(), folder, prepared_data, tmp_path / "onnx", max_length=32)
    assert exported.metrics["max_abs_diff"] < 1e-4
    quantized = quantize.run(QuantizeConfig(), tmp_path / "onnx", prepared_data, tmp_path / "int8", max_length=32)
    assert quantized.metrics["source_max_abs_diff"] < 1e-2 and quantized.metrics["source_label_agreement"] == 1.0
    import onnx

    operators = {node.op_type for node in onnx.load(str(tmp_path / "int8" / MODEL_FILENAME)).graph.node}
    assert "MatMulInteger" in operators  # the encoder's weights were quantized, whatever the family's graph
    # The pruned model (attention left unfused) exports too.
    _, _, pruned = _pruned(folder, tmp_path)
    assert export.run(ExportConfig(), pruned, prepared_data, tmp_path / "pruned_onnx",
                      max_length=32).metrics["max_abs_diff"] < 1e-4


def test_the_served_tokenizer_gives_the_ids_the_model_was_checked_on(family_model, prepared_data, tmp_path):
    """What the Triton tokenizer model does with ``tokenizer.json``: truncation at max_length, right
    padding with the pad token promotion configures; the ONNX model's logits on those ids."""
    from tokenizers import Tokenizer

    from serving.model_repository import pad_token

    name, folder = family_model
    export.run(ExportConfig(), folder, prepared_data, tmp_path / "onnx", max_length=32)
    served = Tokenizer.from_file(str(tmp_path / "onnx" / "tokenizer.json"))
    served.enable_truncation(max_length=32)
    token = pad_token(tmp_path / "onnx")
    served.enable_padding(pad_id=served.token_to_id(token), pad_token=token)
    encodings = served.encode_batch(TEXTS)
    tokenizer = load_tokenizer(tmp_path / "onnx")
    expected = tokenizer(TEXTS, truncation=True, max_length=32, padding=True, return_token_type_ids=False)
    assert [encoding.ids for encoding in encodings] == expected["input_ids"]
    assert [encoding.attention_mask for encoding in encodings] == expected["attention_mask"]
    assert served.token_to_id(token) == load_classifier(folder).config.pad_token_id  # RoBERTa's positions count from it
    model = load_classifier(folder).eval()
    np.testing.assert_allclose(onnx_logits(tmp_path / "onnx" / MODEL_FILENAME, tokenizer, TEXTS, 32),
                               predict_logits(model, tokenizer, TEXTS, 32), atol=1e-4)


def test_distillation_and_pruning_skip_an_unsupported_family(tiny_model, prepared_data, tmp_path):
    from transformers import AutoModelForSequenceClassification, DebertaV2Config

    folder = tmp_path / "deberta"
    config = DebertaV2Config(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64, num_labels=2)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    load_tokenizer(tiny_model).save_pretrained(folder)
    distilled = distill.run(DistillConfig(student_layers=1, max_length=32), folder, prepared_data, tmp_path / "student")
    assert distilled.status is StepStatus.SKIPPED and "'deberta-v2' is not a supported encoder family" in distilled.reason
    pruned = prune.run(PruneConfig(max_length=32), folder, folder, prepared_data, tmp_path / "pruned")
    assert pruned.status is StepStatus.SKIPPED and "tasks/families.py" in pruned.reason
    assert not (tmp_path / "student").exists() and not (tmp_path / "pruned").exists()
