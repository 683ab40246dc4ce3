"""Houlsby adapters, prefix-tuning, random-subspace training and the two-site crop experiment (issue #14).

Counts are hand-computed for tests/tiny_clip.py's model: image and text width 64, 2 blocks each, 1 head.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.adapters import build_adapter
from engine.adapters.base import ADAPTERS
from engine.adapters.lora import RecomputedAttention
from engine.adapters.prefix import PrefixAttention
from engine.adapters.subspace import FastfoodProjection, SubspaceAdapter, fwht
from engine.compression import serialize, serialized_nbytes
from engine.options.adapters import ADAPTER_KINDS, HoulsbyOptions, PrefixOptions, PromptOptions
from engine.presets import PresetError, preset_from_dict
from engine.resolve import resolve
from engine.strategies.base import weighted_mean
from tiny_clip import TEMPLATE_TOKENS, tiny_context, tiny_dataset_with_features, zero_shot_logits

REPO = Path(__file__).resolve().parents[1]
TINY_CLIP = REPO / "engine" / "assets" / "fedtui-clip-tiny"
WIDTH, LAYERS = 64, 2  # tiny_clip: both towers


@pytest.fixture(scope="module")
def context():
    return tiny_context()


@pytest.fixture(scope="module")
def data(context):
    return tiny_dataset_with_features(context)


def inputs_for(adapter, data):
    return data[0] if adapter.needs_images else data[1]


def logits_of(adapter, data, context):
    with torch.no_grad():
        return adapter(inputs_for(adapter, data)).logits(context.logit_scale)


def options(kind: str, **keys):
    base = ADAPTER_KINDS.options_for(kind)()
    if kind == "prompt":
        base = dataclasses.replace(base, prompt_length=TEMPLATE_TOKENS)  # CoOp's exact zero-shot start
    return dataclasses.replace(base, **keys)


def randomise(adapter, scale: float = 0.05, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=generator))


def train_steps(adapter, data, context, steps=5, lr=1e-2, penalty=None):
    adapter.train()
    optimizer = torch.optim.Adam([p for p in adapter.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(adapter(inputs_for(adapter, data)).logits(context.logit_scale), data[2])
        total = loss if penalty is None else loss + penalty()
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        losses.append(loss.item())
    adapter.eval()
    return losses


def test_both_registries_know_the_new_kinds():
    assert {"houlsby", "prefix", "prefix_image"} <= set(ADAPTERS) and set(ADAPTERS) == set(ADAPTER_KINDS.names())
    assert ADAPTERS["houlsby"].needs_images and ADAPTERS["prefix_image"].needs_images
    assert not ADAPTERS["prefix"].needs_images
    # subspace_dim is a key of every kind, off by default
    assert all(ADAPTER_KINDS.options_for(k)().subspace_dim == 0 for k in ADAPTER_KINDS.names())
    assert HoulsbyOptions().houlsby_towers == ["image"] and HoulsbyOptions().houlsby_layers == []


# -- houlsby ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("towers", [["image"], ["image", "text"], ["text"]])
def test_houlsby_starts_exactly_at_zero_shot(towers, context, data):
    adapter = build_adapter("houlsby", context, HoulsbyOptions(houlsby_towers=towers)).eval()
    expected = zero_shot_logits(context, data[0])
    if towers == ["image"]:  # the text side is the frozen features themselves: bit for bit
        assert torch.equal(logits_of(adapter, data, context), expected)
    else:  # the text tower runs again, cut after the last EOT (as prompt does): float rounding only
        torch.testing.assert_close(logits_of(adapter, data, context), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "keys, expected",
    [
        # per block: two adapters of w -> m -> w with biases, m = w // reduction: 2 (2 w m + m + w)
        ({}, LAYERS * 2 * (2 * WIDTH * 4 + 4 + WIDTH)),  # reduction 16: m = 4 -> 2,320
        ({"houlsby_reduction": 8}, LAYERS * 2 * (2 * WIDTH * 8 + 8 + WIDTH)),  # m = 8 -> 4,384
        ({"houlsby_layers": [-1]}, 2 * (2 * WIDTH * 4 + 4 + WIDTH)),  # the last block only -> 1,160
        ({"houlsby_towers": ["image", "text"]}, 2 * LAYERS * 2 * (2 * WIDTH * 4 + 4 + WIDTH)),  # 4,640
        ({"houlsby_reduction": 4096}, LAYERS * 2 * (2 * WIDTH * 1 + 1 + WIDTH)),  # at least one unit -> 772
    ],
)
def test_houlsby_parameter_counts(keys, expected, context):
    adapter = build_adapter("houlsby", context, HoulsbyOptions(**keys))
    assert adapter.trainable_parameters() == expected
    state = adapter.trainable_state()
    assert all(".adapter." in name for name in state)  # only the bottlenecks: the frozen towers never leave
    assert sum(v.numel() for v in state.values()) == expected


def test_houlsby_rejects_blocks_that_do_not_exist(context):
    with pytest.raises(ValueError, match=r"houlsby_layers: block 2 does not exist in a tower of 2 blocks"):
        build_adapter("houlsby", context, HoulsbyOptions(houlsby_layers=[2]))
    with pytest.raises(ValueError, match="named twice"):
        build_adapter("houlsby", context, HoulsbyOptions(houlsby_layers=[1, -1]))


def test_houlsby_eval_equals_training_time_forward_and_never_touches_clip(context, data):
    before = {n: p.clone() for n, p in context.clip_model.named_parameters()}
    adapter = build_adapter("houlsby", context, HoulsbyOptions(houlsby_towers=["image", "text"]))
    randomise(adapter)
    adapter.train()
    with torch.no_grad():
        training = adapter(data[0]).logits(context.logit_scale)  # text tower recomputed
    adapter.eval()
    first = logits_of(adapter, data, context)  # cached class features
    assert not torch.allclose(first, zero_shot_logits(context, data[0]), atol=1e-3)  # the adapters act
    torch.testing.assert_close(first, training, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits_of(adapter, data, context), first, atol=0, rtol=0)
    adapter.load_trainable_state({k: torch.zeros_like(v) if ".up." in k else v for k, v in adapter.trainable_state().items()})
    torch.testing.assert_close(logits_of(adapter, data, context), zero_shot_logits(context, data[0]), atol=1e-5, rtol=0)
    for name, value in context.clip_model.named_parameters():
        assert torch.equal(value, before[name]), name


def test_houlsby_learns(context, data):
    adapter = build_adapter("houlsby", context, HoulsbyOptions(houlsby_towers=["image", "text"]))
    losses = train_steps(adapter, data, context, steps=6)
    assert losses[-1] < losses[0] - 1e-3, losses


# -- prefix-tuning ---------------------------------------------------------------------------------------------


def test_prefix_parameter_counts(context):
    prefix = build_adapter("prefix", context, PrefixOptions(prefix_length=8))
    # sent: layers x {K, V} x P x w
    assert prefix.trainable_parameters() == LAYERS * 2 * 8 * WIDTH == 2048
    assert {k: tuple(v.shape) for k, v in prefix.trainable_state().items()} == {
        "prefix_key": (LAYERS, 8, WIDTH), "prefix_value": (LAYERS, 8, WIDTH)}
    # trained besides during a round: E (P x w), Linear(w, w), Linear(w, layers x 2 x w)
    assert prefix.reparameterisation_parameters() == 8 * WIDTH + (WIDTH * WIDTH + WIDTH) + (
        WIDTH * LAYERS * 2 * WIDTH + LAYERS * 2 * WIDTH) == 21312
    one = build_adapter("prefix_image", context, PrefixOptions(prefix_length=3, prefix_layers=[0]))
    assert one.trainable_parameters() == 1 * 2 * 3 * WIDTH


def test_prefix_differs_from_coop(context, data):
    """CoOp prepends M word embeddings at the input, which the encoder then processes; prefix-tuning adds P keys
    and values inside every layer. Different shapes; CoOp (init from the template's words) starts exactly at
    zero-shot, prefix-tuning cannot (next test), though its predictions at the start agree here."""
    coop = build_adapter("prompt", context, PromptOptions(prompt_length=TEMPLATE_TOKENS)).eval()
    prefix = build_adapter("prefix", context, PrefixOptions(prefix_length=TEMPLATE_TOKENS)).eval()
    assert {k: tuple(v.shape) for k, v in coop.trainable_state().items()} == {"context_vectors": (TEMPLATE_TOKENS, WIDTH)}
    assert {k: tuple(v.shape) for k, v in prefix.trainable_state().items()} == {
        "prefix_key": (LAYERS, TEMPLATE_TOKENS, WIDTH), "prefix_value": (LAYERS, TEMPLATE_TOKENS, WIDTH)}
    zero_shot = zero_shot_logits(context, data[0])
    torch.testing.assert_close(logits_of(coop, data, context), zero_shot, atol=1e-5, rtol=0)
    start = logits_of(prefix, data, context)
    assert not torch.allclose(start, zero_shot, atol=1e-3)
    assert torch.equal(start.argmax(1), zero_shot.argmax(1))


@pytest.mark.parametrize("causal", [False, True])
def test_prefix_start_is_zero_shot_damped_by_the_softmax_share(causal):
    """With K = V = 0 every query gives each of the P prefix slots the logit 0, so the real tokens keep
    1 - lambda of the attention, lambda = P / (P + sum_j exp(q k_j / sqrt(d))) (He et al. 2022, eq. 7); the
    output is exactly (1 - lambda) times plain attention: why no finite prefix starts at zero-shot."""
    torch.manual_seed(0)
    width, heads, length, prefix = 16, 2, 5, 3
    mha = nn.MultiheadAttention(width, heads, batch_first=True).eval()
    owner = type("Owner", (), {})()
    keys = torch.zeros(1, prefix, width)
    owner.current_prefixes = lambda: (keys, keys)
    layer = PrefixAttention(mha, owner, 0)
    x = torch.randn(2, length, width)
    mask = torch.full((length, length), float("-inf")).triu(1) if causal else None
    with torch.no_grad():
        plain = mha(x, x, x, need_weights=False, attn_mask=mask)[0]
        recomputed = RecomputedAttention(mha)(x, x, x, attn_mask=mask)[0]
        out = layer(x, x, x, attn_mask=mask)[0]
        q = F.linear(x, *layer.base_weight("q")).reshape(2, length, heads, width // heads).transpose(1, 2)
        k = F.linear(x, *layer.base_weight("k")).reshape(2, length, heads, width // heads).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(width // heads)
        if mask is not None:
            scores = scores + mask
        share = (1 - prefix / (prefix + scores.exp().sum(-1))).unsqueeze(-1)  # [N, h, L, 1]
        v = F.linear(x, *layer.base_weight("v")).reshape(2, length, heads, width // heads).transpose(1, 2)
        attended = (scores.softmax(-1) @ v) * share
        expected = F.linear(attended.transpose(1, 2).reshape(2, length, width), *layer.base_weight("o"))
    torch.testing.assert_close(recomputed, plain, atol=1e-6, rtol=0)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    assert not torch.allclose(out, plain, atol=1e-3)


@pytest.mark.parametrize("kind", ["prefix", "prefix_image"])
def test_prefix_collapsed_evaluation_equals_training_time_forward(kind, context, data):
    adapter = build_adapter(kind, context, PrefixOptions(prefix_length=4))
    start = adapter.trainable_state()
    losses = train_steps(adapter, data, context, steps=6, lr=1e-2)
    assert losses[-1] < losses[0] - 1e-3, losses
    assert all(torch.equal(adapter.trainable_state()[k] * 0, start[k] * 0) for k in start)
    adapter.train()  # the reparameterised path: anchor + MLP(E)
    with torch.no_grad():
        training = adapter(inputs_for(adapter, data)).logits(context.logit_scale)
    sent = adapter.trainable_state()  # collapsed: what leaves the client
    assert set(sent) == {"prefix_key", "prefix_value"}
    assert not torch.equal(sent["prefix_key"], start["prefix_key"])  # the MLP moved the prefixes
    fresh = build_adapter(kind, context, PrefixOptions(prefix_length=4))  # a server: plain prefixes only
    fresh.load_trainable_state(sent)
    fresh.eval()
    assert fresh.collapsed and fresh.reparam.out.weight.abs().sum() == 0
    torch.testing.assert_close(logits_of(fresh, data, context), training, atol=1e-5, rtol=0)
    adapter.load_trainable_state(sent)  # a client loading the aggregate starts exactly from it
    adapter.train()
    with torch.no_grad():
        torch.testing.assert_close(adapter(inputs_for(adapter, data)).logits(context.logit_scale), training,
                                   atol=1e-5, rtol=0)


def test_prefix_refuses_a_penalty_on_the_sent_prefixes(context, data):
    adapter = build_adapter("prefix", context, PrefixOptions(prefix_length=2))
    anchor = adapter.prefix_key.detach().clone()
    with pytest.raises(RuntimeError, match="fedprox"):
        train_steps(adapter, data, context, steps=2, penalty=lambda: ((adapter.prefix_key - anchor) ** 2).sum())


# -- random-subspace training ---------------------------------------------------------------------------------

ALL_KINDS = sorted(ADAPTER_KINDS.names())


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_subspace_at_z_zero_is_the_wrapped_kind_exactly(kind, context, data):
    torch.manual_seed(11)
    plain = build_adapter(kind, context, options(kind)).eval()
    torch.manual_seed(11)
    wrapped = build_adapter(kind, context, options(kind, subspace_dim=8)).eval()
    assert isinstance(wrapped, SubspaceAdapter) and wrapped.kind == kind
    assert wrapped.needs_images == plain.needs_images
    assert list(wrapped.trainable_state()) == ["z"] and wrapped.trainable_parameters() == 8
    theta = wrapped.theta()
    for name, value in plain.trainable_state().items():
        assert torch.equal(theta[name], value), name
    assert torch.equal(logits_of(wrapped, data, context), logits_of(plain, data, context))


@pytest.mark.parametrize("kind", ["lora", "houlsby", "prefix", "prompt", "clip_adapter"])
def test_subspace_trains_z_only_and_eval_matches_training(kind, context, data):
    no_dropout = {"lora_dropout": 0.0} if kind == "lora" else {}  # training == eval, up to merging
    wrapped = build_adapter(kind, context, options(kind, subspace_dim=16, **no_dropout), seed=4)
    frozen = {n: p.clone() for n, p in wrapped.inner.named_parameters()}
    losses = train_steps(wrapped, data, context, steps=4, lr=0.1)
    assert losses[-1] < losses[0], losses
    assert wrapped.z.abs().sum() > 0
    wrapped.train()
    with torch.no_grad():
        training = wrapped(inputs_for(wrapped, data)).logits(context.logit_scale)
        for name, value in wrapped.inner.named_parameters():  # training substitutes, never writes
            assert torch.equal(value, frozen[name]), name
    wrapped.eval()  # writes theta_0 + P z into the wrapped kind (lora: re-merged)
    torch.testing.assert_close(logits_of(wrapped, data, context), training, atol=1e-5, rtol=0)


def test_aggregating_z_aggregates_theta():
    projection = FastfoodProjection(total=1000, dim=12, seed=9)
    zs = [torch.randn(12, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    mean_z = weighted_mean([{"z": z} for z in zs], [1, 2, 3])["z"]
    mean_theta = weighted_mean([{"t": projection(z)} for z in zs], [1, 2, 3])["t"]
    torch.testing.assert_close(projection(mean_z), mean_theta, atol=1e-5, rtol=0)


def test_fastfood_is_a_linear_map_with_unit_columns():
    x = torch.randn(3, 8)
    hadamard = torch.tensor([[1.0]])
    for _ in range(3):
        hadamard = torch.cat([torch.cat([hadamard, hadamard], 1), torch.cat([hadamard, -hadamard], 1)], 0)
    torch.testing.assert_close(fwht(x), x @ hadamard.t())
    projection = FastfoodProjection(total=3000, dim=20, seed=1)
    matrix = projection.matrix()
    assert matrix.shape == (3000, 20)
    z = torch.randn(20)
    torch.testing.assert_close(projection(z), matrix @ z, atol=1e-5, rtol=1e-5)
    norms = matrix.norm(dim=0)
    assert float((norms - 1).abs().max()) < 0.2, norms  # about unit length (exact in expectation)
    assert projection.signs.numel() == 4096  # O(D) memory: three vectors of the next power of two


PROJECTION_SCRIPT = """
import hashlib, torch
from engine.adapters.subspace import FastfoodProjection
torch.manual_seed(12345)  # a different global stream must not matter
p = FastfoodProjection(total=5000, dim=32, seed={seed})
z = torch.arange(32, dtype=torch.float32) / 7
print(hashlib.sha256(p(z).numpy().tobytes()).hexdigest())
"""


def test_the_projection_is_the_same_in_every_process():
    def in_subprocess(seed: int) -> str:
        out = subprocess.run([sys.executable, "-c", PROJECTION_SCRIPT.format(seed=seed)], cwd=REPO,
                             capture_output=True, text=True, check=True)
        return out.stdout.strip()

    first, second, other = in_subprocess(7), in_subprocess(7), in_subprocess(8)
    assert first == second and first != other
    import hashlib

    here = FastfoodProjection(total=5000, dim=32, seed=7)(torch.arange(32, dtype=torch.float32) / 7)
    assert hashlib.sha256(here.numpy().tobytes()).hexdigest() == first


def safetensors_bytes(count: int, name: str = "z") -> int:
    """d float32 numbers plus safetensors' 8-byte length and its JSON header (padded to 8 bytes)."""
    payload = serialize({name: torch.zeros(count)})
    (header,) = struct.unpack("<Q", payload[:8])
    assert json.loads(payload[8 : 8 + header])[name]["data_offsets"] == [0, 4 * count]
    return 8 + header + 4 * count


# -- through the real engine on the offline world ---------------------------------------------------------------


def write_preset(tmp_path: Path, cache: Path, body: str) -> Path:
    path = tmp_path / "preset.toml"
    path.write_text(
        f'[run]\nname = "t"\nseed = 0\nout_dir = "{tmp_path / "runs"}"\ncache_dir = "{cache}"\n'
        f'[model]\narch = "fedtui-clip-tiny"\npretrained = "local-dir:{TINY_CLIP}"\n' + body
    )
    return path


def run_preset(path: Path, *overrides: str):
    from engine import events as ev
    from engine.presets import load_preset
    from engine.runner import run

    events = []
    result = run(load_preset(path, list(overrides)), sink=events.append)
    assert result.status == "completed", result.summary.get("error")
    return result, events


def test_subspace_uploads_d_floats_in_a_real_run(tmp_path, feature_cache):
    from engine import events as ev

    body = ('[data]\ndataset = "synthetic"\nimages_per_class = 6\nholdout = ["art_painting"]\n'
            '[adapter]\nkind = "clip_adapter"\n[train]\nbatch_size = 8\nlr = 1e-2\n')
    path = write_preset(tmp_path, feature_cache, body)
    full, full_events = run_preset(path, "run.rounds=2", "run.name=full")
    sub, sub_events = run_preset(path, "run.rounds=2", "run.name=sub", "adapter.subspace_dim=64")
    up = [e.bytes_up for e in sub_events if isinstance(e, ev.ClientFinished)]
    assert up and all(b == safetensors_bytes(64) == 8 + 64 + 4 * 64 for b in up)  # 328 bytes a client a round
    full_up = [e.bytes_up for e in full_events if isinstance(e, ev.ClientFinished)]
    d = 128  # the shipped CLIP's embedding width; clip_adapter: 2 d^2 / 4
    assert all(b > 4 * 2 * d * d // 4 for b in full_up) and full_up[0] / up[0] > 90
    (started,) = [e for e in sub_events if isinstance(e, ev.RunStarted)]
    assert started.trainable_parameters == 64
    assert sub.summary["zero_shot"]["mean_test"] == full.summary["zero_shot"]["mean_test"]


@pytest.mark.parametrize("kind", ["houlsby", "prefix"])
def test_a_few_rounds_on_the_offline_world_fit_the_sketch_domain(kind, tmp_path, feature_cache):
    """The shipped CLIP never saw sketches: a few rounds on photo + sketch lower the sketch client's loss and
    raise the number of its sketches (train, val and test) classified right above zero-shot."""
    body = ('[data]\ndataset = "synthetic"\nimages_per_class = 8\ndomains = ["photo", "sketch"]\n'
            f'[adapter]\nkind = "{kind}"\n'
            '[train]\nbatch_size = 16\nlr = 5e-3\nweight_decay = 0.0\nloss = "ce"\nlocal_epochs = 2\n')
    result, events = run_preset(write_preset(tmp_path, feature_cache, body), "run.rounds=3")
    from engine import events as ev

    losses = [e.mean_loss for e in events if isinstance(e, ev.ClientFinished) and e.client == "sketch"]
    assert losses[-1] < losses[0], losses
    summary = result.summary
    zero, final = summary["zero_shot"]["clients"]["sketch"], summary["final"]["clients"]["sketch"]
    split = dict(zip(("train", "val", "test"), (33, 11, 11)))  # 56 sketches: int(0.6 n), int(0.2 n), int(0.2 n)
    correct = {name: sum(round(acc[part] * n) for part, n in split.items()) for name, acc in (("zero", zero), ("final", final))}
    assert correct["final"] > correct["zero"], (zero, final)  # of the 55 sketches the run splits
    if kind == "houlsby":
        logs = " ".join(e.text for e in events if isinstance(e, ev.Log))
        assert "runs the image encoder in the training loop" in logs


# -- the two-site crop experiment --------------------------------------------------------------------------------


def test_crop_domains_are_opt_in_and_mix90_is_ninety_ten():
    from engine import synthetic

    assert synthetic.DOMAINS == ("art_painting", "cartoon", "photo", "sketch")
    frames = [synthetic.framing("photo_mix90", i) for i in range(40)]
    assert frames.count("loose") == 4 and frames.count("tight") == 36
    tight = synthetic.attributes("photo_tight", "star", 0, 0)
    loose = synthetic.attributes("photo_loose", "star", 0, 0)
    assert tight.scale >= 1.0 and loose.scale < 0.35
    # the four styles draw from the same streams as before the crop domains existed
    assert synthetic.ALL_DOMAINS[:4] == synthetic.DOMAINS
    preset = preset_from_dict({"data": {"domains": ["photo_tight"]}, "model": {"arch": "fedtui-clip-tiny",
                                                                               "pretrained": "none"}})
    assert resolve(preset) is preset
    with pytest.raises(PresetError, match="unknown domain 'photo_loose'"):
        resolve(preset_from_dict({"data": {"holdout": ["photo_loose"]},
                                  "model": {"arch": "fedtui-clip-tiny", "pretrained": "none"}}))


def test_eval_domain_is_checked():
    model = {"arch": "fedtui-clip-tiny", "pretrained": "none"}
    with pytest.raises(PresetError, match=r"\[data.eval_domain\] 'photo_mix90' is not among the domains"):
        resolve(preset_from_dict({"data": {"domains": ["photo_tight"], "eval_domain": "photo_mix90"}, "model": model}))
    with pytest.raises(PresetError, match=r"\[data.eval_domain\] 'photo' is also held out"):
        resolve(preset_from_dict({"data": {"holdout": ["photo"], "eval_domain": "photo"}, "model": model}))


def test_eval_domain_is_every_clients_val_and_test():
    from engine.data import make_clients

    preset = preset_from_dict({"data": {"domains": ["a", "b", "m"], "eval_domain": "m"}})
    row_domains = np.array(["a"] * 50 + ["b"] * 50 + ["m"] * 40)
    labels = np.arange(140) % 7
    clients = make_clients(preset, ["a", "b", "m"], row_domains, labels)
    assert [c.name for c in clients] == ["a", "b"]
    mix = set(np.flatnonzero(row_domains == "m"))
    for c in clients:
        assert len(c.val) == len(c.test) == 20 and set(c.val) | set(c.test) == mix and not set(c.val) & set(c.test)
        assert not set(c.train) & mix and len(c.train) == 30
    assert np.array_equal(clients[0].val, clients[1].val)


def test_two_site_preset_runs_end_to_end(tmp_path, feature_cache):
    out = subprocess.run(
        [sys.executable, "-m", "fedtui", "run", str(REPO / "presets" / "two-site-crop.toml"), "--set", "run.rounds=2",
         "--set", f"run.out_dir={tmp_path}", "--set", f"run.cache_dir={feature_cache}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    (summary_path,) = tmp_path.glob("*-two-site-crop/summary.json")
    summary = json.loads(summary_path.read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    assert set(summary["final"]["clients"]) == {"photo_tight", "photo_loose"}


def test_two_site_sweep_prints_its_table(tmp_path, feature_cache):
    out = subprocess.run(
        [sys.executable, "-m", "fedtui", "sweep", str(REPO / "presets" / "two-site-crop.toml"),
         "--vary", "federation.aggregation=fedavg,one_shot,local,centralised", "--vary", "train.local_epochs=1,5",
         "--set", "run.rounds=2", "--set", f"run.out_dir={tmp_path}", "--set", f"run.cache_dir={feature_cache}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for setting in ("aggregation=fedavg", "aggregation=one_shot", "aggregation=local", "aggregation=centralis"):
        assert setting in out.stdout
    (table,) = tmp_path.glob("*-sweep-two-site-crop/sweep.jsonl")
    rows = [json.loads(line) for line in table.read_text().splitlines()]
    assert len(rows) == 8 and all(r["status"] == "completed" for r in rows)
