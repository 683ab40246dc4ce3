"""kill -9 a real run (during encoding, and in round 3), resume it, and compare with a run never interrupted:
metrics.jsonl equal apart from timings, checkpoints equal byte for byte."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
# Everything a round carries forward: server moments (fedadam), codec residuals (topk), client optimiser
# moments (kept across rounds), personal tensors (FedPer), and each client's random stream.
SETTINGS = [
    "run.rounds=6", "federation.aggregation=fedadam", "federation.compression=topk",
    "train.reset_optimizer_each_round=false", "adapter.kind=clip_adapter",
    "federation.personal_layers=image_adapter.up", "train.lr=0.001",
]
# What may differ between two runs of one preset: timings, and the folder each run lives in.
TIMINGS = ("time", "seconds", "train_seconds", "run_dir")


def fedtui(*args: str, cache: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "FEDTUI_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "fedtui.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def kill_when(args: list[str], cache: Path, ready, timeout: float = 300) -> None:
    env = {**os.environ, "FEDTUI_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fedtui.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()


def drop_timings(value):
    if isinstance(value, dict):
        return {k: drop_timings(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [drop_timings(v) for v in value]
    return value


def without_timings(run_dir: Path) -> list[dict]:
    return [drop_timings(json.loads(line)) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def checkpoints(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run_dir / "checkpoints").iterdir())}


def round_done(run_dir: Path, round_: int):
    def ready() -> bool:
        try:
            return json.loads((run_dir / "state" / "state.json").read_text())["round"] >= round_
        except (OSError, ValueError, KeyError):
            return False
    return ready


def test_kill_in_round_3_then_resume_equals_an_uninterrupted_run(tiny_preset_file, tmp_path, feature_cache):
    # Same folder name for both runs: the run id is written into every checkpoint's metadata.
    whole, killed = tmp_path / "a" / "run", tmp_path / "b" / "run"
    # A warm cache for both, so even the "n encoded, m from cache" lines agree.
    fedtui("run", str(tiny_preset_file), "--out", str(tmp_path / "warm"), "--set", "run.rounds=1", cache=feature_cache)
    fedtui("run", str(tiny_preset_file), "--out", str(whole), *[f"--set={s}" for s in SETTINGS], cache=feature_cache)
    kill_when(["run", str(tiny_preset_file), "--out", str(killed), *[f"--set={s}" for s in SETTINGS]],
              feature_cache, round_done(killed, 3))
    assert not (killed / "summary.json").exists()
    state = json.loads((killed / "state" / "state.json").read_text())
    assert state["round"] in (3, 4, 5)

    fedtui("run", "--resume", str(killed), cache=feature_cache)
    assert without_timings(killed) == without_timings(whole)
    assert checkpoints(killed) == checkpoints(whole)
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 6
    # The time the killed session spent on the rounds it kept counts in the summary, not only the resumed part.
    assert summary["seconds"] > state["info"]["elapsed_seconds"] > 0
    assert json.loads((killed / "manifest.json").read_text())["resumed"][0]["after_round"] >= 3


def test_kill_during_encoding_then_resume_equals_an_uninterrupted_run(tiny_preset_file, tmp_path):
    bigger = [*SETTINGS, "data.images_per_class=60"]
    whole, killed = tmp_path / "a" / "run", tmp_path / "b" / "run"
    fedtui("run", str(tiny_preset_file), "--out", str(whole), *[f"--set={s}" for s in bigger], cache=tmp_path / "c1")

    def encoding() -> bool:
        try:
            return "FeaturesProgress" in (killed / "metrics.jsonl").read_text()
        except OSError:
            return False

    kill_when(["run", str(tiny_preset_file), "--out", str(killed), *[f"--set={s}" for s in bigger]],
              tmp_path / "c2", encoding)
    assert not (killed / "state").exists()
    fedtui("run", "--resume", str(killed), cache=tmp_path / "c2")
    # The cache differs (the killed run's second process found part of its features cached), so the
    # encoding log lines differ; every round, every accuracy and every checkpoint is the same.
    def strip(rows):
        rows = [r for r in rows if r["event"] not in ("Log", "FeaturesReady", "FeaturesProgress")]
        for row in rows:
            if row["event"] == "RunFinished":
                row["summary"].pop("features")
        return rows

    assert strip(without_timings(killed)) == strip(without_timings(whole))
    assert checkpoints(killed) == checkpoints(whole)


def test_resume_refuses_what_it_cannot_continue(tiny_preset_file, tmp_path, feature_cache):
    done = fedtui("run", "--resume", str(tmp_path), cache=feature_cache, check=False)
    assert done.returncode == 2 and "not a run directory" in done.stderr
    finished = tmp_path / "finished"
    fedtui("run", str(tiny_preset_file), "--out", str(finished), cache=feature_cache)
    done = fedtui("run", "--resume", str(finished), cache=feature_cache, check=False)
    assert done.returncode == 2 and "completed; nothing to continue" in done.stderr
    done = fedtui("run", "--resume", str(finished), "--set", "run.rounds=9", cache=feature_cache, check=False)
    assert done.returncode == 2 and "exactly as it was" in done.stderr
    state = finished / "state" / "state.json"
    (finished / "summary.json").unlink()
    tensors = next((finished / "state").glob("tensors-*.safetensors"))
    tensors.write_bytes(tensors.read_bytes()[:-7] + b"flipped")
    done = fedtui("run", "--resume", str(finished), cache=feature_cache, check=False)
    assert done.returncode == 2 and "damaged" in done.stderr and state.exists()
