"""``fedtui serve``: the console's web page answers on a loopback port (textual-serve, the ``serve`` extra)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytest.importorskip("textual_serve", reason="serving needs the serve extra: pip install -e '.[serve]'")

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fetch(url: str, seconds: float) -> tuple[int, str]:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status, response.read().decode("utf-8", "replace")
        except (urllib.error.URLError, ConnectionError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.25)


async def terminal_output(url: str, seconds: float) -> str:
    """What the browser's terminal receives over the websocket until the console's first screen is drawn."""
    import aiohttp  # textual-serve's own dependency

    received = ""
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        while "Presets" not in received and time.monotonic() < deadline:
            try:
                message = await asyncio.wait_for(ws.receive(), timeout=max(0.1, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                break
            if message.type == aiohttp.WSMsgType.BINARY:
                received += message.data.decode("utf-8", "replace")
            elif message.type == aiohttp.WSMsgType.TEXT:
                received += message.data
            else:
                break
    return received


def test_serve_answers_with_the_console_page(tmp_path):
    port = free_port()
    log = (tmp_path / "serve.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "fedtui", "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        try:
            status, page = fetch(f"http://127.0.0.1:{port}/", seconds=20)
        except OSError:
            log.flush()
            pytest.fail(f"fedtui serve did not answer in 20 s; it printed:\n{(tmp_path / 'serve.log').read_text()}")
        assert status == 200
        assert "fedtui" in page and "textual" in page.lower()
        assert f"ws://127.0.0.1:{port}/ws" in page  # where the browser's terminal connects
        assert process.poll() is None
        screen = asyncio.run(terminal_output(f"http://127.0.0.1:{port}/ws?width=100&height=30", seconds=40))
        assert "Presets" in screen  # the console itself runs behind the page: its first screen arrives
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def test_serve_refuses_a_missing_preset():
    from fedtui.cli import cli

    result = CliRunner().invoke(cli, ["serve", "no/such/preset.toml"])
    assert result.exit_code == 2 and "no such preset file" in result.output
