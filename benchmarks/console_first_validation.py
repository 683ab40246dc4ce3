"""Time from launch to the first validated preset in the console, as a user sees it in a terminal.

Starts ``.venv/bin/fedtui presets/quickstart.toml`` in a detached 80x24 tmux session from the
repository root and polls the screen (``tmux capture-pane``) until the status line shows "✓ valid";
the time from starting tmux to that screen is one sample (python start-up, imports, discovery, the
editor's read + resolve, the first frame). The median of ``--runs`` samples (default 3) is printed.
Nothing is started, so nothing is written; each sample uses its own tmux server, killed afterwards.

    .venv/bin/python benchmarks/console_first_validation.py [--runs 3] [--preset presets/quickstart.toml]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
POLL_SECONDS = 0.02  # each poll is one short tmux client process


def tmux(socket: str, *args: str, env: dict[str, str] | None = None) -> str:
    return subprocess.run(["tmux", "-L", socket, *args], capture_output=True, text=True, env=env,
                          timeout=30).stdout


def one_sample(preset: str, timeout: float) -> float:
    socket = f"fedtui-bench-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "TERM": os.environ.get("TERM") or "xterm-256color"}
    env.pop("TMUX", None)
    try:
        start = time.perf_counter()
        subprocess.run(["tmux", "-L", socket, "-f", os.devnull, "new-session", "-d", "-s", "bench", "-x", "80",
                        "-y", "24", "-c", str(REPO), f".venv/bin/fedtui {preset}"], check=True, env=env, timeout=30)
        while True:
            screen = tmux(socket, "capture-pane", "-p", "-t", "bench")
            if "✓ valid" in screen:
                return time.perf_counter() - start
            if "Traceback" in screen or "✗" in screen or time.perf_counter() - start > timeout:
                raise SystemExit(f"no '✓ valid' on screen after {time.perf_counter() - start:.1f} s:\n{screen}")
            time.sleep(POLL_SECONDS)
    finally:
        tmux(socket, "kill-server")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--preset", default="presets/quickstart.toml", help="relative to the repository root")
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    if shutil.which("tmux") is None:
        sys.exit("tmux is not installed (apt-get install -y tmux)")
    if not (REPO / ".venv" / "bin" / "fedtui").exists():
        sys.exit("no .venv/bin/fedtui: run `make install` first")
    samples = []
    for i in range(args.runs):
        seconds = one_sample(args.preset, args.timeout)
        samples.append(seconds)
        print(f"run {i + 1}: {seconds:.2f} s to '✓ valid'")
    print(f"median of {len(samples)}: {statistics.median(samples):.2f} s "
          f"(min {min(samples):.2f}, max {max(samples):.2f}; {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
