"""The event stream: what the engine tells its consumers while a run goes on.

Every event is a frozen dataclass of plain JSON values. The run store writes each one as a line of
``metrics.jsonl``; ``read_events`` reads such a file back, so a finished run replays into the same
widgets that showed it live.

Schema version
    ``SCHEMA_VERSION`` counts changes to what a field *means* (or to a field's type). Adding an event
    type or adding a field with a default does not change it. It is written once per file, as
    ``RunStarted.schema`` on the first line, not as a key on every line: a metrics.jsonl holds exactly
    one run, written by one process from its RunStarted on (each run gets a fresh directory; nothing
    appends a second run to a file), so one declaration covers every line after it. Keeping it a field
    of the event also means live consumers (the console, ``fedtui run``'s stream) see the version
    without a wire-only key, and the thousands of ClientProgress lines do not repeat it. A file whose
    RunStarted line is lost is read as the current schema under the rules below. A RunStarted without
    ``schema`` was written before versioning and is schema 1 (field meanings were unchanged).
    Readers accept every version up to ``SCHEMA_VERSION``; a newer one is read where it can be, with
    a warning.

Reading a line (``event_from_dict``; ``read_events`` applies it to every line), one rule per case:
    1. The ``event`` name picks the class. An unknown name is not guessed: the line is skipped, with a
       warning (it is most likely an event type a newer engine added).
    2. A key that is no field of that class is ignored, with a warning counting the lines.
    3. A missing field that has a default gets its default, silently: defaults are how fields are
       added without breaking older files (e.g. ``RoundFinished.selected``).
    4. A missing field without a default whose type admits ``None`` reads as ``None`` ("not known"),
       with a warning.
    5. Any other missing field, or a value whose JSON type does not fit the field (``"round": "3"``),
       leaves the meaning unclear: the line is skipped, with a warning. (Only the outer JSON type is
       checked: int, float (an int is accepted), str, bool, list, dict, null.)

``read_events`` never raises for a damaged file (only ``OSError`` when it cannot be opened) and never
drops a readable line. It skips silently only a torn last line: one without a trailing newline that is
not JSON (the writer crashed mid-line). Blank lines are ignored. Every other line it cannot read is
skipped and reported through its ``warnings`` list (grouped by message, with line numbers);
``describe_read_warnings`` turns that list into the lines a console shows ("skipped 3 lines of
metrics.jsonl: line 17: not JSON ...").
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable

SCHEMA_VERSION = 1  # bump when a field's meaning or type changes; written once, in RunStarted (see above)
UNVERSIONED_SCHEMA = 1  # what a RunStarted without "schema" (written before versioning) is read as


@dataclass(frozen=True)
class RunStarted:
    run_id: str
    run_dir: str
    preset_name: str
    rounds: int
    clients: list[dict[str, Any]]  # [{"client": name, "domain": ..., "examples": n_train, "val": n, "test": n}]
    holdout: list[str]
    classes: list[str]
    device: str
    adapter: str
    aggregation: str
    trainable_parameters: int
    weights: str  # "pretrained:<tag>", "checkpoint:<path>" or "random"
    time: float
    schema: int = SCHEMA_VERSION  # the file's schema version; see the module docstring
    selection: str = "best-val"  # the preset's eval.selection
    adapter_bytes: int = 0  # one shared adapter update, serialised uncompressed
    full_clip_bytes: int = 0  # the whole CLIP's weights, for the "x less than the model" comparison
    compression: str = "none"


@dataclass(frozen=True)
class FeaturesProgress:
    """Encoding the images: ``done`` of ``total`` looked up or encoded so far."""

    done: int
    total: int


@dataclass(frozen=True)
class FeaturesReady:
    encoded: int
    cached: int
    seconds: float
    feature_dim: int


@dataclass(frozen=True)
class RoundStarted:
    round: int
    clients: list[str]
    time: float


@dataclass(frozen=True)
class ClientProgress:
    round: int
    client: str
    step: int
    steps: int
    loss: float


@dataclass(frozen=True)
class ClientFinished:
    round: int
    client: str
    mean_loss: float
    examples: int
    steps: int
    seconds: float
    bytes_up: int
    bytes_down: int
    skipped: bool = False  # its update was below federation.skip_threshold and not sent


@dataclass(frozen=True)
class RoundFinished:
    """Evaluation after aggregation. ``round`` 0 is the zero-shot evaluation (no training)."""

    round: int
    client_accuracy: dict[str, dict[str, float]]  # client -> {"train": .., "val": .., "test": ..}
    holdout_accuracy: dict[str, float]  # held-out domain -> accuracy of the server adapter
    mean_val: float
    mean_test: float
    mean_holdout: float | None
    mean_loss: float | None
    bytes_up: int
    bytes_down: int
    seconds: float
    # the run's selection rule picked this round (best-val: its mean val accuracy strictly improved; last:
    # every round). Files written before the field existed read as False: not marked, not "not selected".
    selected: bool = False


@dataclass(frozen=True)
class WiseEvaluated:
    """WiSE-FT: theta_0 + a (theta - theta_0) evaluated after the last round (Wortsman et al.)."""

    alpha: float
    mean_test: float | None
    mean_holdout: float | None
    holdout: dict[str, float]
    clients: dict[str, float]  # client -> test accuracy
    model: str = "last"  # which theta: "last" (final round) or "selected" (the selection rule's round)


@dataclass(frozen=True)
class Log:
    level: str  # "info" | "warning" | "error"
    text: str
    time: float


@dataclass(frozen=True)
class RunFinished:
    status: str  # "completed" | "stopped" | "diverged"
    summary: dict[str, Any]
    run_dir: str
    seconds: float


@dataclass(frozen=True)
class RunFailed:
    error: str
    traceback: str
    run_dir: str | None


Event = (
    RunStarted
    | FeaturesProgress
    | FeaturesReady
    | RoundStarted
    | ClientProgress
    | ClientFinished
    | RoundFinished
    | WiseEvaluated
    | Log
    | RunFinished
    | RunFailed
)

EventSink = Callable[[Event], None]

# name -> class, derived from the union so the set of event types is written once (above)
EVENT_TYPES: dict[str, type] = {cls.__name__: cls for cls in typing.get_args(Event)}


# Each event type's field names, in order. An event's fields hold JSON values (numbers, strings, lists, dicts),
# never another dataclass, so reading them one by one gives what dataclasses.asdict gives without its deep copy
# (which cost more than the JSON encoding: ~320 ClientProgress events a quickstart run).
_FIELDS: dict[type, tuple[str, ...]] = {cls: tuple(f.name for f in dataclasses.fields(cls)) for cls in EVENT_TYPES.values()}


def event_to_dict(event: Event) -> dict[str, Any]:
    """The event as the JSON object a metrics.jsonl line holds; its values are the event's own (not copies)."""
    return {"event": type(event).__name__, **{name: getattr(event, name) for name in _FIELDS[type(event)]}}


