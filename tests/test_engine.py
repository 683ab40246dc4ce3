"""End to end through the real engine on a tiny synthetic preset with a tiny random CLIP."""

from __future__ import annotations

import json
import threading

import pytest

from engine import RunControl, events as ev, load_preset
from engine.runner import run, sample_cohort

pytestmark = pytest.mark.slow


def collect(preset, control=None):
    seen: list = []
    result = run(preset, seen.append, control)
    return result, seen


def test_run_writes_a_complete_run_directory(tiny_preset_file):
    preset = load_preset(tiny_preset_file)
    result, seen = collect(preset)
    assert result.status == "completed"
    files = {p.name for p in result.run_dir.iterdir()}
    assert {"preset.toml", "manifest.json", "metrics.jsonl", "summary.json", "checkpoints"} <= files
    assert {p.name for p in (result.run_dir / "checkpoints").iterdir()} == {"best.safetensors", "last.safetensors"}

    encoding = [e for e in seen if isinstance(e, ev.FeaturesProgress)]
    assert encoding and encoding[-1].done == encoding[-1].total == 6 * 7 * 4
    kinds = [type(e).__name__ for e in seen if not isinstance(e, (ev.Log, ev.FeaturesProgress))]
    assert kinds[:3] == ["RunStarted", "FeaturesReady", "RoundFinished"]  # round 0: zero-shot
    assert kinds[-1] == "RunFinished"
    assert kinds.count("RoundFinished") == 3 and kinds.count("ClientFinished") == 2 * 3
    # metrics.jsonl replays into exactly the events the sink saw
    assert ev.read_events(result.run_dir / "metrics.jsonl") == seen

    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    assert set(summary["zero_shot"]["clients"]) == {"art_painting", "cartoon", "photo"}
    assert set(summary["zero_shot"]["holdout"]) == {"sketch"}
    assert summary["selected"]["round"] in (1, 2)
    assert summary["generalisation_accuracy"] == summary["selected"]["mean_holdout"]
    assert summary["personalisation_accuracy"] == summary["selected"]["mean_test"]
    assert summary["communication"]["adapter_bytes"] > 2 * (128 * 128 + 128) * 4  # fp32 tensors plus header
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["weights"] == "random" and len(manifest["weights_fingerprint"]) == 64
    assert load_preset(result.run_dir / "preset.toml").to_dict() == preset.to_dict()
    warnings = [e.text for e in seen if isinstance(e, ev.Log) and e.level == "warning"]
    assert any("RANDOM" in text and "chance" in text for text in warnings)


def test_second_run_encodes_nothing_and_reproduces_the_numbers(tiny_preset_file):
    preset = load_preset(tiny_preset_file)
    first, _ = collect(preset)
    second, seen = collect(preset)
    ready = next(e for e in seen if isinstance(e, ev.FeaturesReady))
    assert ready.encoded == 0 and ready.cached == 6 * 7 * 4
    strip = lambda s: [(r["round"], r["mean_loss"], r["mean_val"], r["mean_test"]) for r in s["per_round"]]
    assert strip(first.summary) == strip(second.summary)
    assert first.summary["per_round"][0]["mean_loss"] is not None


def test_adapter_training_lowers_the_loss(tmp_path, feature_cache):
    """On data whose frozen features separate the classes (class = hue, even through a random encoder),
    FedCLIP's adapter must fit: the per-round training loss falls and client accuracy rises. Weight decay
    is off here: the reference's L2-coupled 0.2 holds a randomly initialised adapter near its start."""
    from test_loading import make_image_folder

    make_image_folder(tmp_path / "data", per_class=6)
    preset_file = tmp_path / "hues.toml"
    preset_file.write_text(
        f'[run]\nrounds = 8\nout_dir = "{tmp_path / "runs"}"\ncache_dir = "{feature_cache}"\n'
        f'[data]\ndataset = "imagefolder"\nroot = "data"\nholdout = ["sketch"]\n'
        f'[model]\narch = "fedtui-clip-tiny"\npretrained = "none"\n'
        f'[adapter]\nkind = "attai"\n[train]\nbatch_size = 8\nlr = 0.01\nweight_decay = 0.0\nloss = "ce"\nlocal_epochs = 2\n'
    )
    result, seen = collect(load_preset(preset_file))
    assert result.status == "completed", result.summary.get("error")
    losses = [r["mean_loss"] for r in result.summary["per_round"]]
    assert losses[-1] < 0.8 * losses[0], losses
    zero_shot, best = result.summary["zero_shot"]["mean_test"], result.summary["selected"]["mean_test"]
    assert best > zero_shot, (zero_shot, best)


