"""Presets: TOML files read into typed, frozen dataclasses and validated strictly.

This module is the schema: sections and their common keys, parsing, ``--set`` overrides, anchoring
relative paths to the preset file, and writing a preset back as TOML. The checks that need the file
system, the weights or the machine live in ``engine.resolve``; ``load_preset`` runs both, so every
caller (``fedtui run``, each sweep point, the console's editor) checks a preset the same way before
anything is written. Components (aggregation rules, codecs, adapter kinds) own their keys
(``engine.options``); a section only names the component. No torch is imported here.
"""

from __future__ import annotations

import dataclasses
import os
import string
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.options.adapters import ADAPTER_KINDS
from engine.options.codecs import CODECS
from engine.options.strategies import AGGREGATIONS
from engine.schema import (
    PresetError,
    Problem,
    Problems,
    build_section,
    fill_options,
    flatten,
    options_field,
    section_hints,
    shown,
    suggest,
)
from engine.schema import knob as _knob

__all__ = ["Preset", "PresetError", "load_preset", "read_preset", "to_toml"]

# A source checkout keeps presets/ beside engine/; an installed wheel keeps them beside it as fedtui_presets/.
PRESETS_DIR = next(
    (p for p in (Path(__file__).resolve().parent.parent / name for name in ("presets", "fedtui_presets")) if p.is_dir()),
    Path(__file__).resolve().parent.parent / "presets",
)

MAX_PRESET_BYTES = 1 << 20
FAULTY_MODES = ("label_flip", "noise", "scale", "sign_flip", "free_rider")
# numpy's legacy seeding (the reference code's np.random.seed) takes seeds below 2^32.
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class RunSection:
    name: str = _knob("run", help="name used in the run directory (at most 100 characters)")
    description: str = _knob("", help="one line shown by `fedtui presets`")
    seed: int = _knob(0, min=0, max=MAX_SEED)
    # A round takes at least tens of milliseconds; 100,000 rounds is already a day of evaluation alone.
    rounds: int = _knob(10, min=1, max=100_000, help="communication rounds")
    device: str = _knob("auto", choices=["auto", "cpu", "cuda"])
    out_dir: str = _knob("runs", help="folder under which each run gets its own directory")
    cache_dir: str = _knob("", help="feature cache folder; empty: $FEDTUI_CACHE or ~/.cache/fedtui")
    # More threads than a few per core only adds contention; the exact limit (4 x cores) is checked by
    # engine.resolve against this machine, this one stops absurd values before they reach torch.
    threads: int = _knob(0, min=0, max=1024, help="torch CPU threads; 0: all cores but one; at most 4 x cores")


@dataclass(frozen=True)
class DataSection:
    dataset: str = _knob("synthetic", choices=["synthetic", "imagefolder"])
    root: str = _knob("", help="imagefolder root: <root>/<domain>/<class>/<image>")
    domains: list[str] = _knob([], help="domains in play (training and held out); empty: all")
    holdout: list[str] = _knob([], help="domains never trained on, tested whole (generalisation)")
    split: list[float] = _knob([0.6, 0.2, 0.2], min=0.0, max=1.0, help="train/val/test fractions per domain or client")
    partition: str = _knob("domain", choices=["domain", "iid", "dirichlet"])
    clients: int = _knob(4, min=1, max=10_000, help="client count for iid and dirichlet partitions")
    # Beyond 1e6 a Dirichlet draw is indistinguishable from iid; use partition = "iid".
    alpha: float = _knob(0.5, min=0.0, min_exclusive=True, max=1e6, help="Dirichlet concentration")
    min_client_size: int = _knob(10, min=1, max=1_000_000, help="dirichlet: redraw until every client has this many")
    # Every synthetic image is drawn and encoded: 5,000 per class and style is 140,000 images, about an
    # hour of CPU encoding for the small CLIP and hundreds of MB of features.
    images_per_class: int = _knob(40, min=1, max=5_000, help="synthetic: images per class and domain (at most 5000)")
    # The encoder resizes to its own input; a larger render only costs time and memory.
    image_size: int = _knob(64, min=8, max=1024, help="synthetic: rendered image side in pixels (8 to 1024)")
    prompt_template: str = _knob("a picture of a {}", help="class prompt; {} is the class name")
    eval_domain: str = _knob(
        "", help="a domain no client trains on whose images (split val:test as data.split) are every client's "
                 "val and test set, e.g. one validation set 90% like one site and 10% like another; empty: "
                 "each client's own split",
    )


