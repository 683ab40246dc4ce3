"""``fedtui run --log tensorboard|mlflow|wandb``: one real tiny run logged to every installed tracker, each read
back with its own tool (TensorBoard's EventAccumulator, MLflow's file store, W&B's offline run file); the
event fold and the failure rules on fake events. A tracker whose package is not installed is skipped."""

from __future__ import annotations

import glob
import importlib.util
import json
import math
import struct
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import TINY_PRESET
from engine import events as ev
from engine.events import read_events
from fedtui.cli import cli
from fedtui.trackers import TrackedSink, Tracker, TrackerError, TrackerSpec, flat_params, parse_specs

runner = CliRunner()


def installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


HAVE = {"tensorboard": installed("tensorboard"), "mlflow": installed("mlflow"), "wandb": installed("wandb")}


@pytest.fixture(scope="module")
def logged(tmp_path_factory, feature_cache):
    """One 2-round run of the tiny preset with --log for every installed tracker."""
    base = tmp_path_factory.mktemp("trackers")
    preset = base / "tiny.toml"
    preset.write_text(TINY_PRESET.format(out=base / "runs", cache=feature_cache))
    out = base / "run"
    args = ["run", str(preset), "--out", str(out)]
    env = {"COLUMNS": "200"}
    if HAVE["tensorboard"]:
        args += ["--log", "tensorboard"]
    if HAVE["mlflow"]:
        args += ["--log", f"mlflow={(base / 'mlruns').as_uri()}"]
        env.update(MLFLOW_ALLOW_FILE_STORE="true", MLFLOW_EXPERIMENT_NAME="fedtui-test")
    if HAVE["wandb"]:
        args += ["--log", "wandb=fedtui-test"]
        env.update(WANDB_MODE="offline", WANDB_DIR=str(base), WANDB_SILENT="true", WANDB_CONSOLE="off")
    if len(args) == 4:
        pytest.skip("none of tensorboard, mlflow, wandb is installed")
    result = runner.invoke(cli, args, env=env)
    assert result.exit_code == 0, result.output
    assert "stopped logging" not in result.output, result.output
    rounds = [e for e in read_events(out / "metrics.jsonl") if isinstance(e, ev.RoundFinished)]
    clients = [e for e in read_events(out / "metrics.jsonl") if isinstance(e, ev.ClientFinished)]
    return {"base": base, "out": out, "rounds": rounds, "clients": clients}


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)


