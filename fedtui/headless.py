"""The headless consumer of the event stream: Rich progress and tables, or one JSON event a line."""

from __future__ import annotations

import errno
import os
import sys
from typing import Any, Callable

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from engine import events as ev


def _pct(value: float | None) -> str:
    return "  n/a" if value is None or value != value else f"{100 * value:5.1f}"


def _bytes(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return str(count)


class JsonPrinter:
    """``--json``: every event as one JSON object a line on stdout, nothing else there."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout

    def __call__(self, event: ev.Event) -> None:
        self.stream.write(ev.event_to_json(event) + "\n")
        self.stream.flush()

    def close(self) -> None:
        pass


class ClosedOutputGuard:
    """A reporter on stdout until its reader goes away (``fedtui run --json | head``): then ``on_closed`` runs
    once (the command asks the run to stop after the current batch, as Ctrl-C does, so the run directory keeps
    every completed round and can be resumed), stdout is pointed at /dev/null so that nothing else writing to
    it fails, and later events are dropped. Without it the broken pipe ended the run as failed, blaming the
    run directory."""

    def __init__(self, reporter, on_closed: Callable[[], None]):
        self.reporter, self.on_closed = reporter, on_closed
        self.closed = False

    def __call__(self, event: ev.Event) -> None:
        self._write(self.reporter, event)

    def sink(self, write: Callable[[ev.Event], None]) -> Callable[[ev.Event], None]:
        """Another writer to the same stdout (a sweep's sink for one of its runs), guarded with this one."""
        return lambda event: self._write(write, event)

    def close(self) -> None:
        """The reporter's own close (its progress display stopped), also after the reader has gone: stdout is
        /dev/null by then."""
        try:
            self.reporter.close()
        except BrokenPipeError:
            if not self.closed:
                self._reader_gone()

    def _write(self, write, event) -> None:
        if not self.closed:
            try:
                write(event)
            except BrokenPipeError:
                self._reader_gone()

    def _reader_gone(self) -> None:
        self.closed = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError):  # no file descriptor behind sys.stdout (a test's capture): nothing to redirect
            pass
        self.on_closed()


class StdoutConsole(Console):
    """Rich's own answer to a closed stdout is SystemExit(1) from inside whatever was printing; here it is the
    BrokenPipeError itself, which ``ClosedOutputGuard`` turns into a graceful stop."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError(errno.EPIPE, "stdout was closed")


class RichReporter:
    """A progress bar over rounds, one line per round, and the final summary table."""

    def __init__(self, console: Console | None = None):
        self.console = console or StdoutConsole(stderr=False, highlight=False)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.task = None
        self.encode_task = None
        self.losses: dict[str, float] = {}

    def __call__(self, event: ev.Event) -> None:
        handler = getattr(self, f"on_{type(event).__name__}", None)
        if handler is not None:
            handler(event)

    def on_Log(self, event: ev.Log) -> None:
        style = {"warning": "yellow", "error": "bold red"}.get(event.level, "dim")
        self.console.print(f"[{style}]{event.level}: {escape(event.text)}[/]", soft_wrap=True)

    def on_RunStarted(self, event: ev.RunStarted) -> None:
        clients = ", ".join(f"{c['client']} ({c['examples']})" for c in event.clients)
        self.console.print(
            f"[bold]{event.preset_name}[/]: {event.rounds} rounds, adapter {event.adapter} "
            f"({event.trainable_parameters:,} parameters), aggregation {event.aggregation}, device {event.device}, "
            f"weights {event.weights}"
        )
        self.console.print(f"clients (train examples): {clients}; held out: {', '.join(event.holdout) or 'none'}")
        self.console.print(f"run directory: {event.run_dir}")
        self.progress.start()
        self.task = self.progress.add_task("rounds", total=event.rounds, status="")

    def on_FeaturesProgress(self, event: ev.FeaturesProgress) -> None:
        if self.encode_task is None:
            self.progress.start()
            self.encode_task = self.progress.add_task("images", total=event.total, status="encoding")
        self.progress.update(self.encode_task, completed=event.done)

    def on_FeaturesReady(self, event: ev.FeaturesReady) -> None:
        if self.encode_task is not None:
            self.progress.update(self.encode_task, status="done")
        self.console.print(
            f"features: {event.encoded} encoded, {event.cached} from cache, {event.seconds:.1f} s, dim {event.feature_dim}"
        )

    def on_ClientFinished(self, event: ev.ClientFinished) -> None:
        self.losses[event.client] = event.mean_loss

    def on_ClientProgress(self, event: ev.ClientProgress) -> None:
        if self.task is not None:
            self.progress.update(self.task, status=f"round {event.round} {event.client} step {event.step}/{event.steps}")

    def on_RoundFinished(self, event: ev.RoundFinished) -> None:
        if event.round == 0:
            self.console.print(
                f"round   0 zero-shot  test {_pct(event.mean_test)}  held-out {_pct(event.mean_holdout)}"
            )
            return
        losses = " ".join(f"{name}={loss:.3f}" for name, loss in sorted(self.losses.items()))
        mark = " *" if event.selected else ""
        self.console.print(
            f"round {event.round:3d} loss {losses}  val {_pct(event.mean_val)}  test {_pct(event.mean_test)}  "
            f"held-out {_pct(event.mean_holdout)}  up {_bytes(event.bytes_up)}  {event.seconds:.2f} s{mark}"
        )
        self.losses.clear()
        if self.task is not None:
            self.progress.update(self.task, completed=event.round, status="")

    def on_RunFinished(self, event: ev.RunFinished) -> None:
        self.close()
        self.console.print(summary_table(event.summary))
        comm = event.summary.get("communication") or {}
        if comm.get("adapter_bytes"):
            ratio = comm["full_clip_bytes"] / comm["adapter_bytes"]
            self.console.print(
                f"communication: {_bytes(comm['bytes_up'])} up, {_bytes(comm['bytes_down'])} down in total; "
                f"one adapter update is {_bytes(comm['adapter_bytes'])} vs {_bytes(comm['full_clip_bytes'])} for the "
                f"whole CLIP ({ratio:.0f}x less), compression {comm.get('compression', 'none')}, "
                f"{comm.get('skipped_updates', 0)} updates skipped",
                soft_wrap=True,
            )
        self.console.print(f"{event.status} in {event.seconds:.1f} s; run directory: {event.run_dir}")

    def on_RunFailed(self, event: ev.RunFailed) -> None:
        self.close()
        self.console.print(f"[bold red]run failed:[/] {escape(event.error)}", soft_wrap=True)
        if event.run_dir:
            self.console.print(f"run directory (summary.json, error.txt): {event.run_dir}")

    def close(self) -> None:
        if self.task is not None or self.encode_task is not None:
            self.progress.stop()
            self.task = self.encode_task = None


def summary_table(summary: dict[str, Any]) -> Table:
    """Zero-shot vs selected accuracy per domain: the numbers a paper table needs."""
    zero, chosen = summary.get("zero_shot") or {}, summary.get("selected") or {}
    title = f"{summary.get('preset_name', '')}: selected round {chosen.get('round', '-')} ({summary.get('selection')})"
    table = Table(title=title)
    table.add_column("domain / client")
    table.add_column("role")
    table.add_column("zero-shot %", justify="right")
    table.add_column("selected %", justify="right")
    for name, acc in (chosen.get("clients") or zero.get("clients") or {}).items():
        before = (zero.get("clients") or {}).get(name, {}).get("test")
        table.add_row(name, "client test", _pct(before), _pct(acc.get("test")))
    for name, acc in (chosen.get("holdout") or zero.get("holdout") or {}).items():
        table.add_row(name, "held out", _pct((zero.get("holdout") or {}).get(name)), _pct(acc))
    table.add_section()
    table.add_row("mean", "personalisation", _pct(zero.get("mean_test")), _pct(chosen.get("mean_test")))
    table.add_row("mean", "generalisation", _pct(zero.get("mean_holdout")), _pct(chosen.get("mean_holdout")))
    return table


class SweepReporter:
    """One progress bar over the sweep's runs and one over the current run's rounds."""

    def __init__(self, points: int, console: Console | None = None):
        self.console = console or StdoutConsole(highlight=False)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=self.console,
        )
        self.progress.start()
        self.points = self.progress.add_task("sweep", total=points)
        self.rounds = None

    def sink_for(self, label: str):
        def sink(event: ev.Event) -> None:
            if isinstance(event, ev.RunStarted):
                if self.rounds is not None:
                    self.progress.remove_task(self.rounds)
                self.rounds = self.progress.add_task(label, total=event.rounds)
            elif isinstance(event, ev.RoundFinished) and event.round > 0 and self.rounds is not None:
                self.progress.update(self.rounds, completed=event.round)
            elif isinstance(event, (ev.RunFinished, ev.RunFailed)):
                self.progress.advance(self.points)
                status = event.status if isinstance(event, ev.RunFinished) else f"failed: {escape(event.error)}"
                self.console.print(f"{escape(label)}: {status}", soft_wrap=True)
            elif isinstance(event, ev.Log) and event.level == "error":
                self.console.print(f"[red]{escape(event.text)}[/]", soft_wrap=True)

        return sink

    def close(self) -> None:
        self.progress.stop()


def _spread(value: float | None, sd: float | None, signed: bool = False) -> str:
    """A percentage, with ``±sd`` when there is one (several seeds)."""
    if value is None or value != value:
        return "n/a"
    text = f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"
    return text if sd is None else f"{text}±{100 * sd:.1f}"


def _rounds(text: str) -> str:
    """The selected (or final) rounds over seeds: '3 3 3' -> '3', '1 1 5' -> '1,1,5', beyond four '1-5'."""
    values = [int(v) for v in text.split() if v.isdigit()]
    if not values:
        return "-"
    low, high = min(values), max(values)
    if low == high:
        return str(low)
    return ",".join(map(str, values)) if len(values) <= 4 else f"{low}-{high}"


def _setting(row: dict[str, Any]) -> str:
    statuses = row.get("statuses") or []
    if row["runs"] == 1 and statuses and statuses[0] != "completed":
        return f"{row['setting']} ({statuses[0]})"
    if row["completed"] < row["runs"]:
        return f"{row['setting']} ({row['completed']}/{row['runs']} completed)"
    return row["setting"]


def sweep_table(rows: list[dict[str, Any]], seeds: list[int] | None = None) -> Table:
    """One row per setting (``engine.sweep.aggregate``): the selected and the final round side by side, so two
    settings whose best-val rule picked the same early round show it; mean ± sd when run over seeds."""
    # A light box: the columns of figures must fit an 80-column SSH terminal.
    over = f", mean±sd over seeds {_seed_list(seeds)}" if seeds else ""
    table = Table(
        title=f"sweep: accuracy %{over}", title_justify="left", caption_justify="left",
        caption="test: the clients' test sets (personalisation); held: the held-out domains (generalisation); "
                "sel: at the selected round, fin: at the final round; rnd: selected/final round",
        box=box.SIMPLE_HEAD, pad_edge=False,
    )
    table.add_column("setting", overflow="fold")
    table.add_column("rnd", justify="right", no_wrap=True)
    for name in ("sel\ntest", "sel\nheld", "fin\ntest", "fin\nheld"):
        table.add_column(name, justify="right", no_wrap=True, min_width=4)
    if not seeds:  # seconds per round: sweep.csv (the table keeps to 80 columns)
        for name, width in (("params", 7), ("up/rnd", 8)):
            table.add_column(name, justify="right", no_wrap=True, min_width=width)
    # Round 0 once when every setting starts from the same zero-shot numbers, else under each setting.
    shared = len({(r["zero_shot_test_mean"], r["zero_shot_holdout_mean"]) for r in rows if r["completed"]}) == 1

    def zero_shot(row: dict[str, Any], label: str) -> None:
        table.add_row(label, "0", _spread(row["zero_shot_test_mean"], row["zero_shot_test_sd"]),
                      _spread(row["zero_shot_holdout_mean"], row["zero_shot_holdout_sd"]), style="dim")

    for row in rows:
        cells = [_spread(row[f"{m}_mean"], row[f"{m}_sd"]) for m in ("test", "holdout", "final_test", "final_holdout")]
        extra = []
        if not seeds:
            params = row["trainable_parameters"]
            extra = [f"{params:,}" if params else "-", _bytes(int(row["bytes_up_per_round"] or 0))]
        table.add_row(_setting(row), f"{_rounds(row['selected_rounds'])}/{_rounds(row['final_rounds'])}", *cells, *extra)
        if not shared and row["completed"]:
            zero_shot(row, "  zero-shot")
    if shared:
        table.add_section()
        zero_shot(next(r for r in rows if r["completed"]), "zero-shot")
    return table


def _seed_list(seeds: list[int]) -> str:
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}-{seeds[-1]}"
    return ",".join(str(s) for s in seeds)


def paired_table(rows: list[dict[str, Any]], baseline: str) -> Table:
    """Each setting minus the baseline, paired by seed, in accuracy points: mean ± the half-width of the
    95% t interval (n - 1 degrees of freedom); * where the interval excludes 0."""
    table = Table(
        title=f"difference to {baseline}, accuracy points, paired by seed", title_justify="left",
        caption="mean ± half-width of the 95% t interval (n - 1 degrees of freedom); *: the interval excludes 0",
        caption_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
    )
    table.add_column("setting", overflow="fold")
    table.add_column("n", justify="right", no_wrap=True)
    for name in ("sel\ntest", "sel\nheld", "fin\ntest", "fin\nheld"):
        table.add_column(name, justify="right", no_wrap=True, min_width=4)
    for row in rows:
        if row["baseline"]:
            table.add_row(row["setting"], str(row["completed"]), *(["baseline"] + [""] * 3))
            continue
        cells = []
        for metric in ("test", "holdout", "final_test", "final_holdout"):
            mean, low, high = row[f"{metric}_diff"], row[f"{metric}_diff_low"], row[f"{metric}_diff_high"]
            half = None if low is None or high is None else (high - low) / 2
            mark = "*" if low is not None and high is not None and (low > 0 or high < 0) else ""
            cells.append(_spread(mean, half, signed=True) + mark)
        table.add_row(row["setting"], str(row["paired_n"] or 0), *cells)
    return table


def lodo_table(lodo) -> Table:
    """The paper's leave-one-domain-out table (``engine.sweep.LodoTable``): per held-out domain each client's
    test accuracy, their mean (pers.) and the held-out accuracy (gen.), and the average row."""
    sd = any(c.sd is not None for r in lodo.rows for c in [*r["cells"].values(), r["personalisation"], r["generalisation"]])
    what = f"{lodo.group}: " if lodo.group else ""
    table = Table(
        title=f"{what}leave-one-domain-out, accuracy % at the selected round{', mean±sd over seeds' if sd else ''}",
        caption="per held-out domain: each client's test accuracy (–: the domain held out), pers.: their mean, "
                "gen.: the held-out domain's accuracy",
        title_justify="left", caption_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
    )
    table.add_column("held out", overflow="fold")
    for name in [*lodo.columns, "pers.", "gen."]:
        table.add_column(name, justify="right", overflow="fold", min_width=4)

    def cells(row):
        found = [*(row["cells"][c] for c in lodo.columns), row["personalisation"], row["generalisation"]]
        return ["–" if c.mean is None else _spread(c.mean, c.sd if sd else None) for c in found]

    for row in lodo.rows:
        table.add_row(row["held_out"], *cells(row))
    table.add_section()
    table.add_row("average", *cells(lodo.average))
    return table
