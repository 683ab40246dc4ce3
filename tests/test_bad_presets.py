"""Bad presets through the real command, as a user types it: exit 2, one clear line naming the file, no traceback,
nothing written.

Each file in ``tests/bad_presets/`` holds one mistake and says what the user must read about it in its first line,
``# expect: <regex>`` (searched in stderr). A second line ``# xfail: <why>`` marks a known bug in the schema: the
test is expected to fail (strictly), so fixing the bug turns it red until the line is removed.

Every case runs ``fedtui`` as a subprocess three ways at once:

* ``fedtui run tests/bad_presets/X.toml --out <tmp>/out`` from the repository root (the --out folder must not
  appear);
* ``fedtui run <relative path to X.toml>`` from an empty temporary folder (the default ``runs/`` must not appear
  there);
* ``fedtui check tests/bad_presets/X.toml`` from the repository root (exit 2, nothing on stdout).

The feature cache and the Hugging Face home point into the temporary folder too, so anything written anywhere
the command could write shows up in one listing.

About 150 short subprocesses (each ~0.3 s, the no-model case ~4 s as it imports open_clip): over 20 s on two cores,
so the subprocess tests are marked slow.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from engine.presets import read_preset

REPO = Path(__file__).resolve().parents[1]
BAD = REPO / "tests" / "bad_presets"
QUICKSTART = "presets/quickstart.toml"

# The console script pip installed beside this interpreter (what a user runs); `python -m fedtui` otherwise.
_SCRIPT = Path(sys.executable).parent / "fedtui"
FEDTUI = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "fedtui"]
TIMEOUT = 120


def _header(path: Path) -> tuple[str, str | None]:
    """The ``# expect:`` regex and the optional ``# xfail:`` reason from the file's first lines (read as bytes)."""
    lines = path.read_bytes().split(b"\n", 2)
    first = lines[0].decode("ascii")
    assert first.startswith("# expect: "), f"{path.name}: the first line must be '# expect: <regex>'"
    second = lines[1].decode("ascii", "replace") if len(lines) > 1 else ""
    xfail = second[len("# xfail: "):] if second.startswith("# xfail: ") else None
    return first[len("# expect: "):].strip(), xfail


def _cases():
    for path in sorted(BAD.glob("*.toml")):
        expect, xfail = _header(path)
        marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
        yield pytest.param(path.name, expect, id=path.stem, marks=marks)


def _env(scratch: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "COLUMNS", "FEDTUI_CACHE")}
    env.update(
        HF_HUB_OFFLINE="1",  # the no-model preset must be refused at once, never after a download attempt
        HF_HOME=str(scratch / "hf-home"),  # an empty hub cache: the ViT-B-32 weights are never "already there"
        FEDTUI_CACHE=str(scratch / "feature-cache"),
        NO_COLOR="1",
        PYTHONIOENCODING="utf-8",
    )
    return env


