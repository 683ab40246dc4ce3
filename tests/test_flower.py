"""Rounds over Flower (engine.flower, fedtui flower local).

The claim: the same preset and seed give the in-process run's per-round accuracies (within 1e-6; here they
are equal) whether the clients train in ``fedtui run`` or behind Flower, first through the apps' own records
in one process (every rule: mean, fedavg, fedadam, median, and int8 compression), then over a real
deployment on loopback: a SuperLink and two SuperNodes as separate processes with TLS and SuperNode
authentication (mean through ``fedtui flower local`` itself, fedadam, int8; each such run takes about a
minute on 2 cores, so fedavg and median are checked through the records only). A SuperNode killed mid-run
is reported by name and the round goes on; Ctrl-C stops every process; a reply holds only adapter bytes,
counts and metrics.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="Flower is not installed (pip install 'fedtui[flower]')")
pytest.importorskip("cryptography", reason="cryptography is not installed (pip install 'fedtui[flower]')")

from safetensors.torch import load as st_load  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from conftest import TINY_PRESET  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHIPPED_CLIP = f"model.pretrained=local-dir:{REPO / 'engine' / 'assets' / 'fedtui-clip-tiny'}"
# Two clients (art_painting, cartoon) and sketch held out: the smallest federation that means something.
TWO = [SHIPPED_CLIP, 'data.domains=["art_painting","cartoon","sketch"]']
RULES = {
    "mean": TWO,
    "fedavg": TWO + ["federation.aggregation=fedavg"],
    "fedadam": TWO + ["federation.aggregation=fedadam"],
    "median": TWO + ["federation.aggregation=median"],
    "int8": TWO + ["federation.compression=int8"],
}


# --- helpers --------------------------------------------------------------------------------------------


def write_preset(folder: Path, cache: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny.toml"
    path.write_text(TINY_PRESET.format(out=folder / "runs", cache=cache))
    return path


def in_process(preset_path: Path, overrides: list[str]) -> Path:
    from engine.presets import load_preset
    from engine.runner import run

    result = run(load_preset(preset_path, overrides))
    assert result.status == "completed", result.summary
    return result.run_dir


def events(run_dir: Path, kind: str) -> list[dict]:
    return [e for e in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if e["event"] == kind]


def numbers(value, prefix=""):
    """Every number in a (nested) accuracy record, by its path."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(numbers(item, f"{prefix}/{key}"))
        return out
    return {prefix: value}


def assert_same_numbers(ours: Path, theirs: Path, tolerance: float = 1e-6) -> float:
    """Per-round accuracies, what each client reported and the final adapter, within ``tolerance``; the largest
    difference seen."""
    worst = 0.0
    mine = {e["round"]: e for e in events(ours, "RoundFinished")}
    expected = {e["round"]: e for e in events(theirs, "RoundFinished")}
    assert sorted(mine) == sorted(expected) == [0, 1, 2]
    for round_, want in expected.items():
        got = mine[round_]
        for key in ("client_accuracy", "holdout_accuracy", "mean_val", "mean_test", "mean_holdout"):
            a, b = numbers(got[key]), numbers(want[key])
            assert a.keys() == b.keys(), (round_, key)
            for path in b:
                if b[path] is None or b[path] != b[path]:
                    assert a[path] is None or a[path] != a[path], (round_, key, path)
                    continue
                worst = max(worst, abs(a[path] - b[path]))
                assert abs(a[path] - b[path]) <= tolerance, (round_, key, path, a[path], b[path])
        assert got["selected"] == want["selected"]
        assert got["bytes_up"] == want["bytes_up"] and got["bytes_down"] == want["bytes_down"]
    key = lambda e: (e["round"], e["client"])  # noqa: E731
    mine_clients = {key(e): e for e in events(ours, "ClientFinished")}
    expected_clients = {key(e): e for e in events(theirs, "ClientFinished")}
    assert mine_clients.keys() == expected_clients.keys()
    for k, want in expected_clients.items():
        got = mine_clients[k]
        assert (got["examples"], got["steps"], got["bytes_up"], got["bytes_down"], got["skipped"]) == (
            want["examples"], want["steps"], want["bytes_up"], want["bytes_down"], want["skipped"])
        assert got["mean_loss"] == pytest.approx(want["mean_loss"], rel=1e-6)
    last, reference = load_file(ours / "checkpoints" / "last.safetensors"), load_file(theirs / "checkpoints" / "last.safetensors")
    assert last.keys() == reference.keys()
    adapter = max(float((last[k].double() - reference[k].double()).abs().max()) for k in last)
    assert adapter <= tolerance
    return max(worst, adapter)


