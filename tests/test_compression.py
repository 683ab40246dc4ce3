"""Codecs: real payload bytes, hand-computed reconstructions, error bounds, and top-k's error feedback."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.compression import CODECS, build_codec, deserialize, serialize
from engine.options.codecs import CODECS as CODEC_OPTIONS
from engine.presets import preset_from_dict


def codec(name: str, **knobs):
    """A codec with the given keys where it has them (only topk has any)."""
    options_cls = CODEC_OPTIONS.options_for(name)
    own = {f.name for f in dataclasses.fields(options_cls)}
    return build_codec(name, options_cls(**{k: v for k, v in knobs.items() if k in own}))


def big_delta(numel: int = 100_000, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"layer.weight": torch.randn(numel, generator=generator) * 1e-3}


def test_every_codec_is_registered_and_selectable_in_a_preset():
    assert {"none", "fp16", "int8", "topk"} <= set(CODECS)
    for name in ("none", "fp16", "int8", "topk"):
        preset = preset_from_dict({"federation": {"compression": name}})
        assert build_codec(name, preset.federation.compression_options).name == name


@pytest.mark.parametrize("name", ["none", "fp16", "int8", "topk"])
def test_byte_count_is_the_length_of_the_payload_the_server_decodes(name):
    delta = {"a.weight": torch.randn(7, 5), "a.bias": torch.randn(5)}
    sender, twin = codec(name, topk_fraction=0.2), codec(name, topk_fraction=0.2)
    reconstructed, nbytes = sender.roundtrip("client", delta)
    payload = twin.encode("client", delta)  # a fresh twin: top-k's first round has no residual either
    assert nbytes == len(payload)
    decoded = codec(name).decode(payload, delta)  # the server: a separate object, only bytes and shapes
    for key in delta:
        assert decoded[key].shape == delta[key].shape and decoded[key].dtype == delta[key].dtype
        assert torch.equal(decoded[key], reconstructed[key])


def test_none_is_lossless_and_costs_four_bytes_per_entry_plus_header():
    delta = big_delta()
    reconstructed, nbytes = codec("none").roundtrip("c", delta)
    assert torch.equal(reconstructed["layer.weight"], delta["layer.weight"])
    assert nbytes == len(serialize(delta))
    assert 400_000 < nbytes < 400_000 + 200  # 100,000 float32 + a short JSON header


def test_fp16_halves_the_bytes_within_half_precision_rounding():
    delta = big_delta()
    dense = codec("none").roundtrip("c", delta)[1]
    reconstructed, nbytes = codec("fp16").roundtrip("c", delta)
    assert nbytes / dense == pytest.approx(0.5, abs=0.001)
    x, x_hat = delta["layer.weight"], reconstructed["layer.weight"]
    # relative rounding error <= 2^-11 for normal fp16 numbers (|x| >= 2^-14); 1e-3-scale values are normal
    normal = x.abs() >= 2**-14
    assert ((x - x_hat).abs()[normal] <= x.abs()[normal] * 2**-11).all()


def test_int8_payload_is_hand_computable():
    # x = [-1.27, 0, 1.27]: range [-1.27, 1.27], s = 2.54 / 254 = 0.01, z = round(-127 + 127) = 0,
    # q = round(x / 0.01) = [-127, 0, 127]
    payload = codec("int8").encode("c", {"w": torch.tensor([-1.27, 0.0, 1.27])})
    parts = deserialize(payload)
    assert parts["w#q"].dtype == torch.int8 and parts["w#q"].tolist() == [-127, 0, 127]
    assert parts["w#scale"].item() == pytest.approx(0.01, rel=1e-6)
    assert parts["w#zero_point"].item() == 0
    # x = [0.5, 1.0]: the range includes 0 -> [0, 1], s = 1/254, z = round(-127 - 0) = -127,
    # q = round([127, 254]) - 127 = [0, 127];  x_hat = (q + 127) / 254 = [0.5, 1.0] exactly
    delta = {"w": torch.tensor([0.5, 1.0])}
    parts = deserialize(codec("int8").encode("c", delta))
    assert parts["w#q"].tolist() == [0, 127] and parts["w#zero_point"].item() == -127
    assert codec("int8").roundtrip("c", delta)[0]["w"].tolist() == pytest.approx([0.5, 1.0], rel=1e-6)


def test_int8_error_is_at_most_half_a_step_and_costs_a_quarter_of_float32():
    delta = {"shifted": torch.randn(100_000) * 0.02 + 0.005, "tiny": torch.tensor([3e-7, -1e-7, 0.0])}
    int8 = codec("int8")
    payload = int8.encode("c", delta)
    reconstructed = int8.decode(payload, delta)
    parts = deserialize(payload)
    for key, x in delta.items():
        scale = parts[f"{key}#scale"].item()
        error = (x - reconstructed[key]).abs().max().item()
        # |x - x_hat| <= s / 2; the slack is float32's own rounding of x_hat
        assert error <= scale / 2 + 1e-7 * x.abs().max().item(), (key, error, scale)
    dense = len(serialize(delta))
    assert len(payload) / dense == pytest.approx(0.25, abs=0.005)


def test_int8_reproduces_zeros_and_rejects_non_finite_updates():
    zeros = {"w": torch.zeros(4, 3)}
    assert torch.equal(codec("int8").roundtrip("c", zeros)[0]["w"], zeros["w"])
    with pytest.raises(ValueError, match="inf or nan"):
        codec("int8").encode("c", {"w": torch.tensor([1.0, float("inf")])})


def test_topk_keeps_the_largest_magnitudes_and_feeds_the_rest_back():
    topk = codec("topk", topk_fraction=0.5)
    # k = ceil(0.5 * 4) = 2: |-0.5| and |0.3| are the largest
    sent, nbytes = topk.roundtrip("c", {"w": torch.tensor([0.1, -0.5, 0.3, 0.05])})
    assert torch.allclose(sent["w"], torch.tensor([0.0, -0.5, 0.3, 0.0]))
    assert torch.allclose(topk.residuals["c"]["w"], torch.tensor([0.1, 0.0, 0.0, 0.05]))
    # next round: c = [0.1, 0, 0, 0.1] + [0.1, 0, 0, 0.05] = [0.2, 0, 0, 0.15] -> both kept, residual 0
    sent, _ = topk.roundtrip("c", {"w": torch.tensor([0.1, 0.0, 0.0, 0.1])})
    assert torch.allclose(sent["w"], torch.tensor([0.2, 0.0, 0.0, 0.15]))
    assert torch.equal(topk.residuals["c"]["w"], torch.zeros(4))
    # residuals are per client: a new client starts from zero
    sent, _ = topk.roundtrip("other", {"w": torch.tensor([0.1, 0.0, 0.0, 0.1])})
    assert torch.allclose(sent["w"], torch.tensor([0.1, 0.0, 0.0, 0.1]))


def test_topk_payload_is_int32_indices_and_values():
    payload = codec("topk", topk_fraction=0.3).encode("c", {"w": torch.tensor([[1.0, -4.0, 2.0], [0.0, 3.0, 0.5]])})
    parts = deserialize(payload)
    # k = ceil(0.3 * 6) = ceil(1.8) = 2: entries -4 (flat index 1) and 3 (flat index 4)
    assert parts["w#indices"].dtype == torch.int32
    assert sorted(zip(parts["w#indices"].tolist(), parts["w#values"].tolist())) == [(1, -4.0), (4, 3.0)]


def test_topk_sends_at_least_one_entry_and_costs_eight_bytes_per_kept_entry():
    topk = codec("topk", topk_fraction=1e-6)
    assert topk.kept_count(10) == 1 and topk.kept_count(0) == 0
    assert codec("topk", topk_fraction=0.1).kept_count(30) == 3  # 0.1 * 30 = 3.0000000000000004 in floats
    delta = big_delta()
    _, nbytes = codec("topk", topk_fraction=0.01).roundtrip("c", delta)
    dense = len(serialize(delta))
    # 1,000 kept entries * (4-byte index + 4-byte value) = 8,000 bytes + header, vs 400,000
    assert 8_000 < nbytes < 8_300
    assert nbytes / dense == pytest.approx(0.02, abs=0.001)


def distributed_gradient_descent(error_feedback: bool, rounds: int = 300) -> float:
    """Three clients with f_k(x) = |x - b_k|^2 / 2 (optimum: mean b_k) each send a top-1-of-4 compressed step
    -lr_t (x - b_k); the server adds the mean. Returns the final distance to the optimum."""
    targets = torch.tensor([[4.0, 1.0, -2.0, 0.5], [-2.0, 3.0, 1.0, -1.5], [1.0, -1.0, 4.0, 2.5]], dtype=torch.float64)
    optimum = targets.mean(dim=0)  # [1, 1, 1, 0.5]
    topk = codec("topk", topk_fraction=0.25, topk_error_feedback=error_feedback)
    x = torch.zeros(4, dtype=torch.float64)
    for t in range(rounds):
        lr = 2.0 / (t + 4)  # decaying step: the residuals shrink with it, so error feedback can settle
        sent = [topk.roundtrip(f"c{k}", {"x": -lr * (x - b)})[0]["x"] for k, b in enumerate(targets)]
        x = x + torch.stack(sent).mean(dim=0)
    return (x - optimum).norm().item()


def test_topk_with_error_feedback_reaches_the_optimum_where_plain_topk_stalls():
    # At the optimum the clients' gradients cancel only in full: each client's top-1 entry does not,
    # so plain top-k has a biased fixed point; error feedback sends the dropped parts later.
    assert distributed_gradient_descent(error_feedback=False) > 1.0
    assert distributed_gradient_descent(error_feedback=True) < 0.05