def _start(args: list, cwd: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([*FEDTUI, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return proc.returncode, stdout.decode("utf-8", "replace"), stderr.decode("utf-8", "replace")


def _assert_bad_input(what: str, result: tuple[int, str, str], expect: str, names: str) -> None:
    code, stdout, stderr = result
    shown = f"{what}: exit {code}\n--- stderr\n{stderr}\n--- stdout\n{stdout[-2000:]}"
    assert "Traceback" not in stderr + stdout, shown
    assert code == 2, shown
    assert re.search(expect, stderr), f"expected /{expect}/ on stderr\n{shown}"
    assert names in stderr, f"the message should name {names!r}\n{shown}"


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    """``tmp_path`` with one empty folder, ``cwd``, to run from; nothing else may appear in it."""
    (tmp_path / "cwd").mkdir()
    return tmp_path


def _refuse_three_ways(scratch: Path, cwd_for_repo_runs: Path, relpath: str, expect: str) -> str:
    """Run, run from an empty folder, check: each refuses with ``expect``; returns check's stderr."""
    cwd = scratch / "cwd"
    env = _env(scratch)
    from_cwd = os.path.relpath(cwd_for_repo_runs / relpath, cwd)
    procs = {
        f"fedtui run {relpath} --out <tmp>/out": _start(["run", relpath, "--out", str(scratch / "out")], cwd_for_repo_runs, env),
        f"fedtui run {from_cwd} (from an empty folder)": _start(["run", from_cwd], cwd, env),
        f"fedtui check {relpath}": _start(["check", relpath], cwd_for_repo_runs, env),
    }
    results = {what: _finish(proc) for what, proc in procs.items()}
    for what, result in results.items():
        names = from_cwd if "empty folder" in what else relpath
        _assert_bad_input(what, result, expect, names)
        if what.startswith("fedtui check"):
            assert result[1] == "", f"check printed a preset for a bad file:\n{result[1]}"
    assert _listing(scratch) == ["cwd"], f"something was written: {_listing(scratch)}"
    return results[f"fedtui check {relpath}"][2]


@pytest.mark.slow
@pytest.mark.parametrize("name, expect", list(_cases()))
def test_bad_preset_is_refused_and_nothing_is_written(scratch, name, expect):
    stderr = _refuse_three_ways(scratch, REPO, f"tests/bad_presets/{name}", expect)
    # one mistake per file, so one problem per file (each problem is one line)
    assert len(stderr.strip().splitlines()) == 1, f"{name} should hold exactly one mistake:\n{stderr}"


def test_bad_presets_folder_covers_the_issue_list():
    names = {p.stem for p in BAD.glob("*.toml")}
    wanted = {
        "unknown-key-typo", "unknown-section", "wrong-type", "lr-nan", "lr-inf", "lr-1e30", "split-nan",
        "split-not-summing-to-1", "wise-alpha-nan", "weight-decay-1.8e308", "tau-int64-max", "threads-100000",
        "image-size-100000", "images-per-class-1000000", "mu-under-mean", "arch-nope-with-local-dir",
        "local-dir-missing", "checkpoint-missing", "holdout-unknown-domain", "holdout-every-domain",
        "prompt-template-without-braces", "run-not-a-table", "invalid-toml-syntax",
        "dirichlet-min-client-size-impossible", "iid-more-clients-than-images", "no-model-section",
    }
    assert wanted <= names, sorted(wanted - names)
    for path in BAD.glob("*.toml"):
        re.compile(_header(path)[0])  # every expectation is a valid regex


@pytest.mark.slow
def test_non_utf8_preset(scratch):
    """Written here, so that every file in git stays UTF-8 text: a Latin-1 byte in a string on line 3."""
    work = scratch / "presets-here"
    work.mkdir()
    (work / "latin1.toml").write_bytes(
        b'[model]\narch = "fedtui-clip-tiny"\npretrained = "none"\n[run]\nname = "caf\xe9"\n'
    )
    before = _listing(work)
    _refuse_three_ways_outside(scratch, work, "latin1.toml", r"is not UTF-8 text \(byte \d+, line 5\); save it as UTF-8")
    assert _listing(work) == before


def _refuse_three_ways_outside(scratch: Path, folder: Path, relpath: str, expect: str) -> None:
    """As ``_refuse_three_ways`` for a preset in a temporary folder of its own (which is then ignored)."""
    cwd = scratch / "cwd"
    env = _env(scratch)
    from_cwd = os.path.relpath(folder / relpath, cwd)
    procs = {
        "run --out": _start(["run", relpath, "--out", str(scratch / "out")], folder, env),
        "run from an empty folder": _start(["run", from_cwd], cwd, env),
        "check": _start(["check", relpath], folder, env),
    }
    for what, proc in procs.items():
        _assert_bad_input(what, _finish(proc), expect, from_cwd if "empty" in what else relpath)
    assert _listing(scratch) == sorted(["cwd", folder.name, *(f"{folder.name}/{p}" for p in _listing(folder))])


# --set mistakes: (preset, extra argv, expected message, what the message must name)
SET_MISTAKES = [
    pytest.param(QUICKSTART, ["--set", "train.local_epoch=5"],
                 r"--set: \[train\.local_epoch\] unknown key\. Did you mean 'local_epochs'\?", "--set", id="typo-key"),
    pytest.param(QUICKSTART, ["--set", "trian.lr=1e-3"],
                 r"--set: \[trian\.lr\] unknown section\. Did you mean 'train'\?", "--set", id="typo-section"),
    pytest.param(QUICKSTART, ["--set", "train.lr"], r"expected section\.key=value", "--set", id="no-equals"),
    pytest.param(QUICKSTART, ["--set", "train.lr=nan"],
                 r"\[train\.lr\] must be a finite number, got nan", "--set train.lr=nan:", id="lr-nan"),
    pytest.param(QUICKSTART, ["--set", "train.lr=-inf"],
                 r"\[train\.lr\] must be a finite number, got -inf", "--set train.lr=-inf:", id="lr-minus-inf"),
    pytest.param(QUICKSTART, ["--set", "data.split=nan,0.5,0.5"],
                 r"\[data\.split\] must be a finite number, got nan", "--set data.split=nan,0.5,0.5:", id="split-nan"),
    pytest.param(QUICKSTART, ["--set", "federation.mu=0.5"],
                 r"\[federation\.mu\] is a key of aggregation 'fedprox', but aggregation = 'mean'", "--set federation.mu=0.5:",
                 id="mu-under-mean"),
    pytest.param("tests/bad_presets/run-not-a-table.toml", ["--set", "run.rounds=1"],
                 r"--set: \[run\.rounds\] the preset's \[run\] is not a table", "--set", id="set-into-run-true"),
    pytest.param(QUICKSTART, [b"--set", b"run.name=caf\xe9"],
                 r"\[run\.name\] is not valid UTF-8 text", "--set run.name=caf", id="non-utf8-argv-value"),
    pytest.param(QUICKSTART, [b"--set", b"data.holdout=sk\xe9tch"],
                 r"\[data\.holdout\] is not valid UTF-8 text", "--set data.holdout=sk", id="non-utf8-argv-list"),
    pytest.param(QUICKSTART, [b"--set", b"tr\xe9in.lr=1e-3"],
                 r"--set: \[tr\\udce9in\.lr\] unknown section", "--set", id="non-utf8-argv-key"),
    pytest.param(QUICKSTART, ["--set", "run.seed=" + "1" * 5000], r"\[run\.seed\]", "run.seed", id="int-5000-digits"),
]


@pytest.mark.slow
@pytest.mark.parametrize("preset, extra, expect, names", SET_MISTAKES)
def test_bad_set_is_refused_and_nothing_is_written(scratch, preset, extra, expect, names):
    env = _env(scratch)
    procs = {
        "run --out": _start(["run", preset, *extra, "--out", str(scratch / "out")], REPO, env),
        "check": _start(["check", preset, *extra], REPO, env),
    }
    for what, proc in procs.items():
        _assert_bad_input(what, _finish(proc), expect, names)
    assert _listing(scratch) == ["cwd"], f"something was written: {_listing(scratch)}"


def _run_quickstart_out(scratch: Path, out: str) -> tuple[int, str, str]:
    # rounds=1 only limits the damage should a broken check let the run start
    return _finish(_start(["run", QUICKSTART, "--set", "run.rounds=1", "--out", out], REPO, _env(scratch)))


@pytest.mark.slow
def test_out_is_a_file(scratch):
    target = scratch / "cwd" / "notes.txt"
    target.write_text("keep me\n")
    result = _run_quickstart_out(scratch, str(target))
    _assert_bad_input("run --out FILE", result, r"--out .*notes\.txt is a file, not a folder; nothing was written", "notes.txt")
    assert target.read_text() == "keep me\n"
    assert _listing(scratch) == ["cwd", "cwd/notes.txt"]


@pytest.mark.slow
def test_out_under_a_file_is_not_a_directory(scratch):
    target = scratch / "cwd" / "notes.txt"
    target.write_text("keep me\n")
    result = _run_quickstart_out(scratch, str(target / "sub"))
    _assert_bad_input("run --out FILE/sub", result,
                      r"cannot create the run directory under .*notes\.txt/sub: Not a directory; nothing was written",
                      "notes.txt/sub")
    assert target.read_text() == "keep me\n"
    assert _listing(scratch) == ["cwd", "cwd/notes.txt"]


@pytest.mark.slow
def test_out_not_empty(scratch):
    (scratch / "cwd" / "old-run").mkdir()
    (scratch / "cwd" / "old-run" / "summary.json").write_text("{}")
    result = _run_quickstart_out(scratch, str(scratch / "cwd" / "old-run"))
    _assert_bad_input("run --out NONEMPTY", result, r"exists and is not empty; nothing was written", "old-run")
    assert _listing(scratch) == ["cwd", "cwd/old-run", "cwd/old-run/summary.json"]


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder; the ENOTDIR case covers it")
def test_out_inside_a_read_only_folder(scratch):
    locked = scratch / "cwd" / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        result = _run_quickstart_out(scratch, str(locked / "run"))
    finally:
        locked.chmod(0o700)
    _assert_bad_input("run --out READONLY/run", result, r"cannot create the run directory under .*: Permission denied",
                      "locked/run")
    assert _listing(scratch) == ["cwd", "cwd/locked"]


MULTILINE = '''[run]
name = "multi-line"
description = """first line
second line with "quotes", a tab\tand a backslash \\\\ and unicode \u00e9 \u2713"""

[model]
arch = "fedtui-clip-tiny"
pretrained = "none"

[data]
images_per_class = 4
prompt_template = """a picture
of a {}"""
'''


@pytest.mark.slow
def test_multiline_strings_are_fine(scratch):
    """Not a bad preset: multi-line strings pass `fedtui check` (exit 0), and nothing is written."""
    work = scratch / "cwd"
    (work / "multi.toml").write_text(MULTILINE, encoding="utf-8")
    env = _env(scratch)
    env["COLUMNS"] = "10000"  # see test_check_output_is_the_preset_as_toml for the default width
    code, stdout, stderr = _finish(_start(["check", "multi.toml"], work, env))
    assert code == 0 and "Traceback" not in stderr, stderr
    assert "multi.toml can run" in stderr
    printed = tomllib.loads(stdout)
    assert printed["run"]["description"] == 'first line\nsecond line with "quotes", a tab\tand a backslash \\ and unicode é ✓'
    assert printed["data"]["prompt_template"] == "a picture\nof a {}"
    assert _listing(scratch) == ["cwd", "cwd/multi.toml"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "description",
    [
        pytest.param("a description long enough to pass the eighty columns a piped Rich console assumes, so it wraps",
                     id="long-line"),
        pytest.param("emoji codes stay text :smile: :thumbs_up:", id="emoji-code"),
    ],
)
def test_check_output_is_the_preset_as_toml(scratch, description):
    work = scratch / "cwd"
    (work / "p.toml").write_text(
        f'[run]\ndescription = "{description}"\n[model]\narch = "fedtui-clip-tiny"\npretrained = "none"\n',
        encoding="utf-8",
    )
    code, stdout, stderr = _finish(_start(["check", "p.toml"], work, _env(scratch)))  # no COLUMNS: a pipe's default
    assert code == 0, stderr
    assert tomllib.loads(stdout) == read_preset(work / "p.toml").to_dict()