@pytest.fixture
def task_identity():
    """Flower's messages need the identity of the task they belong to (set by its runtime in a real process)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None


def over_the_wire(record_dict):
    """A RecordDict as Flower sends it: every nested object deflated to bytes and inflated again on the far side."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    contents = {key: obj.deflate() for key, obj in get_all_nested_objects(record_dict).items()}
    size = sum(len(c) for c in contents.values())
    return inflate_object_from_contents(record_dict.object_id, contents), size


class Loopback:
    """``engine.flower.server.Transport`` without processes: each message goes through the ClientApp itself
    (``client_app(message, context)``), its records serialised and read back as Flower does on the wire."""

    def __init__(self, state: Path, node_config: dict | None = None):
        self.state, self.node_config, self.info, self.replies = state, node_config or {}, None, []

    def describe(self):
        return {"kind": "loopback"}

    def start(self, info, log):
        self.info = info

    def exchange(self, round_, cohort, shared):
        from flwr.app import Context, Message, RecordDict

        from engine.flower import Dropped
        from engine.flower.apps import client_app, read_reply, train_content

        answers = {}
        for node, name in enumerate(cohort, 1):
            content, _ = over_the_wire(train_content(shared, self.info.config(round_, cohort)))
            extra = self.node_config(name) if callable(self.node_config) else self.node_config
            context = Context(run_id=1, node_id=node, state=RecordDict(), run_config={},
                              node_config={"client": name, "state-dir": str(self.state / name), **extra})
            try:
                reply = client_app(message=Message(content, dst_node_id=node, message_type="train"), context=context)
            except Exception as error:  # Flower's runtime turns it into an error reply (run_clientapp)
                answers[name] = Dropped(name, f"Flower error: {type(error)}:<'{error}'>")
                continue
            if reply.has_error():
                answers[name] = Dropped(name, reply.error.reason)
                continue
            received, _ = over_the_wire(reply.content)
            self.replies.append((name, round_, received))
            answers[name] = read_reply(received, name, round_)
        return answers


def flower_processes(run_dir: Path) -> list[int]:
    """Processes whose environment names this run directory (every Flower process fedtui started for it)."""
    marker = str(run_dir).encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                environ = Path(f"/proc/{entry}/environ").read_bytes()
                state = Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
            except OSError:
                continue
            if marker in environ and state != b"Z":
                found.append(int(entry))
    return found


