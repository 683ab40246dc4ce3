"""Every way a run can end leaves a run directory that says how: diverged, disk full, killed."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine import events as ev, load_preset
from engine.runner import run
from engine.runstore import RunStore, list_runs, run_status

REPO = Path(__file__).resolve().parent.parent


SHIPPED_CLIP = f"model.pretrained=local-dir:{REPO / 'engine' / 'assets' / 'fedtui-clip-tiny'}"


def exploding(path):
    """lr = 1e30 on the shipped CLIP: NaN within a round. The schema refuses such an lr; the Python API takes
    a preset as given, which is how it reaches the engine."""
    preset = load_preset(path, [SHIPPED_CLIP])
    return dataclasses.replace(
        preset, train=dataclasses.replace(preset.train, lr=1e30),
        run=dataclasses.replace(preset.run, rounds=6),
    )


@pytest.mark.slow
def test_non_finite_loss_ends_the_run_as_diverged_with_the_last_finite_checkpoint(tiny_preset_file):
    from safetensors.torch import load_file

    preset = exploding(tiny_preset_file)
    seen: list = []
    result = run(preset, seen.append)
    assert result.status == "diverged"
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["status"] == "diverged"
    assert summary["error"].startswith("client ") and "round " in summary["error"]
    assert summary["rounds_completed"] < 6
    last = load_file(result.run_dir / "checkpoints" / "last.safetensors")
    assert all(bool(t.isfinite().all()) for t in last.values())
    finished = [e for e in seen if isinstance(e, ev.RunFinished)]
    assert finished and finished[-1].status == "diverged"
    assert any(isinstance(e, ev.Log) and e.level == "error" and "diverged" in e.text for e in seen)


@pytest.mark.slow
def test_diverged_run_in_a_fresh_process(tiny_preset_file, tmp_path):
    script = (
        "import sys; from engine.runner import run\n"
        "from tests.test_run_endings import exploding\n"
        f"sys.exit(0 if run(exploding({str(tiny_preset_file)!r})).status == 'diverged' else 3)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_a_full_disk_never_leaves_a_torn_line_or_a_temp_file(tmp_path, monkeypatch):
    store = RunStore(tmp_path / "run")
    store.append_event(ev.Log(level="info", text="first", time=1.0))
    real = store._metrics

    class FillsUpHalfWay:
        """The file as the kernel shows it when the disk fills mid-write: half the bytes land, then ENOSPC."""

        def write(self, data):
            real.write(bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(real, name)

    monkeypatch.setattr(store, "_metrics", FillsUpHalfWay())
    with pytest.raises(OSError):
        store.append_event(ev.Log(level="info", text="second " * 50, time=2.0))
    monkeypatch.undo()
    store.close()
    text = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert text.endswith("\n") and [e.text for e in ev.read_events(tmp_path / "run" / "metrics.jsonl")] == ["first"]

    class HalfWritten:
        """The temporary file is created and half its bytes land before ENOSPC, as on a disk that fills up."""

        def __init__(self, path, mode):
            self.handle = open(path, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            self.handle.write(data[: len(data) // 2])
            self.handle.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

    from engine import runstore

    for durable in (False, True):
        monkeypatch.setattr(runstore, "open", HalfWritten, raising=False)
        with pytest.raises(OSError):
            runstore.write_atomic(tmp_path / "run" / "summary.json", '{"status": "completed"}', durable=durable)
        monkeypatch.undo()
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics.jsonl"]


@pytest.mark.slow
def test_run_on_a_full_disk_fails_with_one_message_and_no_temp_files(tiny_preset_file, monkeypatch):
    from engine import runstore

    preset = load_preset(tiny_preset_file)
    real = runstore.RunStore.save_checkpoint

    def full(self, name, state, metadata):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.dir / "checkpoints" / f"{name}.safetensors"))

    monkeypatch.setattr(runstore.RunStore, "save_checkpoint", full)
    seen: list = []
    result = run(preset, seen.append)
    monkeypatch.setattr(runstore.RunStore, "save_checkpoint", real)
    assert result.status == "failed"
    failed = [e for e in seen if isinstance(e, ev.RunFailed)]
    assert len(failed) == 1 and "No space left on device" in failed[0].error and "\n" not in failed[0].error
    assert not [p for p in result.run_dir.rglob(".*tmp*")]
    assert ev.read_events(result.run_dir / "metrics.jsonl")[-1] == failed[0]


def test_a_full_disk_under_the_round_state_fails_the_run_and_keeps_the_last_whole_state(tiny_preset_file, monkeypatch):
    """The round state is written on a thread of its own (engine.run_state.RoundStateWriter): a disk that fills
    during round 2's write still fails the run with one line naming the file, and round 1's state stays whole."""
    from engine import run_state

    preset = load_preset(tiny_preset_file)
    real = run_state.write_atomic

    def fills_at_round_two(path, data, durable=False):
        if path.name == "state.json" and json.loads(data)["round"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data, durable)

    monkeypatch.setattr(run_state, "write_atomic", fills_at_round_two)
    seen: list = []
    result = run(preset, seen.append)
    assert result.status == "failed"
    failed = [e for e in seen if isinstance(e, ev.RunFailed)]
    assert len(failed) == 1 and "\n" not in failed[0].error
    assert "No space left on device" in failed[0].error and "state.json" in failed[0].error
    kept = run_state.load_round_state(result.run_dir)
    assert kept is not None and kept.round == 1


@pytest.mark.slow
def test_a_run_killed_with_sigkill_shows_as_killed(tiny_preset_file, tmp_path):
    out = tmp_path / "killed-run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedtui.cli", "run", str(tiny_preset_file), "--out", str(out), "--set", "run.rounds=400"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "heartbeat.json").exists():  # at least one round done
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        assert run_status(out, {}) == "running"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "summary.json").exists()
    assert run_status(out, {}) == "killed"
    assert [r.status for r in list_runs(tmp_path)] == ["killed"]
    assert json.loads((out / "manifest.json").read_text())["pid"] == proc.pid
    assert os.path.exists(out / "metrics.jsonl")


def test_runs_started_in_the_same_second_each_claim_their_own_folder(tmp_path):
    """Two processes launched together race for one name; mkdir decides, the loser takes the next number."""
    from concurrent.futures import ThreadPoolExecutor

    from engine.runstore import new_run_dir

    with ThreadPoolExecutor(8) as pool:
        folders = list(pool.map(lambda _: new_run_dir(tmp_path / "runs", "same", now=0.0), range(16)))
    assert len(set(folders)) == 16
    assert all(folder.is_dir() and folder.parent == tmp_path / "runs" for folder in folders)


@pytest.mark.slow
@pytest.mark.parametrize("json_output", [True, False], ids=["json", "rich"])
def test_a_reader_closing_stdout_stops_the_run_gracefully_and_it_resumes(tiny_preset_file, tmp_path, json_output):
    """``fedtui run ... | head -1``: the closed pipe stops the run after the current batch as Ctrl-C does (exit
    130, summary "stopped", one line on stderr saying so and how to continue), instead of failing it with an
    error that blamed the run directory; ``--resume`` then completes it."""
    out = tmp_path / "piped-run"
    command = [sys.executable, "-m", "fedtui.cli", "run", str(tiny_preset_file), "--out", str(out),
               "--set", "run.rounds=60", *(["--json"] if json_output else [])]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        proc.stdout.readline()
        proc.stdout.close()  # the reader goes away, as head does after its line
        stderr = proc.stderr.read().decode()
        assert proc.wait(timeout=120) == 130, stderr
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "stdout was closed (broken pipe)" in stderr and f"--resume {out}" in stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["rounds_completed"] < 60
    resumed = subprocess.run([sys.executable, "-m", "fedtui.cli", "run", "--resume", str(out)], cwd=REPO,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
