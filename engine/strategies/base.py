"""The strategy interface, its registry and the helpers every rule builds on.

The runner's contract with a strategy (one object lives for the whole run, so server state such as
momentum persists across rounds):

- ``schedule(rounds, local_epochs) -> (rounds, local_epochs)``: called once before round 1.
- ``local_penalty(params, global_state) -> Tensor | None``: added to every local training step's loss.
- ``extra_epochs(updates) -> {client: epochs}``: after local training, before aggregation; the runner
  trains those clients that many more epochs (from where they stopped) and replaces their updates.
- ``aggregate(global_state, updates) -> State``: once per round with this round's participating,
  non-skipped clients (never an empty list: rules raise ValueError; keep x_t when every client
  skipped); returns x_{t+1} for at least every tensor the clients sent. Tensors the clients did not send
  may be absent from the result (mean, fedavg, median, ...) or carried over from x_t (server
  optimisers), so merge: ``new_global = {**global_state, **strategy.aggregate(global_state, updates)}``.
- class attributes ``personalises_everything`` (keep each client's own state, no federation) and
  ``pools_data`` (pool every client's train data into one client) change how the runner sets up the run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from engine.options.strategies import AGGREGATIONS
from engine.registry import Registry

State = dict[str, torch.Tensor]


@dataclass
class ClientUpdate:
    client: str
    state: State  # the client's trained adapter tensors (after decompression, if any)
    examples: int  # n_k, training examples
    loss: float  # mean training loss this round


class Strategy:
    name: ClassVar[str] = ""
    # "local": the runner keeps every client's own trained state (nothing is shared or averaged).
    personalises_everything: ClassVar[bool] = False
    # "centralised": the runner pools all clients' train data into a single client.
    pools_data: ClassVar[bool] = False

    def __init__(self, options: Any = None):
        # The rule's own keys (engine/options/strategies.py); their defaults live only there.
        self.options = options if options is not None else AGGREGATIONS.options_for(self.name)()

    # Server state a resumed run must get back: attributes holding {tensor name: tensor} (momentum, moments).
    persistent: ClassVar[tuple[str, ...]] = ()

    def state_tensors(self) -> State:
        return {f"{attr}/{key}": value for attr in self.persistent for key, value in getattr(self, attr).items()}

    def load_state_tensors(self, tensors: State) -> None:
        for attr in self.persistent:
            setattr(self, attr, {k.split("/", 1)[1]: v for k, v in tensors.items() if k.split("/", 1)[0] == attr})

    def aggregate(self, global_state: State, updates: list[ClientUpdate]) -> State:  # pragma: no cover
        """x_{t+1} from x_t (``global_state``) and this round's client models x_k^{t+1}."""
        raise NotImplementedError

    def local_penalty(self, params: dict[str, torch.Tensor], global_state: State) -> torch.Tensor | None:
        """A term added to each local step's loss (FedProx); None for rules without one."""
        return None

    def extra_epochs(self, updates: list[ClientUpdate]) -> dict[str, int]:
        """Clients that train again before aggregation, and for how many epochs (LoAdaBoost)."""
        return {}

    def schedule(self, rounds: int, local_epochs: int) -> tuple[int, int]:
        """The (rounds, local epochs per round) the run actually uses; identity except for one-shot."""
        return rounds, local_epochs


def weighted_mean(states: list[State], weights: list[float]) -> State:
    """sum_k w_k x_k with w normalised to sum 1, accumulated in float64 so the order of clients does not matter."""
    total = float(sum(weights))
    if not states or total <= 0:
        raise ValueError("weighted_mean needs at least one state and positive weights")
    out: State = {}
    for key in states[0]:
        acc = torch.zeros_like(states[0][key], dtype=torch.float64)
        for state, weight in zip(states, weights):
            acc += state[key].to(torch.float64) * (weight / total)
        out[key] = acc.to(states[0][key].dtype)
    return out


def require_updates(updates: list[ClientUpdate], rule: str) -> None:
    if not updates:
        raise ValueError(f"{rule}: aggregate needs at least one client update (keep x_t when every client skipped)")


def example_weights(updates: list[ClientUpdate]) -> list[float]:
    """n_k per client; weighted_mean normalises them to p_k = n_k / sum_j n_j."""
    return [float(u.examples) for u in updates]


def pseudo_gradient(global_state: State, updates: list[ClientUpdate]) -> State:
    """Delta_t = sum_k p_k (x_k^{t+1} - x_t), in float64 (Reddi et al. 2021, Algorithm 2).

    Only the tensors the clients sent are included: anything else in ``global_state`` (for example
    personal layers that never leave the clients) is not the server's to move.
    """
    averaged = weighted_mean([u.state for u in updates], example_weights(updates))
    return {k: v.to(torch.float64) - global_state[k].to(torch.float64) for k, v in averaged.items()}


def apply_step(global_state: State, step: State) -> State:
    """x_t + step for the keys in ``step``; the other keys of x_t are carried over unchanged."""
    out = {k: v.clone() for k, v in global_state.items()}
    for key, value in step.items():
        out[key] = (global_state[key].to(torch.float64) + value).to(global_state[key].dtype)
    return out


def stacked(updates: list[ClientUpdate], key: str) -> torch.Tensor:
    """The clients' values of one tensor as a float64 [m, ...] stack (m = number of clients)."""
    return torch.stack([u.state[key].to(torch.float64) for u in updates])


def median_of(values: list[float]) -> float:
    """The usual median: the middle value, or the mean of the two middle values for an even count."""
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def ceil_fraction(fraction: float, count: int) -> int:
    """ceil(fraction * count), robust to float noise (0.1 * 30 = 3.0000000000000004 must give 3, not 4)."""
    return math.ceil(round(fraction * count, 9))


STRATEGIES = Registry("aggregation", "name")
register_strategy = STRATEGIES.register


def build_strategy(name: str, options: Any = None) -> Strategy:
    return STRATEGIES.build(name, options)
