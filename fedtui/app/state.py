"""RunState: the dashboard's model, folded from engine events.

Pure Python (no Textual): the live run and a replayed metrics.jsonl both go through ``apply``, so the
same widgets show both. ``apply`` is O(1) per event; widgets read the state at most once per UI tick
and use the ``dirty`` set to skip what did not change (this is where a burst of ClientProgress events
coalesces into one table update per client).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable

from engine.events import (
    ClientFinished,
    ClientProgress,
    FeaturesProgress,
    FeaturesReady,
    Log,
    RoundFinished,
    RoundStarted,
    RunFailed,
    RunFinished,
    RunStarted,
)

SPARK_LEN = 24
LOG_KEEP = 2000


@dataclass
class ClientRow:
    client: str
    domain: str = ""
    examples: int = 0
    last_loss: float | None = None
    losses: deque = field(default_factory=lambda: deque(maxlen=SPARK_LEN))
    val: float | None = None
    test: float | None = None
    bytes_up: int = 0
    step: int = 0
    steps: int = 0
    faulty: str = ""  # federation.faulty_mode of a client that misbehaves on purpose


@dataclass
class RoundPoint:
    round: int
    mean_val: float
    mean_test: float
    mean_holdout: float | None
    mean_loss: float | None


class RunState:
    """Everything the dashboard shows about one run."""

    def __init__(self) -> None:
        self.encoding: tuple[int, int] | None = None  # (done, total) while images are being encoded
        self.status = "idle"  # idle | starting | running | paused | stopping | completed | stopped | failed
        self.run_id = ""
        self.run_name = ""
        self.run_dir = ""
        self.rounds = 0
        self.round = 0
        self.round_clients: list[str] = []
        self.holdout: list[str] = []
        self.clients: dict[str, ClientRow] = {}
        self.points: list[RoundPoint] = []
        self.started_at: float | None = None  # event time of RunStarted
        self.last_event_time: float | None = None
        self.seconds: float | None = None  # final duration (RunFinished)
        self.summary: dict[str, Any] = {}
        self.error: RunFailed | None = None
        self.pending_log: list[str] = []
        self.log_lines: deque[str] = deque(maxlen=LOG_KEEP)
        self.events = 0
        self.dirty: set[str] = set()  # "header", "table", "rows:<client>", "charts", "progress"
        self.dirty_clients: set[str] = set()

    # -- derived -------------------------------------------------------------------------------
    @property
    def live(self) -> bool:
        return self.status in ("starting", "running", "paused", "stopping")

    @property
    def zero_shot(self) -> float | None:
        for p in self.points:
            if p.round == 0:
                return p.mean_holdout if p.mean_holdout is not None else p.mean_test
        return None

    def round_fraction(self) -> float:
        """Progress through the current round from the clients' step counters, 0..1."""
        names = self.round_clients or list(self.clients)
        if not names:
            return 0.0
        done = 0.0
        for name in names:
            row = self.clients.get(name)
            if row and row.steps:
                done += min(1.0, row.step / row.steps)
        return done / len(names)

    def progress(self) -> float:
        """Rounds completed (fractional) out of ``rounds``."""
        if self.status == "completed":
            return float(self.rounds)
        finished = max((p.round for p in self.points), default=0)
        if self.round > finished:
            return finished + self.round_fraction()
        return float(finished)

    # -- folding -------------------------------------------------------------------------------
    def _log(self, text: str) -> None:
        self.pending_log.append(text)
        self.log_lines.append(text)

    def _stamp(self, t: float | None) -> str:
        if t is None or self.started_at is None:
            return ""
        return f"{max(0.0, t - self.started_at):7.1f}s "

    def apply_all(self, events: Iterable[Any]) -> None:
        for event in events:
            self.apply(event)

    def apply(self, event: Any) -> None:
        self.events += 1
        if isinstance(event, ClientProgress):  # the hot path first
            row = self.clients.get(event.client) or self._add_client(event.client)
            row.last_loss = event.loss  # live within the round; the trend shows per-round means
            row.step, row.steps = event.step, event.steps
            self.dirty_clients.add(event.client)
            self.dirty.add("progress")
            return
        self.dirty.add("header")
        if isinstance(event, RunStarted):
            self.status = "running"
            self.run_id, self.run_name, self.run_dir = event.run_id, event.preset_name, event.run_dir
            self.rounds, self.holdout = event.rounds, list(event.holdout)
            self.started_at = self.last_event_time = event.time
            for info in event.clients:  # a resumed run starts again over the rows it had
                name = str(info.get("client"))
                row = self.clients.get(name) or self._add_client(name)
                row.domain = str(info.get("domain", ""))
                row.examples = int(info.get("examples", 0) or 0)
                row.faulty = str(info.get("faulty") or "")
            self.dirty.update({"table", "charts", "progress"})
            holdout = ", ".join(event.holdout) or "none"
            self._log(f"run {event.run_id} started: {len(event.clients)} clients, {event.rounds} rounds, "
                      f"held out: {holdout}, {event.adapter}/{event.aggregation} on {event.device}")
            for info in event.clients:
                if info.get("faulty"):
                    self._log(f"⚠ {info.get('client')} is faulty on purpose: {info['faulty']}")
        elif isinstance(event, FeaturesProgress):
            self.encoding = (event.done, event.total)
        elif isinstance(event, FeaturesReady):
            self.encoding = None
            self._log(f"features ready: {event.encoded} encoded, {event.cached} cached "
                      f"(dim {event.feature_dim}, {event.seconds:.1f}s)")
        elif isinstance(event, RoundStarted):
            self.round = event.round
            self.round_clients = list(event.clients)
            self.last_event_time = event.time
            for name in event.clients:
                row = self.clients.get(name) or self._add_client(name)
                row.step = 0
                self.dirty_clients.add(name)
            self.dirty.add("progress")
        elif isinstance(event, ClientFinished):
            row = self.clients.get(event.client) or self._add_client(event.client)
            row.bytes_up += event.bytes_up
            if event.mean_loss == event.mean_loss:  # NaN when every batch was skipped
                row.last_loss = event.mean_loss
                row.losses.append(event.mean_loss)
            row.step = row.steps = max(event.steps, 1)
            if event.examples and not row.examples:
                row.examples = event.examples
            self.dirty_clients.add(event.client)
            self.dirty.add("progress")
        elif isinstance(event, RoundFinished):
            self.points = [p for p in self.points if p.round != event.round]
            self.points.append(RoundPoint(event.round, event.mean_val, event.mean_test,
                                          event.mean_holdout, event.mean_loss))
            for name, acc in event.client_accuracy.items():
                row = self.clients.get(name) or self._add_client(name)
                row.val, row.test = acc.get("val"), acc.get("test")
                self.dirty_clients.add(name)
            self.dirty.update({"charts", "progress"})
            hold = "" if event.mean_holdout is None else f"  held-out {event.mean_holdout:.3f}"
            label = "zero-shot" if event.round == 0 else f"round {event.round}"
            loss = "" if event.mean_loss is None else f"  loss {event.mean_loss:.4f}"
            best = "  *best" if event.selected else ""
            self._log(f"{label}: val {event.mean_val:.3f}  test {event.mean_test:.3f}{hold}{loss}{best}")
        elif isinstance(event, Log):
            self.last_event_time = event.time
            self._log(f"{self._stamp(event.time)}{event.level}: {event.text}")
        elif isinstance(event, RunFinished):
            self.status = event.status
            self.summary = dict(event.summary)
            self.seconds = event.seconds
            self.run_dir = event.run_dir or self.run_dir
            self.dirty.update({"progress", "charts"})
            self._log(f"run {event.status} in {event.seconds:.1f}s; folder: {event.run_dir}")
        elif isinstance(event, RunFailed):
            self.status = "failed"
            self.error = event
            self.run_dir = event.run_dir or self.run_dir
            self._log(f"error: run failed: {event.error}")

    def _add_client(self, name: str) -> ClientRow:
        row = self.clients[name] = ClientRow(client=name)
        self.dirty.add("table")
        return row

    def take_log(self) -> list[str]:
        lines, self.pending_log = self.pending_log, []
        return lines
