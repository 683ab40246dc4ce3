"""Sweeps: the same preset run once per setting of one or more keys, compared in one table.

``--vary train.local_epochs=1,5,10`` expands to one run per value (several ``--vary`` make a grid);
``--seeds 0-4`` runs every point once per seed (``run.seed``), seed by seed, so an interrupted sweep
still holds complete pairs. Every run is an ordinary run directory. Beside them the sweep writes

    sweep.csv / sweep.jsonl                  one row per run (with its seed)
    sweep-summary.csv / sweep-summary.jsonl  one row per point: mean and sample sd over the seeds of the
                                             selected and the final round's accuracy, and the paired
                                             difference to the baseline point (same seed) with its
                                             t interval (engine.stats)
    sweep-table.csv / .md / .tex             with a ``data.holdout`` axis (``data.holdout=each``: every
                                             domain in turn), the leave-one-domain-out table of the
                                             FedCLIP paper: per held-out domain each client's test
                                             accuracy, their mean (personalisation) and the held-out
                                             accuracy (generalisation), and the average row

Only completed runs enter the statistics; a failed point is a row that says so, not the end of a sweep.
Accuracies stay fractions in sweep.csv and sweep-summary; the LODO table files are in percent.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from engine import stats
from engine.presets import Preset, apply_overrides, parse_override, preset_from_raw
from engine.runstore import write_atomic
from engine.schema import PresetError, Problems, suggest

COLUMNS = [
    "setting", "seed", "status", "rounds", "trainable_parameters", "zero_shot_test", "zero_shot_holdout",
    "selected_round", "test", "holdout", "final_round", "final_test", "final_holdout", "bytes_up_per_round",
    "seconds_per_round", "run_dir",
]
# Per-run accuracies that the summary averages over seeds; the last four are compared to the baseline.
COMPARED = ("test", "holdout", "final_test", "final_holdout")
AVERAGED = ("zero_shot_test", "zero_shot_holdout", *COMPARED)
SUMMARY_COLUMNS = [
    "setting", "baseline", "runs", "completed", "seeds", "selected_rounds", "final_rounds",
    *(f"{m}_{s}" for m in AVERAGED for s in ("mean", "sd")),
    "paired_n", *(f"{m}_diff{s}" for m in COMPARED for s in ("", "_sd", "_low", "_high")),
    "trainable_parameters", "bytes_up_per_round", "seconds_per_round",
]
LEVEL = 0.95
EACH = "each"
HOLDOUT_KEY = "data.holdout"


@dataclass(frozen=True)
class SweepPoint:
    label: str  # "local_epochs=5 aggregation=fedavg"
    overrides: list[str]
    values: dict[str, str] = field(default_factory=dict)  # {"train.local_epochs": "5", ...}


@dataclass(frozen=True)
class PlannedRun:
    """One run of the sweep: a point at a seed, resolved before anything runs."""

    point: SweepPoint
    seed: int
    preset: Preset
    seeded: bool = False  # the seed comes from --seeds (and is then part of the run's name)

    @property
    def label(self) -> str:
        return self.point.label

    @property
    def display(self) -> str:
        return f"{self.point.label} seed={self.seed}" if self.seeded else self.point.label


def expand(vary: list[str], domains: Callable[[], list[str]] | None = None) -> list[SweepPoint]:
    """The grid of ``key=v1,v2`` axes, in the order given (the last axis varies fastest).

    ``data.holdout=each`` is one point per domain of the preset's data, listed by ``domains()``.
    No axis at all is one point (the preset as it is), which ``--seeds`` can still repeat."""
    axes: list[list[tuple[str, str]]] = []
    seen: set[str] = set()
    for text in vary:
        section, key, values = parse_override(text)
        dotted = f"{section}.{key}"
        if dotted in seen:
            raise PresetError("--vary", dotted, "varied twice; give every value in one --vary")
        seen.add(dotted)
        if values.startswith("["):
            raise PresetError("--vary", dotted, "list values cannot be swept; vary a scalar key")
        choices = [v.strip() for v in values.split(",") if v.strip()]
        if choices == [EACH]:
            if dotted != HOLDOUT_KEY:
                raise PresetError("--vary", dotted, f"'{EACH}' is only for {HOLDOUT_KEY} (every domain held out in turn)")
            if domains is None:
                raise PresetError("--vary", dotted, f"'{EACH}' needs the preset's domains")
            choices = list(domains())
        if not choices:
            raise PresetError("--vary", dotted, "expected key=v1,v2,...")
        if len(set(choices)) != len(choices):
            raise PresetError("--vary", dotted, "a value is listed twice")
        axes.append([(dotted, v) for v in choices])
    points = []
    for combo in itertools.product(*axes):
        # Labels drop the section: "local_epochs=5 aggregation=fedavg" reads well in a narrow table.
        label = " ".join(f"{k.split('.', 1)[1]}={v}" for k, v in combo) or "preset"
        points.append(SweepPoint(label, [f"{k}={v}" for k, v in combo], dict(combo)))
    return points


def holdout_domains(raw: dict[str, Any], path: Path, common: list[str] | None = None) -> list[str]:
    """The domains ``data.holdout=each`` goes through: ``data.domains`` if the preset names them, else
    every domain the resolve step lists (an image folder's domain folders, the synthetic world's styles)."""
    from engine.resolve import domain_class_counts

    preset = preset_from_raw(raw, path, common)
    problems = Problems(str(path))
    counts = domain_class_counts(preset, problems)
    problems.raise_if_any()
    return list(preset.data.domains) or list(counts or {})


def parse_seeds(text: str) -> list[int]:
    """``0-4`` (inclusive), ``0,2,7`` or both (``0-2,10``): distinct seeds in the order given."""
    from engine.presets import MAX_SEED

    seeds: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not match:
            raise PresetError("--seeds", None, f"expected seeds like 0-4 or 0,2,7, got {text!r}")
        first, last = int(match[1]), int(match[2] if match[2] is not None else match[1])
        if last < first:
            raise PresetError("--seeds", None, f"the range {part!r} runs backwards")
        if last > MAX_SEED or last - first >= 10_000:
            raise PresetError("--seeds", None, f"{part!r}: seeds are 0 to {MAX_SEED}, at most 10,000 of them")
        seeds.extend(range(first, last + 1))
    if len(set(seeds)) != len(seeds):
        raise PresetError("--seeds", None, f"a seed is listed twice in {text!r}")
    return seeds


def _tokens(label: str) -> frozenset[str]:
    """A label's ``key=value`` parts, section prefixes dropped: ``federation.aggregation=mean`` = ``aggregation=mean``."""
    out = set()
    for token in label.split():
        key, _, value = token.partition("=")
        out.add(f"{key.split('.')[-1].strip()}={value.strip()}")
    return frozenset(out)


