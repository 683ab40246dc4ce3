"""Figures of finished runs and sweeps for a paper or a lab notebook: ``fedtui report``, the runs screen's ``f``.

What a figure holds, read only from what a run directory and a sweep folder already keep:

- accuracy over rounds (mean val dotted, mean test dashed, mean held-out solid; round 0 is zero-shot) and
  the mean client loss over rounds, one colour per run, from ``metrics.jsonl`` folded by
  ``engine.summary.RunSummary`` (the same fold as ``summary.json``, so the numbers are the table's);
- the WiSE-FT curve (accuracy against a in theta_0 + a (theta - theta_0)) of every run that measured one;
- for a sweep folder (``sweep.jsonl``, ``engine.sweep``): the selected round's test and held-out
  accuracy per setting, and the setting's curves. Rows that differ only by seed (a ``seed`` column, or a
  ``seed=N`` part of the setting from ``--vary run.seed=...``) are one setting: bars are the mean, the
  error bar and the band are the spread over seeds (standard deviation; min to max for curves), and each
  seed is a dot.

matplotlib is an optional extra (``pip install 'fedtui[report]'``), imported only when a figure is drawn,
and only through its object API with the Agg canvas (no pyplot, no window, safe in a worker thread).
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

INSTALL_HINT = "pip install 'fedtui[report]'  (or: pip install matplotlib)"
FORMATS = (".png", ".svg", ".pdf")


class ReportError(ValueError):
    """Bad input for a figure: a folder that is no run or sweep, an unknown file type. Nothing was written."""


class MatplotlibMissing(ImportError):
    """matplotlib is not installed; ``str()`` says how to install it."""


def matplotlib_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


# --- reading -------------------------------------------------------------------------------------------


@dataclass
class RunData:
    path: Path
    name: str
    rounds: list[dict[str, Any]] = field(default_factory=list)  # round 0 (zero-shot) first when known
    wise: list[dict[str, Any]] = field(default_factory=list)
    selected_round: int | None = None


@dataclass
class SweepData:
    path: Path
    name: str
    rows: list[dict[str, Any]]
    groups: dict[str, list[dict[str, Any]]]  # setting without its seed -> rows (one per seed)
    runs: dict[str, list[RunData]]  # setting without its seed -> the runs that could be read


def read_run(path: Path) -> RunData:
    """A run directory's rounds and WiSE-FT curve, folded from its metrics.jsonl."""
    from engine.events import read_events
    from engine.summary import RunSummary

    try:
        events = read_events(path / "metrics.jsonl")
    except OSError as error:
        raise ReportError(f"{path}: cannot read metrics.jsonl: {error.strerror or error}") from None
    summary = RunSummary.of(events)
    rounds = ([summary.zero_shot] if summary.zero_shot else []) + summary.rounds
    return RunData(path=path, name=summary.run_id or path.name, rounds=rounds, wise=list(summary.wise),
                   selected_round=(summary.selected or {}).get("round"))


_SEED_PART = re.compile(r"(?:^|\s)seed=(\S+)")


def _setting_and_seed(row: dict[str, Any]) -> tuple[str, Any]:
    setting = str(row.get("setting") or "").strip()
    found = _SEED_PART.search(setting)
    seed = row.get("seed")
    if found:
        setting = " ".join(_SEED_PART.sub(" ", setting).split())
        seed = found.group(1) if seed is None else seed
    return setting or "(the preset)", seed


def read_sweep(path: Path) -> SweepData:
    """A sweep folder's table (sweep.jsonl), its rows grouped by setting over seeds, and the runs it names."""
    rows = []
    try:
        lines = (path / "sweep.jsonl").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as error:
        raise ReportError(f"{path}: cannot read sweep.jsonl: {error.strerror or error}") from None
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    if not rows:
        raise ReportError(f"{path}: sweep.jsonl has no rows yet")
    groups: dict[str, list[dict[str, Any]]] = {}
    runs: dict[str, list[RunData]] = {}
    for row in rows:
        setting, seed = _setting_and_seed(row)
        groups.setdefault(setting, []).append({**row, "seed": seed})
        run_dir = _find_run_dir(row.get("run_dir"), path)
        if run_dir is not None:
            try:
                runs.setdefault(setting, []).append(read_run(run_dir))
            except ReportError:
                pass
    return SweepData(path=path, name=path.name, rows=rows, groups=groups, runs=runs)


def _find_run_dir(value: Any, sweep_dir: Path) -> Path | None:
    """A row's run_dir as written (absolute, or relative to where the sweep ran), else beside the sweep."""
    if not isinstance(value, str) or not value:
        return None
    written = Path(value)
    for candidate in (written, sweep_dir / written, sweep_dir.parent / written.name, sweep_dir / written.name):
        if (candidate / "metrics.jsonl").is_file():
            return candidate
    return None


