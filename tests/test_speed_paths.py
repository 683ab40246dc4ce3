"""The fast paths give the slow paths' numbers: batched local training (engine.batched) against one client at a
time, one-pass evaluation against one call per split, byte counts from the format's arithmetic against the real
serialisation, a warm run without open_clip against a run that loads the model, and the CUDA encoding path."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import engine.adapters  # noqa: F401  (registers the kinds)
from engine.adapters.base import ADAPTERS, AdapterContext, build_adapter
from engine.batched import BATCHABLE, Job, adam_param_groups, choose_batched, train_cohort
from engine.compression import serialize, serialized_nbytes
from engine.presets import TrainSection
from engine.strategies import build_strategy
from engine.training import make_optimizer, train_locally

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = REPO / "engine" / "assets" / "fedtui-clip-tiny"
D, CLASSES = 48, 7
# Ragged on purpose: different step counts, a short last batch, a client with one row (no step at all).
CLIENT_ROWS = [(0, 70), (70, 163), (163, 200), (200, 201), (201, 290)]


def context() -> AdapterContext:
    generator = torch.Generator().manual_seed(0)
    text = torch.randn(CLASSES, D, generator=generator)
    return AdapterContext(feature_dim=D, class_names=list("abcdefg"), prompts=list("abcdefg"),
                          class_text_features=text, logit_scale=100.0)


def data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(300, D, generator=generator) * 3, torch.randint(0, CLASSES, (300,), generator=generator)


def sequential_round(adapter, start, rows, train, epochs, generators, saved, penalty_of):
    """engine.federation's sequential path for each client: fresh (or kept) Adam, train_locally."""
    out = []
    features, labels = data()
    for k, part in enumerate(rows):
        adapter.load_trainable_state(start)
        optimizer = make_optimizer(adapter, train)
        if k in saved:
            optimizer.load_state_dict(saved[k])
        trainable = {n: p for n, p in adapter.named_parameters() if p.requires_grad}
        result = train_locally(adapter, optimizer, lambda r: features[r], labels, part, train, epochs, 100.0,
                               generators[k], lambda: penalty_of(trainable))
        saved[k] = optimizer.state_dict()
        out.append((adapter.trainable_state(), result))
    return out


def assert_same(a: torch.Tensor, b: torch.Tensor, exact: bool, what) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, what
    if exact:
        assert torch.equal(a, b), what
    else:
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=lambda m: f"{what}: {m}")


def assert_same_optimizer_state(sequential: dict, batched: dict, exact: bool) -> None:
    assert sequential["state"].keys() == batched["state"].keys()
    assert sequential["param_groups"] == batched["param_groups"]
    for index, slots in sequential["state"].items():
        assert list(slots) == list(batched["state"][index])
        for slot, value in slots.items():
            assert_same(value, batched["state"][index][slot], exact, (index, slot))


# How a batched step gets its gradients: a kind's hand-written backward (engine.stacked_backward), autograd
# through its stacked forward, or autograd through its forward under vmap (a kind with neither).
STEP_PATHS = [(kind, path) for kind in sorted(BATCHABLE) for path in ("by_hand", "stacked", "vmap")
              if path != "by_hand" or ADAPTERS[kind].has_stacked_backward()]


