"""Fine-tune the teacher classifier on the prepared training split."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch

from tasks.config import FinetuneConfig
from tasks.manifest import ModelSource, Precision, write_manifest
from tasks.modeling import load_classifier, load_tokenizer
from tasks.results import ModelFormat, StepResult, StepStatus, staged_dir, write_json_atomic
from tasks.splits import read_meta, read_split
from tasks.training import EarlyStopping, accuracy, seed_everything, steps_for
from tasks.training import train as train_loop

log = logging.getLogger(__name__)


def chance_level(labels: pd.Series) -> float:
    """The validation accuracy early stopping must beat before it may stop: always answering the most
    common label, plus two standard errors of that share on this many texts (a model within it has
    not started learning; stopping would keep a useless model)."""
    majority = float(labels.value_counts(normalize=True).max())
    return majority + 2.0 * math.sqrt(majority * (1.0 - majority) / len(labels))


def run(config: FinetuneConfig, data_dir: Path, out_dir: Path, progress_every: int = 10) -> StepResult:
    """Train ``config.model`` with a fresh head on ``data_dir``'s train split; save to ``out_dir``."""
    seed_everything(config.seed, config.deterministic)
    labels = read_meta(data_dir)["labels"]
    train = read_split(data_dir, "train")
    validation = read_split(data_dir, "validation")
    tokenizer = load_tokenizer(config.model)
    model = load_classifier(config.model, labels, attention=config.attention)

    total_steps = steps_for(len(train), config.batch_size, config.epochs)
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    targets = torch.tensor(train["label"].to_numpy())
    stopping = None
    if config.evaluations_per_epoch:
        epoch_steps = steps_for(len(train), config.batch_size, 1.0)
        stopping = EarlyStopping(lambda: accuracy(model, tokenizer, validation, config.max_length, config.precision,
                                                  config.truncation),
                                 every=max(1, epoch_steps // config.evaluations_per_epoch),
                                 patience=config.early_stopping_patience,
                                 # Never before one epoch and half the planned steps: validation often
                                 # sits at chance until warm-up ends and the head has learned something.
                                 min_steps=max(epoch_steps, total_steps // 2),
                                 floor=chance_level(validation["label"]))
    trained = train_loop(
        model, tokenizer, train["text"].tolist(),
        lambda batch, index: model(**batch, labels=targets[index]).loss,
        total_steps=total_steps, batch_size=config.batch_size, learning_rate=config.learning_rate,
        weight_decay=config.weight_decay, warmup_ratio=config.warmup_ratio, max_length=config.max_length,
        seed=config.seed, name="fine-tune", progress_every=progress_every, layer_decay=config.layer_lr_decay,
        layer_tiers=config.layer_learning_rates, early_stopping=stopping, precision=config.precision,
        truncation=config.truncation,
    )
    step, train_seconds = trained.steps, trained.seconds

    val_accuracy = accuracy(model, tokenizer, validation, config.max_length, truncation=config.truncation)
    log.info("fine-tune done: %d steps in %.0fs, validation accuracy %.4f", step, train_seconds, val_accuracy)

    with staged_dir(out_dir) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        write_json_atomic(staging / "finetune_config.json", asdict(config))
        write_manifest(staging, format=ModelFormat.PYTORCH, precision=Precision.FP32, step="finetune",
                       created_by=__name__, source=ModelSource(config.model, ModelFormat.PYTORCH), config=config,
                       config_file="finetune_config.json")
    return StepResult(
        step="finetune",
        status=StepStatus.SUCCESS,
        uris={"model": str(out_dir)},
        metrics={
            "steps": float(step),
            "train_loss_last": trained.last_loss,
            "val_accuracy": val_accuracy,
            "train_seconds": train_seconds,
            "best_step": float(trained.best_step),
            "stopped_early": float(trained.stopped_early),
        },
        info={"validation_scores": ",".join(f"{score:.4f}" for score in trained.validation_scores)},
    )
