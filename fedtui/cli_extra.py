"""More ``fedtui`` commands: ``schema`` (the preset format as JSON Schema), ``report`` (figures), ``serve``
(the console in a browser). ``fedtui.cli`` calls ``register(cli)`` once, at the end of its module.

This module does not import ``fedtui.cli`` (which imports it), so either can be imported first.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from fedtui.exit_codes import EXIT_BAD_INPUT

err = Console(stderr=True, highlight=False)


def _bad_input(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    return typer.Exit(EXIT_BAD_INPUT)


def schema(
    out: Optional[Path] = typer.Option(None, "--out", help="write the schema to this file instead of printing it"),
) -> None:
    """Print the preset format as a JSON Schema (draft 2020-12), generated from the preset dataclasses.

    Point an editor at it for completion and checks while typing; `fedtui check` remains the full check.
    """
    from engine.json_schema import schema_text

    text = schema_text()
    if out is None:
        sys.stdout.write(text)
        return
    try:
        if out.is_dir():
            raise _bad_input(f"--out {out} is a folder; give a file name, e.g. preset.schema.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    except OSError as error:
        raise _bad_input(f"--out {out}: cannot write: {error.strerror or error}")
    err.print(f"[green]wrote[/] {escape(str(out))}", soft_wrap=True)


def report(
    run_dirs: list[Path] = typer.Argument(..., help="run directories and/or sweep folders", show_default=False),
    out: Optional[Path] = typer.Option(
        None, "--out", help="figure file: .png, .svg or .pdf (default: report.png in the first folder)"
    ),
    title: Optional[str] = typer.Option(None, "--title", help="the figure's heading"),
) -> None:
    """Draw accuracy and loss over rounds, the WiSE-FT curve and a sweep's comparison (needs matplotlib)."""
    from fedtui.report import MatplotlibMissing, ReportError, draw_report

    target = out if out is not None else run_dirs[0] / "report.png"
    try:
        written = draw_report(run_dirs, target, title=title)
    except ReportError as error:
        raise _bad_input(str(error))
    except MatplotlibMissing as error:
        raise _bad_input(str(error))
    except OSError as error:
        raise _bad_input(f"--out {target}: cannot write: {error.strerror or error}")
    err.print(f"[green]wrote[/] {escape(str(written))} ({written.stat().st_size:,} bytes)", soft_wrap=True)


def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (127.0.0.1: this machine only)"),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="port to listen on"),
    public_url: Optional[str] = typer.Option(
        None, "--public-url", help="the URL browsers reach the server at, if not http://HOST:PORT (a proxy, 0.0.0.0)"
    ),
    preset: Optional[Path] = typer.Argument(None, help="preset to select on start, as `fedtui PRESET`"),
) -> None:
    """Serve the console in a web browser (needs textual-serve); each browser tab gets its own console."""
    try:
        from textual_serve.server import Server
    except ImportError:
        raise _bad_input("serving the console needs textual-serve: pip install 'fedtui[serve]'  "
                         "(or: pip install textual-serve)")
    command = [sys.executable, "-m", "fedtui"]
    if preset is not None:
        if not preset.is_file():
            raise _bad_input(f"{preset}: no such preset file")
        command += ["console", str(preset.resolve())]
    Server(shlex.join(command), host=host, port=port, title="fedtui", public_url=public_url).serve()


def register(cli: typer.Typer) -> None:
    """Add this module's commands to the ``fedtui`` Typer app."""
    cli.command("schema")(schema)
    cli.command("report")(report)
    cli.command("serve")(serve)