@pytest.mark.parametrize("kind, forward", STEP_PATHS)
@pytest.mark.parametrize("loss", ["contrastive", "ce"])
@pytest.mark.parametrize("rule", ["mean", "fedprox"])
def test_batched_training_equals_one_client_at_a_time(kind, loss, rule, forward, monkeypatch):
    """Two rounds, moments kept across them, FedProx's penalty, ragged clients: parameters and Adam moments to
    1e-5, and bit for bit for FedCLIP's own setting (attai, contrastive). On the reference CPU every case but
    the text-side kinds with the CE loss is bit for bit (those differ by ~1e-8: the batched [K, B, d] x [K, d, C]
    product sums in another order than one client's matmul); the reported losses agree to 1e-5 (the batched
    mean sums in another order than F.cross_entropy's cascade sum)."""
    exact = kind == "attai" and loss == "contrastive"
    torch.manual_seed(0)
    adapter = build_adapter(kind, context())
    assert type(adapter).has_stacked_forward(), f"{kind} batches but has no stacked_forward"
    if forward != "by_hand":  # autograd's step, as for a kind without a hand-written backward
        monkeypatch.setattr(type(adapter), "has_stacked_backward", classmethod(lambda cls: False))
    if forward == "vmap":  # the path a kind without its own stacked forward takes
        monkeypatch.setattr(type(adapter), "has_stacked_forward", classmethod(lambda cls: False))
    strategy = build_strategy(rule)
    if rule == "fedprox":
        strategy.options = type(strategy.options)(mu=0.5)
    train = TrainSection(batch_size=16, lr=1e-2, loss=loss, reset_optimizer_each_round=False)
    rows = [np.arange(a, b) for a, b in CLIENT_ROWS]
    start = adapter.trainable_state()
    features, labels = data()
    sequential_generators = [torch.Generator().manual_seed(10 + k) for k in range(len(rows))]
    batched_generators = [torch.Generator().manual_seed(10 + k) for k in range(len(rows))]
    sequential_saved: dict = {}
    batched_saved: dict = {}
    groups = adam_param_groups(train, len(start))
    for _ in range(2):
        expected = sequential_round(adapter, start, rows, train, 2, sequential_generators, sequential_saved,
                                    lambda params: strategy.local_penalty(params, start))
        jobs = [Job(str(k), start, part, 2, batched_generators[k], batched_saved.get(k)) for k, part in enumerate(rows)]
        results = train_cohort(adapter, jobs, lambda r: features[r], labels, train, 100.0, groups,
                               lambda params: strategy.local_penalty(params, start), keep_optimizer=True)
        for k, ((state, local), result) in enumerate(zip(expected, results)):
            assert state.keys() == result.state.keys()
            for name in state:
                assert_same(state[name], result.state[name], exact, (k, name))
                assert result.state[name].is_contiguous()
            assert result.steps == local.steps
            if local.steps:
                assert result.mean_loss == pytest.approx(local.mean_loss, rel=1e-5, abs=1e-6)
            else:
                assert math.isnan(result.mean_loss)
            assert_same_optimizer_state(sequential_saved[k], result.optimizer_state, exact)
            batched_saved[k] = result.optimizer_state
    # the random streams moved exactly as far
    for a, b in zip(sequential_generators, batched_generators):
        assert torch.equal(a.get_state(), b.get_state())


def test_adam_param_groups_are_torchs():
    train = TrainSection(lr=3e-4, betas=[0.8, 0.95], eps=1e-7, weight_decay=0.1)
    adapter = build_adapter("attai", context())
    count = sum(1 for p in adapter.parameters() if p.requires_grad)
    assert adam_param_groups(train, count) == make_optimizer(adapter, train).state_dict()["param_groups"]


def test_the_batched_path_is_chosen_by_a_fixed_rule():
    attai = build_adapter("attai", context())
    assert not choose_batched(attai, 1) and choose_batched(attai, 2) and choose_batched(attai, 3)
    assert choose_batched(attai, 1, "batched") and not choose_batched(attai, 64, "sequential")
    with pytest.raises(ValueError):
        choose_batched(attai, 4, "fast")
    subspace = build_adapter("attai", context(), type(attai.options)(subspace_dim=8)) \
        if hasattr(attai.options, "subspace_dim") else None
    if subspace is not None:
        assert not choose_batched(subspace, 64)  # a wrapper reports its inner kind but does not batch


# --- byte counts --------------------------------------------------------------------------------------------


def test_serialized_nbytes_is_the_length_of_the_serialisation():
    rng = random.Random(0)
    letters = ["a", "b", ".", "_", "0", "9", '"', "\\", "\n", "\x01", "é", "漢", "😀", " ", "#", "\x7f"]
    dtypes = [torch.float32, torch.float16, torch.float64, torch.int8, torch.int32, torch.bool, torch.bfloat16]
    for _ in range(400):
        dtype = rng.choice(dtypes)
        tensors = {}
        for _ in range(rng.randint(0, 6)):
            name = "".join(rng.choice(letters) for _ in range(rng.randint(1, 8)))
            shape = [rng.choice([0, 1, 2, 3, 7, 128, 1000]) for _ in range(rng.randint(0, 3))]
            if math.prod(shape) <= 200_000:
                tensors[name] = torch.zeros(shape, dtype=dtype)
        assert serialized_nbytes(tensors) == len(serialize(tensors)), list(tensors)
    mixed = {"a": torch.zeros(3), "b": torch.zeros(2, dtype=torch.int8)}
    assert serialized_nbytes(mixed) == len(serialize(mixed))
    adapter = build_adapter("attai", context())
    assert serialized_nbytes(adapter.trainable_state()) == len(serialize(adapter.trainable_state()))


