"""Pruning: structured (whole attention heads and feed-forward neurons, ranked by first-order Taylor
importance, giving a smaller dense model) and unstructured (gradual magnitude pruning to a target
sparsity), each followed by recovery distillation from the teacher.

A structurally pruned model no longer fits its Hugging Face config (every layer keeps its own number
of heads and neurons), so its folder holds ``pruning_plan.json`` with the kept indices;
``tasks.modeling.load_classifier`` rebuilds the smaller layers from it before loading the weights.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tasks import data as data_step
from tasks.config import PruneConfig
from tasks.distill import distillation_loss, encoder_layers, parameter_count
from tasks.errors import ConfigError
from tasks.finetune import accuracy, seed_everything
from tasks.modeling import load_tokenizer
from tasks.results import StepResult, StepStatus, staged_dir, write_json_atomic
from tasks.training import batches, steps_for
from tasks.training import train as train_loop

log = logging.getLogger(__name__)

PLAN_FILENAME = "pruning_plan.json"


@dataclass(frozen=True)
class LayerParts:
    """The linear layers of one BERT-style encoder block that pruning resizes."""

    attention: torch.nn.Module
    query: torch.nn.Linear
    key: torch.nn.Linear
    value: torch.nn.Linear
    attention_output: torch.nn.Linear
    intermediate: torch.nn.Linear
    output: torch.nn.Linear


@dataclass(frozen=True)
class PruningPlan:
    """Kept head and neuron indices per encoder layer (indices into the unpruned layer)."""

    head_size: int
    heads: tuple[tuple[int, ...], ...]
    neurons: tuple[tuple[int, ...], ...]

    def to_dict(self) -> dict:
        return {"head_size": self.head_size, "heads": [list(h) for h in self.heads],
                "neurons": [list(n) for n in self.neurons]}

    @classmethod
    def from_dict(cls, data: dict) -> PruningPlan:
        return cls(int(data["head_size"]), tuple(tuple(h) for h in data["heads"]),
                   tuple(tuple(n) for n in data["neurons"]))


def layer_parts(layer: torch.nn.Module) -> LayerParts:
    try:
        attention = layer.attention.self
        return LayerParts(attention, attention.query, attention.key, attention.value, layer.attention.output.dense,
                          layer.intermediate.dense, layer.output.dense)
    except AttributeError:
        raise ConfigError(
            f"{type(layer).__name__} is not a BERT-style block (attention.self.query/key/value, "
            "attention.output.dense, intermediate.dense, output.dense): structured pruning supports BERT, "
            "MiniLM and RoBERTa encoders"
        ) from None


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


def _select(linear: torch.nn.Linear, index: torch.Tensor, dim: int) -> torch.nn.Linear:
    """A new Linear with only the rows (dim 0, outputs) or columns (dim 1, inputs) in ``index``."""
    weight = linear.weight.detach().index_select(dim, index).clone()
    bias = linear.bias.detach().clone() if linear.bias is not None else None
    if dim == 0 and bias is not None:
        bias = bias.index_select(0, index).clone()
    resized = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    resized.weight = torch.nn.Parameter(weight)
    if bias is not None:
        resized.bias = torch.nn.Parameter(bias)
    return resized


def apply_plan(model: torch.nn.Module, plan: PruningPlan) -> None:
    """Resize every encoder block of ``model`` in place to the heads and neurons the plan keeps."""
    layers = encoder_layers(model)
    if len(layers) != len(plan.heads) or len(layers) != len(plan.neurons):
        raise ConfigError(f"pruning plan has {len(plan.heads)} layers, the model {len(layers)}")
    for layer, heads, neurons in zip(layers, plan.heads, plan.neurons):
        parts = layer_parts(layer)
        rows = torch.tensor([head * plan.head_size + offset for head in heads for offset in range(plan.head_size)])
        parts.attention.query = _select(parts.query, rows, 0)
        parts.attention.key = _select(parts.key, rows, 0)
        parts.attention.value = _select(parts.value, rows, 0)
        layer.attention.output.dense = _select(parts.attention_output, rows, 1)
        parts.attention.num_attention_heads = len(heads)
        parts.attention.all_head_size = len(heads) * plan.head_size
        kept = torch.tensor(neurons)
        layer.intermediate.dense = _select(parts.intermediate, kept, 0)
        layer.output.dense = _select(parts.output, kept, 1)


def head_size_of(model: torch.nn.Module) -> int:
    return model.config.hidden_size // model.config.num_attention_heads


def full_plan(model: torch.nn.Module) -> PruningPlan:
    """The plan that keeps everything (the model's current shape)."""
    head_size = head_size_of(model)
    heads, neurons = [], []
    for layer in encoder_layers(model):
        parts = layer_parts(layer)
        heads.append(tuple(range(parts.query.out_features // head_size)))
        neurons.append(tuple(range(parts.intermediate.out_features)))
    return PruningPlan(head_size, tuple(heads), tuple(neurons))


def importance_plan(model: torch.nn.Module, loss_batches, head_fraction: float, ffn_fraction: float) -> PruningPlan:
    """Score heads and neurons over ``loss_batches`` (an iterable of zero-argument callables that
    return a loss) and keep the most important ones per layer."""
    head_size = head_size_of(model)
    layers = [layer_parts(layer) for layer in encoder_layers(model)]
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


def load_pruned(model_dir: Path, attention: str = "eager") -> torch.nn.Module:
    """Rebuild a structurally pruned classifier saved by this step and load its weights."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForSequenceClassification

    plan = PruningPlan.from_dict(json.loads((model_dir / PLAN_FILENAME).read_text()))
    config = AutoConfig.from_pretrained(str(model_dir))
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation=attention)
    apply_plan(model, plan)
    missing, unexpected = model.load_state_dict(load_file(str(model_dir / "model.safetensors")), strict=False)
    real_missing = [name for name in missing if not name.endswith("position_ids")]
    if real_missing or unexpected:
        raise ConfigError(f"pruned model in {model_dir} does not match its plan: missing {real_missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    return model.eval()


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
    """Attention heads and feed-forward neurons over all encoder layers."""
    head_size = head_size_of(model)
    parts = [layer_parts(layer) for layer in encoder_layers(model)]
    return (sum(p.query.out_features // head_size for p in parts), sum(p.intermediate.out_features for p in parts))


def run(config: PruneConfig, student_dir: Path, teacher_dir: Path, data_dir: Path, out_dir: Path,
        progress_every: int = 10) -> StepResult:
    """Prune the model in ``student_dir``, recover it by distilling from ``teacher_dir``, save to ``out_dir``."""
    from tasks.modeling import load_classifier

    seed_everything(config.seed, deterministic=True)
    train = data_step.read_split(data_dir, "train")
    validation = data_step.read_split(data_dir, "validation")
    texts, targets = train["text"].tolist(), torch.tensor(train["label"].to_numpy())
    tokenizer = load_tokenizer(student_dir)
    teacher = load_classifier(teacher_dir, attention="sdpa").eval()
    model = load_classifier(student_dir, attention="sdpa")
    heads_before, neurons_before = count_structure(model)
    parameters_before = parameter_count(model)
    accuracy_before = accuracy(model, tokenizer, validation, config.max_length)

    def loss_on(index: list[int]) -> torch.Tensor:
        batch = tokenizer([texts[i] for i in index], truncation=True, max_length=config.max_length, padding=True,
                          return_tensors="pt", return_token_type_ids=False)
        with torch.no_grad():
            teacher_logits = teacher(**batch).logits
        return distillation_loss(model(**batch).logits, teacher_logits, targets[index], config.temperature,
                                 config.alpha)

    plan = full_plan(model)
    if config.structured:
        generator = torch.Generator().manual_seed(config.seed)
        scoring = batches(len(texts), config.batch_size, config.importance_batches, generator)
        plan = importance_plan(model, ((lambda index=index: loss_on(index)) for index in scoring),
                               config.head_fraction, config.ffn_fraction)
        apply_plan(model, plan)
    heads_after, neurons_after = count_structure(model)
    accuracy_pruned = accuracy(model, tokenizer, validation, config.max_length)
    log.info("structured pruning kept %d/%d heads and %d/%d neurons; validation accuracy %.4f -> %.4f",
             heads_after, heads_before, neurons_after, neurons_before, accuracy_before, accuracy_pruned)

    total_steps = steps_for(len(texts), config.batch_size, config.recovery_epochs) if config.recovery_epochs else 0
    pruner = None
    if config.unstructured_sparsity:
        pruner = GradualMagnitudePruner(prunable_weights(model), config.unstructured_sparsity, total_steps)
    seconds = 0.0
    if total_steps:
        trained = train_loop(
            model, tokenizer, texts, lambda batch, index: loss_on(index), total_steps=total_steps,
            batch_size=config.batch_size, learning_rate=config.learning_rate, weight_decay=0.01, warmup_ratio=0.1,
            max_length=config.max_length, seed=config.seed, name="prune-recovery", progress_every=progress_every,
            after_step=pruner,
        )
        seconds = trained.seconds
    achieved = sparsity(prunable_weights(model))
    accuracy_after = accuracy(model, tokenizer, validation, config.max_length)
    teacher_accuracy = accuracy(teacher, tokenizer, validation, config.max_length)
    with staged_dir(out_dir) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        write_json_atomic(staging / PLAN_FILENAME, plan.to_dict())
        write_json_atomic(staging / "prune_config.json", asdict(config))
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
