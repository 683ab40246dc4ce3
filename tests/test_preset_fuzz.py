"""Property tests of the preset schema: whatever a preset holds, reading it ends in a Preset or a PresetError.

The strategies are built from the schema itself (every section, every key, every component's options, with
their types, choices and bounds), so a key added tomorrow is fuzzed too. Presets are generated as the dicts
``tomllib`` returns and written to real files by a small TOML writer of this module (independent of
``engine.presets.to_toml``):

* ``valid_raw``: every value inside its bounds and every cross-key rule kept (split sums to 1, one ``{}`` in the
  prompt template, ...), with strings full of newlines, quotes, backslashes, tabs, control characters, unicode;
* ``noisy_raw``: a valid preset with up to four mistakes: a boundary or out-of-range value, nan/inf/huge
  numbers, a wrong type, an unknown key or section, a component's key under another component, a section
  that is not a table, ``[federation.<rule>]`` tables with the wrong keys.

Properties: (a) ``preset_from_dict`` and ``read_preset`` raise nothing but ``PresetError``, and agree with
each other; ``--set`` overrides too; (b) every accepted preset round-trips exactly through ``to_toml`` and a
file; (c) ``fedtui check`` on a rejected preset exits 2, prints the problems, writes nothing.

The default run is a few hundred cases per property (about 20 s); ``pytest -m slow tests/test_preset_fuzz.py -s``
runs thousands and prints how many were accepted and rejected (``FEDTUI_FUZZ_EXAMPLES`` sets how many).

Bugs the fuzzing and a read of the schema found have a regression test each at the end.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import math
import os
import re
import subprocess
import sys
import tempfile
import tomllib
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, event, given, note, settings
from hypothesis import strategies as st

from engine.presets import Preset, PresetError, preset_from_dict, read_preset, to_toml

REPO = Path(__file__).resolve().parents[1]
_SCRIPT = Path(sys.executable).parent / "fedtui"
FEDTUI = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "fedtui"]

# database=None: no .hypothesis/ folder in a tree several people share; a failure prints its example anyway.
DEFAULT = settings(max_examples=300, deadline=None, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
THOROUGH_EXAMPLES = int(os.environ.get("FEDTUI_FUZZ_EXAMPLES", "3000"))
THOROUGH = settings(DEFAULT, max_examples=THOROUGH_EXAMPLES)

COUNTS: collections.Counter = collections.Counter()


# ---------------------------------------------------------------------------------------------------------------
# The schema, read from the dataclasses


def _hints(cls: type) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)


SECTIONS: dict[str, type] = {f.name: _hints(Preset)[f.name] for f in dataclasses.fields(Preset) if f.name != "source"}


def plain_specs(cls: type) -> dict[str, tuple[typing.Any, dict]]:
    hints = _hints(cls)
    return {f.name: (hints[f.name], dict(f.metadata)) for f in dataclasses.fields(cls) if "options_of" not in f.metadata}


def components(cls: type) -> dict[str, typing.Any]:
    return {f.name: f.metadata["component"] for f in dataclasses.fields(cls) if f.metadata.get("component")}


def default_of(cls: type, key: str) -> typing.Any:
    return next(f.default for f in dataclasses.fields(cls) if f.name == key)


def option_specs(options_cls: type) -> dict[str, tuple[typing.Any, dict]]:
    hints = _hints(options_cls)
    return {f.name: (hints[f.name], dict(f.metadata)) for f in dataclasses.fields(options_cls)}


def all_specs(cls: type) -> dict[str, tuple[typing.Any, dict]]:
    """Every key a section takes, its own and every component's."""
    specs = dict(plain_specs(cls))
    for catalog in components(cls).values():
        for name in catalog.names():
            specs.update(option_specs(catalog.options_for(name)))
    return specs


ALL_OPTION_KEYS = sorted({k for cls in SECTIONS.values() for c in components(cls).values()
                          for n in c.names() for k in option_specs(c.options_for(n))})
ALL_COMPONENT_NAMES = sorted({n for cls in SECTIONS.values() for c in components(cls).values() for n in c.names()})
SPEC_BY_KEY = {k: spec for cls in SECTIONS.values() for k, spec in all_specs(cls).items()}


# ---------------------------------------------------------------------------------------------------------------
# Strategies

