"""The federated state after each completed round, so a run can be resumed exactly where it stopped.

    state/state.json                 round, selection memory, optimiser settings, the tensors file's name
                                     and SHA-256, and how many bytes of metrics.jsonl that round ended at
    state/tensors-<sha>.safetensors  global and personal adapters, server moments, codec residuals,
                                     optimiser moments, every random stream

Safetensors plus JSON, never pickle. The tensors file is named after its own hash and written before
the JSON, each through a temporary file and a rename: a kill at any moment leaves the previous round's
state whole (the JSON still names the previous tensors file, removed only after the new JSON is in place).
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from engine.runstore import write_atomic

STATE_DIR = "state"
STATE_FILE = "state.json"
FORMAT = 1


class ResumeError(ValueError):
    """A run directory that cannot be resumed; the message says why and what to do."""


@dataclass
class RoundState:
    round: int
    tensors: dict[str, torch.Tensor]
    info: dict[str, Any]
    metrics_bytes: int  # metrics.jsonl's length when this round's state was saved


@dataclass
class RoundStateFiles:
    """A round's state as the bytes of its two files, made before the run goes on (it keeps changing the tensors
    and the dicts they came from), so writing them can happen on another thread (``RoundStateWriter``)."""

    tensors_name: str  # tensors-<sha>.safetensors
    tensors: bytes
    record: str  # state.json


def round_state_files(round_: int, tensors: dict[str, torch.Tensor], info: dict[str, Any],
                      metrics_bytes: int) -> RoundStateFiles:
    blob = st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    digest = hashlib.sha256(blob).hexdigest()
    name = f"tensors-{digest[:16]}.safetensors"
    record = {"format": FORMAT, "round": round_, "tensors": name, "sha256": digest,
              "metrics_bytes": metrics_bytes, "info": info}
    return RoundStateFiles(name, blob, json.dumps(record, indent=1) + "\n")


def write_round_state(run_dir: Path, files: RoundStateFiles) -> None:
    """The tensors file, then state.json, then the previous round's tensors file removed."""
    folder = Path(run_dir) / STATE_DIR
    folder.mkdir(exist_ok=True)
    target = folder / files.tensors_name
    if not target.exists():
        write_atomic(target, files.tensors, durable=True)
    # Durable, and in this order: state.json never names a tensors file that a crash could still lose.
    write_atomic(folder / STATE_FILE, files.record, durable=True)
    for old in folder.glob("tensors-*.safetensors"):
        if old.name != files.tensors_name:
            old.unlink(missing_ok=True)


class RoundStateWriter:
    """Writes each round's state (``write_round_state``) on a thread of its own, so its fsyncs (~1.7 ms a round
    on this machine's disk) overlap the next round instead of holding it up.

    One write in flight at a time, in round order: ``submit`` waits for the previous one. A write's error (a
    full disk) is raised by the next ``submit`` or by ``close``, which the run calls before it ends however it
    ends, so a stopped, diverged or failed run has its last round's state on the disk as before; a kill -9
    during a write leaves the previous round's state, which resume handles like any other kill."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, write: Callable[[], None]) -> None:
        self.close()
        self._thread = threading.Thread(target=self._write, args=(write,), name="fedtui-round-state")
        self._thread.start()

    def _write(self, write: Callable[[], None]) -> None:
        try:
            write()
        except BaseException as error:  # handed to the run's thread, which reports it
            self._error = error

    def close(self) -> None:
        """Wait for the write in flight; raise its error, if it had one."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def load_round_state(run_dir: Path) -> RoundState | None:
    """The last completed round's state, None when the run never completed a round."""
    folder = Path(run_dir) / STATE_DIR
    path = folder / STATE_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("format") != FORMAT:
            raise ResumeError(f"{path}: unknown state format {record.get('format')!r}")
        name = str(record["tensors"])
        if "/" in name or "\\" in name or name.startswith("."):
            raise ResumeError(f"{path}: names an odd tensors file {name!r}")
        blob = (folder / name).read_bytes()
        if hashlib.sha256(blob).hexdigest() != record["sha256"]:
            raise ResumeError(f"{folder / name}: damaged (its SHA-256 does not match state.json)")
        return RoundState(int(record["round"]), st_load(blob), record["info"], int(record["metrics_bytes"]))
    except ResumeError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ResumeError(f"{path}: cannot be read ({type(error).__name__}: {error})") from None
