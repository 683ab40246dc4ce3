"""FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks", MLSys)."""

from __future__ import annotations

import torch

from engine.strategies.base import (
    ClientUpdate,
    State,
    Strategy,
    example_weights,
    register_strategy,
    require_updates,
    weighted_mean,
)


@register_strategy
class FedProx(Strategy):
    """Client k minimises h_k(w) = F_k(w) + (mu/2) ||w - x_t||^2; the server takes FedAvg's weighted mean.

    The proximal term's gradient is mu (w - x_t): it pulls each local model back towards the round's
    global model, limiting client drift on heterogeneous data. mu = 0 is FedAvg exactly. Typical mu
    in {0.001, 0.01, 0.1, 1} (the paper's grid). Preset key: ``federation.mu``.

    Note: PersonalizedFL's code (the FedCLIP reference repository) adds the *unsquared* norm
    mu/2 * ||w - x_t||; we implement the paper's squared norm, whose gradient is the documented mu (w - x_t).
    """

    name = "fedprox"

    def local_penalty(self, params: dict[str, torch.Tensor], global_state: State) -> torch.Tensor | None:
        """(mu/2) * sum over the shared tensors of ||w - x_t||^2; x_t is a constant (no gradient to it).

        Shared tensors: those in ``params`` that are also in ``global_state``. Personal layers (FedPer) never
        leave the client, so the runner passes neither their parameters nor a global value to pull them to.
        """
        mu = float(self.options.mu)
        if mu == 0.0:
            return None
        shared = [name for name in params if name in global_state]
        if not shared:
            return None
        squared = sum(
            (params[name] - global_state[name].detach().to(params[name].device, params[name].dtype)).pow(2).sum()
            for name in shared
        )
        return 0.5 * mu * squared

    def aggregate(self, global_state: State, updates: list[ClientUpdate]) -> State:
        require_updates(updates, self.name)
        return weighted_mean([u.state for u in updates], example_weights(updates))
