"""How long a stop request (Ctrl-C in `fedtui run`, `x` in the console) takes to end a run, per phase.

    .venv/bin/python benchmarks/stop_latency.py [--images-per-class 300] [--repeats 3]

Each phase is reached on the real engine (the shipped small CLIP, a fresh feature cache for the encoding
phases), the stop is requested from the event sink the moment the phase shows, and the time until
``run()`` returns is printed. Target: about 2 s or less in every phase.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import events as ev  # noqa: E402
from engine.control import RunControl  # noqa: E402
from engine.presets import load_preset  # noqa: E402
from engine.runner import run  # noqa: E402

PRESET = Path(__file__).resolve().parent.parent / "presets" / "quickstart.toml"


def phase_trigger(phase: str):
    """A predicate on events that is true once the run is inside ``phase``."""
    seen = {"finished": 0}

    def reached(event) -> bool:
        if phase == "encoding":
            return isinstance(event, ev.FeaturesProgress) and event.done > 0
        if phase == "training":
            return isinstance(event, ev.ClientProgress) and event.round == 2
        if phase == "evaluating":  # the last client of round 2 has reported; the round's evaluation starts next
            if isinstance(event, ev.ClientFinished) and event.round == 2:
                seen["finished"] += 1
            return seen["finished"] == 3
        if phase == "wise-ft":  # the last round is evaluated; the WiSE-FT curve is evaluated next
            return isinstance(event, ev.RoundFinished) and event.round == 6
        raise ValueError(phase)

    return reached


def measure(phase: str, images_per_class: int, workdir: Path) -> tuple[float, str]:
    overrides = [f"run.out_dir={workdir / 'runs'}", "run.rounds=6"]
    if phase == "encoding":
        overrides += [f"run.cache_dir={tempfile.mkdtemp(dir=workdir)}", f"data.images_per_class={images_per_class}"]
    else:
        overrides += [f"run.cache_dir={workdir / 'warm-cache'}"]
    if phase == "wise-ft":
        overrides += ["eval.wise_alphas=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]"]
    preset = load_preset(PRESET, overrides)
    control = RunControl()
    reached = phase_trigger(phase)
    asked: list[float] = []

    def sink(event) -> None:
        if not asked and reached(event):
            asked.append(time.perf_counter())
            control.stop()

    result: list = []
    worker = threading.Thread(target=lambda: result.append(run(preset, sink, control)))
    worker.start()
    worker.join()
    if not asked:
        return float("nan"), result[0].status
    return time.perf_counter() - asked[0], result[0].status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images-per-class", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # Warm the cache for the phases after encoding.
        run(load_preset(PRESET, [f"run.out_dir={work / 'runs'}", f"run.cache_dir={work / 'warm-cache'}", "run.rounds=1"]))
        print(f"{'phase':<12} {'median s':>9} {'max s':>7}  status")
        for phase in ("encoding", "training", "evaluating", "wise-ft"):
            samples = [measure(phase, args.images_per_class, work) for _ in range(args.repeats)]
            latencies = [s for s, _ in samples]
            statuses = sorted({status for _, status in samples})
            print(f"{phase:<12} {statistics.median(latencies):>9.3f} {max(latencies):>7.3f}  {', '.join(statuses)}")


if __name__ == "__main__":
    main()