# --- whole runs: the batched path, one-pass evaluation and the uncompressed upload ------------------------------


def run_tiny(folder: Path, mode: str, *overrides: str, name: str = "run"):
    from engine import load_preset
    from engine.runner import run

    preset_file = folder / "tiny.toml"
    if not preset_file.exists():
        from conftest import TINY_PRESET

        preset_file.write_text(TINY_PRESET.format(out=folder / "runs", cache=folder / "cache"))
    os.environ["FEDTUI_LOCAL_TRAINING"] = mode
    try:
        seen: list = []
        result = run(load_preset(preset_file, list(overrides)), seen.append, run_dir=folder / "runs" / name)
    finally:
        os.environ.pop("FEDTUI_LOCAL_TRAINING", None)
    assert result.status == "completed", result.summary.get("error")
    return result, seen


def comparable(events) -> list[dict]:
    from engine import events as ev

    out = []
    for event in events:
        if isinstance(event, (ev.Log, ev.FeaturesProgress, ev.RunFinished)):
            continue
        row = json.loads(ev.event_to_json(event))
        for key in ("time", "seconds", "run_dir", "run_id", "train_seconds", "encoded", "cached"):
            row.pop(key, None)
        out.append(row)
    return out


def assert_close_events(a: list[dict], b: list[dict]) -> None:
    """Equal, except that losses may differ by 1e-5 (relative) and progress events interleave differently."""
    key = lambda row: json.dumps({k: v for k, v in row.items() if "loss" not in k}, sort_keys=True)
    a, b = sorted(a, key=key), sorted(b, key=key)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if "loss" in k and isinstance(x[k], float):
                assert x[k] == pytest.approx(y[k], rel=1e-5, nan_ok=True), k
            elif k == "per_client_loss" or k == "losses":
                assert x[k] == pytest.approx(y[k], rel=1e-5)
            else:
                assert x[k] == y[k], k


def checkpoint_tensors(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return {p.name: load_file(p) for p in sorted((run_dir / "checkpoints").iterdir())}


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    (),
    ("adapter.kind=clip_adapter", "federation.aggregation=fedprox", "train.reset_optimizer_each_round=false",
     "federation.personal_layers=image_adapter.up", "run.rounds=3"),
    ("adapter.kind=linear_head", "train.loss=ce", "data.partition=dirichlet", "data.clients=5", "data.alpha=0.5",
     "federation.fraction=0.6", "data.min_client_size=4"),
], ids=["attai", "fedprox-personal-kept-moments", "linear-head-dirichlet-cohorts"])
def test_a_run_gives_the_same_numbers_on_either_training_path(tmp_path, overrides):
    sequential, seen_sequential = run_tiny(tmp_path, "sequential", *overrides, name="sequential")
    batched, seen_batched = run_tiny(tmp_path, "batched", *overrides, name="batched")
    assert_close_events(comparable(seen_sequential), comparable(seen_batched))
    a, b = checkpoint_tensors(sequential.run_dir), checkpoint_tensors(batched.run_dir)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys() and all(torch.equal(a[name][k], b[name][k]) for k in a[name])