def assert_all_stopped(run_dir: Path, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while flower_processes(run_dir) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert flower_processes(run_dir) == []


def assert_a_run_directory_like_any_other(run_dir: Path) -> None:
    from engine.runstore import list_runs

    for name in ("preset.toml", "manifest.json", "metrics.jsonl", "summary.json", "checkpoints/best.safetensors",
                 "checkpoints/last.safetensors"):
        assert (run_dir / name).is_file(), name
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["transport"]["kind"] == "flower" and manifest["seed"] == 3
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    listed = {r.path.resolve(): r.status for r in list_runs(run_dir.parent)}
    assert listed[run_dir.resolve()] == "completed"
    assert (run_dir / "flower" / "tls" / "ca.pem").is_file()
    keys = sorted((run_dir / "flower" / "keys").glob("*.key"))
    assert [k.stem for k in keys] == ["art_painting", "cartoon"]
    assert all(k.stat().st_mode & 0o777 == 0o600 for k in keys)
    assert (run_dir / "flower" / "tls" / "server.key").stat().st_mode & 0o777 == 0o600
    assert not (run_dir / "flower" / "tls" / "ca.key").exists()


# --- the apps' records, in one process ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("rule", list(RULES))
def test_through_the_apps_records_every_rule_gives_the_in_process_numbers(tmp_path, feature_cache, task_identity, rule):
    from engine.flower.server import serve

    preset_path = write_preset(tmp_path, feature_cache)
    reference = in_process(preset_path, RULES[rule])
    result = serve(preset_path, Loopback(tmp_path / "state"), RULES[rule], tmp_path / "flower-run", sink=None)
    assert result.status == "completed", result.summary
    difference = assert_same_numbers(result.run_dir, reference)
    print(f"\n{rule}: largest |apps' records - in-process| over accuracies and the final adapter: {difference:.3g}")


@pytest.mark.slow
def test_a_stopped_flower_run_resumes_with_the_in_process_numbers(tmp_path, feature_cache, task_identity):
    """Stopped after round 1 (server moments, top-k residuals and Adam's moments kept at the sites), then
    resumed: the same numbers as one uninterrupted in-process run. Another preset is refused, nothing touched."""
    from engine import events as ev
    from engine.control import RunControl
    from engine.flower import FlowerError
    from engine.flower.server import serve

    overrides = RULES["fedadam"] + ["federation.compression=topk", "train.reset_optimizer_each_round=false"]
    preset_path = write_preset(tmp_path, feature_cache)
    reference = in_process(preset_path, overrides)
    control = RunControl()

    def stop_after_round_1(event):
        if isinstance(event, ev.RoundFinished) and event.round == 1:
            control.stop()

    run_dir, sites = tmp_path / "flower-run", tmp_path / "state"
    first = serve(preset_path, Loopback(sites), overrides, run_dir, sink=stop_after_round_1, control=control)
    assert first.status == "stopped"
    assert json.loads((run_dir / "state" / "state.json").read_text())["round"] == 1
    before = (run_dir / "metrics.jsonl").read_bytes()
    with pytest.raises(FlowerError, match="not the one this run ran"):
        serve(preset_path, Loopback(sites), overrides + ["train.lr=0.5"], run_dir, sink=None, resume=True)
    assert (run_dir / "metrics.jsonl").read_bytes() == before
    second = serve(preset_path, Loopback(sites), overrides, run_dir, sink=None, resume=True)
    assert second.status == "completed", second.summary
    assert_same_numbers(run_dir, reference)
    assert json.loads((run_dir / "manifest.json").read_text())["resumed"][0]["after_round"] == 1


@pytest.mark.slow
def test_a_site_with_only_its_own_domain_trains_the_same_round(tmp_path, feature_cache, task_identity):
    """The node config says where a site's things are; here each site keeps only its own domain
    (``set = 'data.domains=[...];data.holdout=[]'``) and its own cache folder, and the numbers do not move."""
    from engine.flower.server import serve

    preset_path = write_preset(tmp_path, feature_cache)
    reference = in_process(preset_path, RULES["fedadam"])

    def own_domain(name):
        return {"set": f'data.domains=["{name}"];data.holdout=[]', "cache-dir": str(tmp_path / f"cache-{name}")}

    result = serve(preset_path, Loopback(tmp_path / "state", own_domain), RULES["fedadam"], tmp_path / "run", sink=None)
    assert result.status == "completed", result.summary
    assert assert_same_numbers(result.run_dir, reference) == 0.0
    assert sorted(p.name for p in tmp_path.glob("cache-*")) == ["cache-art_painting", "cache-cartoon"]

    # A key that shapes training is the server's, not the site's: that client drops out, saying why.
    result = serve(preset_path, Loopback(tmp_path / "state2", {"set": "train.lr=1.0"}), TWO, tmp_path / "run2", sink=None)
    assert result.status == "failed"
    warnings = [e["text"] for e in events(result.run_dir, "Log") if e["level"] == "warning"]
    assert any("client art_painting dropped out" in w and "the package fixes it" in w for w in warnings), warnings


@pytest.mark.slow
def test_a_reply_holds_only_adapter_bytes_counts_and_metrics(tmp_path, feature_cache, task_identity):
    """What a ClientApp returns, record by record: the codec's bytes (the adapter's shared delta and nothing
    else), the example count, steps, loss and seconds, the client's name and the round. No features, labels,
    images, paths or personal tensors."""
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

    from engine.flower.server import serve

    preset_path = write_preset(tmp_path, feature_cache)
    overrides = TWO + ["run.rounds=1", "adapter.kind=clip_adapter", "federation.personal_layers=image_adapter.up",
                       "train.lr=0.001"]
    transport = Loopback(tmp_path / "state")
    result = serve(preset_path, transport, overrides, tmp_path / "run", sink=None)
    assert result.status == "completed", result.summary
    shared = None
    for name, round_, content in transport.replies:
        assert set(content) == {"update", "metrics", "info"}
        update, metrics, info = content["update"], content["metrics"], content["info"]
        assert isinstance(update, ArrayRecord) and isinstance(metrics, MetricRecord) and isinstance(info, ConfigRecord)
        assert list(update) == ["payload"]
        payload = update["payload"]
        assert (payload.dtype, payload.stype, tuple(payload.shape)) == ("uint8", "fedtui.codec", (len(payload.data),))
        tensors = st_load(bytes(payload.data))  # codec "none": the delta's tensors as they are
        if shared is None:
            theta = load_file(result.run_dir / "checkpoints" / "last.safetensors")
            shared = {k: v for k, v in theta.items() if not k.startswith("image_adapter.up")}
            assert shared and len(shared) < len(theta)  # a personal layer exists, and stays at the site
        assert sorted(tensors) == sorted(shared)
        assert all(tensors[k].shape == shared[k].shape and tensors[k].dtype == shared[k].dtype for k in tensors)
        assert dict(info) == {"protocol": 1, "client": name, "round": round_, "skipped": False, "compression": "none"}
        assert set(metrics) == {"examples", "steps", "seconds", "mean-loss"}
        assert isinstance(metrics["examples"], int) and isinstance(metrics["steps"], int)
        assert isinstance(metrics["seconds"], float) and isinstance(metrics["mean-loss"], float)
    assert sorted(name for name, _, _ in transport.replies) == ["art_painting", "cartoon"]


@pytest.mark.slow
def test_what_a_reply_may_not_say_makes_the_client_drop_out_with_a_reason(tmp_path, feature_cache, task_identity):
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    from engine.flower import FlowerError
    from engine.flower.apps import read_reply
    from engine.flower.server import serve

    good = {"metrics": MetricRecord({"examples": 25, "steps": 4, "seconds": 0.1, "mean-loss": 0.5}),
            "info": ConfigRecord({"protocol": 1, "client": "cartoon", "round": 1, "skipped": False,
                                  "compression": "none"}),
            "update": ArrayRecord({"payload": Array(dtype="uint8", shape=(3,), stype="fedtui.codec", data=b"abc")})}
    assert read_reply(RecordDict(good), "cartoon", 1).payload == b"abc"
    bad = {
        "another client": dict(good, info=ConfigRecord({**dict(good["info"]), "client": "photo"})),
        "another round": dict(good, info=ConfigRecord({**dict(good["info"]), "round": 2})),
        "a fractional count": dict(good, metrics=MetricRecord({"examples": 25.5, "steps": 4, "seconds": 0.1})),
        "numpy data": dict(good, update=ArrayRecord({"payload": Array(dtype="uint8", shape=(3,), stype="numpy.ndarray",
                                                                      data=b"abc")})),
        "an extra record": dict(good, labels=ConfigRecord({"y": [1, 2, 3]})),
    }
    for what, records in bad.items():
        with pytest.raises(FlowerError):
            read_reply(RecordDict(records), "cartoon", 1)

    class Garbling(Loopback):  # cartoon's payload is not an update of this adapter
        def exchange(self, round_, cohort, shared):
            answers = super().exchange(round_, cohort, shared)
            answers["cartoon"].payload = b"\x08\x00\x00\x00\x00\x00\x00\x00{}" + b"x" * 16
            return answers

    preset_path = write_preset(tmp_path, feature_cache)
    result = serve(preset_path, Garbling(tmp_path / "state"), TWO, tmp_path / "run", sink=None)
    assert result.status == "completed"
    warnings = [e["text"] for e in events(result.run_dir, "Log") if e["level"] == "warning"]
    assert any(w.startswith("round 1: client cartoon dropped out (refused: cartoon's update of round 1") for w in warnings)
    assert [e["client"] for e in events(result.run_dir, "ClientFinished")] == ["art_painting", "art_painting"]

    # min_clients = 2 and one bad update: the run stops with one line.
    result = serve(preset_path, Garbling(tmp_path / "state2"), TWO + ["federation.min_clients=2"], tmp_path / "run2",
                   sink=None)
    assert result.status == "failed"
    assert "round 1: 1 of 2 client(s) answered and federation.min_clients = 2" in result.summary["error"]


# --- a real deployment on loopback ---------------------------------------------------------------------------


def fedtui(*args, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "fedtui.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_fedtui_flower_local_runs_the_preset_over_tls_with_node_authentication_like_fedtui_run(tmp_path, feature_cache):
    preset_path = write_preset(tmp_path, feature_cache)
    reference = in_process(preset_path, RULES["mean"])
    run_dir = tmp_path / "flower-run"
    sets = [a for o in RULES["mean"] for a in ("--set", o)]
    done = fedtui("flower", "local", preset_path, "--clients", "2", "--out", run_dir, "--wait-nodes", "120",
                  "--round-timeout", "300", *sets, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    assert "(TLS, SuperNode authentication)" in done.stderr
    assert "round   2 loss art_painting=" in done.stdout and "completed in" in done.stdout
    difference = assert_same_numbers(run_dir, reference)
    print(f"\nmean over a deployment: largest |Flower - in-process| {difference:.3g}")
    assert_a_run_directory_like_any_other(run_dir)
    assert_all_stopped(run_dir)
    # Bad input is refused before anything starts.
    done = fedtui("flower", "local", preset_path, "--clients", "3", *sets, cwd=tmp_path)
    assert done.returncode == 2 and "with data.partition = 'domain' the clients are the training domains" in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["fedadam", "int8"])
def test_a_loopback_deployment_gives_the_in_process_numbers(tmp_path, feature_cache, rule):
    from engine.flower.local import run_local

    preset_path = write_preset(tmp_path, feature_cache)
    reference = in_process(preset_path, RULES[rule])
    result = run_local(preset_path, RULES[rule], clients=2, run_dir=tmp_path / "flower-run", wait_s=120,
                       timeout_s=300)
    assert result.status == "completed", result.summary
    difference = assert_same_numbers(result.run_dir, reference)
    print(f"\n{rule} over a deployment: largest |Flower - in-process| {difference:.3g}; timings {result.timings}")
    assert_a_run_directory_like_any_other(result.run_dir)
    assert_all_stopped(result.run_dir)


@pytest.mark.slow
def test_a_supernode_killed_mid_run_is_reported_by_name_and_the_round_goes_on(tmp_path, feature_cache):
    """Three SuperNodes; photo's is killed (SIGKILL) once round 1 is evaluated. The SuperLink answers for it
    when its heartbeats stop (or the round's timeout passes); rounds 2 and 3 aggregate the two that answer."""
    from engine.flower.local import MetricsTail, run_local

    preset_path = write_preset(tmp_path, feature_cache)
    run_dir = tmp_path / "flower-run"
    killed = threading.Event()

    def kill_photo_after_round_1(deployment):
        def watch():
            tail = MetricsTail(run_dir)
            while not killed.is_set():
                if any(getattr(e, "round", None) == 1 and type(e).__name__ == "RoundFinished" for e in tail.read()):
                    node = next(p for p in deployment.processes if p.name == "supernode-photo")
                    os.killpg(node.popen.pid, signal.SIGKILL)
                    killed.set()
                time.sleep(0.1)

        threading.Thread(target=watch, daemon=True).start()

    result = run_local(preset_path, [SHIPPED_CLIP, "run.rounds=3"], run_dir=run_dir, tls=False, auth=False, wait_s=120,
                       timeout_s=150, on_started=kill_photo_after_round_1)
    killed.set()
    assert result.status == "completed", result.summary
    warnings = [e["text"] for e in events(run_dir, "Log") if e["level"] == "warning"]
    print("\n" + "\n".join(warnings))
    for round_ in (2, 3):  # round 3: the SuperLink lists it offline, so it is not even asked
        assert any(w.startswith(f"round {round_}: client photo dropped out (") and "the round goes on without it" in w
                   for w in warnings), round_
    finished = {(e["round"], e["client"]) for e in events(run_dir, "ClientFinished")}
    assert finished == {(1, "art_painting"), (1, "cartoon"), (1, "photo"), (2, "art_painting"), (2, "cartoon"),
                        (3, "art_painting"), (3, "cartoon")}
    assert [e["round"] for e in events(run_dir, "RoundFinished")] == [0, 1, 2, 3]
    assert_all_stopped(run_dir)
    # The console's runs screen replays it like any run, the drop-outs in its log.
    from fedtui.app.runstore import list_runs, replay

    state = replay(run_dir)
    assert state.status == "completed" and [p.round for p in state.points] == [0, 1, 2, 3]
    assert sum("client photo dropped out" in line for line in state.log_lines) == 2
    assert [r.status for r in list_runs(run_dir.parent) if r.path == run_dir] == ["completed"]


def ctrl_c_when(args: list, cwd: Path, ready, timeout: float = 400, while_running=lambda: None) -> tuple[int, str]:
    """Start ``fedtui flower local ARGS``, wait until ``ready()``, call ``while_running()``, press Ctrl-C;
    (exit code, stderr)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    command = subprocess.Popen([sys.executable, "-m", "fedtui.cli", "flower", "local", *map(str, args)], cwd=cwd,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and command.poll() is None and not ready():
            time.sleep(0.2)
        assert command.poll() is None, command.communicate()
        while_running()
        command.send_signal(signal.SIGINT)
        _, err = command.communicate(timeout=60)
    finally:
        if command.poll() is None:
            command.kill()
    return command.returncode, err


@pytest.mark.slow
def test_ctrl_c_stops_every_flower_process_and_the_summary_says_interrupted(tmp_path, feature_cache):
    from fedtui.app.runstore import replay

    preset_path = write_preset(tmp_path, feature_cache)
    run_dir = tmp_path / "flower-run"
    sets = [a for o in TWO + ["run.rounds=50"] for a in ("--set", o)]
    metrics = run_dir / "metrics.jsonl"

    def running() -> None:
        assert len(flower_processes(run_dir)) >= 4  # SuperLink, SuperExec, ServerApp, SuperNodes, flwr log ...
        assert replay(run_dir).status == "running"  # the console follows it from its run directory

    code, err = ctrl_c_when([preset_path, "--insecure", "--out", run_dir, *sets], tmp_path,
                            lambda: metrics.exists() and '"RoundStarted"' in metrics.read_text(), 300, running)
    assert code == 130, err[-2000:]
    assert "every Flower process was stopped" in err
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"
    assert_all_stopped(run_dir)


@pytest.mark.slow
def test_fedtui_flower_local_resume_continues_an_interrupted_run_to_the_in_process_numbers(tmp_path, feature_cache):
    """Ctrl-C after round 1 of a TLS + node-auth deployment (fedadam, Adam's moments kept at the sites), then
    `fedtui flower local --resume RUN_DIR`: fresh Flower processes, the run's own keys and certificates, and the
    numbers of one uninterrupted in-process run."""
    preset_path = write_preset(tmp_path, feature_cache)
    overrides = RULES["fedadam"] + ["train.reset_optimizer_each_round=false"]
    reference = in_process(preset_path, overrides)
    run_dir = tmp_path / "flower-run"
    sets = [a for o in overrides for a in ("--set", o)]
    state = run_dir / "state" / "state.json"
    code, err = ctrl_c_when([preset_path, "--out", run_dir, "--wait-nodes", "120", "--round-timeout", "300", *sets],
                            tmp_path, state.exists)
    assert code == 130, err[-2000:]
    assert json.loads(state.read_text())["round"] == 1
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"
    assert_all_stopped(run_dir)

    done = fedtui("flower", "local", "--resume", run_dir, "--wait-nodes", "120", "--round-timeout", "300", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    assert "round   2 loss art_painting=" in done.stdout
    assert json.loads((run_dir / "manifest.json").read_text())["resumed"][0]["after_round"] == 1  # not run again
    assert [e["round"] for e in events(run_dir, "RoundFinished")] == [0, 1, 2]
    assert_same_numbers(run_dir, reference)
    assert_a_run_directory_like_any_other(run_dir)
    assert_all_stopped(run_dir)
    done = fedtui("flower", "local", "--resume", run_dir, cwd=tmp_path)
    assert done.returncode == 2 and "the run is completed; nothing to resume" in done.stderr


def test_ports_for_flower_processes_are_free_distinct_and_below_the_ephemeral_range():
    """Outgoing connections take their source ports from the ephemeral range; a port handed to a SuperNode
    must not be one of those, or a connection may take it before the SuperNode binds it."""
    import socket

    from engine.flower.local import _ephemeral_range, free_port

    low, _ = _ephemeral_range()
    ports = [free_port() for _ in range(20)]
    assert len(set(ports)) == 20 and all(1024 <= p < low for p in ports)
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))


# --- what the modules import ------------------------------------------------------------------------------------


def test_the_engine_side_imports_no_ui_packages_and_no_flower():
    code = ("import sys, engine.flower, engine.flower.server, engine.flower.client, engine.flower.local\n"
            "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('textual', 'rich', 'typer', 'flwr'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == ""


def test_the_apps_import_nothing_ui_that_flower_itself_does_not():
    """engine.flower.apps runs inside Flower's processes, where flwr has loaded rich and typer already."""
    code = ("import sys; ui = lambda: {m for m in sys.modules if m.split('.')[0] in ('textual', 'rich', 'typer')}\n"
            "import flwr.app, flwr.clientapp, flwr.serverapp; before = ui()\n"
            "import engine.flower.apps; print(','.join(sorted(ui() - before)), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"  # nothing new, and no torch until a ClientApp trains


def test_nothing_received_is_unpickled():
    from test_no_pickle import pickle_uses

    for path in sorted((REPO / "engine" / "flower").glob("*.py")) + [REPO / "fedtui" / "cli_flower.py"]:
        text = path.read_text()
        assert pickle_uses(text, str(path)) == [] and "torch.load" not in text, path
