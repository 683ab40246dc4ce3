"""Where presets come from: shipped with fedtui, the user's folder, and the current directory.

Nothing found here may stop the console: every file is read by ``read_toml``, which never raises and
never blocks (a pipe or device named ``x.toml`` is not opened for a blocking read, a huge file is not
read whole). What it cannot read becomes an entry with a ``problem`` (shown, never started) or, in the
current folder, is skipped when it is clearly not a preset (pyproject.toml, a folder, a binary file).
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

USER_DIR = Path("~/.config/fedtui/presets")
SECTIONS = {"run", "data", "model", "adapter", "train", "federation", "eval"}
# A preset is a few hundred bytes of text; a file past this is not read (listing stays fast).
MAX_PRESET_BYTES = 1 << 20
# A preset section header in text that did not parse (non-UTF-8, invalid TOML): "[run]", "[federation.fedprox]".
_SECTION_HEADER = re.compile(r"^[ \t]*\[[ \t]*(%s)[ \t]*[\].]" % "|".join(sorted(SECTIONS)), re.MULTILINE)


@dataclass(frozen=True)
class PresetEntry:
    path: Path
    kind: str  # "shipped" | "user" | "here" | "file"
    description: str
    problem: str | None = None  # why the file cannot be read as TOML; such an entry never starts

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def label(self) -> str:
        """The name as it can be shown on a terminal (see ``printable``)."""
        return printable(self.name)


@dataclass
class PresetSources:
    """Injectable so tests and snapshots see a fixed list."""

    shipped: list[Path] | None = None  # None: engine.presets.shipped_presets()
    user_dir: Path | None = None  # None: ~/.config/fedtui/presets
    cwd: Path | None = None  # None: Path.cwd()
    extra: list[Path] = field(default_factory=list)

    def resolved_user_dir(self) -> Path:
        return Path(self.user_dir or USER_DIR).expanduser()


def printable(text: str) -> str:
    """``text`` safe to draw: undecodable file-name bytes become U+FFFD, control characters \\xNN."""
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return "".join(f"\\x{ord(c):02x}" if unicodedata.category(c) == "Cc" else c for c in text)


def same_file_key(path: Path) -> Path:
    """The path for de-duplication; a symlink loop or an unreachable folder falls back to the absolute path."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return path.absolute()


@dataclass(frozen=True)
class TomlRead:
    """What ``read_toml`` found: the parsed table, or the problem and whether the file may be a preset."""

    raw: dict[str, Any] | None
    problem: str | None = None
    # For a file that could not be parsed: a preset section header was seen in its text, or its content
    # could not be looked at (permission, a dangling link), so it may be a preset the user expects to see.
    maybe_preset: bool = False


def read_toml(path: Path) -> TomlRead:
    """Read ``path`` as a TOML preset file; never raises, never blocks, reads at most MAX_PRESET_BYTES."""
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            try:
                target = os.readlink(path)
            except OSError:
                target = "?"
            return TomlRead(None, f"is a link to {target}, which does not exist", maybe_preset=True)
        return TomlRead(None, "no such file (removed since it was listed?)", maybe_preset=True)
    except OSError as error:  # permission on a parent folder, a symlink loop, a name too long
        return TomlRead(None, f"cannot be read: {error.strerror or error}", maybe_preset=True)
    if stat.S_ISDIR(info.st_mode):
        return TomlRead(None, "is a folder, not a preset file")
    if not stat.S_ISREG(info.st_mode):
        return TomlRead(None, "is not a regular file (a pipe, socket or device), so it is not read")
    if info.st_size > MAX_PRESET_BYTES:
        return TomlRead(None, f"is {info.st_size / 2**20:.1f} MiB; a preset is a small text file, so it is not read")
    try:
        # O_NONBLOCK: should the file have become a pipe since the stat, opening it does not wait for a writer.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as error:
        return TomlRead(None, f"cannot be read: {error.strerror or error}", maybe_preset=True)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return TomlRead(None, "is not a regular file (a pipe, socket or device), so it is not read")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(MAX_PRESET_BYTES + 1)
    except OSError as error:
        return TomlRead(None, f"cannot be read: {error.strerror or error}", maybe_preset=True)
    finally:
        os.close(fd)
    if len(data) > MAX_PRESET_BYTES:
        return TomlRead(None, "is larger than 1 MiB; a preset is a small text file, so it is not read")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        return TomlRead(None, f"is not UTF-8 text (byte {error.start}, line {line}); save it as UTF-8",
                        maybe_preset=_has_section_header(data.decode("utf-8", "replace")))
    try:
        return TomlRead(tomllib.loads(text))
    except tomllib.TOMLDecodeError as error:
        return TomlRead(None, f"is not valid TOML: {error}", maybe_preset=_has_section_header(text))
    except ValueError as error:  # an integer of more than 4300 digits: int() refuses it
        return TomlRead(None, f"is not valid TOML: {error}", maybe_preset=_has_section_header(text))
    except RecursionError:  # deeply nested arrays
        return TomlRead(None, "is not valid TOML: nested too deeply", maybe_preset=_has_section_header(text))


def _has_section_header(text: str) -> bool:
    return _SECTION_HEADER.search(text) is not None


def has_preset_sections(raw: dict[str, Any]) -> bool:
    """Some top-level table is a preset section: pyproject.toml is not a preset, a preset with a typo still is."""
    return any(key in SECTIONS for key in raw)


def looks_like_preset(path: Path) -> bool:
    """A readable TOML file with a preset section at the top level (so pyproject.toml is skipped)."""
    found = read_toml(path)
    return found.raw is not None and has_preset_sections(found.raw)


def describe_raw(raw: dict[str, Any]) -> str:
    run = raw.get("run")
    description = run.get("description", "") if isinstance(run, dict) else ""
    return description if isinstance(description, str) else str(description)


def entry_for(path: Path, kind: str) -> PresetEntry | None:
    """The list entry for ``path``: None where the current folder holds something that is clearly not a preset."""
    found = read_toml(path)
    if found.raw is not None:
        if kind == "here" and not has_preset_sections(found.raw):
            return None
        return PresetEntry(path=path, kind=kind, description=describe_raw(found.raw))
    if kind == "here" and not found.maybe_preset:
        return None
    return PresetEntry(path=path, kind=kind, description="", problem=found.problem)


def _toml_files(folder: Path) -> list[Path]:
    try:
        return sorted(folder.glob("*.toml"))
    except OSError:
        return []


def discover(sources: PresetSources) -> list[PresetEntry]:
    """Every preset the console lists, in order: named on the command line, shipped, the user's, here."""
    seen: set[Path] = set()
    entries: list[PresetEntry] = []

    def add(path: Path, kind: str) -> None:
        key = same_file_key(path)
        if key in seen:
            return
        entry = entry_for(path, kind)
        if entry is not None:
            seen.add(key)
            entries.append(entry)

    for path in sources.extra:
        add(Path(path), "file")
    if sources.shipped is not None:
        shipped = sources.shipped
    else:
        from engine.presets import shipped_presets

        shipped = shipped_presets()
    for path in shipped:
        add(Path(path), "shipped")
    try:
        user = sources.resolved_user_dir()
    except RuntimeError:  # "~" with no home directory to expand to
        user = None
    if user is not None:
        for path in _toml_files(user):
            add(path, "user")
    try:
        cwd = sources.cwd or Path.cwd()
    except OSError:  # the folder the console was started in was removed
        cwd = None
    if cwd is not None:
        for path in _toml_files(cwd):
            add(path, "here")
    return entries
