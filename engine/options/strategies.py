"""Aggregation rules (``federation.aggregation``) and the keys each one reads from ``[federation]``."""

from __future__ import annotations

from dataclasses import dataclass

from engine.schema import NoOptions, OptionsCatalog, knob

AGGREGATIONS = OptionsCatalog("aggregation")

AGGREGATIONS.register("mean", help="FedCLIP: the uniform mean of the client adapters")(NoOptions)
AGGREGATIONS.register("fedavg", help="McMahan et al.: the mean weighted by training examples")(NoOptions)
AGGREGATIONS.register("local", help="baseline: every client keeps its own adapter, nothing is shared")(NoOptions)
AGGREGATIONS.register("centralised", help="baseline: one client trains on every client's data pooled")(NoOptions)
AGGREGATIONS.register("median", help="Yin et al.: the coordinate-wise median")(NoOptions)
AGGREGATIONS.register("one_shot", help="one round of rounds x E local epochs, then one average")(NoOptions)


@AGGREGATIONS.register("fedprox", help="Li et al.: fedavg with a proximal term in local training")
@dataclass(frozen=True)
class FedProxOptions:
    # Above 1e4 the proximal term swamps any loss and pins every client to x_t.
    mu: float = knob(0.01, min=0.0, max=1e4, help="fedprox: proximal weight, loss += (mu/2)||w - x_t||^2")


@AGGREGATIONS.register("fedavgm", help="Hsu et al.: server momentum on the averaged update")
@dataclass(frozen=True)
class FedAvgMOptions:
    # A server step 100x the averaged update is already far past any published setting.
    server_lr: float = knob(1.0, min=0.0, min_exclusive=True, max=100.0, help="fedavgm: server learning rate eta_s")
    server_momentum: float = knob(0.9, min=0.0, max=1.0, help="fedavgm: server momentum beta")


@dataclass(frozen=True)
class FedAdagradOptions:
    eta: float = knob(0.1, min=0.0, min_exclusive=True, max=100.0,
                      help="fedadagrad/fedyogi/fedadam: server learning rate")
    beta1: float = knob(0.9, min=0.0, max=1.0, help="fedadagrad/fedyogi/fedadam: first-moment decay")
    # Reddi et al. use tau in [1e-9, 1e-3]; v_0 = tau^2 above 1 makes the step vanish.
    tau: float = knob(1e-9, min=0.0, min_exclusive=True, max=1.0,
                      help="fedadagrad/fedyogi/fedadam: adaptivity, v_0 = tau^2")


AGGREGATIONS.register("fedadagrad", help="Reddi et al.: adaptive server optimiser, Adagrad")(FedAdagradOptions)


@AGGREGATIONS.register("fedyogi", help="Reddi et al.: adaptive server optimiser, Yogi")
@AGGREGATIONS.register("fedadam", help="Reddi et al.: adaptive server optimiser, Adam")
@dataclass(frozen=True)
class FedAdamOptions(FedAdagradOptions):
    beta2: float = knob(0.99, min=0.0, max=1.0, help="fedyogi/fedadam: second-moment decay")


@AGGREGATIONS.register("trimmed_mean", help="Yin et al.: drop the highest and lowest per coordinate, average")
@dataclass(frozen=True)
class TrimmedMeanOptions:
    trim_fraction: float = knob(
        0.2, min=0.0, max=0.5, help="trimmed_mean: beta; drop ceil(beta m) highest and lowest per coordinate"
    )


@AGGREGATIONS.register("loadaboost", help="Huang et al.: clients above the median loss train more")
@dataclass(frozen=True)
class LoAdaBoostOptions:
    # Each extra epoch is a whole local pass; 1000 already multiplies a round's work a thousandfold.
    loadaboost_max_extra_epochs: int = knob(
        1, min=0, max=1000, help="loadaboost: extra local epochs for a client whose loss exceeds the median"
    )
