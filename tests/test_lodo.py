"""The paper's protocol: every domain held out in turn (``--vary data.holdout=each``), the LODO table checked
against the runs' own summaries, on the synthetic world and on an image-folder tree the test makes; and the
VLCS / Office-Home presets beside the PACS one."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine import synthetic
from engine.presets import PRESETS_DIR, PresetError, load_preset, read_preset, read_preset_toml
from engine.sweep import (
    COLUMNS, SweepRecord, expand, holdout_domains, lodo_csv, lodo_latex, lodo_markdown, lodo_tables, plan_runs,
)
from fedtui.cli import EXIT_BAD_INPUT, cli
import image_folders

SHIPPED_CLIP = Path(__file__).resolve().parent.parent / "engine" / "assets" / "fedtui-clip-tiny"


def make_image_folder(root: Path, domains, classes=("cat", "dog", "fish"), per_class: int = 4) -> Path:
    return image_folders.make_image_folder(root, domains, classes, per_class, size=(32, 24))


# -- the table from summaries, by hand ------------------------------------------------------------------


def _run(label, seed, clients, holdout):
    selected = {
        "round": 1, "clients": {n: {"val": 0.0, "test": t} for n, t in clients.items()},
        "holdout": holdout, "mean_test": sum(clients.values()) / len(clients),
        "mean_holdout": sum(holdout.values()) / len(holdout),
    }
    return SweepRecord(label, seed, {c: None for c in COLUMNS} | {"status": "completed"}, {"selected": selected})


def test_lodo_table_by_hand():
    points = expand(["data.holdout=each"], domains=lambda: ["A", "B", "C"])
    records = [
        _run("holdout=A", 0, {"B": 0.8, "C": 0.6}, {"A": 0.5}),
        _run("holdout=A", 1, {"B": 0.9, "C": 0.7}, {"A": 0.3}),
        _run("holdout=B", 0, {"A": 0.4, "C": 0.6}, {"B": 0.7}),
        _run("holdout=B", 1, {"A": 0.6, "C": 0.8}, {"B": 0.9}),
        _run("holdout=C", 0, {"A": 0.5, "B": 0.5}, {"C": 0.2}),
        _run("holdout=C", 1, {"A": 0.7, "B": 0.7}, {"C": 0.4}),
    ]
    (table,) = lodo_tables(records, points)
    assert table.columns == ["A", "B", "C"] and [r["held_out"] for r in table.rows] == ["A", "B", "C"]
    first = table.rows[0]
    assert first["cells"]["A"].mean is None  # held out: no client there
    assert first["cells"]["B"].mean == pytest.approx(0.85) and first["cells"]["B"].sd == pytest.approx(0.0707107, rel=1e-5)
    assert first["personalisation"].mean == pytest.approx((0.7 + 0.8) / 2)
    assert first["generalisation"].mean == pytest.approx(0.4)
    average = table.average
    assert average["cells"]["A"].mean == pytest.approx((0.5 + 0.6) / 2)  # A as a client under B and C held out
    assert average["generalisation"].mean == pytest.approx((0.4 + 0.8 + 0.3) / 3)
    # its sd is over seeds of the per-seed average: seed 0 (0.5+0.7+0.2)/3, seed 1 (0.3+0.9+0.4)/3
    assert average["generalisation"].sd == pytest.approx(abs(1.4 / 3 - 1.6 / 3) / 2 ** 0.5)
    rows = list(csv.reader(lodo_csv([table]).splitlines()))
    assert rows[0] == ["setting", "held_out", "A", "B", "C", "personalisation", "generalisation", "runs",
                       "A_sd", "B_sd", "C_sd", "personalisation_sd", "generalisation_sd"]
    assert rows[1][1:3] == ["A", ""] and rows[1][7] == "2"
    assert [float(v) for v in rows[1][3:7]] == pytest.approx([85.0, 65.0, 75.0, 40.0])
    assert rows[-1][1] == "average"
    markdown = lodo_markdown([table])
    assert "| held out | A | B | C | personalisation | generalisation |" in markdown
    assert "| A | – | 85.0 ± 7.1 | 65.0 ± 7.1 | 75.0 ± 7.1 | 40.0 ± 14.1 |" in markdown
    latex = lodo_latex([table])
    assert "\\toprule" in latex and "Held out & A & B & C & Pers. & Gen. \\\\" in latex
    assert "A & -- & $85.0 \\pm 7.1$" in latex and "Average & " in latex
    assert lodo_tables(records, expand(["train.lr=1,2"])) == []  # no holdout axis, no LODO table


# -- the real engine on the synthetic world -------------------------------------------------------------


@pytest.mark.slow
def test_lodo_sweep_on_the_synthetic_world_matches_the_runs(tiny_preset_file, tmp_path):
    result = CliRunner().invoke(
        cli,
        ["sweep", str(tiny_preset_file), "--vary", "data.holdout=each", "--set", "run.rounds=2",
         "--set", f"model.pretrained=local-dir:{SHIPPED_CLIP}"],
    )
    assert result.exit_code == 0, result.output
    assert "leave-one-domain-out" in result.output
    (folder,) = (tmp_path / "runs").glob("*-sweep-tiny")
    runs = list(csv.DictReader((folder / "sweep.csv").open()))
    domains = list(synthetic.DOMAINS)
    assert [r["setting"] for r in runs] == [f"holdout={d}" for d in domains]  # 4 domains, 4 runs
    table = list(csv.DictReader((folder / "sweep-table.csv").open()))
    assert [r["held_out"] for r in table] == [*domains, "average"]
    summaries = [json.loads((Path(r["run_dir"]) / "summary.json").read_text()) for r in runs]
    for row, summary in zip(table, summaries):
        chosen = summary["selected"]
        assert list(chosen["holdout"]) == [row["held_out"]]
        assert row[row["held_out"]] == ""  # the held-out domain has no client
        for client, accuracy in chosen["clients"].items():
            assert float(row[client]) == pytest.approx(100 * accuracy["test"])
        assert float(row["personalisation"]) == pytest.approx(100 * chosen["mean_test"])
        assert float(row["generalisation"]) == pytest.approx(100 * chosen["mean_holdout"])
    average = table[-1]
    assert float(average["generalisation"]) == pytest.approx(100 * sum(s["selected"]["mean_holdout"] for s in summaries) / 4)
    assert float(average["personalisation"]) == pytest.approx(100 * sum(s["selected"]["mean_test"] for s in summaries) / 4)
    for domain in domains:
        as_client = [s["selected"]["clients"][domain]["test"] for s in summaries if domain in s["selected"]["clients"]]
        assert len(as_client) == 3 and float(average[domain]) == pytest.approx(100 * sum(as_client) / 3)
    markdown = (folder / "sweep-table.md").read_text()
    assert "| held out | art_painting | cartoon | photo | sketch | personalisation | generalisation |" in markdown
    assert f"| **average** | **{float(average['art_painting']):.1f}** |" in markdown
    assert "art\\_painting" in (folder / "sweep-table.tex").read_text()


# -- an image-folder tree -------------------------------------------------------------------------------


def _folder_preset(tmp_path, feature_cache, extra: str = "") -> Path:
    path = tmp_path / "folder.toml"
    path.write_text(
        f'[run]\nname = "folder"\nrounds = 1\nout_dir = "{tmp_path / "runs"}"\ncache_dir = "{feature_cache}"\n'
        f'[data]\ndataset = "imagefolder"\nroot = "tree"\nholdout = ["north"]\n{extra}'
        f'[model]\narch = "fedtui-clip-tiny"\npretrained = "none"\n[train]\nbatch_size = 4\n'
    )
    return path


def test_each_lists_the_domains_of_an_image_folder(tmp_path, feature_cache):
    make_image_folder(tmp_path / "tree", ["north", "east", "south", "west"])
    (tmp_path / "tree" / ".hidden").mkdir()  # not a domain
    path = _folder_preset(tmp_path, feature_cache)
    raw = read_preset_toml(path)
    assert holdout_domains(raw, path) == ["east", "north", "south", "west"]
    points = expand(["data.holdout=each"], domains=lambda: holdout_domains(raw, path))
    plan = plan_runs(raw, path, points)
    assert [p.preset.data.holdout for p in plan] == [["east"], ["north"], ["south"], ["west"]]
    # data.domains narrows the choice
    path = _folder_preset(tmp_path, feature_cache, 'domains = ["north", "south", "west"]\n')
    assert holdout_domains(read_preset_toml(path), path) == ["north", "south", "west"]
    # a missing root is bad input before any run
    path = _folder_preset(tmp_path, feature_cache).parent / "gone.toml"
    path.write_text(_folder_preset(tmp_path, feature_cache).read_text().replace('root = "tree"', 'root = "nowhere"'))
    result = CliRunner().invoke(cli, ["sweep", str(path), "--vary", "data.holdout=each"])
    assert result.exit_code == EXIT_BAD_INPUT and "[data.root] folder" in result.output
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_lodo_sweep_on_an_image_folder(tmp_path, feature_cache):
    make_image_folder(tmp_path / "tree", ["north", "east", "south"])
    path = _folder_preset(tmp_path, feature_cache)
    result = CliRunner().invoke(cli, ["sweep", str(path), "--vary", "data.holdout=each"])
    assert result.exit_code == 0, result.output
    (folder,) = (tmp_path / "runs").glob("*-sweep-folder")
    table = list(csv.DictReader((folder / "sweep-table.csv").open()))
    assert [r["held_out"] for r in table] == ["east", "north", "south", "average"]
    assert list(table[0])[2:5] == ["east", "north", "south"]
    runs = list(csv.DictReader((folder / "sweep.csv").open()))
    for row, run in zip(table, runs):
        chosen = json.loads((Path(run["run_dir"]) / "summary.json").read_text())["selected"]
        assert float(row["generalisation"]) == pytest.approx(100 * chosen["holdout"][row["held_out"]])


# -- the paper's presets --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, domains, holdout",
    [
        ("fedclip-pacs", None, ["sketch"]),
        ("fedclip-vlcs", ["Caltech101", "LabelMe", "SUN09", "VOC2007"], ["VOC2007"]),
        ("fedclip-office-home", ["Art", "Clipart", "Product", "Real_World"], ["Real_World"]),
    ],
)
def test_paper_presets_share_the_fedclip_settings(name, domains, holdout, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = PRESETS_DIR / f"{name}.toml"
    preset = read_preset(path)
    reference = read_preset(PRESETS_DIR / "fedclip-pacs.toml")
    for section in ("model", "adapter", "train", "federation", "eval"):
        assert getattr(preset, section) == getattr(reference, section), section
    assert (preset.run.rounds, preset.run.seed, preset.data.split, preset.data.partition) == (200, 0, [0.6, 0.2, 0.2], "domain")
    assert preset.data.dataset == "imagefolder" and preset.data.holdout == holdout
    assert Path(preset.data.root).parent == PRESETS_DIR / "data"  # relative to the preset, as PACS
    if domains is None:
        return
    assert preset.data.domains == domains
    root = make_image_folder(tmp_path / "data", domains)
    assert holdout_domains(read_preset_toml(path), path, [f"data.root={root}"]) == domains
    # the data checks pass; only the weights download is left
    with pytest.raises(PresetError, match=r"\[model.pretrained\]") as info:
        load_preset(path, [f"data.root={root}"])
    assert "data." not in str(info.value)
    # a folder named otherwise is named in the error, with a suggestion
    other = make_image_folder(tmp_path / "other", [d.lower() for d in domains])
    with pytest.raises(PresetError, match=f"unknown domain {domains[0]!r}.*Did you mean {domains[0].lower()!r}"):
        load_preset(path, [f"data.root={other}"])


def test_lodo_tables_per_setting_of_the_other_axes():
    points = expand(["federation.aggregation=mean,fedavg", "data.holdout=each"], domains=lambda: ["A", "B"])
    records = [_run(p.label, 0, {"B" if "A" in p.values["data.holdout"] else "A": 0.5 + i / 10}, {p.values["data.holdout"]: 0.3})
               for i, p in enumerate(points)]
    tables = lodo_tables(records, points)
    assert [t.group for t in tables] == ["aggregation=mean", "aggregation=fedavg"]
    assert tables[1].rows[1]["cells"]["A"].mean == pytest.approx(0.8)
    rows = list(csv.reader(lodo_csv(tables).splitlines()))
    assert rows[0][:6] == ["setting", "held_out", "A", "B", "personalisation", "generalisation"]
    assert [r[:2] for r in rows[1:]] == [
        ["aggregation=mean", "A"], ["aggregation=mean", "B"], ["aggregation=mean", "average"],
        ["aggregation=fedavg", "A"], ["aggregation=fedavg", "B"], ["aggregation=fedavg", "average"],
    ]
    assert lodo_markdown(tables).count("| held out |") == 2 and lodo_latex(tables).count("\\toprule") == 2
