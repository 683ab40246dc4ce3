"""Coordinate-wise robust aggregation (Yin et al. 2018, "Byzantine-Robust Distributed Learning:
Towards Optimal Statistical Rates", ICML). Both are uniform over clients: a robust statistic has no
example weights, so a large client cannot buy its way past the trimming."""

from __future__ import annotations

import torch

from engine.strategies.base import (
    ClientUpdate,
    State,
    Strategy,
    ceil_fraction,
    register_strategy,
    require_updates,
    stacked,
)


@register_strategy
class CoordinateMedian(Strategy):
    """x_{t+1}[i] = median_k x_k[i] per coordinate; for an even number of clients the mean of the two
    middle values (numpy's and Flower's FedMedian convention; torch.median would return the lower one)."""

    name = "median"

    def aggregate(self, global_state: State, updates: list[ClientUpdate]) -> State:
        require_updates(updates, self.name)
        out: State = {}
        for key in updates[0].state:
            ordered = stacked(updates, key).sort(dim=0).values
            count, middle = ordered.shape[0], ordered.shape[0] // 2
            value = ordered[middle] if count % 2 else (ordered[middle - 1] + ordered[middle]) / 2
            out[key] = value.to(updates[0].state[key].dtype)
        return out


@register_strategy
class TrimmedMean(Strategy):
    """Per coordinate, drop the b = ceil(beta m) largest and b smallest of the m client values and
    average the remaining m - 2b. ``federation.trim_fraction`` is beta. Raises when m - 2b <= 0.

    Flower's FedTrimmedAvg (scipy's trim_mean) cuts floor(beta m) instead; with beta = 0.2 and 4 clients
    that trims nothing, whereas this rule trims one value from each end.
    """

    name = "trimmed_mean"

    def aggregate(self, global_state: State, updates: list[ClientUpdate]) -> State:
        require_updates(updates, self.name)
        count = len(updates)
        beta = float(self.options.trim_fraction)
        cut = ceil_fraction(beta, count)
        if count - 2 * cut <= 0:
            raise ValueError(
                f"trimmed_mean: trim_fraction {beta} drops {cut} largest and {cut} smallest of {count} clients, "
                "leaving nothing to average; lower federation.trim_fraction or sample more clients"
            )
        out: State = {}
        for key in updates[0].state:
            ordered = stacked(updates, key).sort(dim=0).values
            out[key] = ordered[cut : count - cut].mean(dim=0).to(updates[0].state[key].dtype)
        return out
