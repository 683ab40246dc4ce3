"""``fedtui keys`` and ``fedtui round export|train|aggregate``: rounds carried by files (docs/file-rounds.md).

The logic is ``engine.file_rounds`` and ``engine.signing``; this module parses options and prints one line
per outcome. ``fedtui.cli`` calls ``register(cli)`` once, at the end of its module; this module does not
import ``fedtui.cli``. Exit codes: 0 ok, 1 training or aggregation went non-finite, 2 bad input or a
refused package or update (each refusal one line on stderr, naming the folder and why).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from fedtui.exit_codes import EXIT_BAD_INPUT, EXIT_FAILED

err = Console(stderr=True, highlight=False)

rounds_app = typer.Typer(
    help="Rounds carried by files, for sites that never connect to a server (docs/file-rounds.md).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _say(level: str, text: str) -> None:
    style = {"warning": "yellow", "error": "bold red"}.get(level)
    if level != "info":
        err.print(f"[{style}]{level}:[/] {escape(text)}", soft_wrap=True)


def _exit_bad(message: str, prefix: str = "error") -> typer.Exit:
    err.print(f"[bold red]{prefix}:[/] {escape(message)}", soft_wrap=True)
    return typer.Exit(EXIT_BAD_INPUT)


def _guarded(action):
    """Run ``action`` turning every expected failure into one line and its exit code."""
    from engine.file_rounds import AggregationRefused, FileRoundError, RoundFailed
    from engine.schema import PresetError
    from engine.signing import KeyFileError, Refused, SigningUnavailable

    try:
        return action()
    except AggregationRefused as error:
        for refusal in error.refusals:
            err.print(f"[bold red]refused:[/] {escape(str(refusal))}", soft_wrap=True)
        raise _exit_bad(str(error))
    except Refused as refusal:
        raise _exit_bad(str(refusal), "refused")
    except (FileRoundError, PresetError, KeyFileError, SigningUnavailable, FileExistsError) as error:
        raise _exit_bad(str(error))
    except RoundFailed as error:
        err.print(f"[bold red]failed:[/] {escape(str(error))}", soft_wrap=True)
        raise typer.Exit(EXIT_FAILED)
    except OSError as error:
        raise _exit_bad(f"{error.filename or ''}: {error.strerror or error}")


def keys(
    out: Path = typer.Option(..., "--out", help="folder for NAME.key (private, mode 0600) and NAME.pub"),
    name: str = typer.Option(..., "--name", help="the site's name: 'server', or the client's name in the run"),
) -> None:
    """Make an Ed25519 key pair: NAME.key stays on this machine, NAME.pub goes to the other side."""
    from engine.signing import check_name, generate_keypair, load_public_key

    def make():
        try:
            check_name(name, "--name")
        except ValueError as error:
            raise _exit_bad(str(error))
        return generate_keypair(out, name)

    key_path, pub_path = _guarded(make)
    err.print(f"[green]wrote[/] {escape(str(key_path))} (private, keep it here) and {escape(str(pub_path))} "
              f"({load_public_key(pub_path).fingerprint}, give it to the other side)", soft_wrap=True)


@rounds_app.command("export")
def export(
    preset: Path = typer.Argument(..., help="preset TOML file"),
    out: Path = typer.Option(..., "--out", help="the round-1 package folder to write (new or empty)"),
    key: Path = typer.Option(..., "--key", help="the server's private key (server.key)"),
    set_: list[str] = typer.Option([], "--set", help="override a key: --set run.rounds=5 (repeatable)"),
    no_eval: bool = typer.Option(False, "--no-eval", help="do not evaluate on the server, even where it has the data"),
) -> None:
    """Server: write the round-1 package (initial adapter, resolved preset, manifest), signed."""
    from engine.file_rounds import export_round
    from engine.signing import load_private_key

    package = _guarded(lambda: export_round(preset, out, load_private_key(key), set_, False if no_eval else None, _say))
    m = package.manifest
    err.print(f"[green]package[/] round 1 of {m['rounds']} -> {escape(str(out))}: clients {', '.join(m['clients'])}; "
              f"round 1 cohort {', '.join(m['cohort'])}"
              f"{'' if m['server_evaluates'] else '; the server will not evaluate'}", soft_wrap=True)


@rounds_app.command("train")
def train(
    package: Path = typer.Argument(..., help="the package folder the server sent"),
    client: str = typer.Option(..., "--client", help="this site's client name in the run"),
    key: Path = typer.Option(..., "--key", help="this site's private key (NAME.key)"),
    out: Path = typer.Option(..., "--out", help="the update folder to write (new or empty); it goes back to the server"),
    server_pub: Optional[Path] = typer.Option(
        None, "--server-pub", help="the server's public key, obtained out of band (default: server.pub beside --key)"
    ),
    state: Optional[Path] = typer.Option(
        None, "--state", help="a folder that stays at this site, for what a round leaves behind (optimiser moments, "
                              "personal layers, top-k residuals); required by presets that keep such state"
    ),
    set_: list[str] = typer.Option(
        [], "--set", help="this site's own settings only: data.root, data.domains, run.cache_dir, run.threads, ..."
    ),
) -> None:
    """Client: verify the package, train this site's client on its own images, write the signed update."""
    from engine.file_rounds import train_round
    from engine.signing import load_private_key, load_public_key

    def act():
        pub = server_pub if server_pub is not None else key.parent / "server.pub"
        if server_pub is None and not pub.is_file():
            raise _exit_bad(f"no server public key: give --server-pub (the server's server.pub, obtained out of band); "
                            f"{pub} does not exist")
        return train_round(package, client, load_private_key(key), out, load_public_key(pub), set_, state, _say)

    result = _guarded(act)
    what = "skipped (below federation.skip_threshold)" if result.skipped else f"{result.bytes_up:,} bytes"
    err.print(f"[green]update[/] {escape(client)} round {result.round}: {result.examples} examples, {result.steps} steps, "
              f"mean loss {result.mean_loss:.4f}, {what} -> {escape(str(out))}", soft_wrap=True)


