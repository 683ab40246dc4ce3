"""Pilot tests of the console against the scripted fake engine (tests/fake_engine.py)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest

from fake_engine import FakeEngine, make_app, wait_for

from fedtui.app.screens.dashboard import DashboardScreen
from fedtui.app.screens.modals import ConfirmScreen, ErrorScreen
from fedtui.app.widgets.client_table import ClientTable


def run(coro):
    return asyncio.run(coro)


async def select_preset(pilot, name: str) -> None:
    app = pilot.app
    screen = app.presets_screen
    index = [e.name for e in screen.entries].index(name)
    screen.query_one("#preset-list").highlighted = index
    await wait_for(pilot, lambda: screen.entry is not None and screen.entry.name == name)
    await wait_for(pilot, lambda: screen.current_preset()[0] is not None
                   and screen.current_preset()[0].run.name == name.replace("smoke", "smoke"))


async def start_smoke_and_finish(pilot) -> None:
    """Pick the smoke preset, start it, wait until the fake engine's run has completed."""
    await select_preset(pilot, "smoke")
    await pilot.press("s")
    await wait_for(pilot, lambda: pilot.app.state.status == "completed")
    await pilot.pause(0.15)


def test_start_runs_to_completion(tmp_path):
    engine = FakeEngine()

    async def body():
        app = make_app(tmp_path, engine)
        async with app.run_test(size=(80, 24)) as pilot:
            await start_smoke_and_finish(pilot)
            assert isinstance(app.screen, DashboardScreen)
            assert engine.calls == 1
            table = app.dashboard.query_one(ClientTable)
            assert table.row_count == 3
            assert [p.round for p in app.state.points] == [0, 1, 2, 3]
            assert app.state.zero_shot == pytest.approx(0.38)
            assert app.dashboard.query_one("#log").line_count >= 5
            assert app.dashboard.query_one("#round-progress").percentage == 1.0
            await pilot.press("o")  # run folder shown, no crash
            await pilot.press("escape")
            assert app.current_mode == "presets"

    run(body())


def test_a_drain_tick_while_the_dashboard_is_taken_down_is_harmless(tmp_path):
    """As the app exits, Textual removes the dashboard's widgets while it is still the screen; a drain tick (a
    timer, the worker's last state change) landing then once crashed the app with NoMatches (a CI snapshot run)."""
    engine = FakeEngine()

    async def body():
        app = make_app(tmp_path, engine)
        async with app.run_test(size=(80, 24)) as pilot:
            await start_smoke_and_finish(pilot)
            assert app.screen is app.dashboard
            await app.dashboard.query("*").remove()
            app.state.dirty = True
            app._refresh_dashboard()  # what drain_events does with events or a live run
            with app.batch_update():
                app.dashboard.refresh_view(force=True)
            await pilot.pause(0.1)
            assert app.is_running

    run(body())


def test_pause_resume_then_stop(tmp_path):
    hold = threading.Event()
    # Slow enough (1 s a client) that the stop lands mid-run even on a loaded machine.
    engine = FakeEngine(hold=hold, step_delay=0.02, steps=50)

    async def body():
        app = make_app(tmp_path, engine)
        async with app.run_test(size=(80, 24)) as pilot:
            await select_preset(pilot, "smoke")
            await pilot.press("s")
            await wait_for(pilot, lambda: engine.started.is_set() and app.state.status == "running")
            await pilot.press("p")
            assert app.control.paused and app.state.status == "paused"
            hold.set()
            await pilot.pause(0.3)
            assert all(row.last_loss is None for row in app.state.clients.values())  # blocked at checkpoint
            assert "paused" in str(app.dashboard.query_one("#run-header").render())
            await pilot.press("p")
            assert not app.control.paused
            await wait_for(pilot, lambda: any(r.last_loss is not None for r in app.state.clients.values()))
            await pilot.press("x")
            assert app.control.stop_requested
            await wait_for(pilot, lambda: app.state.status == "stopped")
            assert not app.run_live and engine.finished.is_set()
            assert app.state.round < 3

    run(body())


def test_quit_mid_run_asks_then_stops_cleanly(tmp_path):
    hold = threading.Event()  # never set: the run stays live until stopped
    engine = FakeEngine(hold=hold)

    async def body():
        app = make_app(tmp_path, engine)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("s")
            await wait_for(pilot, lambda: engine.started.is_set())
            await pilot.press("q")
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("n")  # changed my mind: the run goes on
            assert not isinstance(app.screen, ConfirmScreen) and app.run_live
            await pilot.press("q")
            await pilot.press("y")
            await wait_for(pilot, lambda: engine.finished.is_set(), timeout=10)
        assert app.state.status == "stopped"
        assert engine.finished.is_set()

    run(body())