TRICKY_STRINGS = [
    "", " ", "say \"hi\"", "it's", "back\\slash", "C:\\Users\\x", "two\nlines", "cr\r\nlf", "tab\there", "\f\b\v",
    "\x1b[31mred\x1b[0m", "\x7f", "\x01\x1f", "\u0085nel", "\u2028\u2029", "\ufeffbom", "é✓😀", "中文", "\U0010ffff",
    "'''", '"""', "\\u0000", "\\n", "# not a comment", "[section]", "key = 1", "{{}}", "~", "~/x", "~nobody/x",
    "../up", "/abs/x", "//double", "local-dir:", "local-dir:~/x", "local-dir:../x", "x.safetensors", "w.pt", ":smile:",
    "[bold]markup[/]", "x" * 101,
]
BAD_STRINGS = ["\x00", "a\x00b", "{", "}", "{0}", "{}{}", "{name}", "{:>10}", "{0!r}", "{!x}", "{0:{1}}", "%s", "nan", "1"]

_chars = st.characters(exclude_categories=("Cs",))
_chars_no_nul = st.characters(exclude_categories=("Cs",), exclude_characters="\x00")
safe_text = st.one_of(st.text(_chars_no_nul, max_size=20), st.sampled_from(TRICKY_STRINGS))
any_text = st.one_of(st.text(_chars, max_size=20), st.sampled_from(TRICKY_STRINGS + BAD_STRINGS))


def _choices(meta: dict) -> list | None:
    choices = meta.get("choices")
    return choices() if callable(choices) else choices


def valid_value(hint: typing.Any, meta: dict) -> st.SearchStrategy:
    """Values the key takes on its own (cross-key rules aside), boundaries included."""
    choices = _choices(meta)
    low, high, exclusive = meta.get("min"), meta.get("max"), bool(meta.get("min_exclusive"))
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return st.lists(valid_value(item, meta), max_size=4)
    if choices is not None:
        return st.sampled_from(list(choices))
    if hint is bool:
        return st.booleans()
    if hint is int:
        lo = -(2**63) if low is None else math.floor(low) + (1 if exclusive else 0)
        hi = 2**63 - 1 if high is None else math.floor(high)
        return st.one_of(st.integers(lo, hi), st.sampled_from([lo, hi]))
    if hint is float:
        lo = -1e300 if low is None else low
        hi = 1e300 if high is None else high
        floats = st.floats(lo, hi, exclude_min=exclusive, allow_nan=False, allow_infinity=False)
        ints_lo = math.ceil(lo) + (1 if exclusive and math.ceil(lo) == lo else 0)
        ints = st.integers(ints_lo, math.floor(hi)) if ints_lo <= math.floor(hi) else st.nothing()
        bounds = st.sampled_from([b for b in (lo, hi, math.nextafter(hi, -math.inf)) if not (exclusive and b == lo)])
        return st.one_of(floats, ints, bounds)
    if hint is str:
        return safe_text
    raise AssertionError(f"no strategy for {hint!r}")


SPECIAL_FLOATS = [math.nan, math.inf, -math.inf, 1e308, -1e308, 1.7976931348623157e308, 5e-324, -5e-324, -0.0, 1e30, -1e30]
SPECIAL_INTS = [0, -1, 2**31, 2**53 + 1, 2**63 - 1, -(2**63), 2**64, 10**30, -(10**30), 9223372036854775807]
WRONG_TYPES = [True, False, "", "1", "nan", [], [math.nan], [1, "a"], [[1]], {}, {"a": 1},
               datetime.date(2020, 1, 1), datetime.time(1, 2, 3), datetime.datetime(2020, 1, 2, 3, 4, 5)]


def edge_value(hint: typing.Any, meta: dict) -> st.SearchStrategy:
    """Values at or past the key's bounds, non-finite and huge numbers, wrong types, arbitrary strings."""
    low, high = meta.get("min"), meta.get("max")
    near: list = []
    for bound in (low, high):
        if bound is not None:
            near += [bound, math.nextafter(bound, math.inf), math.nextafter(bound, -math.inf)]
            if float(bound).is_integer():
                near += [int(bound) - 1, int(bound), int(bound) + 1]
    inner = typing.get_args(hint)[0] if typing.get_origin(hint) is list else hint
    singles = st.sampled_from(SPECIAL_FLOATS + SPECIAL_INTS + WRONG_TYPES + near)
    if typing.get_origin(hint) is list:
        return st.one_of(singles, st.lists(st.one_of(valid_value(inner, meta), singles, any_text), max_size=4))
    return st.one_of(singles, any_text, st.lists(singles, max_size=3))


