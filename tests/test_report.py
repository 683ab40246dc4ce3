"""Figures of real runs and sweeps: ``fedtui report`` (PNG, SVG, PDF), its bad input, and the runs screen's ``f``."""

from __future__ import annotations

import asyncio
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import TINY_PRESET
from fedtui.cli import cli
from fedtui.report import read_inputs, read_sweep

pytest.importorskip("matplotlib", reason="figures need the report extra: pip install -e '.[report]'")

runner = CliRunner()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, feature_cache) -> list[Path]:
    """Two real tiny runs (seeds 3 and 4); the first measures a WiSE-FT curve."""
    from engine.presets import load_preset
    from engine.runner import run

    folder = tmp_path_factory.mktemp("report")
    preset_file = folder / "tiny.toml"
    preset_file.write_text(TINY_PRESET.format(out=folder / "runs", cache=feature_cache))
    made = []
    for seed, extra in ((3, ["eval.wise_alphas=[0, 0.5, 1]"]), (4, [])):
        result = run(load_preset(preset_file, [f"run.seed={seed}", f"run.name=tiny-seed{seed}", *extra]),
                     lambda event: None)
        assert result.status == "completed"
        made.append(result.run_dir)
    return made


def sweep_folder(root: Path, runs: list[Path], seed_column: bool) -> Path:
    """A sweep folder as engine.sweep writes it: one setting over two seeds, one setting once."""
    folder = root / ("sweep-seeds" if seed_column else "sweep-labels")
    folder.mkdir()
    rows = []
    for run_dir, seed in zip(runs, (3, 4)):
        summary = json.loads((run_dir / "summary.json").read_text())
        row = {"setting": "lr=0.001", "status": "completed", "test": summary["selected"]["mean_test"],
               "holdout": summary["selected"]["mean_holdout"], "zero_shot_holdout": 0.1, "run_dir": str(run_dir)}
        if seed_column:
            row["seed"] = seed
        else:
            row["setting"] += f" seed={seed}"  # --vary run.seed=3,4 before sweeps had a seed column
        rows.append(row)
    rows.append({**rows[0], "setting": "lr=0.01" + ("" if seed_column else " seed=3"), "test": 0.5})
    (folder / "sweep.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def run_name(run_dir: Path) -> str:
    return json.loads((run_dir / "summary.json").read_text())["run_id"]


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".png", ".svg", ".pdf"])
def test_report_draws_a_valid_figure(runs, tmp_path, suffix):
    out = tmp_path / f"figure{suffix}"
    result = runner.invoke(cli, ["report", str(runs[0]), str(runs[1]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = out.read_bytes()
    assert len(data) > 5000
    if suffix == ".png":
        assert data.startswith(PNG_MAGIC)
    elif suffix == ".pdf":
        assert data.startswith(b"%PDF-")
    else:
        root = ET.fromstring(data)
        assert root.tag.endswith("svg")
        text = data.decode("utf-8")
        assert run_name(runs[0]) in text and run_name(runs[1]) in text
        assert "WiSE-FT" in text and "accuracy over rounds" in text and "loss over rounds" in text
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no partial file left behind


@pytest.mark.slow
def test_report_without_out_writes_into_the_run_folder(runs):
    result = runner.invoke(cli, ["report", str(runs[1])])
    assert result.exit_code == 0, result.output
    assert (runs[1] / "report.png").read_bytes().startswith(PNG_MAGIC)
    assert "report.png" in result.output
    (runs[1] / "report.png").unlink()


@pytest.mark.slow
@pytest.mark.parametrize("seed_column", [True, False], ids=["seed-column", "seed-in-setting"])
def test_a_sweep_is_compared_with_its_spread_over_seeds(runs, tmp_path, seed_column):
    folder = sweep_folder(tmp_path, runs, seed_column)
    sweep = read_sweep(folder)
    assert list(sweep.groups) == ["lr=0.001", "lr=0.01"]
    assert [r["seed"] for r in sweep.groups["lr=0.001"]] == ([3, 4] if seed_column else ["3", "4"])
    assert [len(sweep.runs[s]) for s in sweep.groups] == [2, 1]
    out = tmp_path / "sweep.svg"
    result = runner.invoke(cli, ["report", str(folder), "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_text(encoding="utf-8")
    assert "over 2 seeds" in text and "lr=0.001" in text and "lr=0.01" in text and "(mean of 2)" in text


def test_a_sweep_without_seeds_reads_as_one_row_a_setting(tmp_path):
    folder = tmp_path / "sweep"
    folder.mkdir()
    rows = [{"setting": "aggregation=mean", "test": 0.5, "holdout": None, "run_dir": "gone/run-a"},
            {"setting": "aggregation=fedavg", "test": 0.6, "holdout": 0.4, "run_dir": ""}]
    (folder / "sweep.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    runs, sweeps = read_inputs([folder])
    assert runs == [] and [list(s.groups) for s in sweeps] == [["aggregation=mean", "aggregation=fedavg"]]
    assert sweeps[0].runs == {}  # run folders that are gone are left out, not an error
    out = tmp_path / "f.png"
    result = runner.invoke(cli, ["report", str(folder), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda tmp: tmp / "no-such-run", "no such run directory"),
        (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "not a run directory (no metrics.jsonl)"),
        (lambda tmp: (tmp / "file.txt").write_text("x") and tmp / "file.txt", "not a folder"),
    ],
    ids=["missing", "empty-folder", "a-file"],
)
def test_bad_run_dirs_exit_2_with_a_message_and_write_nothing(tmp_path, make, expected):
    path = make(tmp_path)
    out = tmp_path / "out" / "figure.png"
    result = runner.invoke(cli, ["report", str(path), "--out", str(out)])
    assert result.exit_code == 2
    assert expected in result.output and str(path) in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_an_unknown_figure_type_exits_2(runs, tmp_path):
    result = runner.invoke(cli, ["report", str(runs[0]), "--out", str(tmp_path / "figure.jpg")])
    assert result.exit_code == 2 and ".png, .svg or .pdf" in result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_without_matplotlib_report_says_how_to_install_it(runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    result = runner.invoke(cli, ["report", str(runs[0]), "--out", str(tmp_path / "f.png")])
    assert result.exit_code == 2
    assert "pip install 'fedtui[report]'" in result.output
    assert list(tmp_path.iterdir()) == []


# --- the runs screen -----------------------------------------------------------------------------------


def _press_f(runs_dir: Path, tmp_path: Path, marks: int = 0) -> list[str]:
    from fake_engine import make_app, wait_for

    async def body() -> list[str]:
        app = make_app(tmp_path / "app", runs_dir=runs_dir)
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.press("r")
            await wait_for(pilot, lambda: len(app.runs_screen.records) == 2)
            for _ in range(marks):
                await pilot.press("space", "down")
            await pilot.press("f")
            await wait_for(pilot, lambda: any("igure" in n.message for n in app._notifications), timeout=60)
            return [n.message for n in app._notifications]

    return asyncio.run(body())


@pytest.mark.slow
def test_runs_screen_f_writes_the_figure_into_the_run_folder(runs, tmp_path):
    runs_dir = runs[0].parent
    messages = _press_f(runs_dir, tmp_path)
    written = [p for p in runs_dir.glob("*/report.png")]
    assert len(written) == 1 and written[0].read_bytes().startswith(PNG_MAGIC)
    assert any(m == f"Figure written: {written[0]}" for m in messages), messages
    written[0].unlink()

    messages = _press_f(runs_dir, tmp_path / "compare", marks=2)  # both runs marked for comparison
    compared = [p for p in runs_dir.glob("*/report-compare.png")]
    assert len(compared) == 1 and any(str(compared[0]) in m for m in messages), messages
    compared[0].unlink()


@pytest.mark.slow
def test_runs_screen_f_without_matplotlib_says_how_to_install_it(runs, tmp_path, monkeypatch):
    import fedtui.report

    monkeypatch.setattr(fedtui.report, "matplotlib_available", lambda: False)
    messages = _press_f(runs[0].parent, tmp_path)
    assert any("pip install 'fedtui[report]'" in m for m in messages), messages
    assert list(runs[0].parent.glob("*/report*.png")) == []
