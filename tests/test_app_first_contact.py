"""First contact: what a new user does first, from the repository root, with the real engine.

``make console`` is ``.venv/bin/fedtui presets/quickstart.toml`` run from the repository root, then ``s``.
These tests do exactly that (Pilot and a real terminal in tmux), on every shipped preset, and check that
nothing odd in the current folder can crash the console.

Where the runs go: a run writes under ``run.out_dir`` ("runs", relative to the current folder) and the
console has no other switch for it, so a test standing in the repository would leave ``runs/`` there.
Instead each test stands in ``user_root``: a folder whose entries are links to every entry of the
repository root (presets/, engine/, .venv/, pyproject.toml, ...) but whose ``runs/`` is its own. From
inside it the user's command is typed unchanged (relative paths, ``.venv/bin/fedtui``), the preset
resolves to the repository's own file (links resolve), so its ``../engine/assets`` weights are the
shipped ones, and the console lists what it lists from the root. Only the feature cache
(FEDTUI_CACHE, the supported override) and HOME (no personal presets in the list) point elsewhere.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from fake_engine import FakeEngine, wait_for

from fedtui.app.catalog import PresetSources
from fedtui.app.screens.dashboard import DashboardScreen
from fedtui.app.screens.modals import ErrorScreen

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted(p.stem for p in (REPO / "presets").glob("*.toml"))
# Shipped presets that need a download (weights or a data set), so they cannot run offline.
NEEDS_DOWNLOAD = {"fedclip-pacs", "fedclip-vlcs", "fedclip-office-home"}
# Rounds typed into the editor for the presets other than the quickstart (which runs at its own settings).
SHORT_ROUNDS = "2"


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def user_root(tmp_path, monkeypatch, feature_cache) -> Path:
    """The repository root as a user sees it, with a fresh runs/; it becomes the current folder."""
    root = tmp_path / "checkout"
    root.mkdir()
    for entry in REPO.iterdir():
        if entry.name != "runs":
            (root / entry.name).symlink_to(entry)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("FEDTUI_CACHE", str(feature_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(root)
    return root


def _runs_in_repo() -> set[str]:
    return {p.name for p in (REPO / "runs").iterdir()} if (REPO / "runs").is_dir() else set()


@pytest.fixture
def repo_untouched():
    """No run lands in the repository's runs/ (others may work in the tree: only runs/ is checked)."""
    before = _runs_in_repo()
    yield
    assert _runs_in_repo() == before, f"the test left {sorted(_runs_in_repo() - before)} in {REPO / 'runs'}"


def status_text(app) -> str:
    return str(app.presets_screen.query_one("#preset-status").render())


def header_text(app) -> str:
    return str(app.dashboard.query_one("#run-header").render())


# -- every shipped preset, as a user opens it -----------------------------------------------------

