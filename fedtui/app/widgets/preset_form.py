"""The preset editor: the knobs people change most, validated as you type by engine.presets.

Validation is exactly the headless path: the preset file's dict gets each field as a
``section.key=value`` override (the same parser as ``--set``), is read relative to the preset file and
resolved (``engine.resolve``). Every problem is shown: under the field its key names, or in the status
line for keys the form does not show.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.widgets import Input, Label, Select, Static


@dataclass(frozen=True)
class Knob:
    key: str  # section.key
    label: str


KNOBS = [
    Knob("run.rounds", "Rounds"),
    Knob("train.local_epochs", "Local epochs E"),
    Knob("data.partition", "Partition"),
    Knob("data.clients", "Clients"),
    Knob("federation.aggregation", "Aggregation"),
    Knob("federation.fraction", "Fraction C"),
    Knob("train.lr", "Learning rate"),
    Knob("train.batch_size", "Batch size"),
    Knob("data.dataset", "Data set"),
    Knob("data.holdout", "Held out"),
    Knob("model.arch", "Model"),
    Knob("model.pretrained", "Weights"),
]


CHECKING = "checking the preset…"


def field_id(key: str) -> str:
    return "knob-" + key.replace(".", "-")


def choices_for(key: str) -> list[str] | None:
    from engine import presets

    section, name = key.split(".")
    cls = type(getattr(presets.Preset(), section))
    for f in dataclasses.fields(cls):
        if f.name == name:
            choices = f.metadata.get("choices")
            return list(choices()) if callable(choices) else choices
    return None


def to_text(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def merged_raw(raw: dict[str, Any]) -> dict[str, Any]:
    """Defaults under the file's own keys, so every knob has a value to show."""
    from engine.presets import Preset

    base = Preset().to_dict()
    for section, values in raw.items():
        if isinstance(values, dict) and section in base:
            base[section].update(values)
        else:
            base[section] = values
    return base


def validate(base: dict[str, Any], values: dict[str, str], source: str):
    """(preset or None, {knob key: message}, general message or None), by the same read-and-resolve as `fedtui run`.

    ``source`` is the preset file's path: relative data roots and weights are anchored to it, as they are
    for ``fedtui run`` on that file, whatever folder the console was opened from.
    """
    from engine.presets import preset_from_raw
    from engine.resolve import resolve
    from engine.schema import PresetError

    try:
        return resolve(preset_from_raw(base, source, [f"{k}={v}" for k, v in values.items()])), {}, None
    except PresetError as error:
        errors: dict[str, str] = {}
        general: list[str] = []
        for problem in error.problems:
            if problem.key in values:
                errors.setdefault(problem.key, problem.message)
            else:
                general.append(f"[{problem.key}] {problem.message}" if problem.key else problem.message)
        return None, errors, "\n".join(general) or None
    except Exception as error:  # noqa: BLE001 - a validator crash is shown, never raised into the UI
        return None, {}, f"{type(error).__name__}: {error}"


class PresetForm(VerticalScroll):
    """Knob rows; posts ``PresetForm.Validated`` after every change."""

    class Validated(Message):
        def __init__(self, preset, errors: dict[str, str], general: str | None) -> None:
            super().__init__()
            self.preset, self.errors, self.general = preset, errors, general

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.base: dict[str, Any] = {}
        self.source = "<preset>"
        self.preset = None
        self.errors: dict[str, str] = {}
        self.general: str | None = None
        self._loading = False
        self._scheduled = False
        self._checked: tuple | None = None  # (base, values, source) the current answer is for

    def compose(self) -> ComposeResult:
        for knob in KNOBS:
            with Horizontal(classes="knob-row"):
                yield Label(knob.label, classes="knob-label")
                choices = choices_for(knob.key)
                if choices:
                    yield Select([(c, c) for c in choices], allow_blank=False, compact=True,
                                 id=field_id(knob.key))
                else:
                    yield Input(compact=True, id=field_id(knob.key))
            yield Static("", classes="knob-error", id=field_id(knob.key) + "-error")

    def load(self, raw: dict[str, Any], source: str) -> None:
        self.base, self.source = merged_raw(raw), source
        self._loading = True
        try:
            for knob in KNOBS:
                section, name = knob.key.split(".")
                value = self.base.get(section, {}).get(name, "")
                widget = self.query_one("#" + field_id(knob.key))
                if isinstance(widget, Select):
                    widget.value = value if value in (choices_for(knob.key) or []) else Select.BLANK
                else:
                    widget.value = to_text(value)
        finally:
            self._loading = False
        self.revalidate()

    def values(self) -> dict[str, str]:
        out = {}
        for knob in KNOBS:
            widget = self.query_one("#" + field_id(knob.key))
            value = widget.value
            out[knob.key] = "" if value is Select.BLANK else str(value)
        return out

    def revalidate(self) -> None:
        """Check the form off the UI thread: resolving may list a data folder or, for an open_clip tag, import
        open_clip (seconds); typing never waits for it. Until the answer comes there is no valid preset."""
        if not self.base:
            return
        base, values, source = self.base, self.values(), self.source
        if (base, values, source) == self._checked:
            return  # nothing changed since the last answer (a burst of Changed messages after a load)
        self._checked = None
        self.preset, self.general = None, CHECKING
        self.run_worker(lambda: self._validate_in_thread(base, values, source), thread=True, exclusive=True,
                        group="preset-validation", exit_on_error=False)

    def _validate_in_thread(self, base: dict[str, Any], values: dict[str, str], source: str) -> None:
        result = validate(base, values, source)
        self.app.call_from_thread(self._show, base, values, source, *result)

    def _show(self, base, values, source, preset, errors: dict[str, str], general: str | None) -> None:
        if (base, values, source) != (self.base, self.values(), self.source):
            return  # the form changed while this was checked; a newer check is on its way
        self.preset, self.errors, self.general = preset, errors, general
        self._checked = (base, values, source)
        for knob in KNOBS:
            line = self.query_one("#" + field_id(knob.key) + "-error", Static)
            message = self.errors.get(knob.key)
            line.update(Text(f"✗ {message}") if message else "")  # a message quotes the user's text: never markup
            line.display = bool(message)
            self.query_one("#" + field_id(knob.key)).set_class(bool(message), "-invalid-knob")
        self.post_message(self.Validated(self.preset, self.errors, self.general))

    def _schedule(self) -> None:
        """Coalesce a burst of Changed messages (loading sets 12 fields) into one validation."""
        if not self._scheduled:
            self._scheduled = True
            self.call_after_refresh(self._scheduled_validate)

    def _scheduled_validate(self) -> None:
        self._scheduled = False
        self.revalidate()

    def on_input_changed(self, event: Input.Changed) -> None:
        event.stop()
        self._schedule()

    def on_select_changed(self, event: Select.Changed) -> None:
        event.stop()
        self._schedule()