def test_one_pass_evaluation_equals_one_call_per_split():
    from engine.adapters.base import ZeroShotHead
    from engine.data import ClientSplit
    from engine.evaluation import Evaluator, accuracy

    features, labels = data()
    adapter = build_adapter("clip_adapter", context())
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    order = np.random.default_rng(0).permutation(300)
    clients = {f"c{k}": ClientSplit(f"c{k}", "d", order[k * 60 : k * 60 + 30], order[k * 60 + 30 : k * 60 + 45],
                                    order[k * 60 + 45 : k * 60 + 60]) for k in range(4)}
    clients["empty"] = ClientSplit("empty", "d", order[240:250], order[0:0], order[250:255])
    holdout = {"h": order[260:300]}
    head = ZeroShotHead(context().class_text_features)
    evaluator = Evaluator(adapter, head, clients, holdout, lambda r: features[r], lambda r: features[r], labels,
                          100.0, lambda: None)
    shared = adapter.trainable_state()
    other = {k: v + 0.01 for k, v in shared.items()}

    def expected(model, state_for, restore):
        out = {}
        for name, split in clients.items():
            if state_for is not None:
                adapter.load_trainable_state(state_for(name))
            out[name] = {part: accuracy(model, lambda r: features[r], labels, getattr(split, part), 100.0)
                         for part in ("train", "val", "test")}
        if restore is not None:
            adapter.load_trainable_state(restore)
        return out, {d: accuracy(model, lambda r: features[r], labels, rows, 100.0) for d, rows in holdout.items()}

    for state_for, restore, model in [
        (lambda name: shared, shared, adapter),  # one state for all: one pass
        (lambda name: other if name == "c1" else shared, shared, adapter),  # a personal state: per client
        (None, None, head),  # zero-shot
    ]:
        want = expected(model, state_for, restore)
        got = evaluator.measure(state_for, restore)
        assert json.dumps(got, sort_keys=True) == json.dumps(want, sort_keys=True)


def test_an_uncompressed_upload_skips_the_round_trip_and_counts_the_same_bytes(tmp_path):
    from engine.compression import NoCompression

    _, seen = run_tiny(tmp_path, "auto", "run.rounds=1")
    from engine import events as ev

    finished = [e for e in seen if isinstance(e, ev.ClientFinished)]
    adapter = build_adapter("attai", AdapterContext(feature_dim=128, class_names=["x"], prompts=["x"],
                                                    class_text_features=torch.zeros(1, 128), logit_scale=1.0))
    assert {e.bytes_up for e in finished} == {len(serialize(adapter.trainable_state()))}
    assert NoCompression().roundtrip("x", adapter.trainable_state())[1] == serialized_nbytes(adapter.trainable_state())


# --- a warm run needs neither the model nor an image ----------------------------------------------------------

WARM_PRESET = """
[run]
name = "warm"
seed = 1
rounds = 2
cache_dir = "{cache}"
[data]
dataset = "synthetic"
images_per_class = 5
holdout = ["art_painting"]
[model]
arch = "fedtui-clip-tiny"
pretrained = "local-dir:{model}"
[adapter]
kind = "{kind}"
[train]
batch_size = 8
"""

PROBE = """
import json, sys
from engine import load_preset
from engine.data import SyntheticSource
from engine.runner import run
rendered = []
render = SyntheticSource.load
SyntheticSource.load = lambda self, ref: rendered.append(ref) or render(self, ref)
result = run(load_preset(sys.argv[1]), run_dir=sys.argv[2])
print(json.dumps({"status": result.status, "open_clip": "open_clip" in sys.modules,
                  "torchvision": "torchvision" in sys.modules, "rendered": len(rendered)}))
"""


def probe_run(preset: Path, run_dir: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, str(preset), str(run_dir)], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_warm_run_imports_no_open_clip_touches_no_image_and_gives_the_same_numbers(tmp_path):
    preset = tmp_path / "warm.toml"
    preset.write_text(WARM_PRESET.format(cache=tmp_path / "cache", model=TINY_MODEL, kind="attai"))
    cold = probe_run(preset, tmp_path / "cold")
    warm = probe_run(preset, tmp_path / "warm")
    assert cold["status"] == warm["status"] == "completed"
    assert cold["open_clip"] and cold["rendered"] > 0
    assert not warm["open_clip"] and not warm["torchvision"] and warm["rendered"] == 0

    cold_manifest = json.loads((tmp_path / "cold" / "manifest.json").read_text())
    warm_manifest = json.loads((tmp_path / "warm" / "manifest.json").read_text())
    assert cold_manifest["backbone_loaded"] and not warm_manifest["backbone_loaded"]
    assert cold_manifest["weights_fingerprint"] == warm_manifest["weights_fingerprint"]
    assert len(warm_manifest["weights_file_sha256"]) == 64 and "index" in warm_manifest["weights_fingerprint_from"]
    assert warm_manifest["versions"]["open_clip"] == cold_manifest["versions"]["open_clip"]

    def untimed(value):
        if isinstance(value, dict):
            return {k: untimed(v) for k, v in value.items() if k not in ("seconds", "time", "train_seconds")}
        return [untimed(v) for v in value] if isinstance(value, list) else value

    def numbers(run_dir: Path):
        summary = json.loads((run_dir / "summary.json").read_text())
        return untimed([summary["zero_shot"], summary["per_round"], summary["selected"], summary["communication"]])

    assert numbers(tmp_path / "cold") == numbers(tmp_path / "warm")
    a, b = checkpoint_tensors(tmp_path / "cold"), checkpoint_tensors(tmp_path / "warm")
    assert all(torch.equal(a[n][k], b[n][k]) for n in a for k in a[n])

    # A kind that runs the text encoder still loads the model, and its numbers are its own business.
    preset.write_text(WARM_PRESET.format(cache=tmp_path / "cache", model=TINY_MODEL, kind="prompt"))
    prompt = probe_run(preset, tmp_path / "prompt")
    assert prompt["status"] == "completed" and prompt["open_clip"] and prompt["rendered"] == 0


