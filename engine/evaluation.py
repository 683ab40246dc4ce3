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


class Selection:
    """The selection rule with its own memory: best-val (FedCLIP: mean val strictly improved) or last."""

    def __init__(self, rule: str, best_val: float | None = None):
        self.rule = rule
        self.best_val = best_val  # -1.0 stands for "a round without a val split", which any later val beats

    def consider(self, mean_val: float | None) -> bool:
        if self.rule == "last":
            return True
        value = mean_val if mean_val is not None else -1.0
        if strictly_improved(value, self.best_val):
            self.best_val = value
            return True
        return False


State = dict[str, torch.Tensor]
Accuracies = dict[str, dict[str, float]]


def _same_tensors(state: State, other: State | None) -> bool:
    """The very same tensor objects: loading ``state`` over ``other`` would change nothing."""
    return other is not None and state.keys() == other.keys() and all(state[k] is other[k] for k in state)


class Evaluator:
    """Accuracy of an adapter state on every client's train/val/test rows and on each held-out domain.

    It loads the states it is asked about into the adapter and leaves ``restore`` loaded afterwards, so the
    federation's own adapter is never left holding an evaluation state.
    """

    def __init__(self, adapter: Adapter, zero_shot_head: torch.nn.Module, clients, holdout: dict[str, np.ndarray],
                 inputs, zero_shot_inputs, labels: torch.Tensor, scale: float, checkpoint: Callable[[], None]):
        self.adapter, self.zero_shot_head = adapter, zero_shot_head
        self.clients, self.holdout = clients, holdout
        self.inputs, self.zero_shot_inputs = inputs, zero_shot_inputs
        self.labels, self.scale, self.checkpoint = labels, scale, checkpoint

    def measure(self, state_for: Callable[[str], State] | None, restore: State | None) -> tuple[Accuracies, dict[str, float]]:
        """``state_for(client)`` gives the state to test a client with; None tests the zero-shot head."""
        zero_shot = state_for is None
        model, inputs = (self.zero_shot_head, self.zero_shot_inputs) if zero_shot else (self.adapter, self.inputs)
        clients: Accuracies = {}
        loaded: State | None = None
        for name, split in self.clients.items():
            state = None if zero_shot else state_for(name)
            # Without personal layers every client sees the same state: load (and, for LoRA, merge) it once.
            if state is not None and not _same_tensors(state, loaded):
                self.adapter.load_trainable_state(state)
                loaded = state
            clients[name] = {
                part: accuracy(model, inputs, self.labels, getattr(split, part), self.scale, checkpoint=self.checkpoint)
                for part in ("train", "val", "test")
            }
        if not zero_shot and restore is not None and not _same_tensors(restore, loaded):
            self.adapter.load_trainable_state(restore)
        holdout = {
            d: accuracy(model, inputs, self.labels, rows, self.scale, checkpoint=self.checkpoint)
            for d, rows in self.holdout.items()
        }
        return clients, holdout

    def wise_curve(self, theta_0: State, theta_1: State, alphas: list[float]) -> list[dict]:
        """WiSE-FT (Wortsman et al.): every client and held-out domain at theta_0 + a (theta_1 - theta_0)."""
        from engine.wise import interpolate

        curve = []
        for alpha in alphas:
            mixed = interpolate(theta_0, theta_1, alpha)
            # The holdout pass runs on the last state loaded, so ``restore`` is the mixed state itself.
            clients, holdout = self.measure(lambda name: mixed, restore=mixed)
            curve.append({
                "alpha": alpha,
                "state": mixed,
                "mean_test": nanmean(a["test"] for a in clients.values()),
                "mean_holdout": nanmean(holdout.values()),
                "holdout": holdout,
                "clients": {n: a["test"] for n, a in clients.items()},
            })
        self.adapter.load_trainable_state(theta_1)
        return curve
