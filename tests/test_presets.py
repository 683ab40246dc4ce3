"""Strict preset validation: every mistake names the file, the key and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.presets import (
    PresetError,
    apply_overrides,
    load_preset,
    preset_from_dict,
    read_preset,
    read_preset_toml,
    shipped_presets,
    to_toml,
)
from engine.resolve import resolve


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p.toml"
    path.write_text(text)
    return path


def test_defaults_are_fedclip_reference_values():
    preset = preset_from_dict({"model": {"pretrained": "none"}})
    assert preset.train.lr == 5e-5 and preset.train.betas == [0.9, 0.98] and preset.train.eps == 1e-6
    assert preset.train.weight_decay == 0.2 and preset.train.batch_size == 32 and preset.train.local_epochs == 1
    assert preset.federation.aggregation == "mean" and preset.data.split == [0.6, 0.2, 0.2]
    assert preset.data.prompt_template == "a picture of a {}"


def test_unknown_key_names_file_key_and_close_match(tmp_path):
    path = write(tmp_path, "[train]\nlocal_epoch = 5\n")
    with pytest.raises(PresetError) as info:
        load_preset(path)
    message = str(info.value)
    assert str(path) in message and "train.local_epoch" in message and "Did you mean 'local_epochs'" in message


def test_unknown_section(tmp_path):
    with pytest.raises(PresetError, match=r"\[trian\] unknown section. Did you mean 'train'"):
        load_preset(write(tmp_path, "[trian]\nlr = 1.0\n"))


def test_wrong_type_and_out_of_range(tmp_path):
    with pytest.raises(PresetError, match=r"\[run.rounds\] expected an integer, got 'ten'"):
        load_preset(write(tmp_path, '[run]\nrounds = "ten"\n'))
    with pytest.raises(PresetError, match=r"\[federation.fraction\] must be <= 1.0, got 1.5"):
        load_preset(write(tmp_path, "[federation]\nfraction = 1.5\n"))
    with pytest.raises(PresetError, match=r"\[data.alpha\] must be > 0.0"):
        load_preset(write(tmp_path, "[data]\nalpha = 0\n"))
    with pytest.raises(PresetError, match=r"\[federation.aggregation\] 'avg' is not allowed"):
        load_preset(write(tmp_path, '[federation]\naggregation = "avg"\n'))


def test_cross_key_checks(tmp_path):
    with pytest.raises(PresetError, match=r"\[data.split\] expected three non-negative fractions summing to 1"):
        preset_from_dict({"data": {"split": [0.5, 0.2, 0.2]}})
    tiny = {"arch": "fedtui-clip-tiny", "pretrained": "none"}
    with pytest.raises(PresetError, match=r"\[data.holdout\] unknown domain 'skecth'. Did you mean 'sketch'"):
        resolve(preset_from_dict({"data": {"holdout": ["skecth"]}, "model": tiny}))
    with pytest.raises(PresetError, match="every domain is held out"):
        resolve(preset_from_dict({"data": {"domains": ["photo"], "holdout": ["photo"]}, "model": tiny}))


def test_missing_data_root_and_checkpoint(tmp_path):
    with pytest.raises(PresetError, match=r"\[data.root\] folder .* does not exist"):
        load_preset(write(tmp_path, '[data]\ndataset = "imagefolder"\nroot = "nowhere"\n'))
    with pytest.raises(PresetError, match=r"\[model.pretrained\] checkpoint file .* does not exist"):
        load_preset(write(tmp_path, '[model]\npretrained = "weights/missing.pt"\n'))


def test_overrides_are_typed_by_the_schema(tmp_path):
    raw = apply_overrides(
        {},
        [
            "train.local_epochs=5",
            "train.lr=0.001",
            "federation.aggregation=fedavg",
            "data.holdout=sketch,photo",
            "train.betas=[0.8, 0.9]",
            "train.reset_optimizer_each_round=false",
        ],
    )
    assert raw["train"] == {"local_epochs": 5, "lr": 0.001, "betas": [0.8, 0.9], "reset_optimizer_each_round": False}
    assert raw["federation"] == {"aggregation": "fedavg"}
    assert raw["data"] == {"holdout": ["sketch", "photo"]}
    with pytest.raises(PresetError, match=r"--set: \[train.epochs\] unknown key. Did you mean 'local_epochs'"):
        apply_overrides({}, ["train.epochs=5"])
    with pytest.raises(PresetError, match="expected section.key=value"):
        apply_overrides({}, ["train.local_epochs"])
    with pytest.raises(PresetError, match=r"\[train.local_epochs\] expected an integer"):
        preset_from_dict(apply_overrides({}, ["train.local_epochs=five"]))


def test_resolved_preset_round_trips_through_toml(tmp_path):
    preset = preset_from_dict({"run": {"name": 'quote"d', "rounds": 7}, "data": {"holdout": ["sketch"]}})
    again = read_preset(write(tmp_path, to_toml(preset)))
    assert again.to_dict() == preset.to_dict()


def test_relative_paths_resolve_against_the_preset_file(tmp_path):
    (tmp_path / "ckpt").mkdir()
    preset = read_preset(write(tmp_path, '[model]\narch = "fedtui-clip-tiny"\npretrained = "local-dir:ckpt"\n'))
    assert preset.model.pretrained == f"local-dir:{tmp_path / 'ckpt'}"
    with pytest.raises(PresetError, match=rf"local-dir folder '{tmp_path / 'ckpt'}' has no open_clip_config.json"):
        resolve(preset)


def test_every_shipped_preset_parses():
    names = {p.stem for p in shipped_presets()}
    assert {"quickstart", "fedclip-pacs"} <= names
    for path in shipped_presets():
        raw = read_preset_toml(path)
        assert raw.get("run", {}).get("description"), f"{path.name} has no run.description"
