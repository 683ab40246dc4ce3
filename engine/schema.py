"""The validation kernel shared by every config fedtui reads: typed knobs, bounds, suggestions, problems.

A leaf module (standard library only), so the preset schema, each component's options and the
pre-training config check keys with the same code and word their errors the same way. Validation
collects every problem before it raises, so a CLI prints all of them at once and the console's editor
shows each under its own field.

A section dataclass may name a *component* (``aggregation = "fedprox"``): its other keys are then
checked against that component's own ``Options`` dataclass, looked up in an ``OptionsCatalog``, and a
key that only another component uses is an error naming that component. Keys for a component that is
not chosen may sit in its own table (``[federation.fedprox]``): checked, and used only when chosen.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Callable


class PresetError(ValueError):
    """A config that cannot run: every problem names the file, the key and what is allowed.

    ``source``, ``key`` and ``message`` describe the first problem (what most callers print);
    ``problems`` holds all of them, and ``str()`` lists them one a line.
    """

    def __init__(self, source: str, key: str | None, message: str, problems: list["Problem"] | None = None):
        self.source = source
        self.key = key
        self.message = message
        self.problems = problems or [Problem(source, key, message)]
        super().__init__("\n".join(str(p) for p in self.problems))


def shown(name: str) -> str:
    """A key or section name as it is safe to print: odd characters (newlines, escape codes) in repr form."""
    return name if name.isprintable() and not any(c.isspace() for c in name) else repr(name)


@dataclass(frozen=True)
class Problem:
    source: str
    key: str | None
    message: str

    def __str__(self) -> str:
        return f"{self.source}: [{self.key}] {self.message}" if self.key else f"{self.source}: {self.message}"


class Problems:
    """Collects problems while checking goes on; ``raise_if_any`` raises one PresetError with them all."""

    def __init__(self, source: str):
        self.source = source
        self.items: list[Problem] = []

    def add(self, key: str | None, message: str, source: str | None = None) -> None:
        problem = Problem(source or self.source, key, message)
        if problem not in self.items:
            self.items.append(problem)

    def extend(self, error: PresetError) -> None:
        for problem in error.problems:
            self.add(problem.key, problem.message, problem.source)

    def keys(self) -> set[str | None]:
        return {p.key for p in self.items}

    def __bool__(self) -> bool:
        return bool(self.items)

    def raise_if_any(self) -> None:
        if self.items:
            first = self.items[0]
            raise PresetError(first.source, first.key, first.message, list(self.items))


def brief(value: Any) -> str:
    """``repr(value)`` for a message, safe for any value TOML can hold (a 5,000-digit integer has no repr)."""
    try:
        text = repr(value)
    except ValueError:
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    return text if len(text) <= 200 else text[:200] + "..."


class BadValue(Exception):
    """One key's value is wrong; ``build_section`` turns it into a Problem under that key."""


def knob(
    default: Any = dataclasses.MISSING,
    *,
    choices: list[str] | Callable[[], list[str]] | None = None,
    min: float | None = None,
    max: float | None = None,
    min_exclusive: bool = False,
    help: str = "",
    component: "OptionsCatalog | None" = None,
):
    """A config key with its bounds. Every number is also checked finite.

    ``max`` is the largest value a real run can take on the machines fedtui targets; each one says why
    in ``help`` or beside it, so a bound is a documented decision, not a guess. ``component`` marks a
    key whose value names a component (an aggregation rule, a codec, an adapter kind): its catalog
    supplies the allowed names and the component's own options.
    """
    if component is not None:
        choices = component.names
    meta = {"choices": choices, "min": min, "max": max, "min_exclusive": min_exclusive, "help": help,
            "component": component}
    if isinstance(default, list):
        return field(default_factory=lambda d=tuple(default): list(d), metadata=meta)
    return field(default=default, metadata=meta)


def options_field(component_key: str):
    """The typed options of the component named by ``component_key``; filled by ``fill_options``."""
    return field(default=None, metadata={"options_of": component_key})


def fill_options(section: Any) -> None:
    """In a section's ``__post_init__``: default options for each named component that has none yet."""
    for f in dataclasses.fields(section):
        of = f.metadata.get("options_of")
        if of is not None and getattr(section, f.name) is None:
            catalog = _field(type(section), of).metadata["component"]
            name = getattr(section, of)
            object.__setattr__(section, f.name, catalog.options_for(name)() if name in catalog else None)


def _field(cls: type, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(cls) if f.name == name)