@pytest.mark.slow
def test_a_missing_feature_loads_the_model_after_all(tmp_path):
    """The index knows the model, but one image's feature is gone: the stand-in loads CLIP and encodes it."""
    import sqlite3

    from engine import load_preset
    from engine.backbone import CachedBackbone
    from engine.prepare import prepare

    preset_file = tmp_path / "warm.toml"
    preset_file.write_text(WARM_PRESET.format(cache=tmp_path / "cache", model=TINY_MODEL, kind="attai"))
    preset = load_preset(preset_file, ["model.encode_batch_size=1"])
    quiet = lambda level, text: None
    first = prepare(preset, torch.device("cpu"), quiet, lambda: None, needs_images=False)
    (db_file,) = (tmp_path / "cache" / "features").glob("*.sqlite")
    db = sqlite3.connect(db_file)
    db.execute("DELETE FROM features WHERE content_hash = (SELECT content_hash FROM features LIMIT 1)")
    db.commit()
    db.close()
    second = prepare(preset, torch.device("cpu"), quiet, lambda: None, needs_images=False)
    assert isinstance(second.backbone, CachedBackbone) and second.backbone.loaded
    assert second.encoded == 1 and torch.equal(second.features, first.features)
    assert torch.equal(second.text_features, first.text_features)
    third = prepare(preset, torch.device("cpu"), quiet, lambda: None, needs_images=False)
    assert not third.backbone.loaded and third.encoded == 0 and torch.equal(third.features, first.features)


def test_the_model_key_follows_the_weights_file(tmp_path):
    import shutil

    from engine import load_preset
    from engine.backbone import model_key
    from engine.features import ModelIndex

    folder = tmp_path / "model"
    shutil.copytree(TINY_MODEL, folder)
    preset_file = tmp_path / "p.toml"
    preset_file.write_text(WARM_PRESET.format(cache=tmp_path / "cache", model=folder, kind="attai"))
    preset = load_preset(preset_file)
    hashed: list[Path] = []
    with ModelIndex(tmp_path / "cache") as index:
        def sha(path: Path) -> str:
            hashed.append(path)
            return index.file_sha256(path)

        first = model_key(preset, sha)
        weights = folder / "open_clip_model.safetensors"
        data_bytes = bytearray(weights.read_bytes())
        data_bytes[-1] ^= 1
        weights.write_bytes(bytes(data_bytes))
        second = model_key(preset, sha)
    assert first and second and first[0] != second[0] and first[1] != second[1]
    assert hashed == [weights, weights]
    assert model_key(load_preset(preset_file, ["model.pretrained=none"]), sha) is None


