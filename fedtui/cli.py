"""The ``fedtui`` command: the console by default, ``run`` headless, ``presets`` to list what ships.

Exit codes: 0 ok, 1 the run failed, 2 bad input (nothing written), 130 interrupted (after a graceful stop).
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from fedtui.exit_codes import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK

cli = typer.Typer(
    help="fedtui: federated CLIP adapter experiments, in a console or headless.",
    no_args_is_help=False,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, highlight=False)


def _bad_input(message: str) -> typer.Exit:
    """One line on stderr naming the file, key or path; exit 2 (nothing was written)."""
    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    return typer.Exit(EXIT_BAD_INPUT)


def _load(preset: Path, overrides: list[str]):
    """Read and resolve the preset, or exit 2 listing every problem."""
    from engine.presets import PresetError, load_preset

    try:
        return load_preset(preset, overrides)
    except PresetError as error:
        raise _bad_input(str(error))


def _claim_run_dir(loaded, out: Optional[Path]) -> Path:
    """The run directory, created now, so an unwritable or occupied place is bad input before any work."""
    from engine.runstore import new_run_dir

    try:
        if out is None:
            return new_run_dir(loaded.run.out_dir, loaded.run.name)
        if out.exists() and not out.is_dir():
            raise _bad_input(f"--out {out} is a file, not a folder; nothing was written")
        if out.is_dir() and any(out.iterdir()):
            raise _bad_input(f"--out {out} exists and is not empty; nothing was written")
        out.mkdir(parents=True, exist_ok=True)
        return out
    except OSError as error:
        where = str(out) if out is not None else f"run.out_dir {loaded.run.out_dir!r}"
        raise _bad_input(f"cannot create the run directory under {where}: {error.strerror or error}; nothing was written")


def _resumable(run_dir: Path, preset: Optional[Path], overrides: list[str], out: Optional[Path]):
    """The run directory's own preset, checked again; nothing about the run may change on the way."""
    from engine.run_state import ResumeError, load_round_state
    from engine.runstore import read_summary

    if preset is not None or overrides or out is not None:
        raise _bad_input("--resume continues a run exactly as it was: give no preset, --set or --out with it")
    if not (run_dir / "preset.toml").is_file():
        raise _bad_input(f"--resume {run_dir}: not a run directory (no preset.toml)")
    if read_summary(run_dir).get("status") == "completed":
        raise _bad_input(f"--resume {run_dir}: this run completed; nothing to continue")
    try:
        load_round_state(run_dir)
    except ResumeError as error:
        raise _bad_input(f"--resume {run_dir}: {error}")
    return _load(run_dir / "preset.toml", []), run_dir


@cli.command()
def run(
    preset: Optional[Path] = typer.Argument(None, help="preset TOML file (see `fedtui presets`)"),
    set_: list[str] = typer.Option([], "--set", help="override a key: --set train.local_epochs=5 (repeatable)"),
    out: Optional[Path] = typer.Option(None, "--out", help="run directory (default: <run.out_dir>/<time>-<name>)"),
    json_: bool = typer.Option(False, "--json", help="print one JSON event per line instead of progress"),
    resume: Optional[Path] = typer.Option(
        None, "--resume", help="continue a stopped, killed or crashed run directory from its last completed round"
    ),
    log: list[str] = typer.Option(
        [], "--log", help="also log to tensorboard[=DIR] | mlflow[=TRACKING_URI] | wandb[=PROJECT] (repeatable; "
        "each an optional extra: pip install 'fedtui[tensorboard]')"
    ),
) -> None:
    """Run a preset headless: progress bar, one line per round, a summary table."""
    from fedtui.trackers import TrackedSink, TrackerError, open_trackers

    try:
        trackers = open_trackers(log)  # a missing package or tracking store is bad input: nothing written yet
    except TrackerError as error:
        raise _bad_input(str(error))
    if resume is not None:
        loaded, out = _resumable(resume, preset, set_, out)
    elif preset is None:
        raise _bad_input("give a preset file (fedtui run presets/quickstart.toml) or --resume RUN_DIR")
    else:
        loaded = _load(preset, set_)
        out = _claim_run_dir(loaded, out)

    from engine.control import RunControl
    from engine.runner import run as run_engine
    from fedtui.headless import ClosedOutputGuard, JsonPrinter, RichReporter

    control = RunControl()

    def output_closed() -> None:
        err.print(f"[yellow]stdout was closed (broken pipe): stopping after the current batch; "
                  f"fedtui run --resume {escape(str(out))} continues[/]", soft_wrap=True)
        control.stop()

    reporter = ClosedOutputGuard(JsonPrinter() if json_ else RichReporter(), output_closed)

    def graceful_stop(signum, frame):
        err.print("\n[yellow]stopping after the current batch (Ctrl-C again to abort)...[/]")
        control.stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, graceful_stop)
    sink = TrackedSink(reporter, trackers, loaded)
    try:
        result = run_engine(loaded, sink, control, run_dir=out, resume=resume is not None)
    except KeyboardInterrupt:
        reporter.close()
        err.print("[red]aborted; the run directory's summary.json says 'interrupted'[/]")
        raise typer.Exit(EXIT_INTERRUPTED)
    finally:
        signal.signal(signal.SIGINT, previous)
        sink.close()  # each tracker ends its run and uploads the run directory
        reporter.close()
    if result.status == "diverged":  # a failure prints itself (RunFailed); divergence ends the run normally
        err.print(f"[bold red]diverged:[/] {escape(str(result.summary.get('error', '')))}", soft_wrap=True)
    if result.status in ("failed", "diverged"):
        raise typer.Exit(EXIT_FAILED)
    if result.status == "stopped":
        raise typer.Exit(EXIT_INTERRUPTED)


