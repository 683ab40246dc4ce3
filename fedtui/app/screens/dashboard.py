"""The run dashboard: header, round progress, client table, charts, log. Live or replayed."""

from __future__ import annotations

import time
from typing import Callable

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import Footer, Log, ProgressBar

from ..runstore import RunFollower
from ..state import RunState
from ..widgets.charts import AccuracyChart, LossChart
from ..widgets.client_table import ClientTable
from ..widgets.run_header import RunHeader

CHART_INTERVAL = 0.25  # seconds: charts redraw at most 4x/s


class DashboardScreen(Screen):
    """Shows one RunState. ``live`` screens get the run keys; replays are read-only."""

    BINDINGS = [
        Binding("s", "start_run", "Start"),
        Binding("p,space", "toggle_pause", "Pause"),
        Binding("x", "stop_run", "Stop"),
        Binding("o", "show_folder", "Folder"),
        Binding("escape,b", "back", "Back"),
        Binding("r", "app.show_runs", "Runs"),
        Binding("q", "app.quit", "Quit"),
    ]

    FOLLOW_INTERVAL = 0.5  # seconds between reads of a followed run's metrics.jsonl

    def __init__(self, state: RunState, *, live: bool = True, elapsed: Callable[[], float | None] | None = None,
                 title: str = "", name: str | None = None, follower: RunFollower | None = None) -> None:
        super().__init__(name=name)
        self.state = state
        self.live = live
        self.follower = follower  # a run another process is writing: read as it grows
        self.elapsed = elapsed or (lambda: None)
        self.run_title = title
        self._chart_at = float("-inf")
        self._charts_dirty = True

    def compose(self) -> ComposeResult:
        yield RunHeader(id="run-header")
        yield ProgressBar(total=1, show_eta=False, id="round-progress")
        yield ClientTable(id="clients")
        with Horizontal(id="charts"):
            yield AccuracyChart(id="acc-chart")
            yield LossChart(id="loss-chart")
        yield Log(id="log", max_lines=2000)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(ClientTable).focus()
        self.refresh_view(force=True)
        if self.follower is not None and self.follower.following:
            self._follow_timer = self.set_interval(self.FOLLOW_INTERVAL, self.follow)

    def follow(self) -> None:
        """Apply what the followed run wrote since the last read; stop reading once it has ended."""
        follower = self.follower
        if follower is None:
            return
        if follower.poll():
            with self.app.batch_update():
                self.refresh_view()
        if not follower.following:
            self._follow_timer.stop()
            self.notify(f"The run ended: {follower.state.status}", timeout=6)

    def on_screen_resume(self) -> None:
        with self.app.batch_update():
            self.refresh_view()

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        if not self.live and action in ("start_run", "toggle_pause", "stop_run"):
            return None  # a replay: shown greyed out, does nothing
        return True

    def action_start_run(self) -> None:
        self.app.action_start_run()

    def action_toggle_pause(self) -> None:
        self.app.action_toggle_pause()

    def action_stop_run(self) -> None:
        self.app.action_stop_run()

    def set_state(self, state: RunState) -> None:
        self.state = state
        if not self.is_mounted or not self.query(ClientTable):
            return  # on_mount draws it
        table = self.query_one(ClientTable)
        table.clear()
        self.query_one(Log).clear()
        self.refresh_view(force=True)

    def refresh_view(self, force: bool = False, now: float | None = None) -> None:
        """Pull what changed from the state into the widgets (call inside ``app.batch_update()``).

        Nothing while the screen has no widgets: a drain tick can land while it is still being composed (on_mount
        then draws everything) or already being taken down as the app exits (nothing left to draw)."""
        state = self.state
        headers = self.query(RunHeader)
        if not headers:
            return
        headers.first().show(state, self.elapsed(), self.run_title)
        if force or state.dirty or state.dirty_clients:
            self.query_one(ClientTable).sync(state, full=force)
            bar = self.query_one(ProgressBar)
            bar.update(total=max(state.rounds, 1), progress=state.progress())
        if force:
            lines = list(state.log_lines)
            state.pending_log.clear()
        else:
            lines = state.take_log()
        if lines:
            self.query_one(Log).write_lines(lines)
        if "charts" in state.dirty:
            self._charts_dirty = True
        now = time.monotonic() if now is None else now
        if self._charts_dirty and (force or not state.live or now - self._chart_at >= CHART_INTERVAL):
            self.query_one(AccuracyChart).draw(state)
            self.query_one(LossChart).draw(state)
            self._chart_at = now
            self._charts_dirty = False
        state.dirty.clear()
        state.dirty_clients.clear()

    def action_show_folder(self) -> None:
        folder = self.state.run_dir or "(no run folder yet)"
        self.notify(folder, title="Run folder", timeout=8)

    def action_back(self) -> None:
        if self.live:
            self.app.switch_mode("presets")
        else:
            self.app.pop_screen()