def test_tensorboard_event_files_hold_the_rounds_and_the_hyperparameters(logged):
    if not HAVE["tensorboard"]:
        pytest.skip("tensorboard is not installed (pip install 'fedtui[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    accumulator = EventAccumulator(str(logged["out"] / "tensorboard"))
    accumulator.Reload()
    scalars = {tag: {e.step: e.value for e in accumulator.Scalars(tag)} for tag in accumulator.Tags()["scalars"]}
    assert [r.round for r in logged["rounds"]] == [0, 1, 2]
    for r in logged["rounds"]:
        assert close(scalars["mean/val_accuracy"][r.round], r.mean_val)
        assert close(scalars["mean/test_accuracy"][r.round], r.mean_test)
        assert close(scalars["mean/holdout_accuracy"][r.round], r.mean_holdout)
        assert scalars["bytes/up"][r.round] == r.bytes_up
        for client, splits in r.client_accuracy.items():
            assert close(scalars[f"client/{client}/val_accuracy"][r.round], splits["val"])
    for c in logged["clients"]:
        assert close(scalars[f"client/{c.client}/loss"][c.round], c.mean_loss)
    content = accumulator.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["train.lr"].number_value == pytest.approx(1e-3)
    assert hparams["data.holdout"].string_value == '["sketch"]'


def test_mlflow_file_store_holds_params_metrics_and_the_run_directory(logged):
    if not HAVE["mlflow"]:
        pytest.skip("mlflow is not installed (pip install 'fedtui[mlflow]')")
    import os

    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient((logged["base"] / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("fedtui-test")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == logged["out"].name
    assert run.data.params["train.lr"] == "0.001" and run.data.params["data.holdout"] == '["sketch"]'
    assert run.data.params["run.rounds"] == "2" and run.data.tags["fedtui.run_dir"] == str(logged["out"])
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "mean/val_accuracy")}
    assert history.keys() == {0, 1, 2}
    assert all(close(history[r.round], r.mean_val) for r in logged["rounds"])
    losses = client.get_metric_history(run.info.run_id, f"client/{logged['clients'][0].client}/loss")
    assert sorted(m.step for m in losses) == [1, 2]
    artefacts = {a.path for a in client.list_artifacts(run.info.run_id, "run")}
    assert {"run/summary.json", "run/metrics.jsonl", "run/preset.toml"} <= artefacts


def _wandb_records(path: str) -> list[bytes]:
    """The records of a W&B run file: a 7-byte header (':W&B', magic, version), then LevelDB-log framing
    (32 KiB blocks; each record crc32c:4, length:2, type:1 = full/first/middle/last)."""
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind in (2, 3):
            pending += chunk
        elif kind == 4:
            records.append(pending + chunk)
            pending = b""
        else:
            break
    return records


def test_wandb_offline_run_holds_config_history_and_the_run_artifact(logged):
    if not HAVE["wandb"]:
        pytest.skip("wandb is not installed (pip install 'fedtui[wandb]')")
    from wandb.proto import wandb_internal_pb2 as pb

    [path] = glob.glob(str(logged["base"] / "wandb" / "offline-run-*" / "run-*.wandb"))
    config, history, artifacts = {}, {}, []
    for raw in _wandb_records(path):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            config.update({i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            config.update({i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            history[row["_step"]] = row
        elif kind == "artifact":
            artifacts.append((record.artifact.type, {m.path for m in record.artifact.manifest.contents}))
    assert config["train.lr"] == 1e-3 and config["data.holdout"] == ["sketch"]
    assert sorted(history) == [0, 1, 2]
    for r in logged["rounds"]:
        assert close(history[r.round]["mean/val_accuracy"], r.mean_val)
    assert [kind for kind, _ in artifacts] == ["run"]
    assert {"summary.json", "metrics.jsonl", "preset.toml"} <= artifacts[0][1]


# --- without a real run -------------------------------------------------------------------------------


class Recording(Tracker):
    kind = "recording"

    def __init__(self, fail_on: str | None = None):
        super().__init__(TrackerSpec("recording", None))
        self.started, self.values, self.finished, self.fail_on = None, {}, None, fail_on

    def start(self, event, params):
        self.started = params

    def scalars(self, step, values):
        if self.fail_on in values:
            raise RuntimeError("the store went away")
        for name, value in values.items():
            self.values.setdefault(name, {})[step] = value

    def finish(self, status):
        self.finished = status


def _events():
    yield ev.RunStarted(run_id="r", run_dir="runs/r", preset_name="tiny", rounds=1, clients=[], holdout=["sketch"],
                        classes=["a", "b"], device="cpu", adapter="attai", aggregation="mean",
                        trainable_parameters=10, weights="random", time=0.0)
    yield ev.ClientFinished(round=1, client="photo", mean_loss=0.5, examples=4, steps=1, seconds=0.1, bytes_up=40,
                            bytes_down=40)
    yield ev.ClientFinished(round=1, client="cartoon", mean_loss=float("nan"), examples=4, steps=1, seconds=0.1,
                            bytes_up=0, bytes_down=40, skipped=True)
    yield ev.RoundFinished(round=1, client_accuracy={"photo": {"val": 0.5, "test": 0.25}},
                           holdout_accuracy={"sketch": 0.75}, mean_val=0.5, mean_test=0.25, mean_holdout=None,
                           mean_loss=0.5, bytes_up=40, bytes_down=80, seconds=1.0)
    yield ev.RunFinished(status="completed", summary={}, run_dir="runs/r", seconds=1.0)


def test_the_fold_gives_per_round_scalars_and_flattened_hyperparameters(tiny_preset_file):
    from engine.presets import load_preset

    preset = load_preset(tiny_preset_file)
    seen: list = []
    tracker = Recording()
    sink = TrackedSink(seen.append, [tracker], preset)
    for event in _events():
        sink(event)
    sink.close()
    assert len(seen) == 5  # the wrapped sink saw every event
    assert tracker.started["train.lr"] == 1e-3 and tracker.started["data.holdout"] == ["sketch"]
    assert tracker.started.keys() >= {f"{s}.{k}" for s, v in preset.to_dict().items() for k in v}
    assert tracker.values["client/photo/loss"] == {1: 0.5} and "client/cartoon/loss" not in tracker.values
    assert tracker.values["client/photo/test_accuracy"] == {1: 0.25}
    assert tracker.values["holdout/sketch/accuracy"] == {1: 0.75}
    assert "mean/holdout_accuracy" not in tracker.values  # None is not a number to plot
    assert tracker.values["bytes/down"] == {1: 80.0} and tracker.finished == "completed"
    assert flat_params(preset)["run.rounds"] == 2


def test_a_failing_tracker_is_reported_once_and_dropped(tiny_preset_file):
    from engine.presets import load_preset

    seen: list = []
    bad, good = Recording(fail_on="client/photo/loss"), Recording()
    sink = TrackedSink(seen.append, [bad, good], load_preset(tiny_preset_file))
    for event in _events():
        sink(event)
    sink.close()
    warnings = [e for e in seen if isinstance(e, ev.Log)]
    assert len(warnings) == 1 and "stopped logging: the store went away" in warnings[0].text
    assert bad.finished is None and good.finished == "completed" and "mean/val_accuracy" in good.values


def test_log_values_are_checked():
    assert parse_specs(["tensorboard", "mlflow=file:/tmp/x", "wandb=proj"]) == [
        TrackerSpec("tensorboard", None), TrackerSpec("mlflow", "file:/tmp/x"), TrackerSpec("wandb", "proj")]
    with pytest.raises(TrackerError, match="one of tensorboard, mlflow, wandb"):
        parse_specs(["comet"])
    with pytest.raises(TrackerError, match="given twice"):
        parse_specs(["wandb", "wandb=x"])


def test_a_tracker_that_cannot_start_is_bad_input_and_nothing_is_written(tiny_preset_file, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    out = tmp_path / "never"
    result = runner.invoke(cli, ["run", str(tiny_preset_file), "--out", str(out), "--log", "tensorboard"])
    assert result.exit_code == 2
    assert "pip install 'fedtui[tensorboard]'" in result.output and not out.exists()
    result = runner.invoke(cli, ["run", str(tiny_preset_file), "--out", str(out), "--log", "comet"])
    assert result.exit_code == 2 and not out.exists()


@pytest.mark.skipif(not HAVE["mlflow"], reason="mlflow is not installed")
def test_an_mlflow_store_that_cannot_be_used_is_bad_input(tiny_preset_file, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    out = tmp_path / "never"
    started = time.time()
    result = runner.invoke(cli, ["run", str(tiny_preset_file), "--out", str(out),
                                 "--log", f"mlflow=nosuchscheme://{tmp_path}"])
    assert result.exit_code == 2 and "--log mlflow: cannot use the tracking store" in result.output
    assert not out.exists() and time.time() - started < 60


@pytest.mark.slow
def test_a_sweep_logs_each_run_to_its_own_tracker_run(tmp_path, feature_cache):
    """``fedtui sweep --log``: every point a tracker run of its own, with its own numbers."""
    if not (HAVE["tensorboard"] and HAVE["mlflow"]):
        pytest.skip("needs tensorboard and mlflow (pip install 'fedtui[tensorboard,mlflow]')")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    preset = tmp_path / "tiny.toml"
    preset.write_text(TINY_PRESET.format(out=tmp_path / "runs", cache=feature_cache))
    store = (tmp_path / "mlruns").as_uri()
    env = {"COLUMNS": "200", "MLFLOW_ALLOW_FILE_STORE": "true", "MLFLOW_EXPERIMENT_NAME": "fedtui-sweep"}
    result = runner.invoke(cli, ["sweep", str(preset), "--vary", "train.lr=1e-3,1e-2", "--set", "run.rounds=1",
                                 "--log", "tensorboard", "--log", f"mlflow={store}"], env=env)
    assert result.exit_code == 0, result.output
    assert "stopped logging" not in result.output, result.output
    run_dirs = sorted(p.parent for p in (tmp_path / "runs").glob("*/metrics.jsonl"))
    assert len(run_dirs) == 2
    for run_dir in run_dirs:
        (finished,) = [e for e in read_events(run_dir / "metrics.jsonl") if isinstance(e, ev.RoundFinished) and e.round == 1]
        accumulator = EventAccumulator(str(run_dir / "tensorboard"))
        accumulator.Reload()
        assert close({e.step: e.value for e in accumulator.Scalars("mean/test_accuracy")}[1], finished.mean_test)
    client = MlflowClient(tracking_uri=store)
    (experiment,) = [e for e in client.search_experiments() if e.name == "fedtui-sweep"]
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(float(r.data.params["train.lr"]) for r in runs) == [1e-3, 1e-2]
    assert all(r.info.status == "FINISHED" for r in runs)
