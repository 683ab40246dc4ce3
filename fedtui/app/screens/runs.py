"""Runs: past runs from the run store, a summary table, overlaid accuracy curves, replay."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Label

from ..fmt import duration, pct
from ..runstore import RunFollower, RunRecord, list_runs, replay
from ..widgets.charts import CompareChart
from .dashboard import DashboardScreen


def wise_curve(summary: dict) -> list[tuple[float, float]]:
    """(a, accuracy) along theta_0 + a (theta - theta_0): held-out where the run has one, else clients' test."""
    points = []
    for entry in summary.get("wise_ft") or []:
        if entry.get("model", "last") != "last":  # the curve of the selected round is in the summary too
            continue
        value = entry.get("mean_holdout")
        value = entry.get("mean_test") if value is None else value
        if value is not None:
            points.append((float(entry["alpha"]), float(value)))
    return points


class RunsScreen(Screen):
    BINDINGS = [
        Binding("enter", "replay", "Replay", show=True),
        Binding("space", "toggle_mark", "Compare"),
        Binding("g", "reload", "Reload"),
        Binding("w", "toggle_wise", "Rounds/WiSE"),
        Binding("c", "resume", "Resume"),
        Binding("f", "figure", "Figure"),
        Binding("escape,b", "app.show_presets", "Presets"),
        Binding("q", "app.quit", "Quit"),
    ]

    def __init__(self, runs_dir: Callable[[], Path]) -> None:
        super().__init__()
        self.runs_dir = runs_dir
        self.records: list[RunRecord] = []
        self.marked: set[str] = set()
        self.show_wise = False  # chart: accuracy per round, or the WiSE-FT curve of runs that measured one

    def compose(self) -> ComposeResult:
        yield Label("", id="runs-title", classes="section-title")
        yield DataTable(id="runs-table", cursor_type="row")
        yield CompareChart(id="compare-chart")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        for key, label in [("mark", "✓"), ("run", "Run"), ("preset", "Preset"), ("status", "Status"),
                           ("rounds", "Rounds"), ("zero", "0-shot%"), ("val", "Best val%"),
                           ("test", "Test%"), ("hold", "Held-out%"), ("time", "Time")]:
            table.add_column(label, key=key)
        self.action_reload()
        table.focus()

    def on_screen_resume(self) -> None:
        self.action_reload()

    def action_reload(self) -> None:
        folder = self.runs_dir()
        self.records = list_runs(folder)
        self.query_one("#runs-title", Label).update(f"Runs in {folder}  ({len(self.records)})")
        table = self.query_one(DataTable)
        table.clear()
        for r in self.records:
            table.add_row("✓" if str(r.path) in self.marked else " ", r.run_id, r.preset, r.status,
                          f"{r.rounds_done}/{r.rounds}", pct(r.zero_shot), pct(r.best_val), pct(r.final_test),
                          pct(r.final_holdout), duration(r.seconds), key=str(r.path))
        self.redraw_chart()

    def _current(self) -> RunRecord | None:
        table = self.query_one(DataTable)
        if not self.records or table.cursor_row is None or table.cursor_row >= len(self.records):
            return None
        return self.records[table.cursor_row]

    def redraw_chart(self) -> None:
        chosen = [r for r in self.records if str(r.path) in self.marked]
        if not chosen and (current := self._current()):
            chosen = [current]
        chart = self.query_one(CompareChart)
        if self.show_wise:
            chart.draw({r.run_id: wise_curve(r.summary) for r in chosen},
                       title="WiSE-FT: held-out (or client test) accuracy % vs a", by_round=False)
        else:
            chart.draw({r.run_id: r.curve for r in chosen})

    def action_toggle_wise(self) -> None:
        self.show_wise = not self.show_wise
        if self.show_wise and not any(wise_curve(r.summary) for r in self.records):
            self.notify("No run here measured a WiSE-FT curve (eval.wise_alphas)", severity="warning")
        self.redraw_chart()

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if not self.marked:
            self.redraw_chart()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_replay()

    def action_toggle_mark(self) -> None:
        record = self._current()
        if record is None:
            return
        key = str(record.path)
        self.marked ^= {key}
        self.query_one(DataTable).update_cell(key, "mark", "✓" if key in self.marked else " ")
        self.redraw_chart()

    def action_resume(self) -> None:
        record = self._current()
        if record is None:
            self.notify("No run selected", severity="warning")
            return
        if record.status in ("completed", "running"):
            self.notify(f"{record.run_id} is {record.status}: nothing to resume", severity="warning")
            return
        self.app.resume_run(record.path)

    def action_figure(self) -> None:
        """The chart's runs (compared, else highlighted) as `fedtui report` draws them, into the run's folder."""
        from fedtui.report import INSTALL_HINT, matplotlib_available

        current = self._current()
        chosen = [r for r in self.records if str(r.path) in self.marked] or ([current] if current else [])
        if not chosen:
            self.notify("No run selected", severity="warning")
            return
        if not matplotlib_available():
            self.notify(f"Figures need matplotlib: {INSTALL_HINT}", severity="warning", markup=False)
            return
        folder = (current if current in chosen else chosen[0]).path
        out = folder / ("report.png" if len(chosen) == 1 else "report-compare.png")
        self.run_worker(lambda: self._write_figure([r.path for r in chosen], out), thread=True, group="figure",
                        exit_on_error=False)

    def _write_figure(self, paths: list[Path], out: Path) -> None:  # in a thread: matplotlib takes a second
        from fedtui.report import draw_report

        try:
            draw_report(paths, out)
        except Exception as error:  # a figure must never take the console down
            self.app.call_from_thread(self.notify, f"No figure: {error}", severity="error", markup=False)
        else:
            self.app.call_from_thread(self.notify, f"Figure written: {out}", markup=False)

    def action_replay(self) -> None:
        record = self._current()
        if record is None:
            self.notify("No run selected", severity="warning")
            return
        if record.status == "running":  # another process is writing it: follow it as it goes
            follower = RunFollower(record.path)
            state = follower.state

            def elapsed() -> float | None:
                if state.seconds is not None:
                    return state.seconds
                return None if state.started_at is None else time.time() - state.started_at

            self.app.push_screen(DashboardScreen(state, live=False, elapsed=elapsed, follower=follower,
                                                 title=f"following {record.run_id}"))
            return
        state = replay(record.path)
        seconds = state.seconds
        if seconds is None and state.started_at is not None and state.last_event_time is not None:
            seconds = state.last_event_time - state.started_at
        self.app.push_screen(DashboardScreen(state, live=False, elapsed=lambda: seconds,
                                             title=f"replay {record.run_id}"))