def pick_baseline(points: list[SweepPoint], text: str | None) -> str:
    """The baseline point's label: ``--baseline "aggregation=mean"`` (any order, sections optional) or the first."""
    if text is None or not text.strip():
        return points[0].label
    wanted = _tokens(text)
    for point in points:
        if _tokens(point.label) == wanted:
            return point.label
    labels = [p.label for p in points]
    raise PresetError("--baseline", None, f"{text!r} is not a point of this sweep.{suggest(text, labels)}")


def plan_runs(
    raw: dict[str, Any], path: Path, points: list[SweepPoint], common: list[str] | None = None,
    seeds: list[int] | None = None,
) -> list[PlannedRun]:
    """Read and resolve every run (``common`` overrides, then the point's, then its seed) before anything
    runs, so a typo in the last value fails at once; the problems of every run are reported together.
    Each run is named after its point (and seed); with seeds the order is seed by seed."""
    from engine.resolve import resolve

    if seeds is not None:
        for text in [*(common or []), *(o for p in points for o in p.overrides)]:
            if text.split("=", 1)[0].strip() == "run.seed":
                raise PresetError("--seeds", "run.seed", "is set by --seeds; do not also --set or --vary it")
    planned, problems = [], Problems(str(path))
    for seed, point in itertools.product(seeds if seeds is not None else [None], points):
        overrides = [*(common or []), *point.overrides, *([f"run.seed={seed}"] if seed is not None else [])]
        origins = ["--set"] * len(common or []) + ["--vary"] * len(point.overrides) + ["--seeds"] * (seed is not None)
        try:
            run_table = apply_overrides(raw, overrides).get("run", {})
            name = run_table.get("name", "run") if isinstance(run_table, dict) else "run"
            slug = "-".join(o.split(".", 1)[1].replace("=", "") for o in point.overrides)
            suffix = "-".join(s for s in (slug, f"seed{seed}" if seed is not None else "") if s)
            if suffix:
                overrides.append(f"run.name={name}-{suffix}")
                origins.append("--vary")
            where = point.label if seed is None else f"{point.label} seed={seed}"
            preset = resolve(preset_from_raw(raw, path, overrides, source=f"{path} ({where})", origins=origins))
            planned.append(PlannedRun(point, preset.run.seed, preset, seeded=seed is not None))
        except PresetError as error:
            problems.extend(error)
    problems.raise_if_any()
    return planned