@dataclass(frozen=True)
class ModelSection:
    arch: str = _knob("ViT-B-32", help="open_clip architecture name (must agree with a local-dir's config)")
    pretrained: str = _knob(
        "openai", help="open_clip tag, a checkpoint file, 'local-dir:<folder>', or 'none' (random weights)"
    )
    encode_batch_size: int = _knob(64, min=1, max=4096)


@dataclass(frozen=True)
class AdapterSection:
    kind: str = _knob("attai", component=ADAPTER_KINDS, help="the adapter kind; its keys: see engine/options/adapters.py")
    kind_options: Any = options_field("kind")

    def __post_init__(self) -> None:
        fill_options(self)


@dataclass(frozen=True)
class TrainSection:
    # Each local epoch is a full pass over a client's data; 10,000 per round is far past any study.
    local_epochs: int = _knob(1, min=1, max=10_000, help="E: local epochs per round")
    batch_size: int = _knob(32, min=2, max=65_536)
    # Adam's step is about lr per coordinate; above 10 every adapter leaves the region a CLIP feature lives in.
    lr: float = _knob(5e-5, min=0.0, min_exclusive=True, max=10.0)
    betas: list[float] = _knob([0.9, 0.98], min=0.0, max=1.0)
    eps: float = _knob(1e-6, min=0.0, min_exclusive=True, max=1.0)
    # Coupled L2 decay of 10 x lr per step drives any adapter to zero within a few steps.
    weight_decay: float = _knob(0.2, min=0.0, max=10.0)
    loss: str = _knob("contrastive", choices=["contrastive", "ce"])
    reset_optimizer_each_round: bool = _knob(True)


@dataclass(frozen=True)
class FederationSection:
    aggregation: str = _knob("mean", component=AGGREGATIONS, help="the aggregation rule; its keys: engine/options/strategies.py")
    fraction: float = _knob(1.0, min=0.0, max=1.0, min_exclusive=True, help="C: share of clients per round")
    min_clients: int = _knob(1, min=1, max=10_000)
    personal_layers: list[str] = _knob([], help="adapter tensors (name prefixes) that never leave the client (FedPer)")
    compression: str = _knob("none", component=CODECS, help="the update codec; its keys: engine/options/codecs.py")
    skip_threshold: float = _knob(
        0.0, min=0.0, max=1e3, help="a client skips sending an update with ||delta|| / ||global|| below this"
    )
    faulty: list[str] = _knob([], help="clients that misbehave on purpose (robustness studies), by client name")
    faulty_mode: str = _knob(
        "sign_flip", choices=list(FAULTY_MODES),
        help="label_flip: train on y -> K-1-y; noise: add Gaussian noise of sd strength x the update's RMS; "
             "scale: send strength x the update; sign_flip: send -strength x the update; free_rider: send nothing new",
    )
    # Attacks in the literature scale updates by up to about 100 (e.g. model replacement); 1e3 covers them.
    faulty_strength: float = _knob(1.0, min=0.0, max=1e3, help="the noise sd or scale factor of faulty_mode")
    aggregation_options: Any = options_field("aggregation")
    compression_options: Any = options_field("compression")

    def __post_init__(self) -> None:
        fill_options(self)


@dataclass(frozen=True)
class EvalSection:
    every: int = _knob(1, min=1, max=100_000, help="evaluate every N rounds (and always after the last)")
    selection: str = _knob("best-val", choices=["best-val", "last"])
    wise_alphas: list[float] = _knob(
        [], min=0.0, max=1.0, help="WiSE-FT: evaluate theta_0 + a (theta - theta_0) at the end for each a"
    )
    wise_alpha: float = _knob(1.0, min=0.0, max=1.0, help="WiSE-FT mixing used for the final model")


@dataclass(frozen=True)
class Preset:
    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    adapter: AdapterSection = field(default_factory=AdapterSection)
    train: TrainSection = field(default_factory=TrainSection)
    federation: FederationSection = field(default_factory=FederationSection)
    eval: EvalSection = field(default_factory=EvalSection)
    source: str = field(default="<defaults>", compare=False)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {s.name: flatten(getattr(self, s.name)) for s in _sections()}


def _sections() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(Preset) if f.name != "source"]


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Preset)
    return {f.name: hints[f.name] for f in _sections()}


def preset_from_dict(raw: dict[str, Any], source: str = "<preset>") -> Preset:
    """Build a preset from parsed TOML (a dict of section tables); every problem is collected, then raised."""
    problems = Problems(source)
    types = _section_types()
    for name in raw:
        if name not in types:
            problems.add(shown(name), f"unknown section.{suggest(name, list(types))}")
    sections = {name: build_section(cls, raw.get(name, {}), problems, name) for name, cls in types.items()}
    problems.raise_if_any()
    preset = Preset(**sections, source=source)
    check_keys_together(preset, problems)
    problems.raise_if_any()
    return preset


