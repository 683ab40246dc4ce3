"""The Flower ServerApp and ClientApp (Flower's Message API, flwr 1.41 / 1.42): records in, records out.

    [tool.flwr.app.components]
    serverapp = "engine.flower.apps:server_app"
    clientapp = "engine.flower.apps:client_app"

``engine.flower.local.write_app`` writes such an app folder (``flwr run`` builds the FAB from it); the numbers
are ``engine.flower.server`` and ``engine.flower.client``. This module only turns them into Flower records
and back, and checks what it reads (the layout is in ``engine.flower``'s docstring):

- the global adapter goes down as an ArrayRecord of float arrays (Flower's numpy format, read with
  ``allow_pickle=False``); a client's update comes up as one uint8 Array holding the codec's bytes, which the
  server hands to the codec's ``decode`` and nothing else;
- a reply is checked before it is used: exactly the records named above, the protocol, the client its node
  said it is, the round, whole numbers where counts belong, a payload no larger than the adapter allows;
  anything else makes the client drop out of that round with one line saying why.

The ServerApp polls for replies every half second (Flower's ``send_and_receive`` sleeps 3 s between pulls)
and gives up on a client after ``round-timeout`` seconds; the SuperLink itself answers for a SuperNode that
stopped sending heartbeats (after twice their interval) with an error reply, which is reported the same way.
"""

from __future__ import annotations

import math
import time
from typing import Any

import flwr
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from engine.flower import (
    PROTOCOL, RUN_DIR, RUN_PRESET, RUN_RESUME, RUN_SET, RUN_TIMEOUT, RUN_WAIT, Answer, Dropped, FlowerError, RunInfo, client_name,
    split_overrides,
)

GLOBAL, CONFIG = "global", "config"  # down
UPDATE, METRICS, INFO = "update", "metrics", "info"  # up
PAYLOAD = "payload"
PAYLOAD_STYPE = "fedtui.codec"  # not numpy's: the codec's own bytes, read by the codec only
MAX_EXAMPLES = 10**9
POLL_SECONDS = 0.5

server_app = ServerApp()
client_app = ClientApp()


# --- records ---------------------------------------------------------------------------------------------


def train_content(shared, config: dict[str, Any]) -> RecordDict:
    """The server's train message: the shared tensors and the round's config."""
    return RecordDict({GLOBAL: ArrayRecord.from_torch_state_dict(dict(shared)), CONFIG: ConfigRecord(dict(config))})


def read_train_content(content: RecordDict):
    """(shared tensors, config) from a train message; FlowerError if it is not one."""
    import torch

    if set(content) != {GLOBAL, CONFIG}:
        raise FlowerError(f"a train message holds {sorted(content)}, expected {sorted([GLOBAL, CONFIG])}")
    arrays, config = content[GLOBAL], content[CONFIG]
    if not isinstance(arrays, ArrayRecord) or not isinstance(config, ConfigRecord):
        raise FlowerError("a train message's records are not an ArrayRecord and a ConfigRecord")
    shared = {}
    for name, array in arrays.items():
        try:
            shared[name] = torch.from_numpy(array.numpy().copy())  # numpy's format, allow_pickle=False
        except (TypeError, ValueError) as error:
            raise FlowerError(f"tensor {name!r} of the train message cannot be read: {error}") from None
    return shared, dict(config)


def reply_content(site) -> RecordDict:
    """A client's reply: the codec's bytes (unless skipped), its counts and metrics, who and which round."""
    metrics: dict[str, Any] = {"examples": int(site.examples), "steps": int(site.steps), "seconds": float(site.seconds)}
    if site.mean_loss == site.mean_loss and math.isfinite(site.mean_loss):
        metrics["mean-loss"] = float(site.mean_loss)
    records: dict[str, Any] = {
        METRICS: MetricRecord(metrics),
        INFO: ConfigRecord({"protocol": PROTOCOL, "client": site.client, "round": int(site.round),
                            "skipped": bool(site.skipped), "compression": site.compression}),
    }
    if not site.skipped:
        payload = bytes(site.payload)
        records[UPDATE] = ArrayRecord({PAYLOAD: Array(dtype="uint8", shape=(len(payload),), stype=PAYLOAD_STYPE,
                                                      data=payload)})
    return RecordDict(records)