def read_inputs(paths: Iterable[Path]) -> tuple[list[RunData], list[SweepData]]:
    """Each path as a run directory (metrics.jsonl) or a sweep folder (sweep.jsonl); else ReportError."""
    runs, sweeps = [], []
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise ReportError(f"{path}: no such run directory")
        if not path.is_dir():
            raise ReportError(f"{path}: not a folder (give a run directory or a sweep folder)")
        if (path / "sweep.jsonl").is_file():
            sweeps.append(read_sweep(path))
        elif (path / "metrics.jsonl").is_file():
            runs.append(read_run(path))
        else:
            raise ReportError(f"{path}: not a run directory (no metrics.jsonl) nor a sweep folder (no sweep.jsonl)")
    if not runs and not sweeps:
        raise ReportError("give at least one run directory or sweep folder")
    return runs, sweeps


# --- drawing -------------------------------------------------------------------------------------------


@dataclass
class _Series:
    label: str
    members: list[RunData]


METRICS = (("mean_holdout", "held-out", "-"), ("mean_test", "test", "--"), ("mean_val", "val", ":"))


def _pct(value: Any) -> float | None:
    if value is None or not isinstance(value, (int, float)) or (isinstance(value, float) and math.isnan(value)):
        return None
    return 100.0 * float(value)


def _spread(series: _Series, key: str, scale=lambda v: v) -> tuple[list[int], list[float], list[float], list[float]]:
    """Per round: the members' mean, min and max of ``key`` (rounds where at least one member has it)."""
    by_round: dict[int, list[float]] = {}
    for run in series.members:
        for record in run.rounds:
            value = record.get(key)
            if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
                by_round.setdefault(int(record["round"]), []).append(scale(float(value)))
    xs = sorted(by_round)
    return (xs, [statistics.fmean(by_round[x]) for x in xs], [min(by_round[x]) for x in xs],
            [max(by_round[x]) for x in xs])


