"""Preset discovery (fedtui/app/catalog.py): nothing found in a folder may raise, block or be hidden unsaid.

A file that looks like a preset but cannot be read is listed with the reason; what is clearly not a
preset (pyproject.toml, a folder, a binary file, a pipe) is skipped in the current folder.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest

from fedtui.app import catalog
from fedtui.app.catalog import PresetSources, discover, printable, read_toml

PRESET = '[run]\nname = "mine"\ndescription = "my preset"\nrounds = 2\n'


def here(tmp_path: Path, **kwargs) -> list[catalog.PresetEntry]:
    """Discover with only the given folder as the current one (no shipped presets, an empty user folder)."""
    return discover(PresetSources(shipped=[], user_dir=tmp_path / "no-user-dir", cwd=tmp_path, **kwargs))


def by_name(entries) -> dict[str, catalog.PresetEntry]:
    return {e.name: e for e in entries}


def test_a_readable_preset_is_listed_with_its_description(tmp_path):
    (tmp_path / "mine.toml").write_text(PRESET, encoding="utf-8")
    [entry] = here(tmp_path)
    assert (entry.name, entry.kind, entry.description, entry.problem) == ("mine", "here", "my preset", None)


def test_other_toml_files_are_skipped(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n[tool.ruff]\nline-length = 120\n')
    (tmp_path / "toplevel.toml").write_text('title = "not sections"\n')
    (tmp_path / "empty.toml").write_text("")
    (tmp_path / "binary.toml").write_bytes(b"\x00\xff\xfe\x80 not text at all")
    (tmp_path / "broken-cargo.toml").write_text("[package\nname = ")  # invalid, but no preset section
    (tmp_path / "folder.toml").mkdir()
    (tmp_path / "notes.txt").write_text(PRESET)
    assert here(tmp_path) == []


def test_a_preset_with_a_misspelt_section_is_still_listed(tmp_path):
    (tmp_path / "typo.toml").write_text('[run]\nrounds = 2\n[trian]\nlr = 0.1\n')
    [entry] = here(tmp_path)
    assert entry.name == "typo" and entry.problem is None  # the editor shows the unknown section


def test_non_utf8_preset_is_listed_as_unreadable_with_where(tmp_path):
    (tmp_path / "latin.toml").write_bytes(b'[run]\nname = "caf\xe9"\n')
    [entry] = here(tmp_path)
    assert entry.problem == "is not UTF-8 text (byte 17, line 2); save it as UTF-8"
    assert entry.description == ""


@pytest.mark.parametrize("text, expect", [
    ("[run]\nrounds = = 3\n", "is not valid TOML: "),
    ("[run]\nname = 'a'\nname = 'b'\n", "Cannot overwrite a value"),
    ("[run]\nseed = " + "9" * 5000 + "\n", "4300 digits"),  # int() refuses it: a ValueError, not a TOMLDecodeError
    ("[data]\nsplit = " + "[" * 5000 + "]" * 5000 + "\n", "is not valid TOML"),  # RecursionError in tomllib
    ("  [ federation.fedprox ]\nmu = \n", "is not valid TOML"),
])
def test_invalid_toml_with_a_preset_section_is_listed_as_unreadable(tmp_path, text, expect):
    (tmp_path / "bad.toml").write_text(text, encoding="utf-8")
    [entry] = here(tmp_path)
    assert expect in entry.problem


def test_dangling_link_and_link_loop_are_listed_not_raised(tmp_path):
    os.symlink(tmp_path / "gone" / "p.toml", tmp_path / "dangling.toml")
    os.symlink("loop.toml", tmp_path / "loop.toml")
    entries = by_name(here(tmp_path))
    assert "which does not exist" in entries["dangling"].problem and "gone" in entries["dangling"].problem
    assert entries["loop"].problem.startswith("cannot be read:")


def test_a_link_to_a_shipped_preset_is_listed_once(tmp_path):
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "mine.toml").write_text(PRESET)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    os.symlink(shipped / "mine.toml", cwd / "mine.toml")
    entries = discover(PresetSources(shipped=[shipped / "mine.toml"], user_dir=tmp_path / "user", cwd=cwd))
    assert [(e.name, e.kind) for e in entries] == [("mine", "shipped")]


def test_unreadable_file_is_listed_with_the_reason(tmp_path, monkeypatch):
    locked = tmp_path / "locked.toml"
    locked.write_text(PRESET)
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        locked.chmod(0)
    else:  # root reads anything: make this one file fail to open as it would for a user
        real_open = os.open

        def refuse(path, *args, **kwargs):
            if Path(path) == locked:
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(catalog.os, "open", refuse)
    try:
        [entry] = here(tmp_path)
    finally:
        locked.chmod(0o644)
    assert entry.problem == "cannot be read: Permission denied"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_pipe_named_toml_is_skipped_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe.toml")
    result = []
    worker = threading.Thread(target=lambda: result.append(here(tmp_path)), daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "discovery blocked on a named pipe"
    assert result == [[]]
    assert read_toml(tmp_path / "pipe.toml").problem.startswith("is not a regular file")


def test_a_huge_file_is_not_read(tmp_path):
    big = tmp_path / "big.toml"
    with big.open("wb") as handle:
        handle.write(b"[run]\n")
        handle.truncate(catalog.MAX_PRESET_BYTES + 10)  # sparse: costs no disk
    assert here(tmp_path) == []
    assert "a preset is a small text file" in read_toml(big).problem


def test_user_folder_lists_every_toml_even_unreadable_ones(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "ok.toml").write_text(PRESET)
    (user / "latin.toml").write_bytes(b"title = 'caf\xe9'\n")  # no section header: in the user folder, still listed
    (user / "folder.toml").mkdir()
    (user / "other.toml").write_text('[project]\nname = "x"\n')  # read fine; the editor says what is wrong
    entries = by_name(discover(PresetSources(shipped=[], user_dir=user, cwd=tmp_path / "empty")))
    assert set(entries) == {"ok", "latin", "folder", "other"}
    assert entries["ok"].problem is None and entries["other"].problem is None
    assert "UTF-8" in entries["latin"].problem
    assert entries["folder"].problem == "is a folder, not a preset file"
    assert all(e.kind == "user" for e in entries.values())


def test_extra_file_comes_first_and_keeps_its_problem(tmp_path):
    bad = tmp_path / "elsewhere" / "bad.toml"
    bad.parent.mkdir()
    bad.write_text("[run\n")
    entries = discover(PresetSources(shipped=[], user_dir=tmp_path / "user", cwd=tmp_path, extra=[bad]))
    assert [(e.name, e.kind) for e in entries] == [("bad", "file")]
    assert entries[0].problem.startswith("is not valid TOML")


def test_odd_file_names_are_printable(tmp_path):
    if sys.platform == "darwin":
        pytest.skip("macOS file systems refuse non-UTF-8 names")
    name = os.fsdecode(b"caf\xe9 \x1b[2J.toml")
    (tmp_path / name).write_text(PRESET)
    [entry] = here(tmp_path)
    assert entry.label == "caf\ufffd \\x1b[2J"
    assert printable("a\nb\tc") == "a\\x0ab\\x09c"


def test_no_home_and_a_removed_current_folder_do_not_raise(tmp_path, monkeypatch):
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    entries = discover(PresetSources(shipped=[], user_dir=Path("~no-such-user-fedtui/presets")))
    assert entries == []


def test_the_repository_root_lists_no_problem(monkeypatch):
    """pyproject.toml is skipped; every shipped preset reads."""
    root = Path(__file__).resolve().parent.parent
    entries = discover(PresetSources(user_dir=root / "no-such-user-dir", cwd=root))
    assert {e.name for e in entries} >= {"quickstart", "fedclip-pacs"}
    assert "pyproject" not in {e.name for e in entries}
    assert all(e.problem is None for e in entries)
