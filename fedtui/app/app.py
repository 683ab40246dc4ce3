"""FedtuiApp: owns the engine worker, the event queue and the screens.

The engine's blocking ``run`` lives in a thread worker; its sink is ``SimpleQueue.put`` (thread-safe,
never blocks). A 10 Hz timer drains the queue into a ``RunState`` (cheap, pure Python) and then pulls
what changed into the widgets inside one ``batch_update()``: no message per event, one table update per
changed client, log lines in one ``write_lines`` call, charts at most 4x/s.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from pathlib import Path
from queue import Empty, SimpleQueue
from typing import Any, Callable, Iterable

from rich.markup import escape
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen
from textual.worker import Worker

from engine.control import RunControl
from engine.events import RunFailed, RunFinished

from .catalog import PresetSources
from .screens.dashboard import DashboardScreen
from .screens.modals import ConfirmScreen, ErrorScreen
from .screens.presets import PresetsScreen
from .screens.runs import RunsScreen
from .state import RunState

EngineRun = Callable[..., Any]
MAX_EVENTS_PER_TICK = 50_000


def default_engine_run(preset, sink, control=None, run_dir=None):
    """``engine.runner.run``, imported only when a run starts (it pulls in torch)."""
    from engine.runner import run

    return run(preset, sink, control=control, run_dir=run_dir)


class FedtuiApp(App):
    TITLE = "fedtui"
    CSS_PATH = "styles/app.tcss"
    MODES = {"presets": "presets", "dashboard": "dashboard", "runs": "runs"}
    DEFAULT_MODE = "presets"
    BINDINGS = [Binding("ctrl+q", "quit", "Quit", show=False, priority=True)]

    def __init__(self, preset_path: str | Path | None = None, engine_run: EngineRun | None = None,
                 runs_dir: str | Path | None = None, clock: Callable[[], float] | None = None,
                 preset_sources: PresetSources | None = None, drain_interval: float = 0.1) -> None:
        super().__init__()
        self.engine_run = engine_run or default_engine_run
        self.clock = clock or time.monotonic
        self.runs_dir_override = Path(runs_dir) if runs_dir else None
        self.drain_interval = drain_interval
        self.events: SimpleQueue = SimpleQueue()
        self.state = RunState()
        self.control: RunControl | None = None
        self.worker: Worker | None = None
        self.started_at: float | None = None
        self.ended_at: float | None = None
        self.run_preset = None
        self.max_tick_seconds = 0.0  # longest drain tick (benchmarks and the burst test print it)
        self.ticks_with_events = 0  # drain ticks that applied events; the dashboard redraws once per such tick
        self.dashboard_refreshes = 0
        self.presets_screen = PresetsScreen(preset_sources or PresetSources(),
                                            Path(preset_path) if preset_path else None)
        self.dashboard = DashboardScreen(self.state, live=True, elapsed=self.elapsed)
        self.runs_screen = RunsScreen(self.runs_dir)
        self.install_screen(self.presets_screen, "presets")
        self.install_screen(self.dashboard, "dashboard")
        self.install_screen(self.runs_screen, "runs")

    def on_mount(self) -> None:
        self.set_interval(self.drain_interval, self.drain_events)

    # -- helpers ---------------------------------------------------------------------------------
    def elapsed(self) -> float | None:
        if self.started_at is None:
            return None
        end = self.ended_at if self.ended_at is not None else self.clock()
        return end - self.started_at

    def runs_dir(self) -> Path:
        if self.runs_dir_override is not None:
            return self.runs_dir_override
        preset = self.run_preset
        if preset is None and self.presets_screen.is_mounted:
            preset, _ = self.presets_screen.current_preset()
        return Path(preset.run.out_dir if preset is not None else "runs")

    @property
    def run_live(self) -> bool:
        return self.worker is not None and not self.worker.is_finished

    # -- the engine worker -----------------------------------------------------------------------
    def _engine_thread(self, preset, control: RunControl, resume_dir: Path | None = None) -> Any:
        put = self.events.put
        try:
            if resume_dir is not None:
                return self.engine_run(preset, put, control=control, run_dir=resume_dir, resume=True)
            return self.engine_run(preset, put, control=control)
        except Exception as error:  # a PresetError before start, or an engine bug: show it, stay alive
            put(RunFailed(error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc(),
                          run_dir=None))
            return None

    def action_start_run(self) -> None:
        if self.run_live:
            self.notify("A run is already live: stop it first (x)", severity="warning")
            return
        preset, problem = self.presets_screen.current_preset()
        if preset is None:
            self.notify(f"Cannot start: {problem}", title="Invalid preset", severity="error")
            if self.current_mode != "presets":
                self.switch_mode("presets")
            return
        self._launch(preset, RunState())

    def resume_run(self, run_dir: Path) -> None:
        """Continue a stopped, killed or crashed run from its last completed round (``fedtui run --resume``)."""
        from engine.presets import PresetError, load_preset
        from engine.run_state import ResumeError, load_round_state

        from .runstore import replay

        if self.run_live:
            self.notify("A run is already live: stop it first (x)", severity="warning")
            return
        try:
            preset = load_preset(Path(run_dir) / "preset.toml")
            load_round_state(run_dir)
        except (PresetError, ResumeError, OSError) as error:
            self.notify(escape(str(error)), title="Cannot resume", severity="error")
            return
        state = replay(Path(run_dir))  # the rounds it had, shown while it continues
        self._launch(preset, state, resume_dir=Path(run_dir))

    def _launch(self, preset, state: RunState, resume_dir: Path | None = None) -> None:
        self.run_preset = preset
        self.state = state
        self.state.status = "starting"
        self.state.run_name = preset.run.name
        self.state.rounds = preset.run.rounds
        self.control = RunControl()
        self.events = SimpleQueue()
        self.started_at, self.ended_at = self.clock(), None
        self.dashboard.set_state(self.state)
        self.switch_mode("dashboard")
        control = self.control
        self.worker = self.run_worker(lambda: self._engine_thread(preset, control, resume_dir), name="engine", group="engine",
                                      thread=True, exit_on_error=False)

    def action_toggle_pause(self) -> None:
        if not self.run_live or self.control is None or self.control.stop_requested:
            self.notify("No live run to pause", severity="warning")
            return
        if self.control.paused:
            self.control.resume()
            self.state.status = "running"
        else:
            self.control.pause()
            self.state.status = "paused"
        self.state.dirty.add("header")
        self._refresh_dashboard()

    def action_stop_run(self) -> None:
        if not self.run_live or self.control is None:
            self.notify("No live run to stop", severity="warning")
            return
        self.control.stop()
        self.state.status = "stopping"
        self._refresh_dashboard()

    # -- navigation ------------------------------------------------------------------------------
    def action_show_dashboard(self) -> None:
        self.switch_mode("dashboard")

    def action_show_presets(self) -> None:
        self.switch_mode("presets")

    def action_show_runs(self) -> None:
        self.switch_mode("runs")

    def action_show_folder(self) -> None:
        self.notify(self.state.run_dir or "(no run folder yet)", title="Run folder", timeout=8)

    def action_save_preset(self) -> None:
        self.switch_mode("presets")
        self.presets_screen.action_save_as()

    async def action_quit(self) -> None:
        if not self.run_live:
            self.exit()
            return
        self.push_screen(ConfirmScreen("A run is live. Stop it and quit? (y/n)"), self._quit_answer)

    async def _quit_answer(self, yes: bool | None) -> None:
        if yes:
            await self.stop_and_exit()

    async def stop_and_exit(self, timeout: float = 30.0) -> None:
        """Stop the run cleanly (the engine notices at its next checkpoint), wait for it, then exit."""
        if self.control is not None:
            self.control.stop()
        self.state.status = "stopping"
        worker = self.worker
        if worker is not None and not worker.is_finished:
            deadline = time.monotonic() + timeout
            while not worker.is_finished and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        self.drain_events()
        self.exit()

    def on_unmount(self) -> None:
        if self.control is not None:
            self.control.stop()  # never leave an engine thread running behind a closed app

    # -- the event pump --------------------------------------------------------------------------
    def drain_events(self) -> int:
        tick = time.perf_counter()
        batch = []
        get = self.events.get_nowait
        try:
            while len(batch) < MAX_EVENTS_PER_TICK:
                batch.append(get())
        except Empty:
            pass
        failures = []
        state = self.state
        for event in batch:
            state.apply(event)
            if isinstance(event, (RunFinished, RunFailed)):
                self.ended_at = self.clock()
                if isinstance(event, RunFailed):
                    failures.append(event)
        if batch:
            self.ticks_with_events += 1
        if batch or state.live:
            self._refresh_dashboard()
        for failure in failures:
            self.push_screen(ErrorScreen(failure.error, failure.traceback, failure.run_dir))
        self.max_tick_seconds = max(self.max_tick_seconds, time.perf_counter() - tick)
        return len(batch)

    def _refresh_dashboard(self) -> None:
        self.dashboard_refreshes += 1
        if self.screen is self.dashboard:
            with self.batch_update():
                self.dashboard.refresh_view()

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.worker is self.worker and event.worker.is_finished:
            self.drain_events()

    # -- command palette -------------------------------------------------------------------------
    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("Start run", "Start the preset in the editor", self.action_start_run)
        yield SystemCommand("Pause / resume run", "Pause or resume the live run", self.action_toggle_pause)
        yield SystemCommand("Stop run", "Stop the live run cleanly", self.action_stop_run)
        yield SystemCommand("Show run folder", "Where the current run writes", self.action_show_folder)
        yield SystemCommand("Presets", "Pick and edit presets", self.action_show_presets)
        yield SystemCommand("Dashboard", "The live run dashboard", self.action_show_dashboard)
        yield SystemCommand("Runs", "Past runs: summary, compare, replay", self.action_show_runs)
        yield SystemCommand("Save preset as", "Save the edited preset as a new file", self.action_save_preset)