def test_stop_between_batches_leaves_a_stopped_run(tiny_preset_file):
    preset = load_preset(tiny_preset_file, ["run.rounds=50"])
    control = RunControl()

    def sink(event):
        if isinstance(event, ev.RoundFinished) and event.round == 2:
            control.stop()

    result = run(preset, sink, control)
    assert result.status == "stopped"
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["rounds_completed"] == 2
    assert (result.run_dir / "checkpoints" / "best.safetensors").is_file()


def test_pause_blocks_until_resume(tiny_preset_file):
    preset = load_preset(tiny_preset_file, ["run.rounds=3"])
    control = RunControl()
    paused_at = []

    def sink(event):
        if isinstance(event, ev.RoundFinished) and event.round == 1 and not paused_at:
            control.pause()
            paused_at.append(event.round)
            threading.Timer(0.5, control.resume).start()

    result = run(preset, sink, control)
    assert result.status == "completed" and result.summary["rounds_completed"] == 3


def test_a_crash_leaves_a_failed_summary_and_traceback(tiny_preset_file, monkeypatch):
    import engine.federation as federation

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(federation, "train_locally", broken)
    result, seen = collect(load_preset(tiny_preset_file))
    assert result.status == "failed"
    assert isinstance(seen[-1], ev.RunFailed) and "disk on fire" in seen[-1].error
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "disk on fire" in summary["error"]
    assert summary["zero_shot"] is not None  # what was measured before the crash is kept
    assert "RuntimeError" in (result.run_dir / "error.txt").read_text()


def test_cohorts_are_seeded_and_sized_like_flower():
    names = [f"c{i}" for i in range(10)]
    first = [sample_cohort(names, 0.3, 1, seed=0, round_=r) for r in range(1, 6)]
    assert first == [sample_cohort(names, 0.3, 1, seed=0, round_=r) for r in range(1, 6)]
    assert all(len(c) == 3 for c in first) and len({tuple(c) for c in first}) > 1
    assert len(sample_cohort(names, 0.05, 2, seed=0, round_=1)) == 2  # min_clients wins over int(C * K) = 0
    assert sample_cohort(names, 1.0, 1, seed=0, round_=1) == names


def test_iid_and_dirichlet_partitions_run(tiny_preset_file):
    for extra in (["data.partition=iid", "data.clients=3"], ["data.partition=dirichlet", "data.clients=3", "data.alpha=0.5", "data.min_client_size=5"]):
        result, seen = collect(load_preset(tiny_preset_file, extra + ["run.rounds=1"]))
        assert result.status == "completed", result.summary.get("error")
        started = next(e for e in seen if isinstance(e, ev.RunStarted))
        assert [c["client"] for c in started.clients] == ["client-0", "client-1", "client-2"]
        assert sum(sum(c["class_histogram"]) for c in started.clients) == sum(c["examples"] for c in started.clients)


def test_quickstart_with_the_shipped_clip_improves_the_clients_over_zero_shot(tmp_path, feature_cache):
    """The offline default end to end: the shipped CLIP is well above chance on the styles it saw and
    weak on sketch, and FedCLIP's rounds raise the clients' mean test accuracy over zero-shot."""
    from engine.presets import PRESETS_DIR

    preset = load_preset(
        PRESETS_DIR / "quickstart.toml", [f"run.out_dir={tmp_path / 'runs'}", f"run.cache_dir={feature_cache}"]
    )
    result, seen = collect(preset)
    assert result.status == "completed", result.summary.get("error")
    zero = result.summary["zero_shot"]
    assert min(zero["clients"][d]["test"] for d in ("cartoon", "photo")) > 0.6
    assert zero["clients"]["sketch"]["test"] < 0.4  # the style pre-training never saw
    assert result.summary["personalisation_accuracy"] > zero["mean_test"]
    assert [w["alpha"] for w in result.summary["wise_ft"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
