"""Fine-tune the teacher classifier on the prepared training split."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from transformers import get_linear_schedule_with_warmup

from tasks import data as data_step
from tasks.config import FinetuneConfig
from tasks.modeling import load_classifier, load_tokenizer
from tasks.results import StepResult, StepStatus, staged_dir, write_json_atomic

log = logging.getLogger(__name__)


def predict_logits(model, tokenizer, texts: list[str], max_length: int, batch_size: int = 32) -> np.ndarray:
    """Logits of a PyTorch classifier for ``texts`` (eval mode, no grad)."""
    model.eval()
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[start:start + batch_size], truncation=True, max_length=max_length, padding=True,
                return_tensors="pt", return_token_type_ids=False,
            )
            outputs.append(model(**batch).logits.float().numpy())
    return np.concatenate(outputs) if outputs else np.zeros((0, model.config.num_labels), dtype=np.float32)


def run(config: FinetuneConfig, data_dir: Path, out_dir: Path, progress_every: int = 10) -> StepResult:
    """Train ``config.model`` with a fresh head on ``data_dir``'s train split; save to ``out_dir``."""
    torch.manual_seed(config.seed)
    labels = data_step.read_meta(data_dir)["labels"]
    train = data_step.read_split(data_dir, "train")
    validation = data_step.read_split(data_dir, "validation")
    tokenizer = load_tokenizer(config.model)
    model = load_classifier(config.model, labels)

    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total_steps = math.ceil(steps_per_epoch * config.epochs)
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(total_steps * config.warmup_ratio), total_steps)
    generator = torch.Generator().manual_seed(config.seed)
    texts, targets = train["text"].tolist(), torch.tensor(train["label"].to_numpy())

    model.train()
    started = time.monotonic()
    step, losses = 0, []
    while step < total_steps:
        order = torch.randperm(len(texts), generator=generator).tolist()
        for start in range(0, len(order), config.batch_size):
            if step >= total_steps:
                break
            index = order[start:start + config.batch_size]
            batch = tokenizer(
                [texts[i] for i in index], truncation=True, max_length=config.max_length, padding=True,
                return_tensors="pt", return_token_type_ids=False,
            )
            loss = model(**batch, labels=targets[index]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            losses.append(loss.item())
            if step % progress_every == 0 or step == total_steps:
                elapsed = time.monotonic() - started
                eta = elapsed / step * (total_steps - step)
                log.info("fine-tune step %d/%d loss %.4f elapsed %.0fs eta %.0fs", step, total_steps,
                         np.mean(losses[-progress_every:]), elapsed, eta)
    train_seconds = time.monotonic() - started

    val_logits = predict_logits(model, tokenizer, validation["text"].tolist(), config.max_length)
    val_accuracy = float((val_logits.argmax(axis=1) == validation["label"].to_numpy()).mean())
    log.info("fine-tune done: %d steps in %.0fs, validation accuracy %.4f", step, train_seconds, val_accuracy)

    with staged_dir(out_dir) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        write_json_atomic(staging / "finetune_config.json", asdict(config))
    return StepResult(
        step="finetune",
        status=StepStatus.SUCCESS,
        uris={"model": str(out_dir)},
        metrics={
            "steps": float(step),
            "train_loss_last": float(np.mean(losses[-progress_every:])) if losses else float("nan"),
            "val_accuracy": val_accuracy,
            "train_seconds": train_seconds,
        },
    )
