"""WiSE-FT interpolation between an adapter's zero-shot start and its trained state."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from engine.adapters import build_adapter
from engine.options.adapters import PromptOptions
from engine.wise import interpolate, interpolation_path
from tiny_clip import TEMPLATE_TOKENS, tiny_context, tiny_dataset, zero_shot_logits


@pytest.fixture(scope="module")
def setup():
    context = tiny_context()
    images, labels = tiny_dataset()
    with torch.no_grad():
        features = context.clip_model.encode_image(images)
    return context, images, features, labels


def train(adapter, inputs, labels, scale, steps=6):
    adapter.train()
    optimizer = torch.optim.Adam([p for p in adapter.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(adapter(inputs).logits(scale), labels).backward()
        optimizer.step()
    return adapter.eval()


def logits(adapter, inputs, scale):
    with torch.no_grad():
        return adapter(inputs).logits(scale)


def test_interpolate_is_exact_at_both_ends():
    generator = torch.Generator().manual_seed(0)
    theta_0 = {"w": torch.randn(5, 3, generator=generator), "b": torch.randn(3, generator=generator)}
    theta_1 = {"w": torch.randn(5, 3, generator=generator), "b": torch.randn(3, generator=generator)}
    for name in theta_0:
        assert torch.equal(interpolate(theta_0, theta_1, 0.0)[name], theta_0[name])
        assert torch.equal(interpolate(theta_0, theta_1, 1.0)[name], theta_1[name])
    half = interpolate(theta_0, theta_1, 0.25)
    torch.testing.assert_close(half["w"], 0.75 * theta_0["w"] + 0.25 * theta_1["w"])
    assert [a for a, _ in interpolation_path(theta_0, theta_1, [0, 0.5, 1])] == [0.0, 0.5, 1.0]


def test_interpolate_rejects_mismatched_states():
    with pytest.raises(KeyError):
        interpolate({"a": torch.zeros(2)}, {"b": torch.zeros(2)}, 0.5)
    with pytest.raises(ValueError):
        interpolate({"a": torch.zeros(2)}, {"a": torch.zeros(3)}, 0.5)


@pytest.mark.parametrize("kind", ["clip_adapter", "both", "linear_head", "lora", "prompt"])
def test_wise_ends_are_zero_shot_and_trained(kind, setup):
    context, images, features, labels = setup
    adapter = build_adapter(kind, context, PromptOptions(prompt_length=TEMPLATE_TOKENS) if kind == "prompt" else None)
    inputs = images if adapter.needs_images else features
    theta_0 = adapter.trainable_state()  # the zero-shot start
    train(adapter, inputs, labels, context.logit_scale)
    theta_1 = adapter.trainable_state()
    trained = logits(adapter, inputs, context.logit_scale)

    adapter.load_trainable_state(interpolate(theta_0, theta_1, 0.0))
    torch.testing.assert_close(logits(adapter, inputs, context.logit_scale), zero_shot_logits(context, images),
                               atol=1e-5, rtol=0)
    adapter.load_trainable_state(interpolate(theta_0, theta_1, 1.0))
    torch.testing.assert_close(logits(adapter, inputs, context.logit_scale), trained, atol=1e-5, rtol=0)


def test_wise_on_linear_head_is_the_logit_ensemble(setup):
    """A linear head is linear in its weights, so weight-space mixing equals mixing the two models' logits."""
    context, images, features, labels = setup
    adapter = build_adapter("linear_head", context, None)
    theta_0 = adapter.trainable_state()
    train(adapter, features, labels, context.logit_scale)
    theta_1 = adapter.trainable_state()
    trained = logits(adapter, features, context.logit_scale)
    adapter.load_trainable_state(interpolate(theta_0, theta_1, 0.3))
    expected = 0.7 * zero_shot_logits(context, images) + 0.3 * trained
    torch.testing.assert_close(logits(adapter, features, context.logit_scale), expected, atol=1e-4, rtol=0)


def test_wise_for_attai_starts_from_its_initial_weights(setup):
    context, images, features, labels = setup
    adapter = build_adapter("attai", context, None).eval()
    theta_0 = adapter.trainable_state()
    initial = logits(adapter, features, context.logit_scale)
    train(adapter, features, labels, context.logit_scale, steps=3)
    adapter.load_trainable_state(interpolate(theta_0, adapter.trainable_state(), 0.0))
    torch.testing.assert_close(logits(adapter, features, context.logit_scale), initial)


@pytest.mark.slow
def test_wise_ft_is_measured_on_the_selected_round_as_well_as_the_last(tiny_preset_file):
    """a = 1 on each curve is that adapter itself: the selected round's test accuracy and the last round's."""
    from engine.presets import load_preset
    from engine.runner import run

    summary = run(load_preset(tiny_preset_file, ["run.rounds=4", "adapter.kind=clip_adapter",
                                                 "eval.wise_alphas=[0.0, 0.5, 1.0]"])).summary
    assert summary["selected"]["round"] != summary["final"]["round"]  # else there is one curve, not two
    curves = {(w["model"], w["alpha"]): w for w in summary["wise_ft"]}
    assert {model for model, _ in curves} == {"last", "selected"}
    assert curves[("selected", 1.0)]["mean_test"] == summary["selected"]["mean_test"]
    assert curves[("last", 1.0)]["mean_test"] == summary["final"]["mean_test"]
    assert curves[("selected", 0.0)]["mean_test"] == curves[("last", 0.0)]["mean_test"]  # both start at theta_0