@pytest.mark.slow
def test_an_open_clip_tag_is_found_again_by_its_downloaded_file(tmp_path, monkeypatch):
    """A tag's weights come from open_clip's download cache: the index remembers that file, and a warm run keys
    the model by its bytes like any checkpoint file (here a tag registered for the shipped model's file)."""
    import shutil

    import open_clip.pretrained as pretrained

    from engine import load_preset
    from engine.backbone import CachedBackbone
    from engine.prepare import prepare

    weights = tmp_path / "downloads" / "tiny.safetensors"
    weights.parent.mkdir()
    shutil.copyfile(TINY_MODEL / "open_clip_model.safetensors", weights)
    monkeypatch.setitem(pretrained._PRETRAINED, "fedtui-clip-tiny",
                        {"tinytag": pretrained._pcfg(file=str(weights))})
    preset_file = tmp_path / "tag.toml"
    preset_file.write_text(WARM_PRESET.format(cache=tmp_path / "cache", model="X", kind="attai")
                           .replace('pretrained = "local-dir:X"', 'pretrained = "tinytag"'))
    preset = load_preset(preset_file)
    quiet = lambda level, text: None
    cold = prepare(preset, torch.device("cpu"), quiet, lambda: None, needs_images=False)
    warm = prepare(preset, torch.device("cpu"), quiet, lambda: None, needs_images=False)
    assert cold.backbone.loaded and cold.backbone.weights_file == weights.resolve()
    assert isinstance(warm.backbone, CachedBackbone) and not warm.backbone.loaded
    assert warm.backbone.fingerprint == cold.backbone.fingerprint and warm.backbone.weights == "pretrained:tinytag"
    assert torch.equal(warm.features, cold.features) and torch.equal(warm.text_features, cold.text_features)
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")  # other bytes: the model is loaded again
    again = prepare(preset, torch.device("cpu"), quiet, lambda: None, needs_images=False)
    assert again.backbone.loaded


# --- encoding through DataLoader workers ------------------------------------------------------------------------


@pytest.mark.slow
def test_encoding_through_workers_gives_the_inline_features(tmp_path):
    from engine import load_preset
    from engine.backbone import load_backbone
    from engine.data import build_source
    from engine.features import FeatureCache, encode_images

    preset_file = tmp_path / "warm.toml"
    preset_file.write_text(WARM_PRESET.format(cache=tmp_path / "cache", model=TINY_MODEL, kind="attai"))
    preset = load_preset(preset_file)
    backbone = load_backbone(preset, torch.device("cpu"))
    source = build_source(preset)
    refs = [ref for domain in source.domains for ref in source.refs(domain)]
    inline = encode_images(source, refs, backbone, None, 16, workers=0)
    with FeatureCache(tmp_path / "c1", backbone) as cache:
        workers = encode_images(source, refs, backbone, cache, 16, workers=2)
    assert torch.equal(inline.features, workers.features) and workers.hashes == inline.hashes
    assert workers.encoded == len(refs) and workers.cached == 0
    with FeatureCache(tmp_path / "c1", backbone) as cache:
        again = encode_images(source, refs, backbone, cache, 16, workers=2)
    assert again.encoded == 0 and torch.equal(again.features, inline.features)


# --- CUDA ---------------------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@cuda
def test_cuda_encoding_with_workers_pinned_memory_and_autocast(tmp_path):
    from engine import load_preset
    from engine.backbone import load_backbone
    from engine.data import build_source
    from engine.features import FeatureCache, encode_images

    preset_file = tmp_path / "warm.toml"
    preset_file.write_text(WARM_PRESET.format(cache=tmp_path / "cache", model=TINY_MODEL, kind="attai"))
    preset = load_preset(preset_file)
    source = build_source(preset)
    refs = [ref for domain in source.domains for ref in source.refs(domain)]
    on_cpu = encode_images(source, refs, load_backbone(preset, torch.device("cpu")), None, 32)
    gpu = load_backbone(preset, torch.device("cuda"))
    with FeatureCache(tmp_path / "c", gpu) as cache:
        on_gpu = encode_images(source, refs, gpu, cache, 32)  # workers by default on CUDA
    assert on_gpu.encoded == len(refs)
    cosine = torch.nn.functional.cosine_similarity(on_cpu.features, on_gpu.features, dim=1)
    assert float(cosine.min()) > 0.999  # fp16 autocast against float32


