"""Pruning: structured (whole attention heads and feed-forward neurons, ranked by first-order Taylor
importance, giving a smaller dense model) and unstructured (gradual magnitude pruning to a target
sparsity), each followed by recovery distillation from the teacher.

A structurally pruned model's folder holds ``pruning_plan.json`` with the kept heads and neurons;
``tasks.modeling`` defines the plan and rebuilds the smaller layers from it when the model is loaded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from tasks.config import PruneConfig
from tasks.manifest import ModelSource, Precision, Structure, write_manifest
from tasks.modeling import (PLAN_FILENAME, LayerParts, PruningPlan, apply_plan, block_parts, encoder_layers,
                            head_size_of, load_classifier, load_tokenizer, parameter_count,
                            unsupported_family)
from tasks.results import ModelFormat, StepResult, StepStatus, staged_dir, write_json_atomic
from tasks.splits import read_split
from tasks.tokens import encode
from tasks.training import accuracy, batches, distillation_loss, seed_everything, steps_for
from tasks.training import train as train_loop

log = logging.getLogger(__name__)


def _row_contribution(linear: torch.nn.Linear) -> torch.Tensor:
    """sum_j w_ij * dL/dw_ij (+ bias term) per output row: first-order change of the loss if the row is removed."""
    total = (linear.weight * linear.weight.grad).sum(dim=1)
    if linear.bias is not None:
        total = total + linear.bias * linear.bias.grad
    return total


def _column_contribution(linear: torch.nn.Linear) -> torch.Tensor:
    return (linear.weight * linear.weight.grad).sum(dim=0)


def batch_importance(parts: LayerParts, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """|first-order Taylor estimate| of the loss change from removing each head and each neuron,
    from the gradients of one backward pass."""
    with torch.no_grad():
        heads = sum(_row_contribution(linear) for linear in (parts.query, parts.key, parts.value))
        heads = heads + _column_contribution(parts.attention_output)
        neurons = _row_contribution(parts.intermediate) + _column_contribution(parts.output)
        return heads.view(-1, head_size).sum(dim=1).abs(), neurons.abs()


def kept_indices(scores: torch.Tensor, fraction: float) -> tuple[int, ...]:
    """Indices of the most important ``1 - fraction`` of ``scores`` (at least one), in ascending order."""
    keep = max(1, round(len(scores) * (1.0 - fraction)))
    return tuple(sorted(torch.argsort(scores, descending=True)[:keep].tolist()))


def full_plan(model: torch.nn.Module) -> PruningPlan:
    """The plan that keeps everything (the model's current shape)."""
    head_size = head_size_of(model)
    heads, neurons = [], []
    for parts in block_parts(model):
        heads.append(tuple(range(parts.query.out_features // head_size)))
        neurons.append(tuple(range(parts.intermediate.out_features)))
    return PruningPlan(head_size, tuple(heads), tuple(neurons))


def importance_plan(model: torch.nn.Module, loss_batches, head_fraction: float, ffn_fraction: float) -> PruningPlan:
    """Score heads and neurons over ``loss_batches`` (an iterable of zero-argument callables that
    return a loss) and keep the most important ones per layer."""
    head_size = head_size_of(model)
    layers = block_parts(model)
    head_scores = [torch.zeros(parts.query.out_features // head_size) for parts in layers]
    neuron_scores = [torch.zeros(parts.intermediate.out_features) for parts in layers]
    model.train()
    for compute_loss in loss_batches:
        model.zero_grad()
        compute_loss().backward()
        for index, parts in enumerate(layers):
            heads, neurons = batch_importance(parts, head_size)
            head_scores[index] += heads
            neuron_scores[index] += neurons
    model.zero_grad()
    model.eval()
    return PruningPlan(
        head_size,
        tuple(kept_indices(scores, head_fraction) for scores in head_scores),
        tuple(kept_indices(scores, ffn_fraction) for scores in neuron_scores),
    )


# ---- unstructured: gradual magnitude pruning ----

def prunable_weights(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Weight matrices of the encoder's linear layers (embeddings and the head stay dense)."""
    return [module.weight for layer in encoder_layers(model) for module in layer.modules()
            if isinstance(module, torch.nn.Linear)]


def cubic_sparsity(step: int, total_steps: int, target: float, start_fraction: float = 0.0,
                   end_fraction: float = 0.75) -> float:
    """Sparsity at ``step`` on Zhu & Gupta's schedule: 0 until the start, rising as
    target * (1 - (1 - progress)^3), and held at ``target`` for the last part of training."""
    begin, end = int(total_steps * start_fraction), max(1, int(total_steps * end_fraction))
    if step <= begin:
        return 0.0
    progress = min(1.0, (step - begin) / max(1, end - begin))
    return target * (1.0 - (1.0 - progress) ** 3)


def magnitude_masks(weights: list[torch.nn.Parameter], sparsity: float) -> list[torch.Tensor]:
    """Per tensor, a mask that zeroes the ``sparsity`` share of smallest-magnitude weights."""
    masks = []
    with torch.no_grad():
        for weight in weights:
            count = int(weight.numel() * sparsity)
            if count == 0:
                masks.append(torch.ones_like(weight, dtype=torch.bool))
                continue
            threshold = weight.abs().flatten().kthvalue(count).values
            masks.append(weight.abs() > threshold)
    return masks


class GradualMagnitudePruner:
    """Called after every optimiser step: raises sparsity on the cubic schedule every ``every`` steps
    and keeps pruned weights at zero in between."""

    def __init__(self, weights: list[torch.nn.Parameter], target: float, total_steps: int, every: int = 10) -> None:
        self.weights, self.target, self.total_steps, self.every = weights, target, total_steps, every
        self.masks: list[torch.Tensor] = []

    def __call__(self, step: int) -> None:
        if step % self.every == 0 or step == self.total_steps or not self.masks:
            self.masks = magnitude_masks(self.weights, cubic_sparsity(step, self.total_steps, self.target))
        with torch.no_grad():
            for weight, mask in zip(self.weights, self.masks):
                weight.mul_(mask)


def sparsity(weights: list[torch.nn.Parameter]) -> float:
    total = sum(weight.numel() for weight in weights)
    zeros = sum(int((weight == 0).sum()) for weight in weights)
    return zeros / total if total else 0.0


def count_structure(model: torch.nn.Module) -> tuple[int, int]:
    """Attention heads and feed-forward neurons over all encoder layers (a shared block counted once)."""
    head_size = head_size_of(model)
    parts = block_parts(model)
    return (sum(p.query.out_features // head_size for p in parts), sum(p.intermediate.out_features for p in parts))


def distillation_loss_on(model: torch.nn.Module, teacher: torch.nn.Module, tokenizer, texts: list[str],
                         targets: torch.Tensor, config: PruneConfig) -> Callable[[list[int]], torch.Tensor]:
    """``loss_on(index)``: the distillation loss of ``model`` against ``teacher`` on the texts at ``index``."""

    def loss_on(index: list[int]) -> torch.Tensor:
        batch = encode(tokenizer, [texts[i] for i in index], config.max_length, config.truncation,
                       return_tensors="pt")
        with torch.no_grad():
            teacher_logits = teacher(**batch).logits
        return distillation_loss(model(**batch).logits, teacher_logits, targets[index], config.temperature,
                                 config.alpha)

    return loss_on


def prune_structure(model: torch.nn.Module, loss_on: Callable[[list[int]], torch.Tensor], text_count: int,
                    config: PruneConfig) -> PruningPlan:
    """Remove the least important heads and neurons in place when ``config.structured``; the plan kept."""
    if not config.structured:
        return full_plan(model)
    generator = torch.Generator().manual_seed(config.seed)
    scoring = batches(text_count, config.batch_size, config.importance_batches, generator)
    plan = importance_plan(model, ((lambda index=index: loss_on(index)) for index in scoring),
                           config.head_fraction, config.ffn_fraction)
    apply_plan(model, plan)
    return plan


def recover(model: torch.nn.Module, tokenizer, texts: list[str], loss_on: Callable[[list[int]], torch.Tensor],
            config: PruneConfig, progress_every: int) -> float:
    """Recovery distillation (with gradual magnitude pruning when ``config.unstructured_sparsity``); seconds taken."""
    total_steps = steps_for(len(texts), config.batch_size, config.recovery_epochs) if config.recovery_epochs else 0
    pruner = None
    if config.unstructured_sparsity:
        pruner = GradualMagnitudePruner(prunable_weights(model), config.unstructured_sparsity, total_steps)
    if not total_steps:
        return 0.0
    trained = train_loop(
        model, tokenizer, texts, lambda batch, index: loss_on(index), total_steps=total_steps,
        batch_size=config.batch_size, learning_rate=config.learning_rate, weight_decay=0.01, warmup_ratio=0.1,
        max_length=config.max_length, seed=config.seed, name="prune-recovery", progress_every=progress_every,
        after_step=pruner, precision=config.precision, truncation=config.truncation,
    )
    return trained.seconds


def pruned_structure(config: PruneConfig) -> Structure:
    """How the saved weights are laid out: smaller layers (loading needs the pruning plan), else dense
    shapes with zeroed weights (unstructured only), else unchanged."""
    if config.structured:
        return Structure.PRUNED
    return Structure.SPARSE if config.unstructured_sparsity else Structure.DENSE


def _save(model: torch.nn.Module, tokenizer, plan: PruningPlan, config: PruneConfig, student_dir: Path,
          teacher_dir: Path, out_dir: Path) -> None:
    with staged_dir(out_dir) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        write_json_atomic(staging / PLAN_FILENAME, plan.to_dict())
        write_json_atomic(staging / "prune_config.json", asdict(config))
        write_manifest(staging, format=ModelFormat.PYTORCH, precision=Precision.FP32, step="prune",
                       created_by=__name__, source=ModelSource(str(student_dir), ModelFormat.PYTORCH), config=config,
                       config_file="prune_config.json", structure=pruned_structure(config),
                       details={"teacher": str(teacher_dir), "pruning_plan": PLAN_FILENAME})


def run(config: PruneConfig, student_dir: Path, teacher_dir: Path, data_dir: Path, out_dir: Path,
        progress_every: int = 10) -> StepResult:
    """Prune the model in ``student_dir``, recover it by distilling from ``teacher_dir``, save to ``out_dir``.

    SKIPPED, with the reason, when the model's encoder family is not supported (``tasks.families``)."""
    unsupported = unsupported_family(student_dir)
    if unsupported is not None:
        log.warning("pruning SKIPPED: %s", unsupported)
        return StepResult(step="prune", status=StepStatus.SKIPPED, reason=unsupported)
    seed_everything(config.seed, deterministic=True)
    train = read_split(data_dir, "train")
    validation = read_split(data_dir, "validation")
    texts, targets = train["text"].tolist(), torch.tensor(train["label"].to_numpy())
    tokenizer = load_tokenizer(student_dir)
    teacher = load_classifier(teacher_dir, attention="sdpa").eval()
    model = load_classifier(student_dir, attention="sdpa")
    heads_before, neurons_before = count_structure(model)
    parameters_before = parameter_count(model)
    accuracy_before = accuracy(model, tokenizer, validation, config.max_length, truncation=config.truncation)
    loss_on = distillation_loss_on(model, teacher, tokenizer, texts, targets, config)

    plan = prune_structure(model, loss_on, len(texts), config)
    heads_after, neurons_after = count_structure(model)
    accuracy_pruned = accuracy(model, tokenizer, validation, config.max_length, truncation=config.truncation)
    log.info("structured pruning kept %d/%d heads and %d/%d neurons; validation accuracy %.4f -> %.4f",
             heads_after, heads_before, neurons_after, neurons_before, accuracy_before, accuracy_pruned)

    seconds = recover(model, tokenizer, texts, loss_on, config, progress_every)
    achieved = sparsity(prunable_weights(model))
    accuracy_after = accuracy(model, tokenizer, validation, config.max_length, truncation=config.truncation)
    teacher_accuracy = accuracy(teacher, tokenizer, validation, config.max_length, truncation=config.truncation)
    _save(model, tokenizer, plan, config, student_dir, teacher_dir, out_dir)
    return StepResult(
        step="prune",
        status=StepStatus.SUCCESS,
        uris={"model": str(out_dir)},
        metrics={
            "heads_before": float(heads_before),
            "heads_after": float(heads_after),
            "ffn_neurons_before": float(neurons_before),
            "ffn_neurons_after": float(neurons_after),
            "parameters_before": float(parameters_before),
            "parameters_after": float(parameter_count(model)),
            "encoder_weight_sparsity": achieved,
            "val_accuracy_before": accuracy_before,
            "val_accuracy_pruned": accuracy_pruned,
            "val_accuracy": accuracy_after,
            "teacher_val_accuracy": teacher_accuracy,
            "val_accuracy_retention": accuracy_after / teacher_accuracy if teacher_accuracy else float("nan"),
            "recovery_seconds": seconds,
        },
    )
