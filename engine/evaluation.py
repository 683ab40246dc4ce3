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


@torch.no_grad()
def predictions(
    model: torch.nn.Module,
    inputs: Callable[[np.ndarray], torch.Tensor],
    rows: np.ndarray,
    scale: float,
    batch_size: int = 1024,
    checkpoint: Callable[[], None] = lambda: None,
) -> np.ndarray:
    """The arg-max class of each of ``rows``, in eval mode; ``checkpoint`` runs between batches."""
    if len(rows) == 0:
        return np.zeros(0, dtype=np.int64)
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(rows), batch_size):
        checkpoint()
        out.append(model(inputs(rows[start : start + batch_size])).logits(scale).argmax(dim=1))
    model.train(was_training)
    return torch.cat(out).cpu().numpy()


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
        self._remembered_union: tuple[list, list[np.ndarray], np.ndarray] | None = None

    def measure(self, state_for: Callable[[str], State] | None, restore: State | None) -> tuple[Accuracies, dict[str, float]]:
        """``state_for(client)`` gives the state to test a client with; None tests the zero-shot head.

        The held-out domains are tested with ``restore`` (the server's adapter) when it is given, else with
        the last client's state. When every client shares one state (no personal layers) and the held-out test
        uses it too, all rows go through the model in one pass and each split's accuracy is read off by
        indexing; otherwise one pass per client over its train/val/test rows, and one for the held-out rows."""
        zero_shot = state_for is None
        model, inputs = (self.zero_shot_head, self.zero_shot_inputs) if zero_shot else (self.adapter, self.inputs)
        parts = ("train", "val", "test")
        states = {} if zero_shot else {name: state_for(name) for name in self.clients}
        first = next(iter(states.values()), None)
        shared = zero_shot or (
            all(_same_tensors(state, first) for state in states.values())
            and (restore is None or _same_tensors(restore, first))
        )
        if shared:
            if first is not None:
                self.adapter.load_trainable_state(first)
            sets = {(name, part): getattr(split, part) for name, split in self.clients.items() for part in parts}
            sets.update({("holdout", d): rows for d, rows in self.holdout.items()})
            scores = self._accuracies(model, inputs, sets)
            clients = {name: {part: scores[(name, part)] for part in parts} for name in self.clients}
            return clients, {d: scores[("holdout", d)] for d in self.holdout}
        clients: Accuracies = {}
        loaded: State | None = None
        for name, split in self.clients.items():
            state = states[name]
            # Without personal layers every client sees the same state: load (and, for LoRA, merge) it once.
            if not _same_tensors(state, loaded):
                self.adapter.load_trainable_state(state)
                loaded = state
            scores = self._accuracies(model, inputs, {part: getattr(split, part) for part in parts})
            clients[name] = {part: scores[part] for part in parts}
        if restore is not None and not _same_tensors(restore, loaded):
            self.adapter.load_trainable_state(restore)
        return clients, self._accuracies(model, inputs, dict(self.holdout))

    def _accuracies(self, model, inputs, sets: dict) -> dict:
        """Accuracy on each row set (NaN for an empty one) from one pass over the rows of all of them."""
        wanted, union = self._union(list(sets.values()))
        predicted = predictions(model, inputs, union, self.scale, checkpoint=self.checkpoint)
        hits = np.zeros(int(union.max()) + 1 if len(union) else 0, dtype=bool)
        hits[union] = predicted == self.labels.numpy()[union]
        return {key: (int(hits[rows].sum()) / len(rows) if len(rows) else float("nan")) for key, rows in zip(sets, wanted)}

    def _union(self, row_sets: list) -> tuple[list[np.ndarray], np.ndarray]:
        """The sets as int64 arrays and the sorted union of their rows; remembered for the very same sets, which
        every round asks about again."""
        remembered = self._remembered_union
        if remembered is not None and len(remembered[0]) == len(row_sets) and all(
                a is b for a, b in zip(remembered[0], row_sets)):
            return remembered[1], remembered[2]
        wanted = [np.asarray(rows, dtype=np.int64) for rows in row_sets]
        union = np.unique(np.concatenate(wanted)) if wanted else np.zeros(0, dtype=np.int64)
        self._remembered_union = (list(row_sets), wanted, union)
        return wanted, union

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