def test_every_shipped_preset_is_covered():
    assert "quickstart" in SHIPPED and NEEDS_DOWNLOAD <= set(SHIPPED)


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_preset_from_the_repository_root(name, user_root, repo_untouched):
    """``fedtui presets/<name>.toml`` from the root: validated, ``s``, finished; or its problem and no start."""
    from engine.presets import PresetError, load_preset
    from fedtui.app import FedtuiApp

    typed = f"presets/{name}.toml"  # exactly as a user types it, relative to the current folder
    try:
        load_preset(typed)
        offline = True
    except PresetError:
        offline = False
    assert offline == (name not in NEEDS_DOWNLOAD), f"{typed}: offline={offline}; update NEEDS_DOWNLOAD?"

    async def body():
        app = FedtuiApp(preset_path=typed)  # the real engine, the default preset sources
        async with app.run_test(size=(80, 24)) as pilot:
            screen = app.presets_screen
            await wait_for(pilot, lambda: screen.entry is not None and screen.entry.name == name)
            assert screen.entry.kind == "shipped" and screen.problem is None
            assert "pyproject" not in [e.name for e in screen.entries]
            form = screen.query_one("#preset-form")
            await wait_for(pilot, lambda: form.preset is not None or bool(form.errors or form.general), timeout=30)
            if not offline:
                assert status_text(app).startswith("✗"), status_text(app)
                await pilot.press("s")
                await pilot.pause(0.2)
                assert app.worker is None and app.current_mode == "presets"
                assert any("Cannot start" in n.message for n in app._notifications)
                return
            assert status_text(app).startswith("✓ valid"), status_text(app)
            rounds = form.preset.run.rounds
            if name != "quickstart":  # shorter, typed into the editor as a user would
                await pilot.press("enter")  # from the list into the first field, Rounds
                assert screen.query_one("#knob-run-rounds").has_focus
                await pilot.press("end", *["backspace"] * len(str(rounds)), *SHORT_ROUNDS, "escape")
                await wait_for(pilot, lambda: form.preset is not None and form.preset.run.rounds == int(SHORT_ROUNDS))
                rounds = int(SHORT_ROUNDS)
                assert status_text(app).startswith(f"✓ valid: {SHORT_ROUNDS} rounds")
            await pilot.press("s")
            assert isinstance(app.screen, DashboardScreen)
            await wait_for(pilot, lambda: app.worker is not None and app.worker.is_finished
                           and not app.state.live, timeout=600, step=0.1)
            await pilot.pause(0.3)
            assert not isinstance(app.screen, ErrorScreen), app.state.error
            assert app.state.status == "completed", app.state.error
            assert app.state.round == rounds and app.state.rounds == rounds
            assert "✓ completed" in header_text(app)
            run_dir = Path(app.state.run_dir)
            assert run_dir.resolve().parent == (user_root / "runs").resolve()  # where the user stands
            assert (run_dir / "summary.json").is_file()

    run(body())


# -- odd files in the current folder ----------------------------------------------------------------

def odd_folder(folder: Path) -> None:
    """What a user's current folder may hold next to their presets."""
    (folder / "good.toml").write_text('[run]\nname = "good"\nrounds = 1\n[model]\narch = "fedtui-clip-tiny"\n'
                                      'pretrained = "none"\n', encoding="utf-8")
    (folder / "latin.toml").write_bytes(b'[run]\nname = "caf\xe9"\n')
    (folder / "broken.toml").write_text('[run]\nrounds = = 2\n')
    (folder / "binary.toml").write_bytes(b"\x00\x01\xff garbage")
    (folder / "pyproject.toml").write_text('[project]\nname = "x"\n')
    (folder / "toplevel.toml").write_text('title = "x"\n')
    (folder / "folder.toml").mkdir()
    os.symlink("/nonexistent/p.toml", folder / "dangling.toml")
    os.symlink("[/]", folder / "markup-link.toml")  # the reason names the target: not markup
    os.symlink("loop.toml", folder / "loop.toml")
    (folder / "huge-int.toml").write_text("[run]\nseed = " + "9" * 5000 + "\n")
    (folder / "[bold]odd.toml").write_bytes(b'[run]\nname = "\xff"\n')
    if hasattr(os, "mkfifo"):
        os.mkfifo(folder / "pipe.toml")


UNREADABLE = {"latin": "is not UTF-8 text (byte 17, line 2)", "broken": "is not valid TOML",
              "dangling": "which does not exist", "markup-link": "is a link to [/]", "loop": "cannot be read",
              "huge-int": "4300 digits", "[bold]odd": "is not UTF-8 text"}