def build_presets(
    raw: dict[str, Any], path: Path, points: list[SweepPoint], common: list[str] | None = None
) -> list[Preset]:
    """Every point's resolved preset (``plan_runs`` without seeds)."""
    return [planned.preset for planned in plan_runs(raw, path, points, common)]


# --- one row per run ---------------------------------------------------------------------------------


@dataclass
class SweepRecord:
    label: str
    seed: int
    row: dict[str, Any]  # COLUMNS
    summary: dict[str, Any]  # the run's summary.json


def summary_row(
    label: str, summary: dict[str, Any], run_dir: Path, trainable: int | None, seed: int | None = None
) -> dict[str, Any]:
    zero, chosen, final = summary.get("zero_shot") or {}, summary.get("selected") or {}, summary.get("final") or {}
    rounds = summary.get("per_round") or []
    bytes_up = [r["bytes_up"] for r in rounds]
    seconds = [r["seconds"] for r in rounds]
    return {
        "setting": label,
        "seed": seed,
        "status": summary.get("status"),
        "rounds": summary.get("rounds_completed"),
        "trainable_parameters": trainable,
        "zero_shot_test": zero.get("mean_test"),
        "zero_shot_holdout": zero.get("mean_holdout"),
        "selected_round": chosen.get("round"),
        "test": chosen.get("mean_test"),
        "holdout": chosen.get("mean_holdout"),
        "final_round": final.get("round"),
        "final_test": final.get("mean_test"),
        "final_holdout": final.get("mean_holdout"),
        "bytes_up_per_round": sum(bytes_up) / len(bytes_up) if bytes_up else None,
        "seconds_per_round": sum(seconds) / len(seconds) if seconds else None,
        "run_dir": str(run_dir),
    }


# --- one row per point -------------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def aggregate(records: list[SweepRecord], labels: list[str], baseline: str | None = None) -> list[dict[str, Any]]:
    """One row per point (in ``labels`` order): mean and sample sd over its completed runs, and the paired
    difference point - baseline over the seeds where both completed, with the t interval at ``LEVEL``."""
    done = {(r.label, r.seed): r.row for r in records if r.row["status"] == "completed"}
    out = []
    for label in labels:
        runs = [r for r in records if r.label == label]
        ok = [r.row for r in runs if r.row["status"] == "completed"]
        row: dict[str, Any] = {
            "setting": label, "baseline": label == baseline, "runs": len(runs), "completed": len(ok),
            "statuses": [r.row["status"] for r in runs],
            "seeds": " ".join(str(r.seed) for r in runs),
            "selected_rounds": " ".join(str(r["selected_round"]) for r in ok),
            "final_rounds": " ".join(str(r["final_round"]) for r in ok),
        }
        for metric in AVERAGED:
            values = [v for v in (_number(r[metric]) for r in ok) if v is not None]
            row[f"{metric}_mean"], row[f"{metric}_sd"] = stats.mean(values), stats.sample_sd(values)
        paired = [] if baseline is None or label == baseline else [
            (done[(label, s)], done[(baseline, s)]) for s in dict.fromkeys(r.seed for r in runs)
            if (label, s) in done and (baseline, s) in done
        ]
        row["paired_n"] = len(paired) if baseline is not None and label != baseline else None
        for metric in COMPARED:
            pairs = [(_number(a[metric]), _number(b[metric])) for a, b in paired]
            pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
            interval = stats.paired_interval([a for a, _ in pairs], [b for _, b in pairs], LEVEL) if pairs else None
            row[f"{metric}_diff"] = interval.mean if interval else None
            row[f"{metric}_diff_sd"] = interval.sd if interval else None
            row[f"{metric}_diff_low"] = interval.low if interval else None
            row[f"{metric}_diff_high"] = interval.high if interval else None
        row["trainable_parameters"] = next((r.row["trainable_parameters"] for r in runs if r.row["trainable_parameters"]), None)
        for metric in ("bytes_up_per_round", "seconds_per_round"):
            row[metric] = stats.mean(v for v in (_number(r[metric]) for r in ok) if v is not None)
        out.append(row)
    return out


