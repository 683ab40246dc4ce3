"""Sweeps: grid expansion, validation before running, and a table from real runs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.presets import PresetError
from engine import stats
from engine.sweep import COLUMNS, SweepRecord, aggregate, expand, parse_seeds, pick_baseline
from fedtui.cli import EXIT_BAD_INPUT, cli


def test_expand_makes_a_grid_in_order():
    points = expand(["train.local_epochs=1,5", "federation.aggregation=mean,fedavg"])
    assert [p.label for p in points] == [
        "local_epochs=1 aggregation=mean",
        "local_epochs=1 aggregation=fedavg",
        "local_epochs=5 aggregation=mean",
        "local_epochs=5 aggregation=fedavg",
    ]
    assert points[1].overrides == ["train.local_epochs=1", "federation.aggregation=fedavg"]
    with pytest.raises(PresetError, match="expected section.key=value"):
        expand(["train.local_epochs"])


def test_a_bad_value_anywhere_fails_before_any_run(tiny_preset_file, tmp_path):
    result = CliRunner().invoke(cli, ["sweep", str(tiny_preset_file), "--vary", "federation.aggregation=mean,fedavgg"])
    assert result.exit_code == EXIT_BAD_INPUT
    assert "fedavgg" in result.output and "Did you mean 'fedavg'" in result.output
    assert "--vary federation.aggregation=fedavgg: [federation.aggregation]" in result.output
    assert not (tmp_path / "runs").exists()
    # A bad value names the option it came from: --vary for a point's, --set for the common one.
    result = CliRunner().invoke(cli, ["sweep", str(tiny_preset_file), "--vary", "train.lr=0.1,nan",
                                      "--set", "train.batch_size=0"])
    assert result.exit_code == EXIT_BAD_INPUT
    assert "--vary train.lr=nan: [train.lr] must be a finite number" in result.output
    assert "--set train.batch_size=0: [train.batch_size]" in result.output
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_sweep_runs_each_point_and_writes_the_table(tiny_preset_file, tmp_path):
    result = CliRunner().invoke(
        cli, ["sweep", str(tiny_preset_file), "--vary", "adapter.kind=attai,clip_adapter", "--set", "run.rounds=1"]
    )
    assert result.exit_code == 0, result.output
    (table,) = (tmp_path / "runs").glob("*-sweep-tiny/sweep.csv")
    rows = list(csv.DictReader(table.open()))
    assert [r["setting"] for r in rows] == ["kind=attai", "kind=clip_adapter"]
    assert all(r["status"] == "completed" for r in rows)
    # clip_adapter sends 2 d^2 / 4 parameters, attai 2 (d^2 + d): d = 128 here
    assert [int(r["trainable_parameters"]) for r in rows] == [2 * (128 * 128 + 128), 2 * 128 * 128 // 4]
    assert float(rows[1]["bytes_up_per_round"]) < float(rows[0]["bytes_up_per_round"])


# -- seeds as an axis ------------------------------------------------------------------------------


def test_parse_seeds():
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert parse_seeds("0,2,7") == [0, 2, 7]
    assert parse_seeds(" 0-2, 10 ") == [0, 1, 2, 10]
    for bad, message in (("4-0", "backwards"), ("a", "expected seeds"), ("1,1", "listed twice"), ("", "expected"),
                         ("0-99999", "at most 10,000")):
        with pytest.raises(PresetError, match=message):
            parse_seeds(bad)


def test_baseline_is_a_point_label_in_any_order_sections_optional():
    points = expand(["train.local_epochs=1,5", "federation.aggregation=mean,fedavg"])
    assert pick_baseline(points, None) == "local_epochs=1 aggregation=mean"
    assert pick_baseline(points, "aggregation=fedavg local_epochs=5") == "local_epochs=5 aggregation=fedavg"
    assert pick_baseline(points, "train.local_epochs=5 federation.aggregation=mean") == "local_epochs=5 aggregation=mean"
    with pytest.raises(PresetError, match="not a point of this sweep"):
        pick_baseline(points, "aggregation=median")
    assert [p.label for p in expand([])] == ["preset"]  # no axis: one point, which --seeds repeats


def test_each_is_only_for_the_holdout_and_lists_the_domains():
    points = expand(["data.holdout=each", "train.lr=1e-3,1e-4"], domains=lambda: ["a", "b"])
    assert [p.label for p in points] == ["holdout=a lr=1e-3", "holdout=a lr=1e-4", "holdout=b lr=1e-3", "holdout=b lr=1e-4"]
    assert points[0].values == {"data.holdout": "a", "train.lr": "1e-3"}
    with pytest.raises(PresetError, match="only for data.holdout"):
        expand(["data.domains=each"], domains=lambda: ["a"])
    with pytest.raises(PresetError, match="varied twice"):
        expand(["train.lr=1", "train.lr=2"])


def _record(label, seed, test, holdout, final_test=None, final_holdout=None, status="completed", selected=1):
    row = {c: None for c in COLUMNS} | {
        "setting": label, "seed": seed, "status": status, "selected_round": selected, "final_round": 5, "test": test,
        "holdout": holdout, "final_test": test if final_test is None else final_test,
        "final_holdout": holdout if final_holdout is None else final_holdout, "zero_shot_test": 0.5,
        "zero_shot_holdout": 0.4, "trainable_parameters": 10,
    }
    return SweepRecord(label, seed, row, {})


def test_aggregate_by_hand():
    records = [
        _record("agg=mean", 0, 0.70, 0.60), _record("agg=fedavg", 0, 0.72, 0.61, final_test=0.80),
        _record("agg=mean", 1, 0.74, 0.64, selected=3), _record("agg=fedavg", 1, 0.77, 0.64, final_test=0.81),
        _record("agg=mean", 2, 0.78, 0.62), _record("agg=fedavg", 2, 0.80, 0.66, final_test=0.82),
        _record("agg=mean", 3, 0.90, 0.90), _record("agg=fedavg", 3, 0.10, 0.10, status="diverged"),
    ]
    mean, fedavg = aggregate(records, ["agg=mean", "agg=fedavg"], baseline="agg=mean")
    assert mean["baseline"] and mean["runs"] == 4 and mean["completed"] == 4 and mean["paired_n"] is None
    assert mean["selected_rounds"] == "1 3 1 1" and mean["seeds"] == "0 1 2 3"
    assert mean["test_mean"] == pytest.approx((0.70 + 0.74 + 0.78 + 0.90) / 4)
    assert mean["test_sd"] == pytest.approx(stats.sample_sd([0.70, 0.74, 0.78, 0.90]))
    assert mean["test_diff"] is None
    # the diverged run counts in neither the mean nor the pairs
    assert fedavg["completed"] == 3 and fedavg["test_mean"] == pytest.approx((0.72 + 0.77 + 0.80) / 3)
    assert fedavg["paired_n"] == 3
    d = [0.02, 0.03, 0.02]  # fedavg - mean at seeds 0, 1, 2
    sd = stats.sample_sd(d)
    assert fedavg["test_diff"] == pytest.approx(sum(d) / 3)
    assert fedavg["test_diff_sd"] == pytest.approx(sd)
    assert fedavg["test_diff_high"] - fedavg["test_diff"] == pytest.approx(4.302653 * sd / 3 ** 0.5, rel=1e-6)
    assert fedavg["final_test_diff"] == pytest.approx((0.10 + 0.07 + 0.04) / 3)
    assert fedavg["holdout_diff_low"] < 0 < fedavg["holdout_diff_high"]  # 0.01, 0, 0.04


def test_table_shows_the_selected_and_final_round_and_fits_80_columns():
    from rich.console import Console

    from fedtui.headless import paired_table, sweep_table

    records = [_record(f"aggregation={a}", s, 0.7 + 0.01 * s, 0.6, final_test=0.75) for s in (0, 1, 2)
               for a in ("mean", "fedavg", "fedprox")]
    rows = aggregate(records, ["aggregation=mean", "aggregation=fedavg", "aggregation=fedprox"], "aggregation=mean")
    console = Console(width=80, record=True, color_system=None)
    console.print(sweep_table(rows, [0, 1, 2]))
    console.print(paired_table(rows, "aggregation=mean"))
    console.print(sweep_table(aggregate(records[:3], ["aggregation=mean", "aggregation=fedavg", "aggregation=fedprox"])))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "mean±sd over seeds 0-2" in text and "1/5" in text  # selected round 1 of 5
    assert "71.0±1.0" in text and "75.0±0.0" in text  # selected test, final test
    assert "+0.0±0.0" in text and "baseline" in text


def test_seeds_conflicts_and_a_bad_baseline_exit_2_and_write_nothing(tiny_preset_file, tmp_path):
    for args, message in (
        (["--seeds", "0-1", "--set", "run.seed=4"], "run.seed"),
        (["--seeds", "0-1", "--vary", "run.seed=1,2"], "is set by --seeds"),
        (["--seeds", "1-0"], "backwards"),
        (["--vary", "federation.aggregation=mean,fedavg", "--baseline", "aggregation=median"], "not a point"),
        ([], "give --vary"),
    ):
        result = CliRunner().invoke(cli, ["sweep", str(tiny_preset_file), *args])
        assert result.exit_code == EXIT_BAD_INPUT, (args, result.output)
        assert message in result.output, (args, result.output)
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_sweep_over_seeds_writes_runs_and_the_summary(tiny_preset_file, tmp_path):
    result = CliRunner().invoke(
        cli,
        ["sweep", str(tiny_preset_file), "--vary", "federation.aggregation=mean,fedavg", "--seeds", "0,2",
         "--baseline", "aggregation=fedavg", "--set", "run.rounds=1"],
    )
    assert result.exit_code == 0, result.output
    (folder,) = (tmp_path / "runs").glob("*-sweep-tiny")
    rows = list(csv.DictReader((folder / "sweep.csv").open()))
    assert [(r["setting"], r["seed"]) for r in rows] == [
        ("aggregation=mean", "0"), ("aggregation=fedavg", "0"), ("aggregation=mean", "2"), ("aggregation=fedavg", "2")
    ]
    for row in rows:  # each run ran at its seed and is named after it
        run_dir = Path(row["run_dir"])
        assert f"seed = {row['seed']}" in (run_dir / "preset.toml").read_text()
        assert run_dir.name.endswith(f"-seed{row['seed']}")
        summary = json.loads((run_dir / "summary.json").read_text())
        assert float(row["test"]) == summary["selected"]["mean_test"]
        assert float(row["final_holdout"]) == summary["final"]["mean_holdout"]
    summary_rows = list(csv.DictReader((folder / "sweep-summary.csv").open()))
    assert [(r["setting"], r["baseline"], r["completed"]) for r in summary_rows] == [
        ("aggregation=mean", "False", "2"), ("aggregation=fedavg", "True", "2")
    ]
    mine = [float(r["test"]) for r in rows if r["setting"] == "aggregation=mean"]
    theirs = [float(r["test"]) for r in rows if r["setting"] == "aggregation=fedavg"]
    assert float(summary_rows[0]["test_mean"]) == pytest.approx(sum(mine) / 2)
    assert float(summary_rows[0]["test_diff"]) == pytest.approx((mine[0] - theirs[0] + mine[1] - theirs[1]) / 2)
    assert len((folder / "sweep-summary.jsonl").read_text().splitlines()) == 2
    assert "mean±sd over seeds 0,2" in result.output and "difference to aggregation=fedavg" in result.output


@pytest.mark.slow
def test_a_reader_closing_stdout_stops_the_sweep_and_keeps_its_tables(tiny_preset_file, tmp_path):
    """``fedtui sweep ... | head -1``: no run starts after the reader has gone; exit 130, one line on stderr, and
    the sweep folder's table holds the runs that ran (before, Rich's SystemExit(1) cut the sweep off mid-run)."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "fedtui.cli", "sweep", str(tiny_preset_file), "--vary",
               "train.lr=0.01,0.02,0.03,0.04", "--set", "run.rounds=1"]
    proc = subprocess.Popen(command, cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert b"completed" in proc.stdout.readline()  # the first run's line
        proc.stdout.close()
        stderr = proc.stderr.read().decode()
        assert proc.wait(timeout=300) == 130, stderr
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "stdout was closed (broken pipe): stopping the sweep" in stderr
    (table,) = (tmp_path / "runs").glob("*-sweep-tiny/sweep.csv")
    rows = list(csv.DictReader(table.open()))
    assert 1 <= len(rows) < 4 and rows[0]["status"] == "completed"