def event_to_json(event: Event) -> str:
    return json.dumps(event_to_dict(event), sort_keys=False)


# --- reading ------------------------------------------------------------------------------------------


class UnreadableEvent(ValueError):
    """A line whose meaning is not clear under the module docstring's rules: it is skipped."""


@dataclass(frozen=True)
class ReadWarning:
    """Something ``read_events`` could not read as written: the same message on many lines is one warning.

    ``skipped``: those lines were dropped; otherwise they were read, leniently (an ignored unknown field,
    a missing field read as null, a newer schema).
    """

    lines: tuple[int, ...]  # 1-based line numbers in the file, in order
    message: str
    skipped: bool

    @property
    def line(self) -> int:
        return self.lines[0]

    def __str__(self) -> str:
        return f"{_line_list(self.lines)}: {self.message}"


def _line_list(lines: tuple[int, ...], shown: int = 5) -> str:
    if len(lines) == 1:
        return f"line {lines[0]}"
    more = f" (+{len(lines) - shown} more)" if len(lines) > shown else ""
    return "lines " + ", ".join(map(str, lines[:shown])) + more


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _accepts(tp: Any, value: Any) -> bool:
    """Whether a JSON value's outer type fits a field's annotation (rule 5)."""
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        return any(_accepts(arg, value) for arg in typing.get_args(tp))
    tp = origin or tp  # list[...] -> list, dict[...] -> dict
    if isinstance(value, bool):
        return tp is bool
    if tp is float:
        return isinstance(value, (int, float))
    return isinstance(value, tp)


def _admits_none(tp: Any) -> bool:
    return tp is Any or _accepts(tp, None)


def _build(data: Any) -> tuple[Event, list[str]]:
    """An event from one decoded line and the lenient readings it needed; ``UnreadableEvent`` if none."""
    if not isinstance(data, dict):
        raise UnreadableEvent(f"not a JSON object but {type(data).__name__}")
    kind = data.get("event")
    if not isinstance(kind, str):
        raise UnreadableEvent('no "event" name')
    cls = EVENT_TYPES.get(kind)
    if cls is None:
        raise UnreadableEvent(f"unknown event {kind!r}")
    hints = _hints(cls)
    notes: list[str] = []
    unknown = [key for key in data if key != "event" and key not in hints]
    if unknown:
        notes.append(f"{kind}: ignored unknown field(s) {', '.join(map(repr, unknown))}")
    values: dict[str, Any] = {}
    absent: list[str] = []
    as_null: list[str] = []
    for field in dataclasses.fields(cls):
        if field.name in data:
            value = data[field.name]
            if not _accepts(hints[field.name], value):
                raise UnreadableEvent(f"{kind}: field {field.name!r} is {_json_type(value)}, "
                                      f"not {_type_name(hints[field.name])}")
            values[field.name] = value
        elif cls is RunStarted and field.name == "schema":
            values[field.name] = UNVERSIONED_SCHEMA
        elif field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING:
            continue  # rule 3: the default
        elif _admits_none(hints[field.name]):
            values[field.name] = None
            as_null.append(field.name)
        else:
            absent.append(field.name)
    if absent:
        raise UnreadableEvent(f"{kind}: missing field(s) {', '.join(map(repr, absent))}")
    if as_null:
        notes.append(f"{kind}: missing field(s) {', '.join(map(repr, as_null))} read as null")
    return cls(**values), notes


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "dict"}.get(
        type(value), type(value).__name__)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(typing.get_origin(tp) or tp, "__name__", str(tp))


