"""Faulty clients (federation.faulty): each mode's update by hand, label flipping, the run and the console."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from engine import events as ev
from engine.federation import Federation
from engine.presets import PresetError, load_preset, preset_from_dict


def misbehaving(mode: str, strength: float):
    preset = preset_from_dict({"federation": {"faulty": ["a"], "faulty_mode": mode, "faulty_strength": strength},
                               "model": {"arch": "fedtui-clip-tiny", "pretrained": "none"}})
    return SimpleNamespace(preset=preset, client_index={"a": 0})


DELTA = {"w": torch.tensor([3.0, -4.0]), "b": torch.tensor([0.0])}


@pytest.mark.parametrize("mode, strength, expected", [
    ("scale", 20.0, {"w": [60.0, -80.0], "b": [0.0]}),
    ("sign_flip", 1.0, {"w": [-3.0, 4.0], "b": [0.0]}),
    ("sign_flip", 2.5, {"w": [-7.5, 10.0], "b": [0.0]}),
    ("free_rider", 1.0, {"w": [0.0, 0.0], "b": [0.0]}),
    ("label_flip", 1.0, {"w": [3.0, -4.0], "b": [0.0]}),  # acts in training, not on the update
])
def test_each_mode_changes_the_update_as_documented(mode, strength, expected):
    sent = Federation.misbehave(misbehaving(mode, strength), "a", 1, DELTA)
    assert {k: v.tolist() for k, v in sent.items()} == expected


def test_noise_is_seeded_and_scaled_by_the_updates_rms():
    big = {"w": torch.ones(200_000)}  # rms 1
    fault = misbehaving("noise", 0.5)
    first, again = (Federation.misbehave(fault, "a", 3, big) for _ in range(2))
    assert torch.equal(first["w"], again["w"])  # the same seed, client and round: the same draw
    other_round = Federation.misbehave(fault, "a", 4, big)
    assert not torch.equal(first["w"], other_round["w"])
    noise = first["w"] - 1.0
    assert abs(float(noise.std()) - 0.5) < 0.01 and abs(float(noise.mean())) < 0.01


def test_label_flip_trains_on_mirrored_labels():
    fake = SimpleNamespace(preset=misbehaving("label_flip", 1.0).preset, faulty={"a"},
                           data=SimpleNamespace(labels=torch.tensor([0, 1, 6])),
                           flipped_labels=6 - torch.tensor([0, 1, 6]))
    assert Federation.labels_for(fake, "a").tolist() == [6, 5, 0]
    assert Federation.labels_for(fake, "b").tolist() == [0, 1, 6]


def test_an_unknown_faulty_client_is_named_before_the_run(tiny_preset_file):
    with pytest.raises(PresetError, match=r"\[federation.faulty\] no client 'cartoons'. Did you mean 'cartoon'"):
        load_preset(tiny_preset_file, ["federation.faulty=cartoons"])


@pytest.mark.slow
def test_one_scaled_client_moves_fedavg_far_and_the_median_little(tiny_preset_file):
    from safetensors.torch import load_file

    from engine.runner import run

    def last_adapter(aggregation: str, faulty: bool):
        extra = ["federation.faulty=cartoon", "federation.faulty_mode=scale", "federation.faulty_strength=50"]
        seen: list = []
        result = run(load_preset(tiny_preset_file, ["run.rounds=3", f"federation.aggregation={aggregation}",
                                                    *(extra if faulty else [])]), seen.append)
        started = next(e for e in seen if isinstance(e, ev.RunStarted))
        marks = {c["client"]: c.get("faulty") for c in started.clients}
        return load_file(result.run_dir / "checkpoints" / "last.safetensors"), marks

    def distance(a, b) -> float:
        return float(sum(((a[k] - b[k]).double() ** 2).sum() for k in a) ** 0.5)

    clean, _ = last_adapter("fedavg", False)
    attacked, marks = last_adapter("fedavg", True)
    assert marks == {"art_painting": None, "cartoon": "scale", "photo": None}
    median_clean, _ = last_adapter("median", False)
    median_attacked, _ = last_adapter("median", True)
    # The median of three stays between the two honest values, so one liar can move it only that far.
    assert distance(attacked, clean) > 10 * distance(median_attacked, median_clean)