@cli.command()
def sweep(
    preset: Path = typer.Argument(..., help="preset TOML file"),
    vary: list[str] = typer.Option(
        [], "--vary", help="key=v1,v2,... one run per value; repeat for a grid; data.holdout=each: every domain in turn"
    ),
    set_: list[str] = typer.Option([], "--set", help="override a key for every run (repeatable)"),
    seeds: Optional[str] = typer.Option(
        None, "--seeds", help="run every point once per seed (run.seed): 0-4 or 0,2,7; reports mean ± sd"
    ),
    baseline: Optional[str] = typer.Option(
        None, "--baseline", help='the point the others are compared to, paired by seed: "aggregation=mean" (default: the first)'
    ),
    log: list[str] = typer.Option(
        [], "--log", help="log every run of the sweep to tensorboard[=DIR] | mlflow[=TRACKING_URI] | wandb[=PROJECT], "
        "one tracker run each (repeatable)"
    ),
) -> None:
    """Run a preset once per setting (and seed) and print one comparison table (saved as CSV and JSONL)."""
    from engine.presets import PresetError, read_preset_toml
    from engine.sweep import expand, holdout_domains, parse_seeds, pick_baseline, plan_runs
    from fedtui.trackers import TrackedSink, TrackerError, open_trackers

    if not vary and seeds is None:
        raise _bad_input("give --vary key=v1,v2,... (one run per value) and/or --seeds 0-4")
    try:
        open_trackers(log)  # a missing package or store is bad input before any run; each run opens its own
    except TrackerError as error:
        raise _bad_input(str(error))
    try:
        raw = read_preset_toml(preset)
        seed_list = parse_seeds(seeds) if seeds is not None else None
        points = expand(vary, domains=lambda: holdout_domains(raw, preset, set_))
        baseline_label = pick_baseline(points, baseline)
        plan = plan_runs(raw, preset, points, common=set_, seeds=seed_list)
    except PresetError as error:
        raise _bad_input(str(error))

    from engine.control import RunControl
    from engine.runner import run as run_engine
    from engine.runstore import new_run_dir
    from engine.sweep import run_sweep
    from fedtui.headless import ClosedOutputGuard, SweepReporter, lodo_table, paired_table, sweep_table

    control = RunControl()
    out_root = plan[0].preset.run.out_dir
    run_table = raw.get("run") if isinstance(raw.get("run"), dict) else {}
    try:
        out_dir = new_run_dir(out_root, f"sweep-{run_table.get('name', preset.stem)}")
    except OSError as error:
        raise _bad_input(f"cannot create the sweep folder under run.out_dir {out_root!r}: {error.strerror or error}")
    reporter = SweepReporter(len(plan))

    def output_closed() -> None:
        err.print(f"[yellow]stdout was closed (broken pipe): stopping the sweep (a run in progress stops after its "
                  f"current batch); {escape(str(out_dir))} keeps its finished runs and tables[/]", soft_wrap=True)
        control.stop()

    guard = ClosedOutputGuard(reporter, output_closed)  # every run's sink writes to the one stdout

    def run_tracked(preset, sink, control, run_dir=None):
        """One run of the sweep with its own tracker runs, ended before the next starts (MLflow and W&B
        keep one active run a process)."""
        tracked = TrackedSink(sink, open_trackers(log), preset)
        try:
            return run_engine(preset, tracked, control, run_dir=run_dir)
        finally:
            tracked.close()

    previous = signal.signal(signal.SIGINT, lambda signum, frame: control.stop())
    try:
        result = run_sweep(plan, out_dir, run_tracked if log else run_engine,
                           lambda label: guard.sink(reporter.sink_for(label)), control, baseline=baseline_label)
    finally:
        signal.signal(signal.SIGINT, previous)
        guard.close()
    console = Console(highlight=False)
    console.print(sweep_table(result.summary, seed_list))
    if seed_list is not None and len(seed_list) > 1 and len(points) > 1:
        console.print(paired_table(result.summary, baseline_label))
    for table in result.lodo:
        console.print(lodo_table(table))
    if result.files:
        console.print(f"tables in {out_dir}: {', '.join(f.name for f in result.files)}", soft_wrap=True)
    if any(r.row["status"] in ("failed", "diverged") for r in result.records):
        raise typer.Exit(EXIT_FAILED)
    if control.stop_requested:
        raise typer.Exit(EXIT_INTERRUPTED)