def event_from_dict(data: dict[str, Any]) -> Event:
    """One line's event under the module docstring's rules; ``ValueError`` (``UnreadableEvent``) when
    its meaning is not clear. The lenient readings it made are not reported here: see ``read_events``."""
    return _build(data)[0]


def read_event_line(raw: bytes, complete: bool = True) -> tuple[Event | None, list[tuple[str, bool]]]:
    """One line of a metrics.jsonl as ``read_events`` reads it: its event (None when the line is skipped) and
    what is to be said about it, as (message, skipped) pairs. A line without its newline (``complete``
    False: torn by a crash mid-write) that is not UTF-8 or not JSON is skipped without a word."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, [(f"not UTF-8 text (byte {exc.start + 1})", True)] if complete else []
    if not text.strip():
        return None, []
    try:
        data = json.loads(text)
    except ValueError as exc:  # json.JSONDecodeError
        detail = f"{exc.msg} at column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else exc
        return None, [(f"not JSON ({detail})", True)] if complete else []
    except Exception as exc:  # e.g. RecursionError on absurdly nested input: damaged, not fatal
        return None, [(f"not JSON ({type(exc).__name__})", True)]
    try:
        event, notes = _build(data)
    except UnreadableEvent as exc:
        return None, [(str(exc), True)]
    except Exception as exc:  # never raise for a damaged file
        return None, [(f"could not be read ({type(exc).__name__}: {exc})", True)]
    said = []
    if isinstance(event, RunStarted) and event.schema > SCHEMA_VERSION:
        said.append((f"written with event schema {event.schema}, newer than this reader's {SCHEMA_VERSION}: "
                     "read what could be read", False))
    return event, said + [(note, False) for note in notes]


def read_events(path, *, warnings: list[ReadWarning] | None = None) -> list[Event]:
    """Every readable event of a run's metrics.jsonl, in order.

    A torn last line (a crash mid-write) is skipped silently; every other line that cannot be read is
    skipped and, like every lenient reading, reported by appending ``ReadWarning``s to ``warnings`` when
    it is given (ordered by first line). Raises only ``OSError``, when the file cannot be opened or read.
    """
    events: list[Event] = []
    found: dict[tuple[str, bool], list[int]] = {}
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            event, said = read_event_line(raw, complete=raw.endswith(b"\n"))
            for message, skipped in said:
                found.setdefault((message, skipped), []).append(number)
            if event is not None:
                events.append(event)
    if warnings is not None:
        warnings.extend(sorted((ReadWarning(tuple(lines), message, skipped)
                                for (message, skipped), lines in found.items()), key=lambda w: w.lines))
    return events


def describe_read_warnings(warnings: list[ReadWarning], name: str = "metrics.jsonl") -> list[str]:
    """What a console shows about ``read_events``' warnings: one line for the skipped lines, one for those
    read leniently, none when there is nothing to say. E.g.
    ``skipped 3 lines of metrics.jsonl: line 17: not JSON (...); lines 20, 31: unknown event 'Foo'``."""
    texts = []
    for skipped, verb in ((True, "skipped {} of {}"), (False, "read {} of {} leniently")):
        chosen = [w for w in warnings if w.skipped is skipped]
        if chosen:
            count = len({n for w in chosen for n in w.lines})
            lines = f"{count} line" + "s" * (count != 1)
            texts.append(verb.format(lines, name) + ": " + "; ".join(map(str, chosen)))
    return texts


__all__ = [
    "EVENT_TYPES",
    "SCHEMA_VERSION",
    "ClientFinished",
    "ClientProgress",
    "Event",
    "EventSink",
    "FeaturesProgress",
    "FeaturesReady",
    "Log",
    "ReadWarning",
    "RoundFinished",
    "RoundStarted",
    "RunFailed",
    "RunFinished",
    "RunStarted",
    "UnreadableEvent",
    "describe_read_warnings",
    "event_from_dict",
    "read_event_line",
    "event_to_dict",
    "event_to_json",
    "read_events",
]