def test_invalid_knob_shows_error_and_refuses_start(tmp_path):
    engine = FakeEngine()

    async def body():
        app = make_app(tmp_path, engine)
        async with app.run_test(size=(80, 24)) as pilot:
            await select_preset(pilot, "smoke")
            await pilot.press("enter")  # from the list into the editor's first field
            rounds = app.screen.query_one("#knob-run-rounds")
            assert rounds.has_focus
            await pilot.press("end", "backspace", "0")
            await wait_for(pilot, lambda: "run.rounds" in app.presets_screen.query_one("#preset-form").errors)
            error = app.screen.query_one("#knob-run-rounds-error")
            assert error.display and "must be >= 1" in str(error.render())
            await pilot.press("escape", "s")  # back to the list, try to start
            await pilot.pause(0.1)
            assert engine.calls == 0 and app.current_mode == "presets"
            assert any("Cannot start" in n.message for n in app._notifications)
            app.screen.query_one("#knob-train-lr").value = "fast"  # a type error, same validator as --set
            await wait_for(pilot, lambda: "train.lr" in app.presets_screen.query_one("#preset-form").errors)
            assert "expected a number" in app.presets_screen.query_one("#preset-form").errors["train.lr"]
            app.screen.query_one("#knob-train-lr").value = "0.001"
            # fix it: back to a valid value, start works
            await pilot.press("enter", "end", "backspace", "2", "escape")
            await wait_for(pilot, lambda: app.presets_screen.current_preset()[0] is not None)
            assert app.presets_screen.current_preset()[0].run.rounds == 2
            await pilot.press("s")
            await wait_for(pilot, lambda: app.state.status == "completed")
            assert app.state.rounds == 2

    run(body())


def test_save_as_writes_a_preset_that_loads(tmp_path):
    from engine.presets import load_preset

    async def body():
        app = make_app(tmp_path)
        async with app.run_test(size=(80, 24)) as pilot:
            await select_preset(pilot, "smoke")
            app.screen.query_one("#knob-train-local_epochs").value = "4"
            # None while the edit is checked off the UI thread, then the checked preset
            await wait_for(pilot, lambda: (preset := app.presets_screen.current_preset()[0]) is not None
                           and preset.train.local_epochs == 4)
            await pilot.press("ctrl+s")
            await wait_for(pilot, lambda: app.screen.__class__.__name__ == "SaveAsScreen")
            app.screen.query_one("#save-name").value = "mine"
            await pilot.press("enter")
            await wait_for(pilot, lambda: (tmp_path / "user" / "mine.toml").exists())
            await wait_for(pilot, lambda: app.presets_screen.entry.name == "mine")  # listed and selected
        preset = load_preset(tmp_path / "user" / "mine.toml")
        assert preset.train.local_epochs == 4 and preset.run.rounds == 3

    run(body())


def test_run_failed_shows_modal_and_app_stays_alive(tmp_path):
    engine = FakeEngine(fail_at_round=2)

    async def body():
        app = make_app(tmp_path, engine)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("s")
            await wait_for(pilot, lambda: isinstance(app.screen, ErrorScreen))
            assert "out of memory" in app.screen.error
            await pilot.press("escape")
            assert isinstance(app.screen, DashboardScreen)
            assert app.state.status == "failed" and not app.run_live
            await pilot.press("s")  # a new run can start after a failure
            await wait_for(pilot, lambda: engine.calls == 2)

    run(body())


def test_engine_raising_before_start_is_shown_not_fatal(tmp_path):
    from engine.presets import PresetError

    def broken(preset, sink, control=None, run_dir=None):
        raise PresetError("x.toml", "data.root", "folder does not exist")

    async def body():
        app = make_app(tmp_path, broken)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("s")
            await wait_for(pilot, lambda: isinstance(app.screen, ErrorScreen))
            assert "data.root" in app.screen.error

    run(body())


def test_replay_finished_run_and_compare(tmp_path):
    ensure = make_app(tmp_path)  # writes the presets; also stubs engine.synthetic if needed
    from engine.presets import load_preset

    preset = load_preset(tmp_path / "shipped" / "smoke.toml")
    FakeEngine(out_dir=tmp_path / "runs", run_id="run-a")(preset, lambda e: None)
    FakeEngine(out_dir=tmp_path / "runs", run_id="run-b", fail_at_round=2)(preset, lambda e: None)
    del ensure

    async def body():
        app = make_app(tmp_path)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("r")
            assert app.current_mode == "runs"
            screen = app.runs_screen
            assert [r.run_id for r in screen.records] == ["run-b", "run-a"]  # newest first
            assert [r.status for r in screen.records] == ["failed", "completed"]
            await pilot.press("space", "down", "space")
            assert len(screen.marked) == 2
            await pilot.press("enter")  # the cursor is on run-a, the completed one
            await wait_for(pilot, lambda: isinstance(app.screen, DashboardScreen) and not app.screen.live)
            replay = app.screen
            assert replay.state.status == "completed"
            assert [p.round for p in replay.state.points] == [0, 1, 2, 3]
            assert replay.query_one(ClientTable).row_count == 3
            await pilot.press("x", "s")  # run keys are off in a replay
            assert app.run_live is False
            await pilot.press("escape")
            assert app.screen is screen

    run(body())


