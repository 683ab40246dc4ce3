"""The run directory: runs/<timestamp>-<name>/ with everything needed to read, replay or re-run a run.

    preset.toml      the resolved preset (re-runnable exactly)
    manifest.json    versions, seed, device, data and weights fingerprints
    metrics.jsonl    every event, one JSON object a line, flushed as it happens
    summary.json     accuracies (zero-shot, per round, selected) and how the run ended
    checkpoints/     adapter weights, best and last (safetensors)

Whole files are written to a temporary name and renamed, so a crash never leaves half a summary.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.events import Event, event_to_json


def write_atomic(path: Path, data: str | bytes, durable: bool = False) -> None:
    """Write a temporary file and rename it; on failure (a full disk) no temporary file is left behind.

    ``durable``: the bytes reach the disk before the rename, and the rename before returning, so a power
    cut or an OS crash (not just kill -9) leaves the old file or the new one, never an empty one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without directory descriptors: the rename is as durable as it gets
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def new_run_dir(out_dir: str | Path, name: str, now: float | None = None) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now if now is not None else time.time()))
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "run"
    base = Path(out_dir).expanduser() / f"{stamp}-{slug}"
    base.parent.mkdir(parents=True, exist_ok=True)
    candidate, n = base, 1
    while True:
        # mkdir itself is the claim: two runs started in the same second each get their own folder.
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            n += 1
            candidate = base.with_name(f"{base.name}-{n}")


class RunStore:
    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        # Unbuffered: a line is in the file or, after a failed write, cut back; never half in a buffer.
        self._metrics = open(self.dir / "metrics.jsonl", "ab", buffering=0)

    def write_text(self, name: str, text: str) -> Path:
        path = self.dir / name
        write_atomic(path, text)
        return path

    def write_json(self, name: str, data: Any) -> Path:
        return self.write_text(name, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")

    def read_json(self, name: str) -> Any:
        return json.loads((self.dir / name).read_text(encoding="utf-8"))

    def sync_metrics(self) -> None:
        """metrics.jsonl on the disk, at least as far as a round's state says it reaches (``metrics_length``)."""
        os.fsync(self._metrics.fileno())

    def metrics_length(self) -> int:
        """metrics.jsonl's length now: a round's state names it, and a resumed run cuts the file back to it."""
        return self._metrics.tell()

    def append_event(self, event: Event) -> None:
        """One whole line or nothing: a write that fails half-way (ENOSPC) is cut back, so the file still replays."""
        line = (event_to_json(event) + "\n").encode("utf-8")
        end = self._metrics.tell()
        try:
            written = 0
            while written < len(line):
                written += self._metrics.write(memoryview(line)[written:])
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._metrics.fileno(), end)
            raise

    def save_checkpoint(self, name: str, state: dict[str, Any], metadata: dict[str, str]) -> Path:
        from safetensors.torch import save_file  # torch only when a run saves, not when the app lists runs

        folder = self.dir / "checkpoints"
        folder.mkdir(exist_ok=True)
        path = folder / f"{name}.safetensors"
        tmp = folder / f".{name}.tmp{os.getpid()}"
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp), metadata=metadata)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path

    def close(self) -> None:
        if not self._metrics.closed:
            with contextlib.suppress(OSError):  # flushing nothing more on a full disk is not an error here
                self._metrics.close()


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def run_status(run_dir: Path, summary: dict[str, Any]) -> str:
    """How a run ended: its summary's word, or for a run without one, "running" while its process lives and
    "killed" once it does not (kill -9, a segfault, a power cut)."""
    if summary.get("status"):
        return summary["status"]
    try:
        manifest = json.loads((Path(run_dir) / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "killed"
    if manifest.get("host") != platform.node() or not manifest.get("pid"):
        # Another machine's run: trust its heartbeat for a while.
        beat = _heartbeat(run_dir)
        return "running" if beat and time.time() - beat < HEARTBEAT_STALE_SECONDS else "killed"
    return "running" if _alive(int(manifest["pid"])) else "killed"


HEARTBEAT_STALE_SECONDS = 600


def _heartbeat(run_dir: Path) -> float | None:
    try:
        return float(json.loads((Path(run_dir) / "heartbeat.json").read_text(encoding="utf-8"))["time"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


@dataclass
class RunInfo:
    path: Path
    name: str
    status: str
    summary: dict[str, Any]


def read_summary(run_dir: Path) -> dict[str, Any]:
    """A run's summary.json, or {} for a run that died before writing one."""
    try:
        return json.loads((Path(run_dir) / "summary.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def list_runs(out_dir: str | Path) -> list[RunInfo]:
    """Runs under ``out_dir``, newest first; a run without a summary is one that died without a word."""
    root = Path(out_dir).expanduser()
    if not root.is_dir():
        return []
    runs = []
    for path in sorted((p for p in root.iterdir() if (p / "metrics.jsonl").is_file()), reverse=True):
        summary = read_summary(path)
        runs.append(RunInfo(path, summary.get("preset_name", path.name), run_status(path, summary), summary))
    return runs
