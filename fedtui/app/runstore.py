"""Reading past runs: directories holding metrics.jsonl (and summary.json) under a runs folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine import runstore as engine_runstore
from engine.events import (
    Log,
    RoundFinished,
    RunFailed,
    RunFinished,
    RunStarted,
    describe_read_warnings,
    read_event_line,
    read_events,
)

from .state import RunState


@dataclass
class RunRecord:
    path: Path
    run_id: str
    preset: str = ""
    status: str = "?"
    rounds: int = 0
    rounds_done: int = 0
    zero_shot: float | None = None
    best_val: float | None = None
    final_test: float | None = None
    final_holdout: float | None = None
    seconds: float | None = None
    curve: list[tuple[int, float]] = field(default_factory=list)  # (round, held-out or test accuracy)
    summary: dict[str, Any] = field(default_factory=dict)
    read_warnings: list[str] = field(default_factory=list)  # lines of metrics.jsonl that could not be read


def list_runs(runs_dir: Path) -> list[RunRecord]:
    """The engine's run store (newest first), each run's curve read from its metrics.jsonl."""
    records = []
    for info in engine_runstore.list_runs(runs_dir):
        try:
            records.append(read_record(info.path, info.summary))
        except OSError:
            continue
    return records


def read_record(path: Path, summary: dict[str, Any] | None = None) -> RunRecord:
    record = RunRecord(path=path, run_id=path.name)
    record.summary = summary if summary is not None else engine_runstore.read_summary(path)
    record.status = engine_runstore.run_status(path, record.summary)
    problems: list = []
    events = read_events(path / "metrics.jsonl", warnings=problems)
    record.read_warnings = describe_read_warnings(problems)
    for event in events:
        if isinstance(event, RunStarted):
            record.run_id, record.preset, record.rounds = event.run_id, event.preset_name, event.rounds
        elif isinstance(event, RoundFinished):
            acc = event.mean_holdout if event.mean_holdout is not None else event.mean_test
            record.curve.append((event.round, acc))
            if event.round == 0:
                record.zero_shot = acc
            else:
                record.rounds_done = max(record.rounds_done, event.round)
            record.best_val = event.mean_val if record.best_val is None else max(record.best_val, event.mean_val)
            record.final_test, record.final_holdout = event.mean_test, event.mean_holdout
        elif isinstance(event, RunFinished):
            record.status, record.seconds = event.status, event.seconds
        elif isinstance(event, RunFailed):
            record.status = "failed"
    return record


def replay(path: Path) -> RunState:
    state = RunState()
    problems: list = []
    state.apply_all(read_events(path / "metrics.jsonl", warnings=problems))
    for text in describe_read_warnings(problems):  # said at the end of the replayed log, never dropped silently
        state.apply(Log(level="warning", text=text, time=state.last_event_time or 0.0))
    if state.status in ("running", "starting"):
        state.status = engine_runstore.run_status(path, {})
    return state


FINAL = ("completed", "stopped", "failed", "diverged", "interrupted", "killed")


class RunFollower:
    """A run another process is writing (a headless ``fedtui run``, a Flower server), followed as it goes:
    each ``poll`` applies the whole lines its metrics.jsonl gained since the last one to ``state``.
    A line that cannot be read becomes a warning in the log; a run whose process is gone is ``killed``."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.state = RunState()
        self.offset = 0
        self.line = 0
        self._ended_at_last_poll = False
        self.poll()

    @property
    def following(self) -> bool:
        return self.state.status not in FINAL

    def poll(self) -> bool:
        """Read what is new; True when something was applied (or the run turned out to have ended)."""
        if not self.following:
            return False
        try:
            with open(self.path / "metrics.jsonl", "rb") as handle:
                handle.seek(self.offset)
                new = handle.read()
        except OSError:
            new = b""
        whole = new[: new.rfind(b"\n") + 1]  # a line still being written waits for the next poll
        self.offset += len(whole)
        for raw in whole.splitlines(keepends=True):
            self.line += 1
            event, said = read_event_line(raw)  # as a finished run's replay reads it; never raises
            for message in (message for message, skipped in said if skipped):
                self.state.apply(Log(level="warning", text=f"metrics.jsonl line {self.line} skipped: {message}",
                                     time=self.state.last_event_time or 0.0))
            if event is not None:
                self.state.apply(event)
        changed = bool(whole)
        if self.following and not whole:
            status = engine_runstore.run_status(self.path, engine_runstore.read_summary(self.path))
            # Ended without its last event (kill -9), or its summary landed a moment before that event: one
            # more empty poll, then take the summary's word.
            if status in FINAL and self._ended_at_last_poll:
                self.state.status = status
                self.state.dirty.update({"header", "progress"})
                changed = True
            self._ended_at_last_poll = status in FINAL
        return changed