@cuda
def test_cuda_batched_training_matches_the_sequential_path():
    device = torch.device("cuda")
    torch.manual_seed(0)
    adapter = build_adapter("attai", context()).to(device)
    train = TrainSection(batch_size=16, lr=1e-2)
    features, labels = data()
    features = features.to(device)
    rows = [np.arange(a, b) for a, b in CLIENT_ROWS]
    start = adapter.trainable_state()
    expected = []
    for k, part in enumerate(rows):
        adapter.load_trainable_state(start)
        optimizer = make_optimizer(adapter, train)
        train_locally(adapter, optimizer, lambda r: features[r], labels, part, train, 2, 100.0,
                      torch.Generator().manual_seed(k))
        expected.append(adapter.trainable_state())
    jobs = [Job(str(k), start, part, 2, torch.Generator().manual_seed(k)) for k, part in enumerate(rows)]
    results = train_cohort(adapter, jobs, lambda r: features[r], labels, train, 100.0,
                           adam_param_groups(train, len(start)))
    for state, result in zip(expected, results):
        for name in state:
            torch.testing.assert_close(result.state[name], state[name], atol=1e-5, rtol=1e-5)


def _adam_case_shapes():
    from hypothesis import strategies as st

    shape = st.lists(st.integers(1, 40), min_size=0, max_size=3).map(tuple)
    return st.lists(shape, min_size=1, max_size=4)


def test_stacked_adam_is_torch_adam_bit_for_bit_on_any_shapes():
    """StackedAdam against ``torch.optim.Adam`` on each row alone: any parameter shapes (so the fused kernel's
    scalar remainder is exercised, which rounds otherwise and is routed around), L2 decay or none, clients
    joining at different steps (a row subset), a stack laid out transposed; every bit of parameters and moments."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from engine.batched import StackedAdam, in_layout

    @settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(shapes=_adam_case_shapes(), clients=st.integers(1, 5), decay=st.sampled_from([0.0, 0.2]),
           seed=st.integers(0, 2**16), transposed=st.booleans(), late=st.integers(0, 4))
    def check(shapes, clients, decay, seed, transposed, late):
        generator = torch.Generator().manual_seed(seed)
        train = TrainSection(lr=3e-3, weight_decay=decay)
        start = {f"p{i}": torch.randn(clients, *shape, generator=generator) for i, shape in enumerate(shapes)}
        names = list(start)
        stacks = {n: (in_layout(t, [0, *reversed(range(1, t.dim()))]) if transposed else t.clone()) for n, t in start.items()}
        optimizer = StackedAdam(stacks, train)
        own = [{n: start[n][k].clone().requires_grad_() for n in names} for k in range(clients)]
        torch_adams = [torch.optim.Adam(list(p.values()), lr=train.lr, betas=tuple(train.betas), eps=train.eps,
                                        weight_decay=decay, foreach=False) for p in own]
        late = min(late, clients - 1)  # rows from ``late`` on start one step later: steps then differ by row
        for step in range(3):
            rows = list(range(clients)) if step else list(range(late)) or list(range(clients))
            grads = {n: torch.randn(len(rows), *start[n].shape[1:], generator=generator) * 0.1 for n in names}
            optimizer.step(rows, grads)
            for position, k in enumerate(rows):
                for n in names:
                    own[k][n].grad = grads[n][position].clone()
                torch_adams[k].step()
        for k in range(clients):
            state = torch_adams[k].state
            for n in names:
                assert torch.equal(optimizer.params[n][k], own[k][n].detach()), (n, k)
                assert torch.equal(optimizer.exp_avg[n][k], state[own[k][n]]["exp_avg"]), (n, k)
                assert torch.equal(optimizer.exp_avg_sq[n][k], state[own[k][n]]["exp_avg_sq"]), (n, k)

    check()


def test_freed_memory_stays_with_the_process_on_glibc():
    """engine/allocator.py: where the C library is glibc the thresholds are raised (once); elsewhere nothing."""
    import platform

    from engine.allocator import keep_freed_memory

    first = keep_freed_memory()
    assert keep_freed_memory() is first
    assert first == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")


def test_finite_rows_names_the_clients_with_inf_or_nan_and_not_those_whose_sum_merely_overflows():
    from engine.batched import _finite_rows

    stacks = {"w": torch.zeros(4, 3, 5).transpose(1, 2), "b": torch.zeros(4, 3)}
    assert _finite_rows(stacks, 4) == [True] * 4
    stacks["w"][2, 1, 1] = float("inf")
    stacks["b"][0, 2] = float("nan")
    assert _finite_rows(stacks, 4) == [False, True, False, True]
    huge = {"w": torch.full((3, 8), 3e38)}  # every entry finite, the sum overflows
    assert _finite_rows(huge, 3) == [True] * 3
