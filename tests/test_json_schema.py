"""The preset format as JSON Schema (``engine.json_schema``, ``fedtui schema``): generated, current, and
agreeing with ``engine.presets`` on everything a JSON Schema can say."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.json_schema import preset_json_schema, schema_text
from engine.options.adapters import ADAPTER_KINDS
from engine.options.codecs import CODECS
from engine.options.strategies import AGGREGATIONS
from engine.presets import Preset, PresetError, preset_from_dict, read_preset_toml
from engine.schema import knob

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is a dev dependency: pip install -e '.[dev]'")

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "presets").glob("*.toml"))
BAD = REPO / "tests" / "bad_presets"


@pytest.fixture(scope="module")
def validator():
    schema = preset_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def errors(validator, raw) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(raw)]


def test_the_schema_is_draft_2020_12_and_closed_everywhere():
    schema = preset_json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["additionalProperties"] is False
    for name, section in schema["properties"].items():
        assert section["additionalProperties"] is False, name
        for key, sub in section["properties"].items():
            if sub.get("type") == "object":  # [federation.fedprox]-style tables
                assert sub["additionalProperties"] is False, f"{name}.{key}"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_preset_validates(validator, path):
    assert errors(validator, read_preset_toml(path)) == []


@pytest.mark.parametrize(
    "name, where",
    [
        ("unknown-key-typo.toml", "local_epoch"),  # unknown key
        ("unknown-section.toml", "traning"),  # unknown section
        ("wrong-type.toml", "run.rounds"),  # wrong type
        ("run-not-a-table.toml", "run"),  # a section that is not a table
        ("seed-negative.toml", "run.seed"),  # out of range
        ("threads-100000.toml", "run.threads"),
        ("image-size-100000.toml", "data.image_size"),
        ("lr-1e30.toml", "train.lr"),
        ("unknown-aggregation.toml", "federation.aggregation"),  # not one of the choices
        # another component's key: `false` in the chosen component's `then` (jsonschema reports a false
        # subschema at the table, not the key: python-jsonschema's descend() returns before adding the path)
        ("mu-under-mean.toml", "federation: False schema does not allow 0.1"),
        ("lora-rank-under-attai.toml", "adapter: False schema does not allow 4"),
    ],
)
def test_schema_level_mistakes_fail_validation(validator, name, where):
    raw = read_preset_toml(BAD / name)
    with pytest.raises(PresetError):  # the engine refuses it too
        preset_from_dict(raw)
    found = errors(validator, raw)
    assert found and any(where in text for text in found), found


def test_every_key_the_preset_has_is_in_the_schema():
    """Generated, not written: every section and key of ``Preset`` (defaults) and every component's keys appear,
    with the knob's default, and a new knob would appear with its bounds and help."""
    schema = preset_json_schema()
    sections = schema["properties"]
    defaults = Preset().to_dict()
    assert set(sections) == set(defaults)
    for section, values in defaults.items():
        for key, value in values.items():
            assert key in sections[section]["properties"], f"{section}.{key}"
            assert sections[section]["properties"][key]["default"] == value, f"{section}.{key}"
    for section, key, catalog in (("federation", "aggregation", AGGREGATIONS), ("federation", "compression", CODECS),
                                  ("adapter", "kind", ADAPTER_KINDS)):
        properties = sections[section]["properties"]
        assert properties[key]["enum"] == catalog.names()
        for name in catalog.names():
            assert name in properties, f"[{section}.{name}]"  # its sub-table
            own = [f.name for f in dataclasses.fields(catalog.options_for(name))]
            assert sorted(properties[name]["properties"]) == sorted(own)
            for option in own:
                assert name in properties[option]["description"], f"{section}.{option} does not name {name}"


def test_a_new_knob_appears_with_its_metadata():
    from engine.json_schema import _section

    @dataclasses.dataclass(frozen=True)
    class NewSection:
        clip_grad: float = knob(1.0, min=0.0, min_exclusive=True, max=100.0, help="gradient norm clip")
        mode: str = knob("a", choices=["a", "b"])
        layers: list[int] = knob([1, 2], min=0, max=12)
        on: bool = knob(False)

    properties = _section(NewSection, "new")["properties"]
    assert properties["clip_grad"] == {"type": "number", "exclusiveMinimum": 0.0, "maximum": 100.0,
                                       "description": "gradient norm clip", "default": 1.0}
    assert properties["mode"] == {"type": "string", "enum": ["a", "b"], "default": "a"}
    assert properties["layers"] == {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 12},
                                    "default": [1, 2]}
    assert properties["on"] == {"type": "boolean", "default": False}


