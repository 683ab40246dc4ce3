"""The ClientApp's side of a Flower run: one client's round, exactly as ``engine.file_rounds`` trains a site.

The server sends the resolved preset, the round, the roster and cohort and the global adapter's shared
tensors; this SuperNode's node config says which client it is and where its things are (``client``,
``data-root``, ``cache-dir``, ``device``, ``threads``, ``pretrained``, ``encode-batch-size``, ``state-dir``,
``set``: see ``engine.flower``). Then ``engine.file_rounds``: ``build_side`` (data, then the adapter under
``torch.manual_seed(run.seed)``, as the runner), the client's own rows, ``train_site`` (``Federation.
train_client`` with the client's random stream replayed from seed and cohorts, the delta, the skip rule, the
codec's ``encode``) and the state a preset keeps at the site (Adam's moments, personal layers, top-k
residuals) in ``state-dir``, never sent. Checks before training: the protocol, the client is in the run and
in this round's cohort, the preset draws the same cohort, this site's CLIP weights are the server's, the
tensors received are this adapter's shared tensors. Each failure is one line (``FlowerError``); the ClientApp
turns it into Flower's error reply, which the server reports as this client dropping out of the round.
"""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path
from typing import Any, Callable

import torch

from engine import file_rounds as fr
from engine.flower import NODE_OVERRIDES, NODE_SET, NODE_STATE_DIR, PROTOCOL, FlowerError, client_name, split_overrides

State = dict[str, torch.Tensor]
Log = Callable[[str, str], None]


def _quiet(level: str, text: str) -> None:
    pass


def node_overrides(node_config: dict[str, Any]) -> list[str]:
    """The node config as ``--set`` overrides; only keys a site may set for itself."""
    overrides = [f"{key}={node_config[name]}" for name, key in NODE_OVERRIDES.items() if name in node_config]
    overrides += split_overrides(node_config.get(NODE_SET, ""))
    try:
        fr.check_client_overrides(overrides)
    except fr.FileRoundError as error:
        raise FlowerError(f"node config: {error}") from None
    return overrides


def _field(config: dict[str, Any], key: str, kind: type) -> Any:
    value = config.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise FlowerError(f"the server's message has no valid {key!r}")
    return value


def train(config: dict[str, Any], shared: State, node_config: dict[str, Any], log: Log = _quiet) -> fr.SiteUpdate:
    """This site's client trains the round in ``config`` from ``shared``; its update, its state kept here."""
    from engine.presets import preset_from_raw
    from engine.resolve import resolve
    from engine.schema import PresetError

    client = client_name(node_config)
    if config.get("protocol") != PROTOCOL:
        raise FlowerError(f"the server speaks protocol {config.get('protocol')!r}, this ClientApp {PROTOCOL}: "
                          "install the same fedtui on both sides")
    run_id = _field(config, "run-id", str)
    round_ = _field(config, "round", int)
    roster = [str(n) for n in _field(config, "roster", list)]
    cohort = [str(n) for n in _field(config, "cohort", list)]
    shared_keys = [str(n) for n in _field(config, "shared-keys", list)]
    where = f"round {round_} of run {run_id}"
    if client not in roster:
        raise FlowerError(f"{where}: no client {client!r} in this run (clients: {', '.join(roster)}); "
                          "check this SuperNode's --node-config client")
    if client not in cohort:
        raise FlowerError(f"{where}: {client} is not in this round's cohort ({', '.join(cohort)})")
    overrides = node_overrides(node_config)
    state_dir = node_config.get(NODE_STATE_DIR) or None
    try:
        raw = tomllib.loads(_field(config, "preset", str))
        preset = resolve(preset_from_raw(raw, Path.cwd() / "flower-preset.toml", overrides,
                                         source=f"the preset of run {run_id} (with this SuperNode's node config)"))
    except tomllib.TOMLDecodeError as error:
        raise FlowerError(f"{where}: the server's preset is not valid TOML: {error}") from None
    except PresetError as error:
        raise FlowerError(str(error)) from None
    side = fr.build_side(preset, True, log)
    if side.backbone.fingerprint != _field(config, "weights-fingerprint", str):
        raise FlowerError(f"this site's CLIP weights ({side.backbone.weights}, sha256 {side.backbone.fingerprint[:16]}) "
                          "are not the server's; every site must load the same weights (node config: pretrained)")
    if client not in [c.name for c in side.data.clients]:
        raise FlowerError(f"this site's data has no client {client!r} (it has: "
                          f"{', '.join(c.name for c in side.data.clients)}); check data-root / set data.domains")
    if fr.cohort(preset, roster, round_) != cohort:
        raise FlowerError(f"{where}: the cohort sent is not the one the preset draws for round {round_}")
    theta_0 = side.adapter.trainable_state()
    if sorted(shared) != sorted(shared_keys) or not set(shared) <= set(theta_0):
        raise FlowerError(f"{where}: the tensors received are not this adapter's shared tensors")
    global_state = {k: v.detach().clone() for k, v in theta_0.items()}
    global_state.update({k: v.to(theta_0[k].device) for k, v in shared.items()})
    from safetensors.torch import save as st_save

    digest = hashlib.sha256(st_save({k: shared[k].contiguous().cpu() for k in sorted(shared)})).hexdigest()
    try:
        site = fr.train_site(side, client, round_, roster, global_state, shared_keys, run_id, f"flower:{digest}",
                             state_dir, where)
    except fr.FileRoundError as error:
        raise FlowerError(str(error).replace("give --state DIR", "start this SuperNode with --node-config "
                                             "\"state-dir='DIR'\"")) from None
    site.keep_state()  # before the reply leaves: the next round starts from it whether or not the reply arrives
    return site