# --- the leave-one-domain-out table ------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    mean: float | None  # a fraction
    sd: float | None = None
    n: int = 0


def _cell(values: list[float]) -> Cell:
    return Cell(stats.mean(values), stats.sample_sd(values), len(values))


@dataclass
class LodoTable:
    """Per held-out domain (rows): each client's test accuracy (columns), their mean (personalisation) and
    the held-out accuracy (generalisation), at each run's selected round; mean over seeds."""

    group: str  # the other axes' values ("aggregation=fedavg"), "" without other axes
    columns: list[str]  # clients (the training domains under a domain partition)
    rows: list[dict[str, Any]] = field(default_factory=list)  # {"held_out", "cells": {col: Cell}, "personalisation", "generalisation", "n"}
    average: dict[str, Any] = field(default_factory=dict)


def lodo_tables(records: list[SweepRecord], points: list[SweepPoint]) -> list[LodoTable]:
    """The LODO tables of a sweep with a ``data.holdout`` axis (one per setting of the other axes); [] without."""
    if not points or HOLDOUT_KEY not in points[0].values:
        return []
    groups: dict[str, list[SweepPoint]] = {}
    for point in points:
        rest = " ".join(f"{k.split('.', 1)[1]}={v}" for k, v in point.values.items() if k != HOLDOUT_KEY)
        groups.setdefault(rest, []).append(point)
    tables = []
    for group, members in groups.items():
        per_point = {
            p.label: [r for r in records if r.label == p.label and r.row["status"] == "completed" and r.summary.get("selected")]
            for p in members
        }
        names: list[str] = [p.values[HOLDOUT_KEY] for p in members]
        for runs in per_point.values():
            for record in runs:
                for name in record.summary["selected"].get("clients") or {}:
                    if name not in names:
                        names.append(name)
        seen = {n for runs in per_point.values() for r in runs for n in (r.summary["selected"].get("clients") or {})}
        columns = [n for n in names if n in seen]
        table = LodoTable(group, columns)
        per_seed: list[dict[int, dict[str, float]]] = []  # row -> seed -> column -> value
        for point in members:
            runs = per_point[point.label]
            seeds: dict[int, dict[str, float]] = {}
            for record in runs:
                chosen = record.summary["selected"]
                values = {n: a["test"] for n, a in (chosen.get("clients") or {}).items() if _number(a.get("test")) is not None}
                for key, metric in (("personalisation", "mean_test"), ("generalisation", "mean_holdout")):
                    if _number(chosen.get(metric)) is not None:
                        values[key] = chosen[metric]
                seeds[record.seed] = values
            per_seed.append(seeds)
            table.rows.append({
                "held_out": point.values[HOLDOUT_KEY],
                "cells": {c: _cell([v[c] for v in seeds.values() if c in v]) for c in columns},
                "personalisation": _cell([v["personalisation"] for v in seeds.values() if "personalisation" in v]),
                "generalisation": _cell([v["generalisation"] for v in seeds.values() if "generalisation" in v]),
                "n": len(runs),
            })
        table.average = {
            "held_out": "average",
            "cells": {c: _average(per_seed, c) for c in columns},
            "personalisation": _average(per_seed, "personalisation"),
            "generalisation": _average(per_seed, "generalisation"),
        }
        tables.append(table)
    return tables