@pytest.mark.parametrize(
    "raw, ok",
    [
        ({"federation": {"aggregation": "fedprox", "mu": 0.1}}, True),
        ({"federation": {"mu": 0.1}}, False),  # aggregation defaults to mean, which has no mu
        ({"federation": {"fedprox": {"mu": 0.1}}}, True),  # kept for when fedprox is chosen
        ({"federation": {"aggregation": "fedprox", "fedprox": {"mu": 0.1}}}, True),
        ({"federation": {"aggregation": "fedprox", "mu": 0.2, "fedprox": {"mu": 0.1}}}, False),  # set twice
        ({"federation": {"fedprox": {"tau": 0.1}}}, False),  # tau is not fedprox's
        ({"federation": {"fedprox": {"mu": -1.0}}}, False),
        ({"federation": {"mean": {}}}, True),
        ({"federation": {"mean": {"mu": 1.0}}}, False),
        ({"federation": {"fedprox": 3}}, False),
        ({"federation": {"aggregation": "fedadam", "beta2": 0.9, "compression": "topk", "topk_fraction": 0.1}}, True),
        ({"federation": {"aggregation": "fedadagrad", "beta2": 0.9}}, False),  # beta2 is fedyogi/fedadam's
        ({"federation": {"topk_fraction": 0.1}}, False),  # compression defaults to none
        ({"federation": {"topk_fraction": 0.0, "compression": "topk"}}, False),  # exclusive minimum
        ({"adapter": {"kind": "lora", "lora_targets": ["q", "v"], "lora_share": "b_only"}}, True),
        ({"adapter": {"kind": "lora", "lora_targets": ["x"]}}, False),
        ({"adapter": {"kind": "clip_adapter", "ratio": 0.5}}, True),
        ({"adapter": {"ratio": 0.5}}, False),  # kind defaults to attai
        ({"adapter": {"kind": "prompt", "lora": {"lora_rank": 4}}}, True),
        ({"train": {"lr": 1}}, True),  # an integer where a number is expected
        ({"run": {"rounds": 2.5}}, False),
        ({"run": {"rounds": True}}, False),  # a boolean is no integer
        ({"train": {"reset_optimizer_each_round": 1}}, False),
    ],
)
def test_components_and_their_tables_agree_with_the_engine(validator, raw, ok):
    found = errors(validator, raw)
    try:
        preset_from_dict(raw)
        engine_ok = True
    except PresetError:
        engine_ok = False
    assert engine_ok is ok
    assert (found == []) is ok, found


def test_the_committed_schema_is_current():
    """docs/preset.schema.json is what `fedtui schema` prints: regenerate it with
    `fedtui schema --out docs/preset.schema.json` after changing a knob."""
    committed = (REPO / "docs" / "preset.schema.json").read_text(encoding="utf-8")
    assert committed == schema_text(), "docs/preset.schema.json is stale: run fedtui schema --out docs/preset.schema.json"


def test_fedtui_schema_prints_and_writes(tmp_path):
    from fedtui.cli import cli

    runner = CliRunner()
    printed = runner.invoke(cli, ["schema"])
    assert printed.exit_code == 0, printed.output
    assert json.loads(printed.stdout) == preset_json_schema()
    out = tmp_path / "deep" / "preset.schema.json"
    written = runner.invoke(cli, ["schema", "--out", str(out)])
    assert written.exit_code == 0, written.output
    assert out.read_text(encoding="utf-8") == schema_text()
    folder = runner.invoke(cli, ["schema", "--out", str(tmp_path)])
    assert folder.exit_code == 2 and "is a folder" in folder.output


def test_the_generator_imports_no_torch():
    code = "import sys, engine.json_schema as j; j.schema_text(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_a_preset_file_with_a_schema_directive_still_reads(tmp_path):
    """The `#:schema` line editors read is a TOML comment: the engine ignores it."""
    path = tmp_path / "p.toml"
    path.write_text("#:schema ../docs/preset.schema.json\n[run]\nrounds = 3\n", encoding="utf-8")
    raw = read_preset_toml(path)
    assert raw == tomllib.loads(path.read_text()) and preset_from_dict(raw).run.rounds == 3


# --- the schema and the engine agree on generated presets ------------------------------------------------------

# What a JSON Schema cannot say, so only ``fedtui check`` finds it: checks across keys, finiteness (NaN passes
# every bound), NUL characters, and a TOML float with no fraction where an integer is wanted (JSON Schema counts
# 1.0 as an integer).
BEYOND_JSON_SCHEMA = (
    "must be a finite number", "contains a NUL character", "is not valid UTF-8",
    "expected three non-negative fractions", "the train fraction must be > 0", "expected two numbers in [0, 1)",
    "must contain exactly one {}", "a domain is listed twice", "at most 100 characters", "more than data.clients",
)


def _beyond_json_schema(message: str) -> bool:
    if message.startswith("expected an integer, got ") or message.startswith("expected a list of int, got "):
        try:
            return float(message.rsplit("got ", 1)[1]).is_integer()
        except ValueError:
            return False
    return any(text in message for text in BEYOND_JSON_SCHEMA)


def _agree(validator, raw) -> None:
    found = errors(validator, raw)
    try:
        preset_from_dict(raw)
    except PresetError as error:
        if not found:  # the schema let it through: every problem must be one it cannot express
            hidden = [str(p) for p in error.problems if not _beyond_json_schema(p.message)]
            assert not hidden, f"the schema accepts a preset the engine refuses for: {hidden}"
        return
    assert found == [], f"the schema refuses a preset the engine accepts: {found}"


def test_generated_presets_agree_with_the_engine(validator):
    """Hypothesis: the schema never refuses a preset the engine accepts, and accepts a refused one only for a
    reason beyond JSON Schema. The presets come from test_preset_fuzz's strategies (built from the schema too)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from test_preset_fuzz import noisy_raw, valid_raw

    @settings(max_examples=int(os.environ.get("FEDTUI_SCHEMA_EXAMPLES", "250")), deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
    @given(st.one_of(valid_raw(), noisy_raw()))
    def check(raw):
        _agree(validator, raw)

    check()
