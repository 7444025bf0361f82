"""Knowledge distillation: a smaller student initialised from the teacher's layers, trained on the
teacher's soft targets (temperature-scaled) and the hard labels."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import torch

from tasks.config import DistillConfig
from tasks.manifest import ModelSource, Precision, write_manifest
from tasks.modeling import build_student, encoder_depth, load_classifier, load_tokenizer, parameter_count, unsupported_family
from tasks.results import ModelFormat, StepResult, StepStatus, staged_dir, write_json_atomic
from tasks.splits import read_split
from tasks.training import accuracy, distillation_loss, steps_for
from tasks.training import train as train_loop

log = logging.getLogger(__name__)


def hidden_state_loss(student_hidden: tuple[torch.Tensor, ...], teacher_hidden: tuple[torch.Tensor, ...],
                      chosen: list[int], attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error between each student layer's output and the output of the teacher layer
    it was copied from (hidden_states[0] is the embeddings, so layer i is at i + 1); padding excluded."""
    mask = attention_mask.unsqueeze(-1).to(student_hidden[0].dtype)
    tokens = mask.sum() * student_hidden[0].shape[-1]
    losses = [(((student_hidden[i + 1] - teacher_hidden[t + 1]) ** 2) * mask).sum() / tokens
              for i, t in enumerate(chosen)]
    return torch.stack(losses).mean()


def _distillation_loss(teacher: torch.nn.Module, student: torch.nn.Module, targets: torch.Tensor, chosen: list[int],
                       config: DistillConfig):
    """``loss_fn(batch, index)``: soft and hard targets, plus the hidden-state term when ``hidden_weight``."""
    transfer_hidden = config.hidden_weight > 0

    def loss_fn(batch: dict[str, torch.Tensor], index: list[int]) -> torch.Tensor:
        with torch.no_grad():
            teacher_out = teacher(**batch, output_hidden_states=transfer_hidden)
        student_out = student(**batch, output_hidden_states=transfer_hidden)
        loss = distillation_loss(student_out.logits, teacher_out.logits, targets[index], config.temperature,
                                 config.alpha)
        if transfer_hidden:
            loss = loss + config.hidden_weight * hidden_state_loss(
                student_out.hidden_states, teacher_out.hidden_states, chosen, batch["attention_mask"])
        return loss

    return loss_fn


def run(config: DistillConfig, teacher_dir: Path, data_dir: Path, out_dir: Path, progress_every: int = 10) -> StepResult:
    """Distill the fine-tuned teacher in ``teacher_dir`` into a smaller student saved to ``out_dir``.

    SKIPPED, with the reason, when the teacher's encoder family is not supported (``tasks.families``)."""
    unsupported = unsupported_family(teacher_dir)
    if unsupported is not None:
        log.warning("distillation SKIPPED: %s", unsupported)
        return StepResult(step="distill", status=StepStatus.SKIPPED, reason=unsupported)
    torch.manual_seed(config.seed)
    train = read_split(data_dir, "train")
    validation = read_split(data_dir, "validation")
    tokenizer = load_tokenizer(teacher_dir)
    teacher = load_classifier(teacher_dir).eval()
    teacher_layers = encoder_depth(teacher)
    wanted = config.student_layers or max(1, teacher_layers // 2)
    student, chosen = build_student(teacher, wanted)
    log.info("student keeps teacher layers %s of %d", chosen, teacher_layers)

    total_steps = steps_for(len(train), config.batch_size, config.epochs)
    targets = torch.tensor(train["label"].to_numpy())

    loss_fn = _distillation_loss(teacher, student, targets, chosen, config)

    trained = train_loop(
        student, tokenizer, train["text"].tolist(), loss_fn, total_steps=total_steps,
        batch_size=config.batch_size, learning_rate=config.learning_rate, weight_decay=0.01, warmup_ratio=0.1,
        max_length=config.max_length, seed=config.seed, name="distill", progress_every=progress_every,
        precision=config.precision, truncation=config.truncation,
    )
    student_accuracy = accuracy(student, tokenizer, validation, config.max_length, truncation=config.truncation)
    teacher_accuracy = accuracy(teacher, tokenizer, validation, config.max_length, truncation=config.truncation)
    with staged_dir(out_dir) as staging:
        student.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        write_json_atomic(staging / "distill_config.json", asdict(config) | {"teacher_layers_kept": chosen})
        write_manifest(staging, format=ModelFormat.PYTORCH, precision=Precision.FP32, step="distill",
                       created_by=__name__, source=ModelSource(str(teacher_dir), ModelFormat.PYTORCH), config=config,
                       config_file="distill_config.json",
                       details={"teacher_layers_kept": ",".join(map(str, chosen))})
    return StepResult(
        step="distill",
        status=StepStatus.SUCCESS,
        uris={"model": str(out_dir)},
        metrics={
            "student_layers": float(wanted),
            "teacher_layers": float(teacher_layers),
            "student_parameters": float(parameter_count(student)),
            "teacher_parameters": float(parameter_count(teacher)),
            "val_accuracy": student_accuracy,
            "teacher_val_accuracy": teacher_accuracy,
            "val_accuracy_retention": student_accuracy / teacher_accuracy if teacher_accuracy else float("nan"),
            "train_seconds": trained.seconds,
            "steps": float(trained.steps),
        },
        info={"teacher_layers_kept": ",".join(map(str, chosen))},
    )