def check_keys_together(preset: Preset, problems: Problems) -> None:
    """Checks that involve several keys but nothing outside the preset."""
    data, train = preset.data, preset.train
    if len(data.split) != 3 or abs(sum(data.split) - 1.0) > 1e-6:
        problems.add("data.split", f"expected three non-negative fractions summing to 1, got {data.split}")
    elif data.split[0] <= 0:
        problems.add("data.split", "the train fraction must be > 0")
    if len(train.betas) != 2 or not all(0 <= b < 1 for b in train.betas):
        problems.add("train.betas", f"expected two numbers in [0, 1), got {train.betas}")
    if not _one_plain_field(data.prompt_template):
        problems.add("data.prompt_template", "must contain exactly one {} where the class name goes, and no other "
                     "braces (write {{ or }} for a brace)")
    if len(set(data.domains)) != len(data.domains):
        problems.add("data.domains", "a domain is listed twice")
    if len(set(data.holdout)) != len(data.holdout):
        problems.add("data.holdout", "a domain is listed twice")
    if len(preset.run.name) > 100:
        problems.add("run.name", f"at most 100 characters (it names the run directory), got {len(preset.run.name)}")
    if preset.federation.min_clients > data.clients and data.partition != "domain":
        problems.add("federation.min_clients", f"more than data.clients = {data.clients}")


def _one_plain_field(template: str) -> bool:
    """Exactly one bare ``{}``: parsed, never formatted, so '{0.attr}' or a width of 10**18 cannot run."""
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError:
        return False
    return fields == [("", "", None)]


def parse_override(text: str) -> tuple[str, str, str]:
    """Split ``section.key=value`` into its three parts."""
    if "=" not in text:
        raise PresetError("--set", text, "expected section.key=value, e.g. train.local_epochs=5")
    dotted, value = text.split("=", 1)
    dotted = dotted.strip()
    if dotted.count(".") != 1:
        raise PresetError("--set", dotted, "expected section.key, e.g. train.local_epochs")
    section, key = dotted.split(".")
    return section, key, value.strip()


