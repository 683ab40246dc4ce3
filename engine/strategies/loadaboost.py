"""LoAdaBoostFedAvg (Huang et al. 2020, "LoAdaBoost: Loss-based AdaBoost federated machine learning
with reduced computational complexity on IID and non-IID intensive care data", PLOS ONE)."""

from __future__ import annotations

from engine.strategies.base import (
    ClientUpdate,
    State,
    Strategy,
    example_weights,
    median_of,
    register_strategy,
    require_updates,
    weighted_mean,
)


@register_strategy
class LoAdaBoost(Strategy):
    """A client whose local loss this round exceeds the median of the clients' losses keeps training
    before its model is aggregated; then FedAvg's weighted mean.

    ``extra_epochs`` gives every client with loss > median (strictly) ``federation.loadaboost_max_extra_epochs``
    more epochs: the bound on the extra work. Clients at or below the median are not retrained, so at
    most half of the clients do extra work. The paper's clients may stop early once their loss falls
    below the threshold; this hook returns the bound, which the runner spends in full.
    """

    name = "loadaboost"

    def extra_epochs(self, updates: list[ClientUpdate]) -> dict[str, int]:
        budget = int(self.options.loadaboost_max_extra_epochs)
        if not updates or budget <= 0:
            return {}
        threshold = median_of([u.loss for u in updates])
        return {u.client: budget for u in updates if u.loss > threshold}

    def aggregate(self, global_state: State, updates: list[ClientUpdate]) -> State:
        require_updates(updates, self.name)
        return weighted_mean([u.state for u in updates], example_weights(updates))