def any_value(hint: typing.Any, meta: dict) -> st.SearchStrategy:
    return st.one_of(valid_value(hint, meta), edge_value(hint, meta))


@st.composite
def valid_split(draw) -> list[float]:
    train = draw(st.one_of(st.floats(0.0, 1.0, exclude_min=True), st.sampled_from([1.0, 0.6, 0.8, 1 / 3])))
    rest = 1.0 - train
    val = draw(st.floats(0.0, rest)) if rest > 0 else 0.0
    return [train, val, rest - val]


def _no_braces(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


valid_template = st.builds(lambda a, b: _no_braces(a) + "{}" + _no_braces(b), safe_text, safe_text)
unique_names = st.lists(safe_text, max_size=4, unique=True)
CROSS_KEY = {  # keys whose valid values depend on each other or on the whole value
    ("data", "split"): valid_split(),
    ("data", "prompt_template"): valid_template,
    ("data", "domains"): unique_names,
    ("data", "holdout"): unique_names,
    ("train", "betas"): st.lists(st.floats(0.0, 1.0, exclude_max=True), min_size=2, max_size=2),
    ("run", "name"): st.one_of(st.text(_chars_no_nul, max_size=100), st.sampled_from(TRICKY_STRINGS[:-1])),
}


def _subset(keys) -> st.SearchStrategy:
    keys = sorted(keys)
    return st.lists(st.sampled_from(keys), unique=True, max_size=len(keys)) if keys else st.just([])


@st.composite
def valid_raw(draw) -> dict:
    """A preset every rule accepts (as parsed TOML), with some sections and keys left to their defaults."""
    raw: dict = {}
    for section, cls in SECTIONS.items():
        if draw(st.integers(0, 3)) == 0:
            continue
        table: dict = {}
        specs = plain_specs(cls)
        for key in draw(_subset(specs)):
            strategy = CROSS_KEY[section, key] if (section, key) in CROSS_KEY else valid_value(*specs[key])
            table[key] = draw(strategy)
        for ckey, catalog in components(cls).items():
            chosen = table.get(ckey, default_of(cls, ckey))
            own = option_specs(catalog.options_for(chosen))
            for key in draw(_subset(own)):
                table[key] = draw(valid_value(*own[key]))
            for other in draw(_subset(n for n in catalog.names() if n != chosen and option_specs(catalog.options_for(n)))):
                theirs = option_specs(catalog.options_for(other))  # kept for when `other` is chosen
                table[other] = {k: draw(valid_value(*theirs[k])) for k in draw(_subset(theirs))}
        raw[section] = table
    data, federation = raw.get("data", {}), raw.get("federation", {})
    clients = data.get("clients", 4)
    if federation.get("min_clients", 1) > clients:
        federation["min_clients"] = draw(st.integers(1, clients))
    return raw


def _typo(key: str) -> st.SearchStrategy:
    edits = [key[:-1], key + "s", key.upper(), key.replace("_", "-"), key[1:], " " + key, key + "\n"]
    return st.sampled_from([e for e in edits if e and e != key])


@st.composite
def noisy_raw(draw) -> dict:
    """A valid preset with up to four mistakes (some of which may happen to be harmless)."""
    raw = draw(valid_raw())
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["edge", "unknown-key", "wrong-component", "unknown-section", "not-a-table",
                                     "scoped-table", "flat-and-scoped", "top-level-value"]))
        section = draw(st.sampled_from(sorted(SECTIONS)))
        cls = SECTIONS[section]
        if not isinstance(raw.get(section), dict):
            raw[section] = {}
        table = raw[section]
        if kind == "edge":
            key = draw(st.sampled_from(sorted(all_specs(cls))))
            table[key] = draw(edge_value(*all_specs(cls)[key]))
        elif kind == "unknown-key":
            known = sorted(all_specs(cls))
            key = draw(st.one_of(st.text(_chars, max_size=12), st.sampled_from(known).flatmap(_typo)))
            table[key] = draw(st.one_of(st.sampled_from(SPECIAL_FLOATS + SPECIAL_INTS + WRONG_TYPES), any_text))
        elif kind == "wrong-component":  # a component's key in any section, whichever component is chosen
            key = draw(st.sampled_from(ALL_OPTION_KEYS))
            table[key] = draw(any_value(*SPEC_BY_KEY[key]))
        elif kind == "unknown-section":
            name = draw(st.one_of(st.text(_chars, max_size=10), st.sampled_from(sorted(SECTIONS)).flatmap(_typo)))
            if name not in SECTIONS:
                raw[name] = draw(st.dictionaries(st.text(_chars, max_size=8), any_text, max_size=2))
        elif kind == "not-a-table":
            raw[section] = draw(st.sampled_from(SPECIAL_FLOATS + SPECIAL_INTS + WRONG_TYPES[:9]))
        elif kind == "scoped-table":
            name = draw(st.one_of(st.sampled_from(ALL_COMPONENT_NAMES), st.text(_chars, max_size=8)))
            keys = draw(st.lists(st.sampled_from(ALL_OPTION_KEYS), max_size=3, unique=True))
            table[name] = {k: draw(any_value(*SPEC_BY_KEY[k])) for k in keys}
        elif kind == "flat-and-scoped":
            comps = components(cls)
            if comps:
                ckey = draw(st.sampled_from(sorted(comps)))
                name = draw(st.sampled_from(comps[ckey].names()))
                own = option_specs(comps[ckey].options_for(name))
                if own:
                    key = draw(st.sampled_from(sorted(own)))
                    table[ckey] = name
                    table[key] = draw(valid_value(*own[key]))
                    table[name] = {key: draw(valid_value(*own[key]))}
        elif kind == "top-level-value":
            raw[draw(st.text(_chars, max_size=8))] = draw(st.sampled_from(SPECIAL_FLOATS + WRONG_TYPES))
    return raw


