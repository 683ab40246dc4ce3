"""One line: run name, status, round r/R, elapsed, ETA."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from ..fmt import duration
from ..state import RunState

STATUS_MARK = {"running": "▶", "paused": "⏸", "stopping": "■", "completed": "✓", "stopped": "■", "failed": "✗",
               "diverged": "✗", "killed": "✗"}


class RunHeader(Static):
    DEFAULT_CSS = "RunHeader { height: 1; background: $panel; padding: 0 1; }"

    def show(self, state: RunState, elapsed: float | None, title: str = "") -> None:
        mark = STATUS_MARK.get(state.status, "·")
        name = state.run_name or title or "no run"
        rounds = f"round {state.round}/{state.rounds}" if state.rounds else "round -/-"
        if state.encoding is not None:
            rounds = f"encoding {state.encoding[0]}/{state.encoding[1]} images"
        eta = None
        progress = state.progress()
        if state.live and elapsed and progress > 0 and state.rounds:
            eta = elapsed / progress * max(0.0, state.rounds - progress)
        text = Text.assemble(
            (name, "bold"),
            "  ",
            (f"{mark} {state.status}", "reverse" if state.status in ("paused", "failed", "diverged", "killed") else "bold"),
            f"  {rounds}  elapsed {duration(elapsed)}  ETA {duration(eta) if state.live else '-'}",
        )
        if state.run_id:
            text.append(f"  [{state.run_id}]", style="dim")
        self.update(text)