def test_burst_of_events_keeps_keys_responsive(tmp_path):
    engine = FakeEngine(steps=3000, extra_logs=5000)  # 3 clients x 3 rounds x 3000 + 5000 log lines

    async def body():
        app = make_app(tmp_path, engine)
        async with app.run_test(size=(80, 24)) as pilot:
            await select_preset(pilot, "smoke")
            await pilot.press("s")
            await wait_for(pilot, lambda: app.state.status == "completed", timeout=30)
            t0 = time.perf_counter()
            await pilot.press("o")
            key_latency = time.perf_counter() - t0
            print(f"events={app.state.events} longest drain tick={app.max_tick_seconds * 1000:.0f} ms "
                  f"key latency={key_latency * 1000:.0f} ms")
            assert app.state.events > 30_000
            # What keeps keys responsive under a burst, checked without a clock: events are applied in batches
            # (tens of thousands in a few ticks, not a redraw each), and a tick redraws the dashboard once.
            print(f"ticks with events={app.ticks_with_events} dashboard refreshes={app.dashboard_refreshes}")
            assert app.ticks_with_events * 100 < app.state.events
            assert app.dashboard_refreshes * 100 < app.state.events  # one a tick, never one an event
            assert app.dashboard.query_one("#log").line_count <= 2000

    run(body())


def test_command_palette_has_main_actions(tmp_path):
    async def body():
        app = make_app(tmp_path)
        async with app.run_test(size=(80, 24)):
            titles = [c.title for c in app.get_system_commands(app.screen)]
            for title in ("Start run", "Pause / resume run", "Stop run", "Show run folder", "Runs", "Presets"):
                assert title in titles

    run(body())


def test_app_import_is_light():
    import subprocess
    import sys

    code = "import sys; import fedtui.app; from fedtui.app import FedtuiApp; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == "False", out.stderr


# -- REAL ENGINE -------------------------------------------------------------------------------------
# Uses engine.runner.run (the real training loop, tiny model, random weights). Skipped until
# engine/runner.py exists.
def test_real_engine_tiny_run(tmp_path):
    runner = pytest.importorskip("engine.runner")
    (tmp_path / "real.toml").write_text(f"""\
[run]
name = "real-tiny"
rounds = 1
out_dir = "{tmp_path / 'runs'}"
cache_dir = "{tmp_path / 'cache'}"
threads = 1

[data]
images_per_class = 3
image_size = 32

[model]
arch = "fedtui-clip-tiny"
pretrained = "none"
encode_batch_size = 16

[train]
batch_size = 4
""", encoding="utf-8")

    async def body():
        from fedtui.app import FedtuiApp
        from fedtui.app.catalog import PresetSources

        app = FedtuiApp(preset_path=tmp_path / "real.toml", engine_run=runner.run, runs_dir=tmp_path / "runs",
                        preset_sources=PresetSources(shipped=[], user_dir=tmp_path / "user", cwd=tmp_path))
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for(pilot, lambda: app.presets_screen.current_preset()[0] is not None, timeout=30)
            await pilot.press("s")
            await wait_for(pilot, lambda: not app.state.live and app.state.status != "idle"
                           and app.worker is not None and app.worker.is_finished, timeout=120)
            await pilot.pause(0.2)
            assert app.state.status == "completed", app.state.error
            assert app.state.points and app.dashboard.query_one(ClientTable).row_count >= 1
            await pilot.press("r")
            assert len(app.runs_screen.records) == 1

    run(body())