any_raw = st.one_of(valid_raw(), noisy_raw())


# ---------------------------------------------------------------------------------------------------------------
# A TOML writer for the generated dicts (independent of engine.presets.to_toml)


def _toml_str(text: str) -> str:
    out = []
    for char in text:
        if char in '\\"':
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04X}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _toml(value: typing.Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, (datetime.date, datetime.time)):  # datetime is a date
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_str(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def dump(raw: dict) -> str:
    lines = [f"{_toml_str(k)} = {_toml(v)}" for k, v in raw.items() if not isinstance(v, dict)]
    for name, table in raw.items():
        if isinstance(table, dict):
            lines.append(f"[{_toml_str(name)}]")
            lines += [f"{_toml_str(k)} = {_toml(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def same(a: typing.Any, b: typing.Any) -> bool:
    """Equal as parsed TOML: same types, nan equal to nan."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def outcome(call) -> tuple[Preset | None, PresetError | None]:
    """The preset, or the PresetError; anything else propagates and fails the test with its traceback."""
    try:
        return call(), None
    except PresetError as error:
        assert type(error) is PresetError
        assert error.problems and all(isinstance(p.message, str) and p.message for p in error.problems)
        str(error)  # printable
        return None, error


def problems_of(error: PresetError) -> list[tuple[str | None, str]]:
    return [(p.key, p.message) for p in error.problems]


PATH_KEYS = {("data", "root"), ("model", "pretrained")}


def without_paths(preset: Preset) -> dict:
    """The preset as a dict, less the keys read_preset anchors to the file's folder."""
    out = preset.to_dict()
    for section, key in PATH_KEYS:
        out[section].pop(key)
    return out


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def check_never_crashes(raw: dict) -> str:
    """Property (a) on one preset: returns 'accepted' or 'rejected'."""
    note(f"raw = {raw!r}")
    from_dict, error = outcome(lambda: preset_from_dict(raw))
    text = dump(raw)
    note(f"file:\n{text}")
    assert same(tomllib.loads(text), raw), "the test's TOML writer lost something"
    with tempfile.TemporaryDirectory() as tmp:
        from_file, file_error = outcome(lambda: read_preset(write(Path(tmp), "p.toml", text)))
    assert (from_dict is None) == (from_file is None), (error, file_error)
    if error is not None:
        # the same problems; their order follows the keys', and the file lists top-level values before tables
        assert sorted(problems_of(file_error), key=repr) == sorted(problems_of(error), key=repr)
        verdict = "rejected"
    else:
        assert without_paths(from_file) == without_paths(from_dict)
        verdict = "accepted"
    event(verdict)
    return verdict


def check_round_trip(raw: dict) -> bool:
    """Property (b) on one preset: False if it was rejected (nothing to round-trip)."""
    preset, error = outcome(lambda: preset_from_dict(raw))
    if error is not None:
        return False
    text = to_toml(preset)
    note(f"to_toml:\n{text}")
    assert preset_from_dict(tomllib.loads(text)) == preset  # in memory, paths as written
    with tempfile.TemporaryDirectory() as tmp:
        first = read_preset(write(Path(tmp) / "one", "p.toml", dump(raw)))  # paths anchored to its folder
        text = to_toml(first)
        again = read_preset(write(Path(tmp) / "two" / "deeper", "copy.toml", text))  # another folder
    assert again == first
    assert to_toml(again) == text
    for section in first.to_dict():  # Preset equality, spelled out for the strings
        assert getattr(again, section) == getattr(first, section)
    return True


# ---------------------------------------------------------------------------------------------------------------
# (a) never anything but PresetError


def property_a(raw):
    COUNTS["a:" + check_never_crashes(raw)] += 1


SECTION_KEYS = sorted(f"{s}.{k}" for s, cls in SECTIONS.items() for k in all_specs(cls))
OVERRIDE_VALUES = ["nan", "inf", "-inf", "1e400", "1e30", "-1", "0", "1", "10001", "9223372036854775808", "0x10",
                   "1_000", "true", "[1, 2", "[nan, 0.5, 0.5]", "0.6,0.2,0.2", '"quoted"', "{a = 1}", "1979-05-27",
                   "", " ", "a,b,,c", "fedprox", "lora", "topk", "q,k", "{}", "{0}", "~/x", "local-dir:x"]


@st.composite
def overrides(draw) -> list[str]:
    def one() -> str:
        key = draw(st.one_of(st.sampled_from(SECTION_KEYS), st.sampled_from(SECTION_KEYS).flatmap(_typo),
                             st.text(_chars, max_size=12)))
        value = draw(st.one_of(st.sampled_from(OVERRIDE_VALUES), any_text))
        return draw(st.sampled_from([f"{key}={value}", key, f"{key} = {value}", value]))

    return [one() for _ in range(draw(st.integers(0, 4)))]


def property_set(raw, items):
    with tempfile.TemporaryDirectory() as tmp:
        path = write(Path(tmp), "p.toml", dump(raw))
        _, error = outcome(lambda: read_preset(path, items))
    verdict = "accepted" if error is None else "rejected"
    event(verdict)
    COUNTS["set:" + verdict] += 1


# (b) accepted presets round-trip exactly


def property_b(raw):
    verdict = "round-tripped" if check_round_trip(raw) else "rejected"
    event(verdict)
    COUNTS["b:" + verdict] += 1


def property_b_noisy(raw):
    verdict = "round-tripped" if check_round_trip(raw) else "rejected"
    event(verdict)
    COUNTS["b-noisy:" + verdict] += 1


PROPERTIES = {  # name: (strategies, property)
    "a": ((any_raw,), property_a),
    "set": ((valid_raw(), overrides()), property_set),
    "b": ((valid_raw(),), property_b),
    "b-noisy": ((noisy_raw(),), property_b_noisy),
}

test_reading_a_preset_raises_only_preset_error = DEFAULT(given(any_raw)(property_a))
test_set_overrides_raise_only_preset_error = DEFAULT(given(valid_raw(), overrides())(property_set))
test_accepted_presets_round_trip_through_toml = DEFAULT(given(valid_raw())(property_b))
test_noisy_presets_that_pass_round_trip_too = DEFAULT(given(noisy_raw())(property_b_noisy))


# ---------------------------------------------------------------------------------------------------------------
# (c) fedtui check on a rejected preset: exit 2, the problems on stderr, nothing written


def _printable(line: str) -> bool:  # what Rich prints unchanged (it turns :name: codes into emoji)
    return line.isascii() and line.isprintable() and not re.search(r":[\w+-]+:", line)


@settings(DEFAULT, max_examples=20)
@given(noisy_raw())
def test_check_refuses_a_rejected_preset_and_writes_nothing(raw):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = write(folder, "p.toml", dump(raw))
        _, error = outcome(lambda: read_preset(path))
        assume(error is not None)  # an accepted preset would go on to resolve (weights, data): not this property
        env = dict(os.environ, HF_HUB_OFFLINE="1", NO_COLOR="1", FEDTUI_CACHE=str(folder / "cache"))
        result = subprocess.run([*FEDTUI, "check", "p.toml"], cwd=folder, env=env, capture_output=True, timeout=120)
        stderr = result.stderr.decode("utf-8", "replace")
        note(stderr)
        assert "Traceback" not in stderr
        assert result.returncode == 2
        assert result.stdout == b""
        assert "p.toml" in stderr
        for problem in error.problems:
            if _printable(str(problem)):
                assert f"{problem.key}] {problem.message}" in stderr if problem.key else problem.message in stderr
        assert sorted(p.name for p in folder.iterdir()) == ["p.toml"]
        COUNTS["c:refused"] += 1


# ---------------------------------------------------------------------------------------------------------------
# Thousands of cases, on request: pytest -m slow tests/test_preset_fuzz.py -s


@pytest.fixture
def thorough(request):
    markexpr = request.config.getoption("markexpr") or ""
    if not re.search(r"(?<!not )\bslow\b", markexpr) and "FEDTUI_FUZZ_EXAMPLES" not in os.environ:
        pytest.skip("thousands of cases: run with -m slow (or set FEDTUI_FUZZ_EXAMPLES)")
    COUNTS.clear()
    yield
    print(f"\nfuzz counts ({THOROUGH_EXAMPLES} examples asked for; hypothesis may stop early when it has "
          f"exhausted a strategy): {dict(sorted(COUNTS.items()))}")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PROPERTIES))