class OptionsCatalog:
    """A family's component names and each one's ``Options`` dataclass, importable without torch.

    The components' code (which needs torch) registers its classes in an ordinary ``Registry``; this
    catalog is what the preset schema, ``fedtui presets`` and the console's first validation read.
    """

    def __init__(self, what: str):
        self.what = what  # "aggregation", "compression", "adapter kind"
        self._options: dict[str, type] = {}
        self._help: dict[str, str] = {}

    def register(self, *names: str, help: str = "") -> Callable[[type], type]:
        def decorate(options_cls: type) -> type:
            for name in names:
                self._options[name] = options_cls
                self._help[name] = help
            return options_cls

        return decorate

    def names(self) -> list[str]:
        return sorted(self._options)

    def __contains__(self, name: object) -> bool:
        return name in self._options

    def options_for(self, name: str) -> type:
        return self._options[name]

    def help_for(self, name: str) -> str:
        return self._help.get(name, "")

    def owners(self, key: str) -> list[str]:
        """The components whose options include ``key``."""
        return [n for n in self.names() if key in {f.name for f in dataclasses.fields(self._options[n])}]

    def all_keys(self) -> list[str]:
        return sorted({f.name for cls in self._options.values() for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class NoOptions:
    """A component with no knobs of its own."""


def suggest(name: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(str(name), allowed, n=1, cutoff=0.6)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"{hint} Allowed: {', '.join(allowed)}."


def coerce(value: Any, hint: Any) -> Any:
    """Check ``value`` against the annotation ``hint``; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    if origin is list:
        (item_hint,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise BadValue(f"expected a list of {item_hint.__name__}, got {brief(value)}")
        return [coerce(v, item_hint) for v in value]
    if hint is bool:
        if not isinstance(value, bool):
            raise BadValue(f"expected true or false, got {brief(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadValue(f"expected an integer, got {brief(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BadValue(f"expected a number, got {brief(value)}")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond float's range
            raise BadValue(f"must be a finite number, got {brief(value)}") from None
        if not math.isfinite(number):
            raise BadValue(f"must be a finite number, got {brief(value)}")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise BadValue(f"expected a string, got {brief(value)}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates from a non-UTF-8 command line
            raise BadValue(f"is not valid UTF-8 text: {brief(value)}") from None
        if "\x00" in value:
            raise BadValue("contains a NUL character")
        return value
    raise TypeError(f"unsupported schema type {hint!r}")


def check_bounds(value: Any, meta: dict) -> None:
    choices = meta.get("choices")
    if callable(choices):
        choices = choices()
    values = value if isinstance(value, list) else [value]
    for item in values:
        if choices is not None and item not in choices:
            raise BadValue(f"{brief(item)} is not allowed.{suggest(str(item), list(choices))}")
    low, high = meta.get("min"), meta.get("max")
    for item in values:
        if low is not None:
            too_low = item <= low if meta.get("min_exclusive") else item < low
            if too_low:
                relation = ">" if meta.get("min_exclusive") else ">="
                raise BadValue(f"must be {relation} {low}, got {brief(item)}")
        if high is not None and item > high:
            raise BadValue(f"must be <= {high}, got {brief(item)}")


def build_section(cls: type, raw: Any, problems: Problems, section: str) -> Any:
    """``cls(**raw)`` with every key checked; problems go to ``problems``. Returns None if any key was bad."""
    if not isinstance(raw, dict):
        problems.add(section, f"expected a table [{section}], got {brief(raw)}")
        return None
    hints = typing.get_type_hints(cls)
    plain = {f.name: f for f in dataclasses.fields(cls) if "options_of" not in f.metadata}
    before = len(problems.items)
    values: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in plain:
            extra[key] = value
            continue
        try:
            value = coerce(value, hints[key])
            check_bounds(value, dict(plain[key].metadata))
            values[key] = value
        except BadValue as bad:
            problems.add(f"{section}.{key}", str(bad))
    components = {name: f.metadata["component"] for name, f in plain.items() if f.metadata.get("component")}
    scoped = _scoped_tables(extra, components, problems, section)
    chosen = {}
    for key, catalog in components.items():
        name = values.get(key, plain[key].default)
        if name in catalog:
            chosen[key] = name
            options_cls = catalog.options_for(name)
            own = {f.name for f in dataclasses.fields(options_cls)}
            mine = {k: extra.pop(k) for k in list(extra) if k in own}
            for k, v in scoped.pop(name, {}).items():
                if k in mine:
                    problems.add(f"{section}.{k}", f"set both here and in [{section}.{name}]; keep one")
                mine[k] = v
            options = build_section(options_cls, mine, problems, section)
            values[f"{key}_options"] = options
    for key, catalog in components.items():  # tables of components not chosen: checked, then unused
        for name in [n for n in scoped if n in catalog]:
            build_section(catalog.options_for(name), scoped.pop(name), problems, f"{section}.{name}")
    for key in extra:
        owners = [(ckey, name) for ckey, catalog in components.items() for name in catalog.owners(key)]
        if owners:
            ckey, first = owners[0]
            names = " or ".join(f"'{name}'" for _, name in owners)
            problems.add(
                f"{section}.{key}",
                f"is a key of {ckey} {names}, but {ckey} = '{chosen.get(ckey, '?')}' does not use it "
                f"(to keep it for when {first} is chosen, put it under [{section}.{first}])",
            )
        else:
            known = sorted(set(plain) | {k for c in components.values() for k in c.all_keys()})
            problems.add(f"{section}.{shown(key)}", f"unknown key.{suggest(key, known)}")
    if len(problems.items) > before:
        return None
    return cls(**values)


def _scoped_tables(extra: dict, components: dict, problems: Problems, section: str) -> dict[str, dict]:
    """``[federation.fedprox]``-style tables: a component's keys that apply only when it is chosen.

    They let one preset carry settings for several rules (a sweep over ``aggregation``) without a flat key
    that the chosen rule would not use.
    """
    scoped = {}
    for key in [k for k, v in extra.items() if isinstance(v, dict)]:
        if any(key in catalog for catalog in components.values()):
            scoped[key] = extra.pop(key)
    return scoped


def flatten(section: Any) -> dict[str, Any]:
    """A section as its TOML table: plain keys, then the chosen components' own keys."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if "options_of" in f.metadata:
            if value is not None:
                out.update(dataclasses.asdict(value))
        else:
            out[f.name] = list(value) if isinstance(value, list) else value
    return out


def section_hints(cls: type) -> dict[str, Any]:
    """Every key a section accepts with its type: plain keys and every component's options."""
    hints = {k: v for k, v in typing.get_type_hints(cls).items()
             if "options_of" not in _field(cls, k).metadata}
    for f in dataclasses.fields(cls):
        catalog = f.metadata.get("component")
        if catalog is not None:
            for name in catalog.names():
                hints.update(typing.get_type_hints(catalog.options_for(name)))
    return hints
