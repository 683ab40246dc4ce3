"""``fedtui flower local|tls|node-key|app``: rounds over Flower's deployment runtime (docs/deploy.md).

``local`` starts a SuperLink and one SuperNode per client on loopback (separate processes, TLS and SuperNode
authentication from keys made for the run), runs the preset and stops every process it started, also on
Ctrl-C or a failure; it prints what ``fedtui run`` prints, read from the run directory the ServerApp fills.
``tls``, ``node-key`` and ``app`` make what a deployment on real machines needs. The logic is
``engine.flower``; this module parses options and prints. ``fedtui.cli`` calls ``register(cli)`` once, at
the end of its module. Exit codes: 0 completed, 1 the run failed or diverged, 2 bad input (nothing started),
130 interrupted (every Flower process stopped).
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from fedtui.exit_codes import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED

err = Console(stderr=True, highlight=False)

flower_app = typer.Typer(
    help="Federated rounds over Flower's deployment runtime: a SuperLink and SuperNodes (docs/deploy.md).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _say(level: str, text: str) -> None:
    style = {"warning": "yellow", "error": "bold red"}.get(level, "dim")
    err.print(f"[{style}]{level}:[/] {escape(text)}", soft_wrap=True)


def _exit_bad(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    return typer.Exit(EXIT_BAD_INPUT)


def _need_flower() -> None:
    import importlib.util

    if importlib.util.find_spec("flwr") is None:
        raise _exit_bad("Flower is not installed: pip install 'fedtui[flower]'")


@flower_app.command("local")
def local(
    preset: Optional[Path] = typer.Argument(None, help="preset TOML file"),
    clients: Optional[int] = typer.Option(
        None, "--clients", help="SuperNodes to start, one per client (default: the preset's clients; sets "
                                "data.clients for iid and dirichlet partitions)"),
    set_: list[str] = typer.Option([], "--set", help="override a key: --set run.rounds=5 (repeatable)"),
    out: Optional[Path] = typer.Option(None, "--out", help="run directory (default: <run.out_dir>/<time>-<name>)"),
    insecure: bool = typer.Option(False, "--insecure", help="plain HTTP on loopback, no TLS and no SuperNode "
                                                            "authentication"),
    no_auth: bool = typer.Option(False, "--no-auth", help="TLS, but any SuperNode may connect"),
    round_timeout: float = typer.Option(3600.0, "--round-timeout", help="seconds a round waits for a client before "
                                                                        "it drops out of that round"),
    wait_nodes: float = typer.Option(300.0, "--wait-nodes", help="seconds to wait for every SuperNode before round 1"),
    json_: bool = typer.Option(False, "--json", help="print one JSON event per line instead of progress"),
    resume: Optional[Path] = typer.Option(
        None, "--resume", help="continue a stopped, killed or failed `fedtui flower local` run directory from its "
                               "last completed round (its own preset, keys and client state)"),
) -> None:
    """Run a preset over a SuperLink and K SuperNodes on this machine (Flower's deployment runtime)."""
    _need_flower()
    from engine.flower import FlowerError
    from engine.flower.local import plan_preset, run_local
    from engine.schema import PresetError
    from fedtui.headless import JsonPrinter, RichReporter

    if resume is not None:
        from engine.runstore import read_summary, run_status

        if preset is not None or set_ or clients is not None or out is not None:
            raise _exit_bad("--resume continues the run as it was: give no preset, --set, --clients or --out")
        if not (resume / "flower" / "preset.toml").is_file():
            raise _exit_bad(f"--resume {resume}: not a run directory of `fedtui flower local` (no flower/preset.toml)")
        status = run_status(resume, read_summary(resume))
        if status in ("completed", "running"):
            raise _exit_bad(f"--resume {resume}: the run is {status}; nothing to resume")
        preset, out = resume / "flower" / "preset.toml", resume
    elif preset is None:
        raise _exit_bad("give a preset file (fedtui flower local presets/quickstart.toml) or --resume RUN_DIR")
    try:
        plan_preset(preset, set_, clients)  # every problem before anything starts
    except (PresetError, FlowerError) as error:
        raise _exit_bad(str(error))
    if resume is None and out is not None and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise _exit_bad(f"--out {out} exists and is not an empty folder; nothing was started")
    reporter = JsonPrinter() if json_ else RichReporter()
    # SIGTERM (a kill, a CI timeout) ends this command like Ctrl-C: every Flower process is stopped first.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        result = run_local(preset, set_, clients, out, tls=not insecure, auth=not (insecure or no_auth),
                           wait_s=wait_nodes, timeout_s=round_timeout, sink=reporter, log=_say,
                           resume=resume is not None)
    except KeyboardInterrupt:
        reporter.close()
        err.print("[red]interrupted: every Flower process was stopped; the run directory's summary.json says "
                  "'interrupted'[/]")
        raise typer.Exit(EXIT_INTERRUPTED)
    except FlowerError as error:
        reporter.close()
        err.print(f"[bold red]failed:[/] {escape(str(error))}", soft_wrap=True)
        raise typer.Exit(EXIT_FAILED)
    finally:
        signal.signal(signal.SIGTERM, previous)
        reporter.close()
    if result.status == "diverged":
        err.print(f"[bold red]diverged:[/] {escape(str(result.summary.get('error', '')))}", soft_wrap=True)
    if result.status != "completed":
        raise typer.Exit(EXIT_INTERRUPTED if result.status in ("stopped", "interrupted") else EXIT_FAILED)


