"""The training loop shared by fine-tuning and distillation: shuffled batches, AdamW with linear
warm-up and decay, gradient clipping, and progress with loss and ETA in the task log."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from transformers import get_linear_schedule_with_warmup

log = logging.getLogger(__name__)

LossFn = Callable[[dict[str, torch.Tensor], list[int]], torch.Tensor]


@dataclass(frozen=True)
class TrainingRun:
    steps: int
    last_loss: float
    seconds: float


def steps_for(rows: int, batch_size: int, epochs: float) -> int:
    """Optimiser steps for ``epochs`` passes over ``rows`` examples in batches of ``batch_size``."""
    return math.ceil(math.ceil(rows / batch_size) * epochs)


def batches(count: int, batch_size: int, total_steps: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Index lists of shuffled batches, a new permutation each epoch, ``total_steps`` in all."""
    step = 0
    while step < total_steps:
        order = torch.randperm(count, generator=generator).tolist()
        for start in range(0, count, batch_size):
            if step >= total_steps:
                return
            yield order[start:start + batch_size]
            step += 1


def train(model: torch.nn.Module, tokenizer, texts: list[str], loss_fn: LossFn, *, total_steps: int,
          batch_size: int, learning_rate: float, weight_decay: float, warmup_ratio: float, max_length: int,
          seed: int, name: str, progress_every: int = 10) -> TrainingRun:
    """Train ``model`` for ``total_steps`` batches of ``texts``; ``loss_fn(batch, indices)`` gives the loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(total_steps * warmup_ratio), total_steps)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    started, losses, step = time.monotonic(), [], 0
    for step, index in enumerate(batches(len(texts), batch_size, total_steps, generator), start=1):
        batch = tokenizer([texts[i] for i in index], truncation=True, max_length=max_length, padding=True,
                          return_tensors="pt", return_token_type_ids=False)
        loss = loss_fn(batch, index)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if step % progress_every == 0 or step == total_steps:
            elapsed = time.monotonic() - started
            log.info("%s step %d/%d loss %.4f elapsed %.0fs eta %.0fs", name, step, total_steps,
                     np.mean(losses[-progress_every:]), elapsed, elapsed / step * (total_steps - step))
    model.eval()
    last = float(np.mean(losses[-progress_every:])) if losses else float("nan")
    return TrainingRun(steps=step, last_loss=last, seconds=time.monotonic() - started)
