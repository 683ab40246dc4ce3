"""Sweeps: the same preset run once per setting of one or more keys, compared in one table.

``--vary train.local_epochs=1,5,10`` expands to one run per value (several ``--vary`` make a grid);
every run is an ordinary run directory, and the comparison is written as CSV and JSONL beside them so
it can go straight into a paper.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from engine.runstore import write_atomic
from engine.presets import Preset, apply_overrides, parse_override, preset_from_raw
from engine.schema import PresetError, Problems

COLUMNS = [
    "setting", "status", "rounds", "trainable_parameters", "zero_shot_test", "zero_shot_holdout",
    "selected_round", "test", "holdout", "final_test", "final_holdout", "bytes_up_per_round",
    "seconds_per_round", "run_dir",
]


@dataclass(frozen=True)
class SweepPoint:
    label: str  # "local_epochs=5 aggregation=fedavg"
    overrides: list[str]


def expand(vary: list[str]) -> list[SweepPoint]:
    """The grid of ``key=v1,v2`` axes, in the order given (the last axis varies fastest)."""
    axes: list[list[str]] = []
    for text in vary:
        section, key, values = parse_override(text)
        if values.startswith("["):
            raise PresetError("--vary", f"{section}.{key}", "list values cannot be swept; vary a scalar key")
        choices = [v.strip() for v in values.split(",") if v.strip()]
        if not choices:
            raise PresetError("--vary", f"{section}.{key}", "expected key=v1,v2,...")
        axes.append([f"{section}.{key}={v}" for v in choices])
    # Labels drop the section: "local_epochs=5 aggregation=fedavg" reads well in a narrow table.
    return [SweepPoint(" ".join(o.split(".", 1)[1] for o in combo), list(combo)) for combo in itertools.product(*axes)]


def build_presets(
    raw: dict[str, Any], path: Path, points: list[SweepPoint], common: list[str] | None = None
) -> list[Preset]:
    """Read and resolve every point (``common`` overrides, then its own) before anything runs, so a typo in
    the last value fails at once; the problems of every point are reported together. Each run is named
    after its point."""
    from engine.resolve import resolve

    presets, problems = [], Problems(str(path))
    for point in points:
        overrides = [*(common or []), *point.overrides]
        try:
            run_table = apply_overrides(raw, overrides).get("run", {})
            name = run_table.get("name", "run") if isinstance(run_table, dict) else "run"
            slug = "-".join(o.split(".", 1)[1].replace("=", "") for o in point.overrides)
            overrides.append(f"run.name={name}-{slug}")
            presets.append(resolve(preset_from_raw(raw, path, overrides, source=f"{path} ({point.label})")))
        except PresetError as error:
            problems.extend(error)
    problems.raise_if_any()
    return presets


def summary_row(label: str, summary: dict[str, Any], run_dir: Path, trainable: int | None) -> dict[str, Any]:
    zero, chosen, final = summary.get("zero_shot") or {}, summary.get("selected") or {}, summary.get("final") or {}
    rounds = summary.get("per_round") or []
    bytes_up = [r["bytes_up"] for r in rounds]
    seconds = [r["seconds"] for r in rounds]
    return {
        "setting": label,
        "status": summary.get("status"),
        "rounds": summary.get("rounds_completed"),
        "trainable_parameters": trainable,
        "zero_shot_test": zero.get("mean_test"),
        "zero_shot_holdout": zero.get("mean_holdout"),
        "selected_round": chosen.get("round"),
        "test": chosen.get("mean_test"),
        "holdout": chosen.get("mean_holdout"),
        "final_test": final.get("mean_test"),
        "final_holdout": final.get("mean_holdout"),
        "bytes_up_per_round": sum(bytes_up) / len(bytes_up) if bytes_up else None,
        "seconds_per_round": sum(seconds) / len(seconds) if seconds else None,
        "run_dir": str(run_dir),
    }


def run_sweep(
    presets: list[Preset],
    labels: list[str],
    out_dir: Path,
    run: Callable,
    sink_for: Callable[[str], Callable],
    control=None,
) -> list[dict[str, Any]]:
    """Run each preset in turn; a failed point is a row that says so, not the end of the sweep."""
    from engine import events as ev

    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for preset, label in zip(presets, labels):
        if control is not None and control.stop_requested:
            break
        trainable: dict[str, int] = {}
        user_sink = sink_for(label)

        def sink(event, user_sink=user_sink, trainable=trainable):
            if isinstance(event, ev.RunStarted):
                trainable["n"] = event.trainable_parameters
            user_sink(event)

        result = run(preset, sink, control, run_dir=None)
        rows.append(summary_row(label, result.summary, result.run_dir, trainable.get("n")))
        write_table(rows, out_dir)
        if result.status == "stopped":
            break
    return rows


def write_table(rows: list[dict[str, Any]], out_dir: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(out_dir / "sweep.csv", buffer.getvalue())
    write_atomic(out_dir / "sweep.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
