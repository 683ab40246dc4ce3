"""One client's local training: E epochs of shuffled mini-batches on its own rows."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from engine.adapters.base import Adapter
from engine.losses import LOSSES
from engine.presets import TrainSection


@dataclass
class LocalResult:
    mean_loss: float
    steps: int
    seconds: float


def make_optimizer(adapter: Adapter, train: TrainSection) -> torch.optim.Optimizer:
    """torch Adam with L2-coupled weight decay, as FedCLIP's reference (not AdamW)."""
    params = [p for p in adapter.parameters() if p.requires_grad]
    return torch.optim.Adam(
        params, lr=train.lr, betas=tuple(train.betas), eps=train.eps, weight_decay=train.weight_decay
    )


class NonFiniteLoss(ArithmeticError):
    """Local training met a nan or inf loss; the runner names the client and round and ends the run as diverged."""


def train_locally(
    adapter: Adapter,
    optimizer: torch.optim.Optimizer,
    inputs: Callable[[np.ndarray], torch.Tensor],
    labels: torch.Tensor,
    rows: np.ndarray,
    train: TrainSection,
    epochs: int,
    scale: float,
    generator: torch.Generator,
    penalty: Callable[[], torch.Tensor | None] = lambda: None,
    checkpoint: Callable[[], None] = lambda: None,
    on_step: Callable[[int, int, float], None] = lambda step, steps, loss: None,
) -> LocalResult:
    """Batches of one sample are skipped (the reference's ``if len(text) > 1``): the in-batch loss needs two."""
    started = time.perf_counter()
    loss_fn = LOSSES[train.loss]
    batch = train.batch_size
    per_epoch = len(rows) // batch + (1 if len(rows) % batch > 1 else 0)
    total_steps = per_epoch * epochs
    adapter.train()
    losses: list[float] = []
    device = next(adapter.parameters()).device
    for _ in range(epochs):
        order = rows[torch.randperm(len(rows), generator=generator).numpy()]
        for start in range(0, len(order), batch):
            chunk = order[start : start + batch]
            if len(chunk) < 2:
                continue
            checkpoint()
            scores = adapter(inputs(chunk))
            loss = loss_fn(scores, labels[chunk].to(device), scale)
            extra = penalty()
            total = loss if extra is None else loss + extra
            if not torch.isfinite(total.detach()):
                # Stepping on a non-finite loss would poison every parameter it touches, and then the average.
                raise NonFiniteLoss(f"loss {float(total.detach())} at step {len(losses) + 1} of {total_steps}")
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            on_step(len(losses), total_steps, losses[-1])
    mean = float(np.mean(losses)) if losses else float("nan")
    return LocalResult(mean, len(losses), time.perf_counter() - started)