def _parse_override_value(value: str, hint: Any) -> Any:
    """Typed by the schema: strings stay as written; everything else is read as a TOML value."""
    if hint is str:
        return value
    if typing.get_origin(hint) is list and typing.get_args(hint)[0] is str and not value.startswith("["):
        return [v.strip() for v in value.split(",") if v.strip()]
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except (tomllib.TOMLDecodeError, ValueError, RecursionError):
        if typing.get_origin(hint) is list and not value.startswith("["):
            try:
                return tomllib.loads(f"v = [{value}]")["v"]
            except (tomllib.TOMLDecodeError, ValueError, RecursionError):
                pass
        return value  # coerce reports the type mismatch with the key's name


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of parsed TOML with each ``section.key=value`` applied, typed by the schema."""
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    types = _section_types()
    problems = Problems("--set")
    for text in overrides:
        try:
            section, key, value = parse_override(text)
        except PresetError as error:
            problems.extend(error)
            continue
        dotted = f"{section}.{key}"
        if section not in types:
            problems.add(dotted, f"unknown section.{suggest(section, list(types))}")
            continue
        hints = section_hints(types[section])
        if key not in hints:
            problems.add(dotted, f"unknown key.{suggest(key, list(hints))}")
            continue
        if not isinstance(merged.setdefault(section, {}), dict):
            problems.add(dotted, f"the preset's [{section}] is not a table, so its keys cannot be set")
            continue
        merged[section][key] = _parse_override_value(value, hints[key])
    problems.raise_if_any()
    return merged


def read_preset_toml(path: str | Path) -> dict[str, Any]:
    """The file's TOML as a dict; a missing, unreadable, non-UTF-8 or invalid file is a PresetError."""
    path = Path(path)
    if path.is_dir():
        raise PresetError(str(path), None, "is a folder, not a preset file")
    if path.exists() and not path.is_file():  # a pipe or a device would block or never end
        raise PresetError(str(path), None, "is not a regular file")
    try:
        if path.stat().st_size > MAX_PRESET_BYTES:
            raise PresetError(str(path), None, f"is larger than {MAX_PRESET_BYTES // 1024} KiB; a preset is a few lines")
        data = path.read_bytes()
    except FileNotFoundError:
        raise PresetError(str(path), None, "no such preset file") from None
    except OSError as error:
        raise PresetError(str(path), None, f"cannot be read: {error.strerror or error}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise PresetError(str(path), None, f"is not UTF-8 text (byte {error.start}, line {line}); save it as UTF-8") from None
    try:
        return tomllib.loads(text)
    except (tomllib.TOMLDecodeError, ValueError) as error:  # ValueError: an integer of over 4,300 digits
        raise PresetError(str(path), None, f"not valid TOML: {error}") from None
    except RecursionError:
        raise PresetError(str(path), None, "not valid TOML: nested too deeply") from None


def read_preset(path: str | Path, overrides: list[str] | None = None) -> Preset:
    """The preset file with its overrides applied and paths anchored to it: the schema's checks only."""
    return preset_from_raw(read_preset_toml(path), path, overrides)


def load_preset(path: str | Path, overrides: list[str] | None = None) -> Preset:
    """Read and resolve: what every command runs before it writes anything (see ``engine.resolve``)."""
    from engine.resolve import resolve

    return resolve(read_preset(path, overrides))


def preset_from_raw(
    raw: dict[str, Any], path: str | Path, overrides: list[str] | None = None, source: str | None = None,
    origins: list[str] | None = None,
) -> Preset:
    """The parsed TOML of the file at ``path`` with overrides applied and its relative paths anchored there.
    ``origins[i]``: the option that gave ``overrides[i]`` (default ``--set``), named when its value is bad."""
    merged = apply_overrides(raw, overrides or [])
    try:
        return preset_from_dict(resolve_relative_paths(merged, Path(path).resolve().parent), source=source or str(path))
    except PresetError as error:
        raise _blame_overrides(error, overrides or [], origins) from None


def _blame_overrides(error: PresetError, overrides: list[str], origins: list[str] | None) -> PresetError:
    """A bad value that came from an override is reported as ``--set``'s (or ``--vary``'s), not the file's,
    which may well be fine."""
    given = {}
    for text, origin in zip(overrides, origins or ["--set"] * len(overrides)):
        section, key, _ = parse_override(text)  # apply_overrides has parsed each one already
        given[f"{section}.{key}"] = f"{origin} {text}"
    if not any(p.key in given for p in error.problems):
        return error
    problems = [Problem(given[p.key], p.key, p.message) if p.key in given else p for p in error.problems]
    first = problems[0]
    return PresetError(first.source, first.key, first.message, problems)


def resolve_relative_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """Data roots, checkpoints and output folders written relative to the preset file mean relative to it.

    The resolved (absolute) paths are what a run directory's preset.toml records, so it re-runs anywhere.
    ``run.out_dir`` and ``run.cache_dir`` stay as written: runs land where the user stands.
    """
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    data, model = raw.get("data"), raw.get("model")
    if isinstance(data, dict) and isinstance(data.get("root"), str) and data["root"]:
        data["root"] = _anchor(data["root"], base)
    if isinstance(model, dict) and isinstance(model.get("pretrained"), str):
        value = model["pretrained"]
        if value.startswith("local-dir:"):
            model["pretrained"] = "local-dir:" + _anchor(value[len("local-dir:") :], base)
        elif looks_like_path(value):
            model["pretrained"] = _anchor(value, base)
    return raw


def _anchor(value: str, base: Path) -> str:
    try:
        path = Path(value).expanduser()
    except (RuntimeError, ValueError):  # "~nobody/..." (no such user) or a NUL byte: the schema reports it
        path = Path(value)
    return os.path.normpath(path if path.is_absolute() else base / path)


def looks_like_path(value: str) -> bool:
    return "/" in value or "\\" in value or value.endswith((".pt", ".pth", ".bin", ".safetensors"))


def shipped_presets() -> list[Path]:
    return sorted(PRESETS_DIR.glob("*.toml"))


def describe(path: Path) -> str:
    """The preset's one-line description, without validating it (listing must not fail on one bad file)."""
    try:
        raw = read_preset_toml(path)
    except PresetError as error:
        return f"(unreadable: {error.message})"
    run = raw.get("run")
    return str(run.get("description", "")) if isinstance(run, dict) else ""


def to_toml(preset: Preset) -> str:
    """The resolved preset as TOML, so a run directory can be re-run exactly (``read_preset`` gives it back)."""
    lines: list[str] = []
    for section, values in preset.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


_TOML_ESCAPES = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_string(value: str) -> str:
    out = []
    for char in value:
        if char in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:  # other control characters are not allowed raw in TOML
            out.append(f"\\u{ord(char):04X}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")