@flower_app.command("tls")
def tls(
    out: Path = typer.Option(..., "--out", help="folder for ca.pem, server.pem and server.key"),
    host: list[str] = typer.Option(..., "--host", help="a name or IP address SuperNodes reach the SuperLink by "
                                                       "(repeatable)"),
    days: int = typer.Option(30, "--days", help="validity of both certificates"),
) -> None:
    """Make a CA and the SuperLink's TLS certificate (ECDSA P-384); the CA's private key is not kept."""
    from engine.flower.local import make_tls

    try:
        files = make_tls(out, host, days)
    except (FileExistsError, ValueError) as error:
        raise _exit_bad(str(error))
    err.print(f"[green]wrote[/] {escape(str(files['ca']))} (give it to every SuperNode and to flwr), "
              f"{escape(str(files['cert']))} and {escape(str(files['key']))} (private: they stay with the SuperLink)",
              soft_wrap=True)


@flower_app.command("node-key")
def node_key(
    out: Path = typer.Option(..., "--out", help="folder for NAME.key (private, mode 0600) and NAME.pub"),
    name: str = typer.Option(..., "--name", help="the site's client name in the run"),
) -> None:
    """Make a SuperNode's authentication key pair (NIST P-384, OpenSSH format)."""
    from engine.flower.local import make_node_key

    if not name or any(c in name for c in "/\\\0") or name.startswith("."):
        raise _exit_bad(f"--name {name!r}: a plain name, such as the client's name in the run")
    try:
        private, public = make_node_key(out, name)
    except FileExistsError as error:
        raise _exit_bad(str(error))
    err.print(f"[green]wrote[/] {escape(str(private))} (private, keep it at the site) and {escape(str(public))} "
              "(register it with the SuperLink: flwr supernode register)", soft_wrap=True)


@flower_app.command("app")
def app(
    out: Path = typer.Option(..., "--out", help="folder for the Flower app's pyproject.toml"),
    wait_nodes: float = typer.Option(300.0, "--wait-nodes", help="default seconds to wait for every SuperNode"),
    round_timeout: float = typer.Option(3600.0, "--round-timeout", help="default seconds a round waits for a client"),
) -> None:
    """Write the Flower app folder (engine.flower.apps' ServerApp and ClientApp) for `flwr run`."""
    from engine.flower.local import write_app

    if (out / "pyproject.toml").exists():
        raise _exit_bad(f"{out / 'pyproject.toml'} exists; nothing was written")
    write_app(out, wait_nodes, round_timeout)
    err.print(f"[green]wrote[/] {escape(str(out / 'pyproject.toml'))}; run it with: flwr run {escape(str(out))} "
              "CONNECTION --run-config \"preset='/abs/path/preset.toml'\"", soft_wrap=True)


def register(cli: typer.Typer) -> None:
    """Add ``flower`` to the ``fedtui`` Typer app."""
    cli.add_typer(flower_app, name="flower")
