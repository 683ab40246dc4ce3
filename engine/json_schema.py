"""A JSON Schema (draft 2020-12) of the preset format, generated from the preset dataclasses.

Nothing here is written by hand: the sections come from ``engine.presets.Preset``, each key's type,
bounds, choices, help and default from its ``knob`` metadata (``engine.schema``), and the component
keys from the ``OptionsCatalog`` of each component field (``adapter.kind``, ``federation.aggregation``,
``federation.compression``). Adding a knob or a component changes the schema with no edit here;
``docs/preset.schema.json`` is this module's output, and a test keeps the two equal.

How the component rule of ``engine.schema.build_section`` is expressed:

- every key of every component sits in the section's ``properties`` (so ``additionalProperties: false``
  still rejects a typo), with a description naming the components that read it;
- one ``if``/``then`` per component name: when ``aggregation`` is ``"fedprox"`` (or absent and
  ``"fedprox"`` is the default) the keys of the other aggregation rules are ``false``, and a key may not
  be set both flat and in ``[federation.fedprox]``;
- ``[federation.fedprox]``-style sub-tables are named properties, each an object of that component's
  own keys (and nothing else).

What a JSON Schema cannot say is left to ``fedtui check``: checks across keys (``data.split`` sums
to 1, one ``{}`` in ``data.prompt_template``, ``run.name`` length, ``min_clients`` vs ``clients``) and
everything that needs the file system or the machine (``engine.resolve``). One more difference: JSON
Schema counts ``1.0`` as an integer, while a TOML float is refused where fedtui wants an integer.

Standard library only (no torch), like the schema it describes.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any

from engine.schema import OptionsCatalog

__all__ = ["DRAFT", "preset_json_schema", "schema_text"]

DRAFT = "https://json-schema.org/draft/2020-12/schema"


def preset_json_schema() -> dict[str, Any]:
    """The preset format as a JSON Schema document (a dict ready for ``json.dumps``)."""
    from engine.presets import Preset

    hints = typing.get_type_hints(Preset)
    properties = {}
    for f in dataclasses.fields(Preset):
        section_cls = hints[f.name]
        if not dataclasses.is_dataclass(section_cls):  # ``source``: where the preset came from, not a key
            continue
        properties[f.name] = _section(section_cls, f.name)
    return {
        "$schema": DRAFT,
        "title": "fedtui preset",
        "description": (
            "A fedtui preset (TOML). Generated from engine/presets.py by `fedtui schema`; checks across keys "
            "and of files, weights and the machine are `fedtui check`'s."
        ),
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
    }


def schema_text() -> str:
    """The schema as the text ``fedtui schema`` prints and ``docs/preset.schema.json`` holds."""
    return json.dumps(preset_json_schema(), indent=2, ensure_ascii=False) + "\n"


def _section(cls: type, name: str) -> dict[str, Any]:
    """One section: its plain keys, every component's keys and sub-tables, and the rule tying them."""
    hints = typing.get_type_hints(cls)
    doc = (cls.__doc__ or "").strip()
    schema: dict[str, Any] = {"type": "object", "description": f"[{name}]"}
    if doc and not doc.startswith(cls.__name__ + "("):  # dataclasses invent a signature docstring
        schema["description"] = f"[{name}] {doc}"
    properties: dict[str, Any] = {}
    components: dict[str, OptionsCatalog] = {}
    for f in dataclasses.fields(cls):
        if "options_of" in f.metadata:
            continue
        properties[f.name] = _knob(f, hints[f.name])
        catalog = f.metadata.get("component")
        if catalog is not None:
            components[f.name] = catalog
            properties[f.name]["description"] = _component_description(f, catalog)
    rules: list[dict[str, Any]] = []
    for key, catalog in components.items():
        _add_component_keys(properties, catalog, key, name)
        default = _default(next(f for f in dataclasses.fields(cls) if f.name == key))
        all_keys = set(catalog.all_keys())
        for component in catalog.names():
            own = _option_fields(catalog, component)
            condition: dict[str, Any] = {"properties": {key: {"const": component}}}
            if component != default:  # an absent key means the default component
                condition["required"] = [key]
            then: dict[str, Any] = {}
            foreign = sorted(all_keys - set(own))
            if foreign:
                then["properties"] = {k: False for k in foreign}
            both = [{"not": {"required": [k, component], "properties": {component: {"required": [k]}}}}
                    for k in own]
            if both:
                then["allOf"] = both
            if then:
                rules.append({"if": condition, "then": then})
    schema["properties"] = properties
    schema["additionalProperties"] = False
    if rules:
        schema["allOf"] = rules
    return schema