def _draw_curves(ax, series: list[_Series], colours, key_styles, ylabel: str, scale) -> bool:
    from matplotlib.ticker import MaxNLocator

    drawn = False
    for colour, one in zip(colours, series):
        for key, name, style in key_styles:
            xs, mean, low, high = _spread(one, key, scale)
            if not xs:
                continue
            seeds = f" (mean of {len(one.members)})" if len(one.members) > 1 else ""
            ax.plot(xs, mean, linestyle=style, color=colour, marker="." if len(xs) < 30 else None,
                    label=f"{one.label} {name}{seeds}".strip())
            if len(one.members) > 1:
                ax.fill_between(xs, low, high, color=colour, alpha=0.15, linewidth=0)
            drawn = True
    ax.set_xlabel("round (0 = zero-shot)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return drawn


def _draw_wise(ax, series: list[_Series], colours) -> None:
    """Accuracy against a for each series that measured WiSE-FT (the mean over its seeds, band min to max)."""
    for colour, one in zip(colours, series):
        models = sorted({str(w.get("model", "last")) for run in one.members for w in run.wise})
        for model in models:
            for key, name, style in METRICS[:2]:
                by_alpha: dict[float, list[float]] = {}
                for run in one.members:
                    for w in run.wise:
                        value = _pct(w.get(key))
                        if str(w.get("model", "last")) == model and value is not None:
                            by_alpha.setdefault(float(w["alpha"]), []).append(value)
                if not by_alpha:
                    continue
                xs = sorted(by_alpha)
                suffix = f" ({model})" if len(models) > 1 else ""
                seeds = f" (mean of {len(one.members)})" if len(one.members) > 1 else ""
                ax.plot(xs, [statistics.fmean(by_alpha[a]) for a in xs], linestyle=style, color=colour,
                        marker="o" if model == "last" else "s", label=f"{one.label}{suffix} {name}{seeds}")
                if len(one.members) > 1:
                    ax.fill_between(xs, [min(by_alpha[a]) for a in xs], [max(by_alpha[a]) for a in xs],
                                    color=colour, alpha=0.15, linewidth=0)
    ax.set_xlabel("a in theta_0 + a (theta - theta_0)")
    ax.set_ylabel("accuracy %")
    ax.set_title("WiSE-FT")
    ax.grid(True, alpha=0.3)


def _draw_sweep(ax, sweep: SweepData, colours) -> None:
    settings = list(sweep.groups)
    keys = (("holdout", "held-out"), ("test", "test"))
    width = 0.8 / len(keys)
    seeds = max(len(rows) for rows in sweep.groups.values())
    for k, ((key, name), colour) in enumerate(zip(keys, colours)):
        means, errors, positions = [], [], []
        for i, setting in enumerate(settings):
            values = [v for v in (_pct(r.get(key)) for r in sweep.groups[setting]) if v is not None]
            x = i - 0.4 + width * (k + 0.5)
            positions.append(x)
            means.append(statistics.fmean(values) if values else math.nan)  # nan: no bar, not a zero
            errors.append(statistics.stdev(values) if len(values) > 1 else 0.0)
            if len(values) > 1:
                ax.scatter([x] * len(values), values, color="black", s=8, zorder=3)
        ax.bar(positions, means, width=width * 0.95, color=colour, label=f"{name} (selected round)",
               yerr=errors if seeds > 1 else None, capsize=3 if seeds > 1 else 0)
    zero, which = [_pct(r.get("zero_shot_holdout")) for r in sweep.rows], "held-out"
    if not any(v is not None for v in zero):  # no held-out domain: the clients' test accuracy
        zero, which = [_pct(r.get("zero_shot_test")) for r in sweep.rows], "test"
    zero = [v for v in zero if v is not None]
    if zero:
        ax.axhline(statistics.fmean(zero), color="grey", linestyle=":", label=f"zero-shot {which}")
    ax.set_xticks(range(len(settings)))
    ax.set_xticklabels(settings, rotation=20 if len(settings) > 3 else 0, ha="right" if len(settings) > 3 else "center",
                       fontsize="small")
    ax.set_ylabel("accuracy %")
    spread = f", mean ± sd over {seeds} seeds" if seeds > 1 else ""
    ax.set_title(f"sweep {sweep.name}{spread}", fontsize="medium")
    ax.grid(True, axis="y", alpha=0.3)


def draw_report(paths: Iterable[Path], out: Path, title: str | None = None) -> Path:
    """Draw the figure of these run directories and sweep folders into ``out`` (.png, .svg or .pdf).

    Raises ``ReportError`` for bad input (before anything is written) and ``MatplotlibMissing``.
    """
    out = Path(out)
    if out.suffix.lower() not in FORMATS:
        raise ReportError(f"--out {out}: the file type is taken from the name; use .png, .svg or .pdf")
    if out.is_dir():
        raise ReportError(f"--out {out} is a folder; give a file name ending in .png, .svg or .pdf")
    runs, sweeps = read_inputs(paths)
    try:
        os.environ.setdefault("MPLBACKEND", "Agg")
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError:
        raise MatplotlibMissing(f"figures need matplotlib: {INSTALL_HINT}") from None

    series = [_Series(r.name, [r]) for r in runs]
    for sweep in sweeps:
        series += [_Series(setting, members) for setting, members in sweep.runs.items()]
    panels = ["accuracy", "loss"] if series else []
    panels += ["wise"] if any(run.wise for one in series for run in one.members) else []
    panels += [f"sweep:{i}" for i in range(len(sweeps))]
    columns = 1 if len(panels) == 1 else 2
    rows = math.ceil(len(panels) / columns)
    names = [r.name for r in runs] + [s.name for s in sweeps]
    heading = title or ("fedtui: " + ", ".join(names) if len(names) <= 4 else f"fedtui: {len(names)} runs and sweeps")

    with matplotlib.rc_context({"svg.fonttype": "none", "pdf.fonttype": 42, "font.size": 9}):
        fig = Figure(figsize=(6.4 * columns, 4.2 * rows + 0.4), layout="constrained")
        fig.suptitle(heading)
        axes = fig.subplots(rows, columns, squeeze=False).ravel()
        cycle = [c["color"] for c in matplotlib.rcParams["axes.prop_cycle"]]
        colours = [cycle[i % len(cycle)] for i in range(max(len(series), 2))]
        for ax, panel in zip(axes, panels):
            if panel == "accuracy":
                _draw_curves(ax, series, colours, METRICS, "accuracy %", lambda v: 100.0 * v)
                ax.set_title("accuracy over rounds")
            elif panel == "loss":
                if not _draw_curves(ax, series, colours, (("mean_loss", "loss", "-"),), "mean client loss",
                                    lambda v: v):
                    ax.text(0.5, 0.5, "no training rounds yet", ha="center", va="center", transform=ax.transAxes)
                ax.set_title("loss over rounds")
            elif panel == "wise":
                _draw_wise(ax, series, colours)
            else:
                _draw_sweep(ax, sweeps[int(panel.split(":")[1])], cycle)
            handles, _ = ax.get_legend_handles_labels()
            if handles:
                ax.legend(fontsize="x-small", loc="best")
        for ax in axes[len(panels):]:
            ax.set_visible(False)
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(f".{out.name}.{os.getpid()}.partial")  # never a half-written figure under out
        try:
            fig.savefig(partial, format=out.suffix.lower()[1:], metadata={"Title": heading})
            os.replace(partial, out)
        finally:
            partial.unlink(missing_ok=True)
    return out