@cli.command()
def check(
    preset: Path = typer.Argument(..., help="preset TOML file"),
    set_: list[str] = typer.Option([], "--set", help="override a key: --set train.local_epochs=5 (repeatable)"),
) -> None:
    """Check a preset as `fedtui run` would, without running it: print the resolved preset, or every problem."""
    from engine.presets import to_toml

    loaded = _load(preset, set_)
    sys.stdout.write(to_toml(loaded))  # plain text, never wrapped or styled: `fedtui check p.toml > r.toml` works
    err.print(f"[green]ok:[/] {escape(str(preset))} can run")


@cli.command("presets")
def list_presets() -> None:
    """List the shipped presets with a one-line description each."""
    from rich.table import Table

    from engine.presets import describe, shipped_presets

    table = Table(show_header=True, header_style="bold")
    table.add_column("preset")
    table.add_column("description")
    for path in shipped_presets():
        table.add_row(str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path), describe(path))
    Console().print(table)


@cli.command()
def console(preset: Optional[Path] = typer.Argument(None, help="preset to select on start")) -> None:
    """Open the interactive console (the same as plain `fedtui`)."""
    raise typer.Exit(_open_console(preset))


@cli.command()
def pretrain(
    preset: Path = typer.Argument(..., help="pretraining preset, e.g. presets/pretrain/tiny.toml"),
    out: Optional[Path] = typer.Option(None, "--out", help="output checkpoint folder"),
    resume: bool = typer.Option(False, "--resume", help="continue from the last checkpoint in the output folder"),
) -> None:
    """Contrastive pre-training of a small CLIP on the synthetic captioned corpus."""
    from fedtui.pretrain_cli import pretrain_command

    raise typer.Exit(pretrain_command(str(preset), str(out) if out else None, resume))


def _open_console(preset: Path | None) -> int:
    """Open the console; the exit code is 1 if it crashed (Textual prints the traceback), else 0.

    A preset named on the command line must read as TOML (UTF-8, parses, a regular file) or it is one
    error line and exit 2, as for ``fedtui run``; one that reads but does not validate opens in the
    editor with every problem shown, so it can be fixed there.
    """
    if preset is not None:
        from fedtui.app.catalog import printable, read_toml

        found = read_toml(preset)
        if found.raw is None:
            missing = not preset.exists() and not preset.is_symlink()
            problem = "no such preset file" if missing else found.problem
            err.print(f"[bold red]error:[/] {escape(printable(str(preset)))}: {escape(printable(problem or ''))}",
                      soft_wrap=True)
            return EXIT_BAD_INPUT
    from fedtui.app.app import FedtuiApp

    app = FedtuiApp(preset_path=preset)
    app.run()
    return app.return_code or EXIT_OK


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``fedtui`` and ``fedtui PRESET.toml`` open the console; everything else is a subcommand.

    Run as the program (``argv`` None), it ends with ``leave``: the interpreter's teardown is skipped."""
    as_program = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if not argv or (len(argv) == 1 and argv[0].endswith(".toml")):
            sys.exit(_open_console(Path(argv[0]) if argv else None))
        cli(argv, prog_name="fedtui")
    except SystemExit as ending:
        if not as_program:
            raise
        leave(ending.code)
    if as_program:
        leave(EXIT_OK)


def leave(code) -> None:
    """Exit the process as Python's own shutdown would, less its teardown of modules and objects.

    Threads are waited for, ``atexit`` handlers run (trackers, logging) and the standard streams are flushed,
    in that order, as at a normal exit; then ``os._exit``. With torch loaded the skipped teardown costs
    ~0.2 s and raises the process's peak memory by ~130 MB (tearing down its modules touches pages it had
    left alone) for nothing: every file a command writes is complete and fsynced before it returns."""
    import atexit
    import os
    import threading

    if isinstance(code, bool) or not isinstance(code, int):
        if code is not None:  # sys.exit("message"): the message on stderr, exit 1, as Python does
            print(code, file=sys.stderr)
        code = EXIT_OK if code is None else EXIT_FAILED
    shutdown = getattr(threading, "_shutdown", None)  # joins non-daemon threads; runs executors' exit hooks
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
            pass
    os._exit(code)


from fedtui.cli_extra import register as _register_extra  # noqa: E402  (schema, report, serve)
_register_extra(cli)

from fedtui.cli_rounds import register as _register_rounds; _register_rounds(cli)  # noqa: E402,E702  (keys, round)

from fedtui.cli_data import register as _register_data; _register_data(cli)  # noqa: E402,E702  (data fetch, data list)

from fedtui.cli_flower import register as _register_flower; _register_flower(cli)  # noqa: E402,E702  (flower local, tls, node-key, app)


if __name__ == "__main__":
    main()
