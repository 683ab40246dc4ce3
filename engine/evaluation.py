"""Top-1 accuracy of an adapter against the class prompts, and the reference's selection rule."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from engine.adapters.base import Adapter


@torch.no_grad()
def accuracy(
    adapter: Adapter,
    inputs: Callable[[np.ndarray], torch.Tensor],
    labels: torch.Tensor,
    rows: np.ndarray,
    scale: float,
    batch_size: int = 1024,
    checkpoint: Callable[[], None] = lambda: None,
) -> float:
    """Share of ``rows`` whose arg-max class logit is the label; NaN for an empty set.

    ``checkpoint`` runs between batches, so a stop request is honoured while a large set is evaluated."""
    if len(rows) == 0:
        return float("nan")
    was_training = adapter.training
    adapter.eval()
    correct = 0
    for start in range(0, len(rows), batch_size):
        checkpoint()
        batch = rows[start : start + batch_size]
        predicted = adapter(inputs(batch)).logits(scale).argmax(dim=1)
        correct += int((predicted.cpu() == labels[batch]).sum())
    adapter.train(was_training)
    return correct / len(rows)


def strictly_improved(mean_val: float, best_so_far: float | None) -> bool:
    """FedCLIP's rule: a round is selected when its mean val accuracy beats every earlier round's."""
    return best_so_far is None or mean_val > best_so_far


def nanmean(values) -> float | None:
    values = [v for v in values if v == v]
    return float(np.mean(values)) if values else None