def _average(per_seed: list[dict[int, dict[str, float]]], column: str) -> Cell:
    """The average over the rows that have ``column``; its sd is over seeds of the per-seed average, taken
    from the seeds every such row completed (the mean is the mean of the rows' means either way)."""
    rows = [seeds for seeds in per_seed if any(column in v for v in seeds.values())]
    if not rows:
        return Cell(None)
    means = [stats.mean(v[column] for v in seeds.values() if column in v) for seeds in rows]
    common = set.intersection(*({s for s, v in seeds.items() if column in v} for seeds in rows))
    averages = [stats.mean(seeds[s][column] for seeds in rows) for s in sorted(common)]
    return Cell(stats.mean(means), stats.sample_sd(averages) if len(common) >= 2 else None, len(common))


def _pct(cell: Cell, sd: bool) -> str:
    if cell.mean is None:
        return ""
    text = f"{100 * cell.mean:.1f}"
    return f"{text} ± {100 * cell.sd:.1f}" if sd and cell.sd is not None else text


def lodo_csv(tables: list[LodoTable]) -> str:
    """Percent, full precision; ``<column>_sd`` columns when some cell has more than one seed."""
    with_sd = any(c.sd is not None for t in tables for r in [*t.rows, t.average] for c in _row_cells(r, t))
    columns = list(dict.fromkeys(c for t in tables for c in t.columns))  # one header for every group
    names = [*columns, "personalisation", "generalisation"]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["setting", "held_out", *names, "runs", *([f"{n}_sd" for n in names] if with_sd else [])])
    for table in tables:
        for row in [*table.rows, table.average]:
            cells = [*(row["cells"].get(c, Cell(None)) for c in columns), row["personalisation"], row["generalisation"]]
            line = [table.group, row["held_out"], *(_full(c.mean) for c in cells), row.get("n", "")]
            if with_sd:
                line += [_full(c.sd) for c in cells]
            writer.writerow(line)
    return buffer.getvalue()


def _row_cells(row: dict[str, Any], table: LodoTable) -> list[Cell]:
    return [*(row["cells"][c] for c in table.columns), row["personalisation"], row["generalisation"]]


def _full(value: float | None) -> str:
    return "" if value is None else repr(100 * value)


def _caption(table: LodoTable) -> str:
    what = f"{table.group}: " if table.group else ""
    return (f"{what}accuracy (%) at each run's selected round, leave-one-domain-out: per held-out domain, each "
            f"client's test accuracy, their mean (personalisation) and the held-out domain's accuracy "
            f"(generalisation); mean ± sd over seeds where there are several")


