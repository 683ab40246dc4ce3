"""``fedtui data fetch NAME`` and ``fedtui data list``: the real data sets, laid out for ``data.root``.

The work is ``engine.datasets`` (its ``DATASETS`` table holds every URL, its origin and its checksum); this
module draws the progress bars and prints the outcome. ``fedtui.cli`` calls ``register(cli)`` once, at the
end of its module. Exit codes: 0 fetched (or already there), 1 the download or the archive failed on the
way (a ``.part`` is kept to resume), 2 bad input, offline, or an archive whose checksum is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn,
                           TransferSpeedColumn)


err = Console(stderr=True, highlight=False)
out = Console(highlight=False)

data_app = typer.Typer(
    help="The real data sets (PACS, VLCS, Office-Home, DomainNet): fetch them into <root>/<domain>/<class>/<image>.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class _Bars:
    """One Rich bar per stage (download X, verify X, extract X): bytes for the first two, members for the last."""

    def __init__(self, console: Console):
        self.bytes = Progress(TextColumn("{task.description:<28}"), BarColumn(), DownloadColumn(),
                              TransferSpeedColumn(), TimeRemainingColumn(), console=console)
        self.items = Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), console=console)
        self.tasks: dict[str, tuple[Progress, int]] = {}
        self.started = False

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        if stage not in self.tasks:
            bar = self.items if stage.startswith("extract") else self.bytes
            if not self.started:
                self.bytes.start()
                self.started = True
            if bar is self.items and not self.items.live.is_started:
                self.bytes.stop()
                self.items.start()
            self.tasks[stage] = (bar, bar.add_task(stage, total=total))
        bar, task = self.tasks[stage]
        bar.update(task, completed=done, total=total)

    def note(self, text: str) -> None:
        live = self.items if self.items.live.is_started else self.bytes
        live.console.print(f"[yellow]note:[/] {escape(text)}", soft_wrap=True)

    def close(self) -> None:
        for bar in (self.bytes, self.items):
            if bar.live.is_started:
                bar.stop()


@data_app.command("fetch")
def fetch_command(
    name: str = typer.Argument(..., help="pacs | vlcs | office-home | domainnet"),
    root: Optional[Path] = typer.Option(None, "--root", help="where the domains go (default: data/<Name>)"),
    url: list[str] = typer.Option(
        [], "--url", help="replace the table's URL (http(s)://, file:// or a path); FILE=URL for one archive of "
        "several (repeatable). Env: FEDTUI_DATA_URL_<NAME>"),
    source: Optional[str] = typer.Option(None, "--source", help="another source of the table (fedtui data list)"),
    sha256: Optional[str] = typer.Option(None, "--sha256", help="the archive's expected SHA-256, if you know it"),
    force: bool = typer.Option(False, "--force", help="download and lay out again even if it is there"),
    keep_archive: bool = typer.Option(False, "--keep-archive", help="keep the archive in <root>/.download"),
    timeout: float = typer.Option(30.0, "--timeout", help="seconds to wait for the server"),
) -> None:
    """Download (resumable), verify SHA-256, extract and lay out a data set; print the preset keys to use it."""
    from engine.datasets import FetchError, fetch, preset_keys

    bars = _Bars(out)
    try:
        result = fetch(name.lower(), root, source=source, urls=url, sha256=sha256, force=force,
                       keep_archive=keep_archive, progress=bars, note=bars.note, timeout=timeout)
    except FetchError as error:
        bars.close()
        err.print(f"[bold red]error:[/] {escape(str(error))}", soft_wrap=True)
        raise typer.Exit(error.exit_code)
    except KeyboardInterrupt:
        bars.close()
        err.print("[red]interrupted; the partial download is kept: the same command resumes it[/]")
        raise typer.Exit(130)
    finally:
        bars.close()
    title = result.dataset.title
    if result.already:
        out.print(f"{title} is already in {escape(str(result.root))} (--force fetches it again)", soft_wrap=True)
    else:
        out.print(f"{title} fetched into {escape(str(result.root))}", soft_wrap=True)
    for domain, (classes, images) in result.domains.items():
        out.print(f"  {domain:<14} {classes:>4} classes {images:>7} images")
    for archive in result.archives:
        resumed = f", resumed at {archive.resumed_from:,} bytes" if archive.resumed_from else ""
        where = f" in {result.root / '.fedtui-checksums.json'}" if archive.checksum == "recorded now" else ""
        out.print(f"  {archive.filename}: {archive.size:,} bytes, SHA-256 {archive.sha256} "
                  f"({archive.checksum}{escape(where)}{resumed})", soft_wrap=True)
    out.print("use it:")
    for line in preset_keys(result):
        out.print(f"  {escape(line)}", soft_wrap=True)


@data_app.command("list")
def list_command() -> None:
    """The data sets, their sources (the first is the default), URLs, checksums and layouts."""
    from engine.datasets import DATASETS, env_var

    for dataset in DATASETS.values():
        preset = f", preset presets/{dataset.preset}" if dataset.preset else ""
        out.print(f"[bold]{dataset.key}[/] ({dataset.title}): domains {', '.join(dataset.domain_names)}{preset}; "
                  f"URL override {env_var(dataset.key)}", soft_wrap=True)
        for number, source in enumerate(dataset.sources):
            default = " (default)" if number == 0 else ""
            out.print(f"  --source {source.name}{default}: from {escape(source.origin)}", soft_wrap=True)
            for archive in source.archives:
                out.print(f"    {archive.filename} <- {escape(archive.url)}", soft_wrap=True)
                out.print(f"      checksum {archive.checksum_kind}; domains under {archive.base or '(top)'!r}"
                          f"{'; ' + escape(archive.note) if archive.note else ''}", soft_wrap=True)
        if dataset.note:
            out.print(f"  note: {escape(dataset.note)}", soft_wrap=True)


def register(cli: typer.Typer) -> None:
    cli.add_typer(data_app, name="data")


__all__ = ["data_app", "register"]
