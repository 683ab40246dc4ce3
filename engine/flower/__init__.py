"""Federated rounds over Flower's deployment runtime: a SuperLink, one SuperNode per client, real processes.

The transport is Flower's (``flwr``, the ``flower`` extra: ``pip install 'fedtui[flower]'``); everything that
decides a number is the engine's own, the pieces ``engine.file_rounds`` already reuses for one site's round:

    server (ServerApp)   engine.runner's run lifecycle and run directory, engine.prepare + the adapter built as
                         the runner builds it, sample_cohort, the codec's decode, build_strategy(...).aggregate,
                         Federation.evaluate: ``engine.flower.server``
    client (ClientApp)   the preset the server sends + this site's node config, build_side, its own rows,
                         Federation.train_client with its random stream replayed from seed and cohorts, the
                         codec's encode (the real bytes go on the wire), client state kept at the site:
                         ``engine.flower.client`` (``engine.file_rounds.train_site``)
    Flower glue          ServerApp / ClientApp and the message records: ``engine.flower.apps`` (the only module
                         here that imports flwr)
    fedtui flower local  a SuperLink and K SuperNodes on loopback, TLS and SuperNode authentication from keys
                         made for the run, every process stopped at the end: ``engine.flower.local``

What crosses the network, per round and client (``engine.flower.apps`` builds and checks the records):

    down  "global"  ArrayRecord: the adapter's shared tensors (float32 arrays, numpy's own format, no pickle)
          "config"  ConfigRecord: protocol, run id, round, the resolved preset (TOML text), roster, cohort,
                    shared tensor names, the CLIP weights' fingerprint
    up    "update"  ArrayRecord with one uint8 Array: the codec's bytes (engine.compression), absent if skipped
          "metrics" MetricRecord: examples, steps, mean loss, seconds
          "info"    ConfigRecord: protocol, client, round, skipped, codec

Nothing else leaves a site: no features, labels, images, paths, personal tensors or optimiser state. Nothing
received is unpickled (safetensors, ``np.load(allow_pickle=False)`` inside Flower, TOML and JSON only).

No UI imports: ``engine.flower``, ``.server``, ``.client`` and ``.local`` import neither flwr nor textual,
rich or typer. ``engine.flower.apps`` imports flwr, which itself loads rich and typer; it is only ever
imported inside Flower's own processes (flwr-serverapp, flwr-clientapp), where flwr has loaded them already.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PROTOCOL = 1  # bump when a record's layout or meaning changes; both sides check it

# Keys of the Flower app's run config (``[tool.flwr.app.config]``; ``flwr run --run-config``).
RUN_PRESET = "preset"  # the preset file on the SuperLink's machine (absolute path)
RUN_SET = "set"  # overrides, "key=value" separated by ";" (as --set)
RUN_DIR = "run-dir"  # the run directory to fill; "" -> a new one under the preset's run.out_dir
RUN_WAIT = "wait-nodes"  # seconds to wait for every client's SuperNode before round 1
RUN_TIMEOUT = "round-timeout"  # seconds a round waits for its cohort's replies; a client later is dropped
RUN_RESUME = "resume"  # true: continue run-dir from its last kept round (the preset must be the one it ran)

# Keys of a SuperNode's node config (``flower-supernode --node-config``) and the preset keys they set: where
# this site's things are and how its machine runs. Everything that shapes training comes from the server.
NODE_CLIENT = "client"  # this site's client name in the run (the domain, or client-0 ... for iid / dirichlet)
NODE_STATE_DIR = "state-dir"  # a folder that stays at the site, for presets that keep client state
NODE_SET = "set"  # further client-local overrides, "key=value" separated by ";"
NODE_OVERRIDES = {
    "data-root": "data.root",
    "cache-dir": "run.cache_dir",
    "device": "run.device",
    "threads": "run.threads",
    "pretrained": "model.pretrained",
    "encode-batch-size": "model.encode_batch_size",
}


class FlowerError(ValueError):
    """Bad input or a deployment that cannot go on: one line that says which and why."""


def client_name(node_config: dict[str, Any]) -> str:
    """This SuperNode's client name, from its node config."""
    name = node_config.get(NODE_CLIENT)
    if not isinstance(name, str) or not name:
        raise FlowerError("this SuperNode has no client name: start it with --node-config \"client='NAME'\" "
                          "(the training domain, or client-0, client-1 ... for iid and dirichlet partitions)")
    return name


def split_overrides(text: str) -> list[str]:
    """``"a.b=1; c.d=[\\"x\\"]"`` -> ``["a.b=1", 'c.d=["x"]']``: Flower's config values are scalars, so a
    list of ``--set`` overrides travels as one string."""
    return [part.strip() for part in str(text or "").split(";") if part.strip()]


# --- what the server and the transport pass each other (no torch here: a query-only ClientApp stays light) ---


@dataclass
class RunInfo:
    """What every train message of the run carries besides the round: the ClientApp builds its side from it."""

    run_id: str
    preset: str  # the resolved preset as TOML (engine.presets.to_toml)
    roster: list[str]
    weights_fingerprint: str
    shared_keys: list[str]

    def config(self, round_: int, cohort: list[str]) -> dict[str, Any]:
        return {"protocol": PROTOCOL, "run-id": self.run_id, "round": round_, "preset": self.preset,
                "roster": list(self.roster), "cohort": list(cohort), "shared-keys": list(self.shared_keys),
                "weights-fingerprint": self.weights_fingerprint}


@dataclass
class Answer:
    """A client's reply, as the transport read it: the codec's bytes and what the client says about them."""

    client: str
    examples: int
    mean_loss: float
    steps: int
    seconds: float
    skipped: bool
    payload: bytes = b""


@dataclass
class Dropped:
    client: str
    reason: str
