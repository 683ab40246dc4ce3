"""Server-side optimisers on the pseudo-gradient Delta_t = sum_k p_k (x_k^{t+1} - x_t).

FedAvgM (Hsu et al. 2019, "Measuring the Effects of Non-Identical Data Distribution for Federated
Visual Classification") and FedAdagrad / FedYogi / FedAdam (Reddi et al. 2021, "Adaptive Federated
Optimization", ICLR, Algorithm 2). Each object keeps its moment buffers for the whole run, keyed by
tensor name, in float64 so that long runs do not accumulate rounding error.
"""

from __future__ import annotations

import torch

from engine.strategies.base import (
    ClientUpdate,
    State,
    Strategy,
    apply_step,
    pseudo_gradient,
    register_strategy,
    require_updates,
)


@register_strategy
class FedAvgM(Strategy):
    """Server momentum: v_{t+1} = beta v_t - Delta_t;  x_{t+1} = x_t - eta_s v_{t+1};  v_0 = 0.

    Preset keys: ``federation.server_momentum`` (beta) and ``federation.server_lr`` (eta_s).
    beta = 0 with eta_s = 1 is FedAvg exactly. Same update as Flower's FedAvgM, whose
    pseudo-gradient has the opposite sign (x_t - avg) and momentum m = beta m + (x_t - avg).
    """

    name = "fedavgm"

    persistent = ("velocity",)

    def __init__(self, options=None):
        super().__init__(options)
        self.velocity: State = {}

    def aggregate(self, global_state: State, updates: list[ClientUpdate]) -> State:
        require_updates(updates, self.name)
        beta, server_lr = float(self.options.server_momentum), float(self.options.server_lr)
        step: State = {}
        for key, delta in pseudo_gradient(global_state, updates).items():
            previous = self.velocity.get(key, torch.zeros_like(delta))
            self.velocity[key] = beta * previous - delta
            step[key] = -server_lr * self.velocity[key]
        return apply_step(global_state, step)


class AdaptiveServerOptimizer(Strategy):
    """Reddi et al. 2021, Algorithm 2, shared by FedAdagrad, FedYogi and FedAdam:

        m_t     = b1 m_{t-1} + (1 - b1) Delta_t                 (m_{-1} = 0)
        v_t     = second_moment(v_{t-1}, Delta_t^2)             (v_{-1} = tau^2)
        x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau)

    Preset keys: ``federation.eta`` (0.1), ``beta1`` (0.9), ``beta2`` (0.99), ``tau`` (1e-9): Flower's
    defaults (its newest strategies use tau = 1e-3).

    v_{-1} = tau^2: the paper's Algorithm 2 initialises "v_{-1} >= tau^2"; we take the bound itself.
    Flower initialises v to zeros instead (all its versions), and its newest FedAdam also multiplies eta by
    Adam's bias correction sqrt(1 - b2^t) / (1 - b1^t), which is not in Reddi et al.; we follow the
    paper. With Flower's tau = 1e-9 the two inits differ by 1e-18 in v, far below float precision of any
    real update; they differ visibly only for large tau and tiny updates.
    """

    persistent = ("first_moment", "second_moment")

    def __init__(self, options=None):
        super().__init__(options)
        self.first_moment: State = {}
        self.second_moment: State = {}

    def next_second_moment(self, previous: torch.Tensor, squared_delta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover

    def aggregate(self, global_state: State, updates: list[ClientUpdate]) -> State:
        require_updates(updates, self.name)
        options = self.options
        eta, beta1, tau = float(options.eta), float(options.beta1), float(options.tau)
        step: State = {}
        for key, delta in pseudo_gradient(global_state, updates).items():
            m_previous = self.first_moment.get(key, torch.zeros_like(delta))
            v_previous = self.second_moment.get(key, torch.full_like(delta, tau * tau))
            m = beta1 * m_previous + (1.0 - beta1) * delta
            v = self.next_second_moment(v_previous, delta * delta)
            self.first_moment[key], self.second_moment[key] = m, v
            step[key] = eta * m / (v.sqrt() + tau)
        return apply_step(global_state, step)


@register_strategy
class FedAdagrad(AdaptiveServerOptimizer):
    """v_t = v_{t-1} + Delta_t^2 (Reddi et al. 2021). Flower's FedAdagrad hard-codes b1 = 0 (no momentum);
    we keep Algorithm 2's m_t with ``federation.beta1``: set beta1 = 0 to match Flower."""

    name = "fedadagrad"

    def next_second_moment(self, previous: torch.Tensor, squared_delta: torch.Tensor) -> torch.Tensor:
        return previous + squared_delta


@register_strategy
class FedYogi(AdaptiveServerOptimizer):
    """v_t = v_{t-1} - (1 - b2) Delta_t^2 sign(v_{t-1} - Delta_t^2) (Reddi et al. 2021; Zaheer et al. 2018)."""

    name = "fedyogi"

    def next_second_moment(self, previous: torch.Tensor, squared_delta: torch.Tensor) -> torch.Tensor:
        beta2 = float(self.options.beta2)
        return previous - (1.0 - beta2) * squared_delta * torch.sign(previous - squared_delta)


@register_strategy
class FedAdam(AdaptiveServerOptimizer):
    """v_t = b2 v_{t-1} + (1 - b2) Delta_t^2 (Reddi et al. 2021; no bias correction, as in the paper)."""

    name = "fedadam"

    def next_second_moment(self, previous: torch.Tensor, squared_delta: torch.Tensor) -> torch.Tensor:
        beta2 = float(self.options.beta2)
        return beta2 * previous + (1.0 - beta2) * squared_delta