@rounds_app.command("aggregate")
def aggregate(
    update_dirs: list[Path] = typer.Argument(..., help="update folders", show_default=False, metavar="UPDATE..."),
    updates_flag: bool = typer.Option(False, "--updates", help="the update folders follow (--updates U1 U2 ...)"),
    package: Path = typer.Option(..., "--package", help="this round's package folder"),
    key: Path = typer.Option(..., "--key", help="the server's private key (server.key)"),
    clients_pub: Path = typer.Option(..., "--clients-pub", help="folder of the clients' NAME.pub files"),
    out: Path = typer.Option(..., "--out", help="the next round's package folder to write (new or empty)"),
    no_eval: bool = typer.Option(False, "--no-eval", help="do not evaluate, even where the server has the data"),
) -> None:
    """Server: verify the updates (refusing stale, unknown-key, unsigned or tampered ones), aggregate them
    with the preset's rule, evaluate if it can, write the next round's package."""
    from engine.file_rounds import aggregate_round
    from engine.signing import load_private_key, load_public_keys

    result = _guarded(lambda: aggregate_round(package, update_dirs, load_private_key(key), load_public_keys(clients_pub),
                                              out, False if no_eval else None, _say))
    for refusal in result.refused:
        err.print(f"[bold red]refused:[/] {escape(str(refusal))}", soft_wrap=True)
    m = result.package.manifest
    line = (f"round {m['round'] - 1}: aggregated {len(result.received)} update(s) "
            f"({', '.join(r.client for r in result.received)}) with {m['aggregation']}")
    finished = result.round_finished
    if finished is not None:
        holdout = "" if finished.mean_holdout is None else f", held-out {finished.mean_holdout:.3f}"
        line += f"; mean test {finished.mean_test:.3f}{holdout}"
    target = "final model" if m["final"] else f"package round {m['round']}"
    err.print(f"[green]{escape(line)}[/] -> {target} in {escape(str(out))}", soft_wrap=True)


def register(cli: typer.Typer) -> None:
    """Add ``keys`` and ``round`` to the ``fedtui`` Typer app."""
    cli.command("keys")(keys)
    cli.add_typer(rounds_app, name="round")
