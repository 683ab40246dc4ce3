"""Every aggregation rule against numbers worked out by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import pytest
import torch

from engine.options.strategies import AGGREGATIONS
from engine.presets import PresetError, preset_from_dict
from engine.strategies import ClientUpdate, build_strategy
from engine.strategies.base import STRATEGIES, Strategy

ALL_RULES = {
    "mean", "fedavg", "fedprox", "fedavgm", "fedadagrad", "fedyogi", "fedadam",
    "median", "trimmed_mean", "loadaboost", "one_shot", "local", "centralised",
}  # fmt: skip


def vec(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)  # exact inputs, so hand values match tightly


def update(name: str, values, examples: int = 1, loss: float = 0.0) -> ClientUpdate:
    return ClientUpdate(client=name, state={"w": vec(*values)}, examples=examples, loss=loss)


def offsets(global_state, *clients) -> list[ClientUpdate]:
    """Clients given as (offset from x_t, n_k): x_k = x_t + offset."""
    x = global_state["w"]
    return [
        ClientUpdate(client=f"c{i}", state={"w": x + vec(*offset)}, examples=n, loss=0.0)
        for i, (offset, n) in enumerate(clients)
    ]


def rule(name: str, **knobs) -> Strategy:
    return build_strategy(name, AGGREGATIONS.options_for(name)(**knobs))


def assert_close(actual: torch.Tensor, expected, tol: float = 1e-6) -> None:
    assert torch.allclose(actual.to(torch.float64), torch.tensor(expected, dtype=torch.float64), atol=tol, rtol=0), (
        actual,
        expected,
    )


def test_every_rule_is_registered_and_selectable_in_a_preset():
    assert ALL_RULES <= set(STRATEGIES)
    for name in ALL_RULES:
        preset = preset_from_dict({"federation": {"aggregation": name}})
        assert isinstance(build_strategy(name, preset.federation.aggregation_options), Strategy)


@pytest.mark.parametrize(
    "key, bad",
    [("mu", -0.1), ("server_lr", 0.0), ("server_momentum", 1.5), ("tau", 0.0), ("trim_fraction", 0.6),
     ("loadaboost_max_extra_epochs", -1), ("beta2", 1.2)],
)  # fmt: skip
def test_strategy_knobs_are_bounded_preset_keys(key, bad):
    owner = AGGREGATIONS.owners(key)[0]
    with pytest.raises(PresetError, match=rf"\[federation.{key}\] must be"):
        preset_from_dict({"federation": {"aggregation": owner, key: bad}})


# --- weighted vs uniform -------------------------------------------------------------------------------------


def test_uniform_mean_ignores_sizes_and_fedavg_weights_by_examples():
    updates = [update("a", [1.0, 2.0], examples=1), update("b", [3.0, 6.0], examples=3)]
    x_t = {"w": vec(0.0, 0.0)}
    # uniform: ([1, 2] + [3, 6]) / 2 = [2, 4]
    assert_close(rule("mean").aggregate(x_t, updates)["w"], [2.0, 4.0])
    # p = (1/4, 3/4): [0.25 + 2.25, 0.5 + 4.5] = [2.5, 5.0]
    for name in ("fedavg", "fedprox", "loadaboost", "one_shot"):
        assert_close(rule(name).aggregate(x_t, updates)["w"], [2.5, 5.0])


# --- FedProx ---------------------------------------------------------------------------------------------------


def test_fedprox_penalty_is_half_mu_squared_distance_with_gradient_mu_times_difference():
    prox = rule("fedprox", mu=0.5)
    w = {"a": vec(1.0, 2.0).requires_grad_(), "b": torch.tensor([[3.0]], requires_grad=True)}
    x_t = {"a": vec(0.0, 0.0), "b": torch.tensor([[1.0]]), "personal": vec(9.0)}
    penalty = prox.local_penalty(w, x_t)
    # ||w - x_t||^2 = 1 + 4 + (3 - 1)^2 = 9;  (mu / 2) * 9 = 0.25 * 9 = 2.25
    assert penalty.item() == pytest.approx(2.25)
    penalty.backward()
    # gradient mu (w - x_t) = 0.5 * [1, 2] and 0.5 * 2
    assert_close(w["a"].grad, [0.5, 1.0])
    assert_close(w["b"].grad.reshape(-1), [1.0])
    assert x_t["a"].grad is None


def test_fedprox_with_mu_zero_and_other_rules_add_no_penalty():
    w, x_t = {"a": vec(1.0)}, {"a": vec(0.0)}
    assert rule("fedprox", mu=0.0).local_penalty(w, x_t) is None
    assert rule("fedavg").local_penalty(w, x_t) is None


# --- FedAvgM ---------------------------------------------------------------------------------------------------


def test_fedavgm_momentum_over_two_rounds():
    server = rule("fedavgm", server_lr=0.5, server_momentum=0.9)
    x0 = {"w": vec(1.0, -2.0)}
    # round 1: equal sizes, offsets [1, 0] and [0, 2]: Delta_1 = [0.5, 1.0]
    # v_1 = 0.9 * 0 - Delta_1 = [-0.5, -1.0];  x_1 = x_0 - 0.5 v_1 = [1.25, -1.5]
    x1 = server.aggregate(x0, offsets(x0, ([1.0, 0.0], 1), ([0.0, 2.0], 1)))
    assert_close(x1["w"], [1.25, -1.5])
    # round 2: n = 3 and 1, offsets [0, 0.5] and [1, 0]: Delta_2 = 0.75 [0, 0.5] + 0.25 [1, 0] = [0.25, 0.375]
    # v_2 = 0.9 [-0.5, -1.0] - [0.25, 0.375] = [-0.7, -1.275];  x_2 = x_1 - 0.5 v_2 = [1.6, -0.8625]
    x2 = server.aggregate(x1, offsets(x1, ([0.0, 0.5], 3), ([1.0, 0.0], 1)))
    assert_close(x2["w"], [1.6, -0.8625])


def test_fedavgm_without_momentum_and_unit_rate_is_fedavg():
    x_t = {"w": vec(1.0, 1.0)}
    updates = [update("a", [1.0, 2.0], examples=1), update("b", [3.0, 6.0], examples=3)]
    assert_close(rule("fedavgm", server_lr=1.0, server_momentum=0.0).aggregate(x_t, updates)["w"], [2.5, 5.0])


# --- FedAdagrad / FedYogi / FedAdam -------------------------------------------------------------------------
# Shared inputs: x_0 = [0, 1]; eta 0.1, b1 0.9, b2 0.99, tau 1e-9 (Flower's defaults; v_{-1} = tau^2 = 1e-18
# is far below the tolerance). Round 1: n = 1 with offset [0.8, -0.4] and n = 3 with offset 0:
# Delta_1 = 1/4 [0.8, -0.4] = [0.2, -0.1] (a uniform mean would give [0.4, -0.2]).
# Round 2: two clients of n = 2, offsets [0, 0.6] and 0: Delta_2 = [0, 0.3].
# m_1 = 0.1 Delta_1 = [0.02, -0.01];  m_2 = 0.9 m_1 + 0.1 Delta_2 = [0.018, 0.021].
ROUND_1 = (([0.8, -0.4], 1), ([0.0, 0.0], 3))
ROUND_2 = (([0.0, 0.6], 2), ([0.0, 0.0], 2))


def two_rounds(name: str):
    knobs = {"eta": 0.1, "beta1": 0.9, "tau": 1e-9} | ({} if name == "fedadagrad" else {"beta2": 0.99})
    server = rule(name, **knobs)
    x0 = {"w": vec(0.0, 1.0)}
    x1 = server.aggregate(x0, offsets(x0, *ROUND_1))
    x2 = server.aggregate(x1, offsets(x1, *ROUND_2))
    return server, x1["w"], x2["w"]


def test_fedadagrad_two_rounds():
    server, x1, x2 = two_rounds("fedadagrad")
    # v_1 = Delta_1^2 = [0.04, 0.01];  x_1 = x_0 + 0.1 m_1 / sqrt(v_1) = [0 + 0.1 * 0.1, 1 - 0.1 * 0.1]
    assert_close(x1, [0.01, 0.99])
    # v_2 = v_1 + Delta_2^2 = [0.04, 0.10];  x_2 = [0.01 + 0.1 * 0.018 / 0.2, 0.99 + 0.1 * 0.021 / sqrt(0.1)]
    assert_close(x2, [0.019, 0.9966407830863536])
    assert_close(server.second_moment["w"], [0.04, 0.10], tol=1e-12)


def test_fedyogi_two_rounds():
    server, x1, x2 = two_rounds("fedyogi")
    # v_1 = v_0 - 0.01 Delta^2 sign(v_0 - Delta^2) = tau^2 + 0.01 [0.04, 0.01] = [4e-4, 1e-4]
    # x_1 = x_0 + 0.1 m_1 / sqrt(v_1) = [0 + 0.1 * 0.02 / 0.02, 1 - 0.1 * 0.01 / 0.01] = [0.1, 0.9]
    assert_close(x1, [0.1, 0.9])
    # coordinate 0: Delta^2 = 0 -> v stays 4e-4;  x = 0.1 + 0.1 * 0.018 / 0.02 = 0.19
    # coordinate 1: v_1 < Delta^2 = 0.09 -> v_2 = 1e-4 + 0.01 * 0.09 = 1e-3;  x = 0.9 + 0.1 * 0.021 / sqrt(1e-3)
    assert_close(x2, [0.19, 0.966407830863536])
    assert_close(server.second_moment["w"], [4e-4, 1e-3], tol=1e-12)


def test_fedadam_two_rounds():
    server, x1, x2 = two_rounds("fedadam")
    # v_1 = 0.99 tau^2 + 0.01 [0.04, 0.01] = [4e-4, 1e-4];  x_1 = [0.1, 0.9] as for Yogi
    assert_close(x1, [0.1, 0.9])
    # v_2 = 0.99 [4e-4, 1e-4] + 0.01 [0, 0.09] = [3.96e-4, 9.99e-4]
    # x_2 = [0.1 + 0.1 * 0.018 / sqrt(3.96e-4), 0.9 + 0.1 * 0.021 / sqrt(9.99e-4)]
    assert_close(x2, [0.1904534033733291, 0.9664410597026749])
    assert_close(server.first_moment["w"], [0.018, 0.021], tol=1e-12)
    assert_close(server.second_moment["w"], [3.96e-4, 9.99e-4], tol=1e-12)


def test_fedadam_second_moment_starts_at_tau_squared_as_in_reddi_et_al():
    # eta 1, b1 0, b2 0.5, tau 0.1, one client with Delta = 0.3:
    # v_0 = 0.5 * 0.1^2 + 0.5 * 0.09 = 0.05;  x_1 = 0.3 / (sqrt(0.05) + 0.1) = 0.92705...
    # (Flower's zero init would give v = 0.045 and x_1 = 0.96113...)
    server = rule("fedadam", eta=1.0, beta1=0.0, beta2=0.5, tau=0.1)
    x0 = {"w": vec(0.0)}
    assert_close(server.aggregate(x0, [update("a", [0.3])])["w"], [0.9270509831248422])


def test_server_optimisers_leave_tensors_the_clients_did_not_send_alone():
    x_t = {"w": vec(0.0), "personal": vec(7.0)}
    for name in ("fedavgm", "fedadagrad", "fedyogi", "fedadam"):
        out = rule(name).aggregate(x_t, [update("a", [1.0])])
        assert_close(out["personal"], [7.0])


# --- robust rules ----------------------------------------------------------------------------------------------


def test_coordinate_median_resists_an_outlier():
    honest = [update("a", [1.0, 10.0]), update("b", [2.0, 20.0])]
    outlier = update("evil", [100.0, -1000.0], examples=1000)
    median = rule("median")
    # sorted per coordinate: [1, 2, 100] -> 2;  [-1000, 10, 20] -> 10
    assert_close(median.aggregate({}, honest + [outlier])["w"], [2.0, 10.0])
    # even count, mean of the middle two: [1, 2, 3, 100] -> 2.5;  [-1000, 10, 20, 30] -> 15
    assert_close(median.aggregate({}, honest + [outlier, update("c", [3.0, 30.0])])["w"], [2.5, 15.0])
    # the mean, by contrast, is dragged away: (1 + 2 + 100) / 3
    assert rule("mean").aggregate({}, honest + [outlier])["w"][0].item() == pytest.approx(103 / 3)


def test_trimmed_mean_drops_ceil_beta_m_from_each_end():
    updates = [
        update("a", [1.0, -50.0]),
        update("b", [2.0, 0.0]),
        update("c", [3.0, 1.0]),
        update("d", [4.0, 2.0]),
        update("evil", [100.0, 3.0]),
    ]
    # beta 0.2, m 5: drop ceil(1.0) = 1 per end -> [2, 3, 4] -> 3 and [0, 1, 2] -> 1
    assert_close(rule("trimmed_mean", trim_fraction=0.2).aggregate({}, updates)["w"], [3.0, 1.0])
    # beta 0.1, m 5: ceil(0.5) = 1, the same cut
    assert_close(rule("trimmed_mean", trim_fraction=0.1).aggregate({}, updates)["w"], [3.0, 1.0])
    # beta 0.4, m 5: ceil(2.0) = 2 per end -> only the middle value remains
    assert_close(rule("trimmed_mean", trim_fraction=0.4).aggregate({}, updates)["w"], [3.0, 1.0])
    # beta 0: the plain mean: (1 + 2 + 3 + 4 + 100) / 5 = 22, (-50 + 0 + 1 + 2 + 3) / 5 = -8.8
    assert_close(rule("trimmed_mean", trim_fraction=0.0).aggregate({}, updates)["w"], [22.0, -8.8], tol=1e-5)


def test_trimmed_mean_is_robust_to_float_noise_in_beta_m():
    # 0.1 * 30 = 3.0000000000000004 in floats; the cut must be 3, not 4
    updates = [update(f"c{i}", [float(i)]) for i in range(30)]
    # drop 0..2 and 27..29 -> mean of 3..26 = 14.5
    assert_close(rule("trimmed_mean", trim_fraction=0.1).aggregate({}, updates)["w"], [14.5])


def test_trimmed_mean_with_nothing_left_is_an_error():
    updates = [update(f"c{i}", [float(i)]) for i in range(4)]
    with pytest.raises(ValueError, match="leaving nothing"):
        rule("trimmed_mean", trim_fraction=0.5).aggregate({}, updates)  # ceil(2) + ceil(2) = 4 of 4


# --- LoAdaBoost ------------------------------------------------------------------------------------------------


def test_loadaboost_retrains_clients_above_the_median_loss():
    boost = rule("loadaboost", loadaboost_max_extra_epochs=3)
    even = [update(n, [0.0], loss=loss) for n, loss in (("a", 1.0), ("b", 2.0), ("c", 3.0), ("d", 4.0))]
    assert boost.extra_epochs(even) == {"c": 3, "d": 3}  # median (2 + 3) / 2 = 2.5
    odd = [update(n, [0.0], loss=loss) for n, loss in (("a", 0.5), ("b", 2.0), ("c", 9.0))]
    assert boost.extra_epochs(odd) == {"c": 3}  # median 2.0; "b" equals it, not above
    tied = [update(n, [0.0], loss=1.0) for n in "abc"]
    assert boost.extra_epochs(tied) == {}
    assert rule("loadaboost", loadaboost_max_extra_epochs=0).extra_epochs(even) == {}
    assert rule("fedavg").extra_epochs(even) == {}


# --- one-shot, local, centralised -------------------------------------------------------------------------------


def test_one_shot_spends_the_whole_budget_in_one_round():
    assert rule("one_shot").schedule(10, 2) == (1, 20)
    assert rule("fedavg").schedule(10, 2) == (10, 2)


def test_local_keeps_the_global_state_and_asks_the_runner_to_personalise():
    local = rule("local")
    assert local.personalises_everything and not local.pools_data
    x_t = {"w": vec(1.0, 2.0)}
    out = local.aggregate(x_t, [update("a", [5.0, 5.0])])
    assert_close(out["w"], [1.0, 2.0])
    assert out["w"] is not x_t["w"]


def test_centralised_takes_the_pooled_clients_state():
    central = rule("centralised")
    assert central.pools_data and not central.personalises_everything
    assert_close(central.aggregate({"w": vec(0.0)}, [update("pooled", [4.0])])["w"], [4.0])
    with pytest.raises(ValueError, match="single pooled client"):
        central.aggregate({"w": vec(0.0)}, [update("a", [1.0]), update("b", [2.0])])


@pytest.mark.parametrize("name", sorted(ALL_RULES - {"local"}))
def test_no_updates_is_an_error_not_a_silent_step(name):
    with pytest.raises(ValueError):
        rule(name).aggregate({"w": vec(0.0)}, [])


@pytest.mark.parametrize("name", sorted(ALL_RULES - {"centralised"}))
def test_aggregate_keeps_the_adapters_dtype(name):
    x_t = {"w": torch.zeros(3, dtype=torch.float32)}
    updates = [ClientUpdate(f"c{i}", {"w": torch.full((3,), float(i))}, examples=i + 1, loss=0.0) for i in range(3)]
    assert rule(name).aggregate(x_t, updates)["w"].dtype == torch.float32


def test_fedprox_does_not_pull_personal_layers_towards_the_server():
    # The runner hands the rule the global state of the shared tensors only (personal ones never leave
    # the client), so a personal tensor has no x_t to be pulled to.
    prox = rule("fedprox", mu=2.0)
    w = {"body.w": vec(1.0).requires_grad_(), "head.w": vec(5.0).requires_grad_()}
    x_t_shared = {"body.w": vec(0.0)}
    # only body.w counts: (2 / 2) * 1^2 = 1
    assert prox.local_penalty(w, x_t_shared).item() == pytest.approx(1.0)