def lodo_markdown(tables: list[LodoTable]) -> str:
    parts = []
    for table in tables:
        names = [*table.columns, "personalisation", "generalisation"]
        sd = any(c.sd is not None for r in table.rows for c in _row_cells(r, table))
        lines = [_caption(table) + ".", "", "| held out | " + " | ".join(names) + " |",
                 "| --- | " + " | ".join("---:" for _ in names) + " |"]
        for row in table.rows:
            lines.append(f"| {row['held_out']} | " + " | ".join(_pct(c, sd) or "–" for c in _row_cells(row, table)) + " |")
        lines.append("| **average** | " + " | ".join(f"**{_pct(c, sd)}**" if c.mean is not None else "–"
                                                   for c in _row_cells(table.average, table)) + " |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def _tex(text: str) -> str:
    return re.sub(r"([&%$#_{}])", r"\\\1", text).replace("~", r"\textasciitilde{}").replace("^", r"\textasciicircum{}")


def lodo_latex(tables: list[LodoTable]) -> str:
    """booktabs tables (\\usepackage{booktabs}); a dash where a domain was held out."""
    parts = []
    for table in tables:
        names = [*table.columns, "Pers.", "Gen."]
        sd = any(c.sd is not None for r in table.rows for c in _row_cells(r, table))

        def cells(row: dict[str, Any]) -> str:
            out = []
            for c in _row_cells(row, table):
                if c.mean is None:
                    out.append("--")
                elif sd and c.sd is not None:
                    out.append(f"${100 * c.mean:.1f} \\pm {100 * c.sd:.1f}$")
                else:
                    out.append(f"{100 * c.mean:.1f}")
            return " & ".join(out)

        lines = [
            f"% {_caption(table)}",
            "\\begin{tabular}{l" + "r" * len(names) + "}",
            "\\toprule",
            "Held out & " + " & ".join(_tex(n) for n in names) + " \\\\",
            "\\midrule",
            *(f"{_tex(row['held_out'])} & {cells(row)} \\\\" for row in table.rows),
            "\\midrule",
            f"Average & {cells(table.average)} \\\\",
            "\\bottomrule",
            "\\end{tabular}",
        ]
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


# --- running and writing -----------------------------------------------------------------------------


@dataclass
class SweepResult:
    records: list[SweepRecord]
    summary: list[dict[str, Any]]  # one row per point (aggregate)
    lodo: list[LodoTable]
    files: list[Path]
    baseline: str | None
    seeds: list[int] | None  # the --seeds, None when each point ran once at the preset's seed


def run_sweep(
    plan: list[PlannedRun],
    out_dir: Path,
    run: Callable,
    sink_for: Callable[[str], Callable],
    control=None,
    baseline: str | None = None,
) -> SweepResult:
    """Run each planned run in turn, rewriting every output file after each one."""
    from engine import events as ev

    out_dir.mkdir(parents=True, exist_ok=True)
    points = list({id(p.point): p.point for p in plan}.values())
    seeds = list(dict.fromkeys(p.seed for p in plan)) if plan and plan[0].seeded else None
    records: list[SweepRecord] = []
    result = SweepResult(records, [], [], [], baseline, seeds)
    for planned in plan:
        if control is not None and control.stop_requested:
            break
        trainable: dict[str, int] = {}
        user_sink = sink_for(planned.display)

        def sink(event, user_sink=user_sink, trainable=trainable):
            if isinstance(event, ev.RunStarted):
                trainable["n"] = event.trainable_parameters
            user_sink(event)

        outcome = run(planned.preset, sink, control, run_dir=None)
        row = summary_row(planned.label, outcome.summary, outcome.run_dir, trainable.get("n"), planned.seed)
        records.append(SweepRecord(planned.label, planned.seed, row, outcome.summary))
        result = write_outputs(records, points, out_dir, baseline, seeds)
        if outcome.status == "stopped":
            break
    return result


def write_outputs(
    records: list[SweepRecord], points: list[SweepPoint], out_dir: Path, baseline: str | None = None,
    seeds: list[int] | None = None,
) -> SweepResult:
    write_table([r.row for r in records], out_dir)
    summary = aggregate(records, [p.label for p in points], baseline)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(summary)
    files = [out_dir / "sweep.csv", out_dir / "sweep.jsonl", out_dir / "sweep-summary.csv", out_dir / "sweep-summary.jsonl"]
    write_atomic(files[2], buffer.getvalue())
    write_atomic(files[3], "".join(json.dumps({k: r[k] for k in SUMMARY_COLUMNS}) + "\n" for r in summary))
    lodo = lodo_tables(records, points)
    if lodo:
        for suffix, text in (("csv", lodo_csv(lodo)), ("md", lodo_markdown(lodo)), ("tex", lodo_latex(lodo))):
            files.append(out_dir / f"sweep-table.{suffix}")
            write_atomic(files[-1], text)
    return SweepResult(records, summary, lodo, files, baseline, seeds)


def write_table(rows: list[dict[str, Any]], out_dir: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(out_dir / "sweep.csv", buffer.getvalue())
    write_atomic(out_dir / "sweep.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