def test_odd_files_in_the_current_folder_are_listed_or_skipped_never_fatal(tmp_path, monkeypatch):
    folder = tmp_path / "cwd"
    folder.mkdir()
    odd_folder(folder)
    monkeypatch.chdir(folder)
    engine = FakeEngine()

    async def body():
        from fedtui.app import FedtuiApp

        app = FedtuiApp(engine_run=engine, runs_dir=tmp_path / "runs",
                        preset_sources=PresetSources(shipped=[], user_dir=tmp_path / "user"))
        async with app.run_test(size=(80, 24)) as pilot:
            screen = app.presets_screen
            await wait_for(pilot, lambda: screen.entry is not None)
            names = {e.name: e for e in screen.entries}
            assert set(names) == {"good", *UNREADABLE}  # pyproject, toplevel, binary, folder, pipe: skipped
            assert all(e.kind == "here" for e in names.values())
            for name, reason in UNREADABLE.items():
                assert reason in names[name].problem, (name, names[name].problem)
                screen.query_one("#preset-list").highlighted = list(names).index(name)
                await wait_for(pilot, lambda: screen.entry is names[name])
                await pilot.pause(0.05)
                assert screen.problem and reason in status_text(app), status_text(app)
                assert status_text(app).startswith(f"✗ {names[name].label} ")
                assert screen.query_one("#preset-problem").display and not screen.query_one("#preset-form").display
                await pilot.press("enter", "s")  # enter stays on the list: nothing to edit
                await pilot.pause(0.1)
                assert engine.calls == 0 and app.current_mode == "presets"
                assert any("Cannot start" in n.message and reason in n.message.replace("\\[", "[")
                           for n in app._notifications)
            # and the good one next to them still runs
            screen.query_one("#preset-list").highlighted = list(names).index("good")
            await wait_for(pilot, lambda: screen.current_preset()[0] is not None)
            # The check runs off the UI thread; its answer reaches the status line one message later.
            await wait_for(pilot, lambda: not status_text(app).startswith("✗ [bold]odd"))
            assert status_text(app).startswith("✓ valid")
            await pilot.press("s")
            await wait_for(pilot, lambda: app.state.status == "completed")
            assert engine.calls == 1
        assert app.return_code in (None, 0)

    run(body())


def test_a_file_fixed_after_listing_loads_when_selected_again(tmp_path, monkeypatch):
    (tmp_path / "latin.toml").write_bytes(b'[run]\nname = "caf\xe9"\n')
    (tmp_path / "other.toml").write_text('[run]\nname = "other"\n[model]\narch = "fedtui-clip-tiny"\npretrained = "none"\n')
    monkeypatch.chdir(tmp_path)

    async def body():
        from fedtui.app import FedtuiApp

        app = FedtuiApp(engine_run=FakeEngine(), runs_dir=tmp_path / "runs",
                        preset_sources=PresetSources(shipped=[], user_dir=tmp_path / "user"))
        async with app.run_test(size=(80, 24)) as pilot:
            screen = app.presets_screen
            await wait_for(pilot, lambda: screen.entry is not None and screen.entry.name == "latin")
            assert screen.current_preset()[0] is None
            (tmp_path / "latin.toml").write_text('[run]\nname = "café"\n[model]\narch = "fedtui-clip-tiny"\n'
                                                 'pretrained = "none"\n', encoding="utf-8")
            await pilot.press("down")
            await wait_for(pilot, lambda: screen.entry.name == "other" and screen.current_preset()[0] is not None)
            await pilot.press("up")
            await wait_for(pilot, lambda: screen.entry.name == "latin" and screen.current_preset()[0] is not None)
            assert screen.current_preset()[0].run.name == "café"
            assert status_text(app).startswith("✓ valid") and screen.query_one("#preset-form").display

    run(body())


def test_a_preset_value_that_looks_like_markup_does_not_crash(tmp_path, monkeypatch):
    (tmp_path / "markup.toml").write_text('[run]\nname = "m"\nrounds = "[/]"\n')
    monkeypatch.chdir(tmp_path)

    async def body():
        from fedtui.app import FedtuiApp

        app = FedtuiApp(engine_run=FakeEngine(), runs_dir=tmp_path / "runs",
                        preset_sources=PresetSources(shipped=[], user_dir=tmp_path / "user"))
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for(pilot, lambda: "run.rounds" in app.presets_screen.query_one("#preset-form").errors)
            await pilot.pause(0.2)

    run(body())


