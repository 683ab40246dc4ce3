"""Real loading paths on data the test makes: image folders (with a damaged file), checkpoint files,
and the paper preset up to the point where it would download weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from engine import events as ev
from engine.backbone import load_backbone, weights_fingerprint
from engine.presets import PRESETS_DIR, PresetError, load_preset, read_preset
from engine.runner import run
from image_folders import PACS_CLASSES, make_image_folder



def test_paper_preset_validates_and_stops_only_at_the_weights_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = make_image_folder(tmp_path / "PACS", per_class=1)
    with pytest.raises(PresetError, match=r"\[model.pretrained\] ViT-B-32 'openai' weights must be downloaded .* HF_HUB_OFFLINE"):
        load_preset(PRESETS_DIR / "fedclip-pacs.toml", [f"data.root={root}"])  # said at once, before any run
    preset = read_preset(PRESETS_DIR / "fedclip-pacs.toml", [f"data.root={root}"])
    assert preset.model.arch == "ViT-B-32" and preset.model.pretrained == "openai"
    assert preset.data.holdout == ["sketch"] and preset.run.rounds == 200 and preset.train.lr == 5e-5
    with pytest.raises(Exception) as info:  # no hub here: open_clip's own download is what fails
        load_backbone(preset, torch.device("cpu"))
    assert "openai" in str(info.value) or "download" in str(info.value).lower()


@pytest.mark.slow
def test_imagefolder_run_from_a_checkpoint_file_skips_damaged_images(tmp_path, feature_cache):
    import open_clip

    from engine import modelzoo

    modelzoo.register_model_configs()
    torch.manual_seed(11)
    model = open_clip.create_model("fedtui-clip-tiny", pretrained=None)
    checkpoint = tmp_path / "weights.pt"
    torch.save(model.state_dict(), checkpoint)
    root = make_image_folder(tmp_path / "data")
    (root / "photo" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    preset_file = tmp_path / "p.toml"
    preset_file.write_text(
        f'[run]\nrounds = 1\nout_dir = "{tmp_path / "runs"}"\ncache_dir = "{feature_cache}"\n'
        f'[data]\ndataset = "imagefolder"\nroot = "data"\nholdout = ["sketch"]\n'
        f'[model]\narch = "fedtui-clip-tiny"\npretrained = "weights.pt"\n[train]\nbatch_size = 4\n'
    )
    seen: list = []
    result = run(load_preset(preset_file), seen.append)
    assert result.status == "completed", result.summary.get("error")
    warnings = [e.text for e in seen if isinstance(e, ev.Log) and e.level == "warning"]
    assert any("broken.jpg" in text and "skipped" in text for text in warnings)
    started = next(e for e in seen if isinstance(e, ev.RunStarted))
    assert started.classes == list(PACS_CLASSES)
    assert [c["examples"] for c in started.clients] == [int(14 * 0.6)] * 3  # 7 classes x 2 images, 60%
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["weights"] == f"checkpoint:{checkpoint}"
    assert manifest["weights_fingerprint"] == weights_fingerprint(model)