def test_thousands_of_presets(thorough, name):
    strategies, prop = PROPERTIES[name]
    THOROUGH(given(*strategies)(prop))()


# ---------------------------------------------------------------------------------------------------------------
# Bugs found while fuzzing, one regression test each


def _raises_only_preset_error(call) -> None:
    outcome(call)


@pytest.mark.parametrize("raw", [{"train": {"lr": 10**5000}}, {"run": {"seed": 10**5000}}, {"run": 10**5000}],
                         ids=["float-key", "int-key", "section"])
def test_regression_huge_int_in_a_dict(raw):
    _raises_only_preset_error(lambda: preset_from_dict(raw))


def test_regression_huge_int_literal_in_a_file(tmp_path):
    path = write(tmp_path, "p.toml", "[run]\nseed = " + "1" * 5000 + "\n")
    _raises_only_preset_error(lambda: read_preset(path))


def test_regression_huge_int_in_a_set(tmp_path):
    path = write(tmp_path, "p.toml", "")
    _raises_only_preset_error(lambda: read_preset(path, ["run.seed=" + "1" * 5000]))


def test_regression_deeply_nested_array(tmp_path):
    path = write(tmp_path, "p.toml", "[train]\nbetas = " + "[" * 3000 + "]" * 3000 + "\n")
    _raises_only_preset_error(lambda: read_preset(path))


