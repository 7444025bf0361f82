"""Distillation on the tiny teacher: layer mapping, student construction, loss, and a full run."""

import json

import pytest
import torch
import torch.nn.functional as F

from tasks import distill, modeling
from tasks.config import DistillConfig
from tasks.errors import ConfigError
from tasks.manifest import ArtifactManifest, Backend, Precision
from tasks.modeling import load_classifier
from tasks.results import ModelFormat
from tasks.training import distillation_loss


@pytest.mark.parametrize("teacher, student, expected", [(6, 3, [1, 3, 5]), (12, 4, [2, 5, 8, 11]), (2, 1, [1]),
                                                         (4, 4, [0, 1, 2, 3])])
def test_student_layers_are_evenly_spaced_and_keep_the_last(teacher, student, expected):
    assert modeling.student_layer_map(teacher, student) == expected


def test_student_layer_count_is_validated():
    with pytest.raises(ConfigError):
        modeling.student_layer_map(6, 7)
    with pytest.raises(ConfigError):
        DistillConfig(alpha=1.5)


def test_build_student_copies_the_chosen_layers(trained_teacher):
    teacher = load_classifier(trained_teacher).eval()
    student, chosen = modeling.build_student(teacher, 1)
    assert chosen == [1]
    assert len(modeling.encoder_layers(student)) == 1 and student.config.num_hidden_layers == 1
    assert len(modeling.encoder_layers(teacher)) == 2  # the teacher is untouched
    assert modeling.parameter_count(student) < modeling.parameter_count(teacher)
    copied = modeling.encoder_layers(student)[0].state_dict()
    original = modeling.encoder_layers(teacher)[1].state_dict()
    assert all(torch.equal(copied[key], original[key]) for key in original)
    assert torch.equal(student.classifier.weight, teacher.classifier.weight)


def test_distillation_loss_mixes_soft_and_hard_terms():
    student = torch.tensor([[2.0, -1.0], [0.5, 0.3]])
    labels = torch.tensor([0, 1])
    hard = F.cross_entropy(student, labels)
    assert torch.allclose(distillation_loss(student, student.clone(), labels, 2.0, alpha=0.0), hard)
    # Identical logits: the soft (KL) term is zero, only the hard part remains.
    assert torch.allclose(distillation_loss(student, student.clone(), labels, 2.0, alpha=0.5), 0.5 * hard)
    different = torch.tensor([[-2.0, 1.0], [0.0, 0.0]])
    assert distillation_loss(student, different, labels, 2.0, alpha=1.0) > 0


def test_distill_run_produces_a_smaller_student_that_keeps_accuracy(trained_teacher, prepared_data, tmp_path):
    config = DistillConfig(student_layers=1, epochs=3, batch_size=16, learning_rate=5e-3, max_length=32)
    result = distill.run(config, trained_teacher, prepared_data, tmp_path / "student")
    m = result.metrics
    assert m["student_layers"] == 1 and m["teacher_layers"] == 2
    assert m["student_parameters"] < m["teacher_parameters"]
    assert m["val_accuracy"] >= 0.8
    saved = json.loads((tmp_path / "student" / "config.json").read_text())
    assert saved["num_hidden_layers"] == 1
    assert json.loads((tmp_path / "student" / "distill_config.json").read_text())["teacher_layers_kept"] == [1]
    reloaded = load_classifier(tmp_path / "student")
    assert len(modeling.encoder_layers(reloaded)) == 1
    manifest = ArtifactManifest.read(tmp_path / "student")
    assert (manifest.format, manifest.precision, manifest.backend) == (ModelFormat.PYTORCH, Precision.FP32,
                                                                       Backend.TORCH)
    assert manifest.source.path == str(trained_teacher) and manifest.step == "distill"
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(manifest.files)
    assert manifest.details["teacher_layers_kept"] == "1"


def test_hidden_state_loss_compares_mapped_layers_and_ignores_padding():
    embeddings = torch.zeros(1, 3, 2)
    teacher = (embeddings, torch.ones(1, 3, 2), torch.full((1, 3, 2), 2.0))
    student_same = (embeddings, torch.full((1, 3, 2), 2.0))
    mask = torch.tensor([[1, 1, 0]])
    assert distill.hidden_state_loss(student_same, teacher, [1], mask) == 0  # student layer 0 <- teacher layer 1
    padded_differs = (embeddings, torch.tensor([[[2.0, 2.0], [2.0, 2.0], [9.0, 9.0]]]))
    assert distill.hidden_state_loss(padded_differs, teacher, [1], mask) == 0
    assert distill.hidden_state_loss(student_same, teacher, [0], mask) == pytest.approx(1.0)


def test_distill_with_hidden_state_transfer_trains(trained_teacher, prepared_data, tmp_path):
    config = DistillConfig(student_layers=1, epochs=2, batch_size=16, learning_rate=5e-3, max_length=32,
                           hidden_weight=1.0)
    result = distill.run(config, trained_teacher, prepared_data, tmp_path / "student")
    assert result.metrics["val_accuracy"] >= 0.8