# -- fedtui PRESET.toml: a file that cannot be read is one line and exit 2 -----------------------------

@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_bytes(b'[run]\nname = "caf\xe9"\n'), "is not UTF-8 text (byte 17, line 2); save it as UTF-8"),
    (lambda p: p.write_text("[run\n"), "is not valid TOML: "),
    (lambda p: p.mkdir(), "is a folder, not a preset file"),
    (lambda p: os.mkfifo(p), "is not a regular file"),
    (lambda p: os.symlink("/nonexistent/x.toml", p), "is a link to /nonexistent/x.toml, which does not exist"),
    (lambda p: None, "no such preset file"),
], ids=["latin1", "invalid-toml", "folder", "pipe", "dangling-link", "missing"])
def test_console_refuses_an_unreadable_preset_file(tmp_path, monkeypatch, capsys, make, message):
    from fedtui.cli import main

    monkeypatch.chdir(tmp_path)
    make(tmp_path / "bad.toml")
    with pytest.raises(SystemExit) as exit_:
        main(["bad.toml"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: bad.toml: ") and message in err, err


# -- a real terminal --------------------------------------------------------------------------------

def tmux(socket: str, *args: str, env=None, check: bool = True) -> str:
    out = subprocess.run(["tmux", "-L", socket, *args], capture_output=True, text=True, env=env, timeout=30)
    if check and out.returncode != 0:
        raise AssertionError(f"tmux {' '.join(args)}: {out.stderr}")
    return out.stdout


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_quickstart_in_tmux_as_a_user_types_it(user_root, tmp_path, repo_untouched):
    """``.venv/bin/fedtui presets/quickstart.toml`` in an 80x24 terminal: ✓ valid, ``s``, ✓ completed, ``q``."""
    assert (user_root / ".venv" / "bin" / "fedtui").exists(), "no .venv/bin/fedtui: run `make install`"
    socket = f"fedtui-test-{uuid.uuid4().hex[:8]}"
    conf = tmp_path / "tmux.conf"
    conf.write_text("set -g remain-on-exit on\nset -g history-limit 10000\n")
    env = {**os.environ, "TERM": os.environ.get("TERM") or "xterm-256color"}
    env.pop("TMUX", None)
    screens: list[str] = []

    def screen() -> str:
        text = tmux(socket, "capture-pane", "-p", "-J", "-t", "first", "-S", "-")
        screens.append(text)
        return text

    def wait_screen(condition, timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = screen()
            assert "Traceback" not in text, text
            if condition(text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout:.0f} s; the terminal shows:\n{text}")
            time.sleep(0.25)

    try:
        tmux(socket, "-f", str(conf), "new-session", "-d", "-s", "first", "-x", "80", "-y", "24",
             # the user's command; the echo shows its exit code (tmux 3.3's #{pane_dead_status} stays empty here)
             "-c", str(user_root), '.venv/bin/fedtui presets/quickstart.toml; echo "[exit code $?]"', env=env)
        text = wait_screen(lambda t: "✓ valid" in t, 120, "validated preset")
        assert "✗" not in text and "quickstart" in text
        tmux(socket, "send-keys", "-t", "first", "s")
        text = wait_screen(lambda t: "✓ completed" in t or "failed" in t, 600, "finished run")
        assert "✓ completed" in text and "round 20/20" in text, text
        tmux(socket, "send-keys", "-t", "first", "q")
        text = wait_screen(lambda t: "[exit code" in t, 60, "exit after q")
        assert "[exit code 0]" in text, text
        assert not any("Traceback" in s for s in screens)
        runs = list((user_root / "runs").iterdir())
        assert len(runs) == 1 and (runs[0] / "summary.json").is_file()
    finally:
        tmux(socket, "kill-server", check=False)
