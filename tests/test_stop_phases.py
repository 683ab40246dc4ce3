"""A stop request in every phase of a run (encoding, training, evaluating, WiSE-FT) ends it as "stopped", and
the run directory says so."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from engine.control import RunControl  # noqa: E402
from engine.presets import load_preset  # noqa: E402
from engine.runner import run  # noqa: E402
from stop_latency import phase_trigger  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("phase", ["encoding", "training", "evaluating", "wise-ft"])
def test_a_stop_in_each_phase_ends_the_run_as_stopped(phase, tiny_preset_file, tmp_path):
    overrides = ["run.rounds=6", "eval.wise_alphas=[0.0, 0.5, 1.0]"]
    if phase == "encoding":  # a cache of its own, so there is something to encode
        overrides += [f"run.cache_dir={tmp_path / 'fresh-cache'}", "model.encode_batch_size=8"]
    preset = load_preset(tiny_preset_file, overrides)
    control, reached, asked = RunControl(), phase_trigger(phase), []

    def sink(event) -> None:
        if not asked and reached(event):
            asked.append(event)
            control.stop()

    result = run(preset, sink, control)
    assert asked, f"the run never reached {phase}"
    assert result.status == "stopped"
    assert json.loads((result.run_dir / "summary.json").read_text())["status"] == "stopped"