def _add_component_keys(properties: dict[str, Any], catalog: OptionsCatalog, key: str, section: str) -> None:
    """Each component's flat keys (once, naming every component that reads it) and its sub-table."""
    for option in catalog.all_keys():
        owners = catalog.owners(option)
        field_, hint = _option_field(catalog, owners[0], option)
        entry = _knob(field_, hint)
        used = f"used when {key} = " + " or ".join(f'"{o}"' for o in owners)
        entry["description"] = f"{entry['description']} ({used})" if entry.get("description") else f"({used})"
        _claim(properties, option, entry, section)
    for component in catalog.names():
        own = _option_fields(catalog, component)
        sub = {
            "type": "object",
            "description": (
                f"[{section}.{component}]: keys of {catalog.what} '{component}', used only when "
                f"{key} = \"{component}\" (lets one preset carry settings for several). "
                f"{catalog.help_for(component)}"
            ).strip(),
            "properties": {k: _knob(f, h) for k, (f, h) in own.items()},
            "additionalProperties": False,
        }
        _claim(properties, component, sub, section)


def _claim(properties: dict[str, Any], name: str, entry: dict[str, Any], section: str) -> None:
    if name in properties:
        raise ValueError(f"[{section}] {name!r} is both a key and a component name (or two components' keys)")
    properties[name] = entry


def _option_fields(catalog: OptionsCatalog, component: str) -> dict[str, tuple[dataclasses.Field, Any]]:
    cls = catalog.options_for(component)
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def _option_field(catalog: OptionsCatalog, component: str, key: str) -> tuple[dataclasses.Field, Any]:
    return _option_fields(catalog, component)[key]


def _component_description(f: dataclasses.Field, catalog: OptionsCatalog) -> str:
    names = "; ".join(f"{n}: {catalog.help_for(n)}" if catalog.help_for(n) else n for n in catalog.names())
    help_ = f.metadata.get("help", "")
    return f"{help_}. {names}" if help_ else names


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _knob(f: dataclasses.Field, hint: Any) -> dict[str, Any]:
    """One key: its JSON type from the annotation, bounds and choices from the knob's metadata."""
    meta = f.metadata
    bounds = _bounds(meta)
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        entry: dict[str, Any] = {"type": "array", "items": {"type": _json_type(item), **bounds}}
    else:
        entry = {"type": _json_type(hint), **bounds}
    if meta.get("help"):
        entry["description"] = meta["help"]
    default = _default(f)
    if default is not dataclasses.MISSING:
        entry["default"] = list(default) if isinstance(default, (list, tuple)) else default
    return entry


def _bounds(meta: typing.Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    choices = meta.get("choices")
    if callable(choices):
        choices = choices()
    if choices is not None:
        out["enum"] = list(choices)
    if meta.get("min") is not None:
        out["exclusiveMinimum" if meta.get("min_exclusive") else "minimum"] = meta["min"]
    if meta.get("max") is not None:
        out["maximum"] = meta["max"]
    return out


def _json_type(hint: Any) -> str:
    types = {bool: "boolean", int: "integer", float: "number", str: "string"}
    if hint not in types:
        raise TypeError(f"no JSON Schema type for {hint!r}")
    return types[hint]