def _whole(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def read_reply(content: RecordDict, client: str, round_: int) -> Answer:
    """A client's reply checked field by field; FlowerError (one line) for anything that is not one."""
    names = set(content)
    if not {METRICS, INFO} <= names or not names <= {UPDATE, METRICS, INFO}:
        raise FlowerError(f"the reply holds records {sorted(names)}; expected {INFO}, {METRICS} and maybe {UPDATE}")
    info, metrics = content[INFO], content[METRICS]
    if not isinstance(info, ConfigRecord) or not isinstance(metrics, MetricRecord):
        raise FlowerError("the reply's info / metrics records are of the wrong kinds")
    if info.get("protocol") != PROTOCOL:
        raise FlowerError(f"protocol {info.get('protocol')!r}, this server speaks {PROTOCOL}")
    if info.get("client") != client:
        raise FlowerError(f"says it is from {info.get('client')!r}, but its node is {client}'s")
    if info.get("round") != round_:
        raise FlowerError(f"is for round {info.get('round')!r}, this is round {round_}")
    skipped = info.get("skipped")
    if not isinstance(skipped, bool):
        raise FlowerError("has no 'skipped'")
    unknown = sorted(set(metrics) - {"examples", "steps", "seconds", "mean-loss"})
    if unknown:
        raise FlowerError(f"unexpected metrics {unknown}")
    examples, steps, seconds = metrics.get("examples"), metrics.get("steps"), metrics.get("seconds")
    if not _whole(examples, 1, MAX_EXAMPLES) or not _whole(steps, 0, 10**12):
        raise FlowerError(f"examples must be a whole number from 1 to {MAX_EXAMPLES}, steps a whole number")
    if not isinstance(seconds, float) or not 0 <= seconds < 1e9:
        raise FlowerError("seconds is not a duration")
    loss = metrics.get("mean-loss", float("nan"))
    if not isinstance(loss, float):
        raise FlowerError("mean-loss is not a number")
    payload = b""
    if skipped:
        if UPDATE in names:
            raise FlowerError("a skipped update carries tensors")
    else:
        record = content.get(UPDATE)
        if not isinstance(record, ArrayRecord) or set(record) != {PAYLOAD}:
            raise FlowerError(f"the update must be one Array named {PAYLOAD!r}")
        array = record[PAYLOAD]
        if array.stype != PAYLOAD_STYPE or array.dtype != "uint8" or tuple(array.shape) != (len(array.data),):
            raise FlowerError(f"the payload must be uint8 bytes of stype {PAYLOAD_STYPE!r}")
        payload = bytes(array.data)
    return Answer(client, examples, loss, steps, seconds, skipped, payload)


# --- the server's transport over Flower's Grid -------------------------------------------------------------


class GridTransport:
    """``engine.flower.server.Transport`` over a Flower ``Grid``: which node is which client, and each round."""

    def __init__(self, grid: Grid, wait_s: float = 300.0, timeout_s: float = 3600.0, poll_s: float = POLL_SECONDS):
        self.grid, self.wait_s, self.timeout_s, self.poll_s = grid, float(wait_s), float(timeout_s), poll_s
        self.nodes: dict[str, int] = {}  # client -> node id
        self.asked: set[int] = set()  # nodes asked who they are
        self.info: RunInfo | None = None
        self.log = lambda level, text: None

    def describe(self) -> dict[str, Any]:
        return {"kind": "flower", "flwr": flwr.__version__, "wait_nodes": self.wait_s, "round_timeout": self.timeout_s}

    def _pull(self, pending: dict[str, str], timeout_s: float) -> dict[str, Message]:
        """Replies by the id of the message they answer, until all came or ``timeout_s`` passed."""
        got: dict[str, Message] = {}
        deadline = time.monotonic() + timeout_s
        while len(got) < len(pending):
            for reply in self.grid.pull_messages([i for i in pending if i not in got]):
                got[reply.metadata.reply_to_message_id] = reply
            if len(got) >= len(pending) or time.monotonic() >= deadline:
                break
            time.sleep(self.poll_s)
        return got

    def _identify(self, timeout_s: float) -> None:
        """Ask every node not asked yet which client it is (a ``query`` message each)."""
        online = set(self.grid.get_node_ids())
        new = sorted(online - self.asked)
        if not new:
            return
        self.asked.update(new)
        messages = [Message(RecordDict({CONFIG: ConfigRecord({"protocol": PROTOCOL})}), dst_node_id=node,
                            message_type="query") for node in new]
        ids = list(self.grid.push_messages(messages))
        pending = {i: str(node) for i, node in zip(ids, new) if i}
        replies = self._pull(pending, timeout_s)
        roster = self.info.roster if self.info else []
        for message_id, node in pending.items():
            reply = replies.get(message_id)
            if reply is None:
                self.asked.discard(int(node))  # ask again later
                continue
            if reply.has_error():
                self.log("warning", f"SuperNode {node} could not say which client it is: {reply.error.reason}")
                continue
            info = reply.content.get(CONFIG)
            name = info.get("client") if isinstance(info, ConfigRecord) else None
            if not isinstance(name, str) or name not in roster:
                self.log("warning", f"SuperNode {node} says it is client {name!r}, not one of this run's "
                                    f"({', '.join(roster)}); it is not used")
            elif name in self.nodes and self.nodes[name] != int(node) and self.nodes[name] in online:
                self.log("warning", f"SuperNode {node} says it is {name}, but SuperNode {self.nodes[name]} "
                                    "already is; it is not used")
            else:
                if name in self.nodes and self.nodes[name] != int(node):
                    self.log("info", f"{name} is back, as SuperNode {node}")
                self.nodes[name] = int(node)

    def start(self, info: RunInfo, log) -> None:
        self.info, self.log = info, log
        deadline = time.monotonic() + self.wait_s
        while True:
            self._identify(max(5.0, deadline - time.monotonic()))
            missing = [name for name in info.roster if name not in self.nodes]
            if not missing or time.monotonic() >= deadline:
                break
            time.sleep(1.0)
        if not self.nodes:
            raise FlowerError(f"no SuperNode of this run's clients ({', '.join(info.roster)}) connected within "
                              f"{self.wait_s:.0f} s")
        found = ", ".join(f"{name} (node {self.nodes[name]})" for name in info.roster if name in self.nodes)
        log("info", f"SuperNodes: {found}")
        if missing:
            log("warning", f"no SuperNode for {', '.join(missing)} after {self.wait_s:.0f} s: each drops out of the "
                           "rounds it is drawn for until one connects")

    def exchange(self, round_: int, cohort: list[str], shared) -> dict[str, Answer | Dropped]:
        assert self.info is not None, "start() first"
        online = set(self.grid.get_node_ids())  # the SuperLink lists the nodes whose heartbeats arrive
        if any(self.nodes.get(name) not in online for name in cohort):
            self._identify(30.0)  # a SuperNode that connected late, or again under a new node id
            online = set(self.grid.get_node_ids())
        answers: dict[str, Answer | Dropped] = {}
        messages, names = [], []
        config = self.info.config(round_, cohort)
        for name in cohort:
            if name not in self.nodes:
                answers[name] = Dropped(name, "no SuperNode for it is connected")
                continue
            if self.nodes[name] not in online:
                answers[name] = Dropped(name, f"its SuperNode (node {self.nodes[name]}) is offline: its heartbeats "
                                              "stopped reaching the SuperLink")
                continue
            messages.append(Message(train_content(shared, config), dst_node_id=self.nodes[name], message_type="train",
                                    group_id=str(round_)))
            names.append(name)
        ids = list(self.grid.push_messages(messages)) if messages else []
        pending = {}
        for message_id, name in zip(ids, names):
            if message_id:
                pending[message_id] = name
            else:
                answers[name] = Dropped(name, "the SuperLink did not take the message")
        replies = self._pull(pending, self.timeout_s)
        for message_id, name in pending.items():
            reply = replies.get(message_id)
            if reply is None:
                answers[name] = Dropped(name, f"no reply within {self.timeout_s:.0f} s (federation round-timeout)")
            elif reply.has_error():
                answers[name] = Dropped(name, f"Flower error {reply.error.code}: {reply.error.reason}")
            else:
                try:
                    answers[name] = read_reply(reply.content, name, round_)
                except FlowerError as error:
                    answers[name] = Dropped(name, f"malformed reply: {error}")
        return answers


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the preset named in the run config; the run directory is the one named or a new one."""
    from engine.flower.server import serve

    config = context.run_config
    preset = str(config.get(RUN_PRESET) or "")
    if not preset:
        raise FlowerError(f"the run config has no {RUN_PRESET!r}: flwr run APP --run-config \"preset='/path/to.toml'\"")
    transport = GridTransport(grid, float(config.get(RUN_WAIT, 300)), float(config.get(RUN_TIMEOUT, 3600)))
    result = serve(preset, transport, split_overrides(str(config.get(RUN_SET, ""))), str(config.get(RUN_DIR, "")) or None,
                   resume=bool(config.get(RUN_RESUME, False)))
    print(f"run directory: {result.run_dir} ({result.status})", flush=True)
    if result.status != "completed":
        raise RuntimeError(f"the run ended {result.status}: {result.summary.get('error', '')}")


# --- the client ---------------------------------------------------------------------------------------------


@client_app.query()
def query(message: Message, context: Context) -> Message:
    """Which client this SuperNode is (its node config), for the server's roster."""
    return Message(RecordDict({CONFIG: ConfigRecord({"protocol": PROTOCOL, "client": client_name(context.node_config)})}),
                   reply_to=message)


@client_app.train()
def train(message: Message, context: Context) -> Message:
    """Train this site's client for the round in the message; reply with the codec's bytes and counts."""
    from engine.flower import client

    shared, config = read_train_content(message.content)
    site = client.train(config, shared, dict(context.node_config), log=lambda level, text: print(f"{level}: {text}"))
    return Message(reply_content(site), reply_to=message)