@pytest.mark.slow
def test_runs_screen_resumes_a_stopped_run_to_the_end(tiny_preset_file, tmp_path):
    """A run stopped in round 2 is continued from the runs screen ('c') and ends as an uninterrupted run would."""
    import json

    from engine import events as ev
    from engine.control import RunControl
    from engine.presets import load_preset
    from engine.runner import run as engine_run

    preset = load_preset(tiny_preset_file, ["run.rounds=4"])
    control = RunControl()
    stopped = engine_run(preset, lambda e: control.stop() if isinstance(e, ev.RoundFinished) and e.round == 2 else None,
                         control)
    assert stopped.status == "stopped"

    async def body():
        from fedtui.app import FedtuiApp
        from fedtui.app.catalog import PresetSources

        app = FedtuiApp(engine_run=engine_run, runs_dir=stopped.run_dir.parent,
                        preset_sources=PresetSources(shipped=[], user_dir=tmp_path / "user", cwd=tmp_path))
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("r")
            await wait_for(pilot, lambda: [r.status for r in app.runs_screen.records] == ["stopped"])
            await pilot.press("c")
            await wait_for(pilot, lambda: app.worker is not None and app.worker.is_finished
                           and app.state.status == "completed", timeout=120)
            await pilot.pause(0.2)
            assert [p.round for p in app.state.points] == [0, 1, 2, 3, 4]  # the rounds it had, then the rest

    run(body())
    summary = json.loads((stopped.run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 4


def test_runs_screen_follows_a_run_another_process_is_writing(tiny_preset_file, tmp_path):
    """A run that is still going (here: the real engine in a thread, held after round 1) opens as a dashboard
    that reads its metrics.jsonl as it grows, and stops reading when the run ends."""
    from engine import events as ev
    from engine.control import RunControl
    from engine.presets import load_preset
    from engine.runner import run as engine_run

    preset = load_preset(tiny_preset_file, ["run.rounds=3"])
    hold = threading.Event()
    outcome = {}

    def sink(event):
        if isinstance(event, ev.RoundFinished) and event.round == 1:
            hold.wait(120)  # the line is in metrics.jsonl already; the run waits here

    thread = threading.Thread(target=lambda: outcome.setdefault("result", engine_run(preset, sink, RunControl())))
    thread.start()
    runs = tmp_path / "runs"
    deadline = time.monotonic() + 120
    while not any('"round": 1' in p.read_text() and "RoundFinished" in p.read_text()
                  for p in runs.glob("*/metrics.jsonl")):
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.05)

    async def body():
        from fedtui.app import FedtuiApp
        from fedtui.app.catalog import PresetSources

        app = FedtuiApp(engine_run=engine_run, runs_dir=runs,
                        preset_sources=PresetSources(shipped=[], user_dir=tmp_path / "user", cwd=tmp_path))
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("r")
            await wait_for(pilot, lambda: [r.status for r in app.runs_screen.records] == ["running"])
            await pilot.press("enter")
            await wait_for(pilot, lambda: isinstance(app.screen, DashboardScreen) and app.screen.follower is not None)
            dashboard = app.screen
            assert [p.round for p in dashboard.state.points] == [0, 1] and dashboard.state.status == "running"
            assert dashboard.query_one(ClientTable).row_count == 3
            hold.set()
            await wait_for(pilot, lambda: dashboard.state.status == "completed", timeout=120)
            assert [p.round for p in dashboard.state.points] == [0, 1, 2, 3]
            assert not dashboard.follower.following
            await pilot.press("x", "s")  # a followed run is another process's: no run keys here
            assert app.run_live is False

    try:
        run(body())
    finally:
        hold.set()
        thread.join(120)
    assert outcome["result"].status == "completed"


def test_a_follower_applies_whole_lines_only_reports_damage_and_sees_a_killed_writer(tiny_preset_file, tmp_path):
    import json
    import platform
    import subprocess
    import sys

    from engine.control import RunControl
    from engine.presets import load_preset
    from engine.runner import run as engine_run
    from fedtui.app.runstore import RunFollower

    done = engine_run(load_preset(tiny_preset_file, ["run.rounds=1"]), lambda e: None, RunControl())
    lines = (done.run_dir / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    finished = next(i for i, line in enumerate(lines) if b'"RunFinished"' in line)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    folder = tmp_path / "followed"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"pid": os.getpid(), "host": platform.node()}))
    metrics = folder / "metrics.jsonl"
    metrics.write_bytes(b"".join(lines[:3]) + lines[3][:10])  # three lines and the start of a fourth
    follower = RunFollower(folder)
    assert follower.offset == len(b"".join(lines[:3])) and follower.following
    with metrics.open("ab") as handle:
        handle.write(lines[3][10:] + b"{not json\n" + b"".join(lines[4:finished]))
    assert follower.poll()
    assert any("line 5 skipped" in text for text in follower.state.log_lines)
    assert [p.round for p in follower.state.points] == [0, 1] and follower.following
    (folder / "manifest.json").write_text(json.dumps({"pid": gone.pid, "host": platform.node()}))  # the writer died
    follower.poll()  # one quiet poll is not yet an ending: the last event may be on its way
    assert follower.following
    assert follower.poll() and follower.state.status == "killed" and not follower.following
