"""SVG snapshots of the presets screen and a finished run's dashboard at 80x24 and 120x40.

Deterministic: fixed presets (tests/fake_engine.py), the scripted engine (no run folder written, fixed
run id and event times), an injected clock (elapsed reads 00:00). Update with
``pytest tests/test_app_snapshots.py --snapshot-update`` after checking the new SVGs by eye.
"""

from __future__ import annotations

import pytest

from fake_engine import FakeEngine, make_app, wait_for

SIZES = [(80, 24), (120, 40)]


async def _presets_ready(pilot) -> None:
    app = pilot.app
    await wait_for(pilot, lambda: app.presets_screen.current_preset()[0] is not None)
    await pilot.pause(0.1)


async def _finished_run(pilot) -> None:
    app = pilot.app
    await _presets_ready(pilot)
    screen = app.presets_screen
    screen.query_one("#preset-list").highlighted = [e.name for e in screen.entries].index("smoke")
    await wait_for(pilot, lambda: screen.current_preset()[0] is not None
                   and screen.current_preset()[0].run.name == "smoke")
    await pilot.press("s")
    await wait_for(pilot, lambda: app.state.status == "completed" and app.worker.is_finished)
    await pilot.pause(0.3)
    # How the log's lines were split over drain ticks depends on the machine's load, and Textual's Log then
    # sometimes keeps a one-line scrollbar: write the same lines in one go, as a replay does.
    from textual.widgets import Log

    app.dashboard.query_one(Log).clear()
    with app.batch_update():
        app.dashboard.refresh_view(force=True)
    await pilot.pause(0.3)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_presets_screen(snap_compare, tmp_path, size):
    assert snap_compare(make_app(tmp_path, FakeEngine()), terminal_size=size, run_before=_presets_ready)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_dashboard_finished_run(snap_compare, tmp_path, size):
    assert snap_compare(make_app(tmp_path, FakeEngine()), terminal_size=size, run_before=_finished_run)