@pytest.mark.parametrize("template", ["a {0.nope}", "a {0[x]}", "a {:9000000000000000000}"],
                         ids=["attribute", "index", "huge-width"])
def test_regression_prompt_template_format_fields(template):
    _raises_only_preset_error(lambda: preset_from_dict({"data": {"prompt_template": template}}))


@pytest.mark.parametrize("body", ['[data]\nroot = "~\\u0000x"\n', '[model]\npretrained = "local-dir:~\\u0000x"\n',
                                  '[model]\npretrained = "~\\u0000/w.pt"\n'], ids=["root", "local-dir", "checkpoint"])
def test_regression_tilde_path_with_nul(tmp_path, body):
    path = write(tmp_path, "p.toml", body)
    _raises_only_preset_error(lambda: read_preset(path))


@pytest.mark.parametrize("raw", [{"train": {"a\nb": 1}}, {"train": {"\x1b[2Jx": 1}}, {"\x1b]0;t\x07": {}}],
                         ids=["newline-key", "escape-key", "escape-section"])
def test_regression_odd_key_names_are_echoed_raw(raw):
    _, error = outcome(lambda: preset_from_dict(raw))
    assert error is not None
    assert all(p.key is None or p.key.isprintable() for p in error.problems), [p.key for p in error.problems]
