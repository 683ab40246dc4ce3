"""Adapter kinds: zero-shot start, parameter counts, LoRA merging and sharing, and that training lowers loss."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
import torch.nn.functional as F

from engine.adapters import AdapterContext, build_adapter
from engine.adapters.base import ADAPTERS
from engine.adapters.clip_adapter import below_zero, nan_as_negative, relu_passing_zero
from engine.options.adapters import ADAPTER_KINDS, LoRAOptions, PromptOptions
from engine.presets import AdapterSection, preset_from_dict
from tiny_clip import TEMPLATE_TOKENS, tiny_context, tiny_dataset_with_features, zero_shot_logits

ZERO_SHOT_KINDS = ["clip_adapter", "text_adapter", "both", "linear_head", "lora", "prompt"]


def exact_start(kind: str):
    """Each kind's defaults, but prompt_length = 4, the template's word count: CoOp "init from words", the
    exact zero-shot start."""
    return PromptOptions(prompt_length=TEMPLATE_TOKENS) if kind == "prompt" else ADAPTER_KINDS.options_for(kind)()


@pytest.fixture(scope="module")
def context() -> AdapterContext:
    return tiny_context()


@pytest.fixture(scope="module")
def data(context):
    return tiny_dataset_with_features(context)


def inputs_for(adapter, data):
    images, features, _ = data
    return images if adapter.needs_images else features


def logits_of(adapter, data, context) -> torch.Tensor:
    with torch.no_grad():
        return adapter(inputs_for(adapter, data)).logits(context.logit_scale)


def test_every_kind_is_registered():
    assert set(ZERO_SHOT_KINDS + ["attai"]) <= set(ADAPTERS)
    assert ADAPTERS["lora"].needs_images and not ADAPTERS["prompt"].needs_images


@pytest.mark.parametrize("kind", ZERO_SHOT_KINDS)
def test_round_zero_equals_zero_shot(kind, context, data):
    adapter = build_adapter(kind, context, exact_start(kind)).eval()
    expected = zero_shot_logits(context, data[0])
    torch.testing.assert_close(logits_of(adapter, data, context), expected, atol=1e-5, rtol=0)


def test_attai_starts_near_not_at_zero_shot(context, data):
    adapter = build_adapter("attai", context, None).eval()
    assert not torch.allclose(logits_of(adapter, data, context), zero_shot_logits(context, data[0]), atol=1e-5)


def test_prompt_with_other_length_is_random_coop_init(context, data):
    adapter = build_adapter("prompt", context, PromptOptions(prompt_length=16))
    assert not adapter.starts_at_zero_shot
    assert adapter.trainable_parameters() == 16 * 64  # M x text width
    assert abs(adapter.context_vectors.std().item() - 0.02) < 0.005
    torch.manual_seed(123)  # a different global RNG state: the seeded init must not care
    again = build_adapter("prompt", context, PromptOptions(prompt_length=16))
    assert torch.equal(again.context_vectors, adapter.context_vectors)
    default_length = build_adapter("prompt", context, PromptOptions(prompt_length=0))
    assert default_length.starts_at_zero_shot and default_length.context_vectors.shape[0] == TEMPLATE_TOKENS


def big_context(d: int = 512, classes: int = 7) -> AdapterContext:
    names = [f"class{k}" for k in range(classes)]
    return AdapterContext(d, names, [f"a picture of a {n}" for n in names], torch.randn(classes, d), 100.0)


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("attai", 2 * (512 * 512 + 512)),  # 525,312
        ("clip_adapter", 2 * 512 * 512 // 4),  # 131,072
        ("text_adapter", 2 * 512 * 512 // 4),
        ("both", 2 * 2 * 512 * 512 // 4),
        ("linear_head", 512 * 7 + 7),
    ],
)
def test_parameter_counts_at_d512(kind, expected):
    assert build_adapter(kind, big_context(), None).trainable_parameters() == expected


def test_lora_parameter_count_and_state_excludes_base_weights(context):
    layers, width, rank = 2, 64, 2
    adapter = build_adapter("lora", context, None)
    assert adapter.trainable_parameters() == layers * 4 * 2 * rank * width  # q, k, v, o: A [r, d] + B [d, r]
    state = adapter.trainable_state()
    assert state and all(name.endswith((".A", ".B")) for name in state)
    frozen = {name for name, p in adapter.named_parameters() if not p.requires_grad}
    assert any("in_proj_weight" in n for n in frozen) and not frozen & set(state)

    b_only = build_adapter("lora", context, LoRAOptions(lora_share="b_only", lora_targets=["q", "v"]))
    assert b_only.trainable_parameters() == layers * 2 * rank * width
    assert all(name.endswith(".B") for name in b_only.trainable_state())


def test_lora_clients_share_seeded_a_but_no_mutable_state(context, data):
    first = build_adapter("lora", context, LoRAOptions(lora_share="b_only"))
    second = build_adapter("lora", context, LoRAOptions(lora_share="b_only"))
    first_a = {n: p for n, p in first.named_parameters() if n.endswith(".A")}
    second_a = {n: p for n, p in second.named_parameters() if n.endswith(".A")}
    assert first_a.keys() == second_a.keys()
    for name in first_a:
        assert torch.equal(first_a[name], second_a[name]) and first_a[name] is not second_a[name]
    base_before = context.clip_model.visual.transformer.resblocks[0].attn.in_proj_weight.clone()
    train_steps(first, data, context, steps=2, lr=1e-2)
    assert all(torch.count_nonzero(p) == 0 for n, p in second.named_parameters() if n.endswith(".B"))
    torch.testing.assert_close(context.clip_model.visual.transformer.resblocks[0].attn.in_proj_weight, base_before)


def test_lora_merged_and_unmerged_give_the_same_logits(context, data):
    adapter = build_adapter("lora", context, None)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if name.endswith(".B"):
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))
    adapter.eval()
    assert adapter.is_merged
    merged = logits_of(adapter, data, context)
    adapter.unmerge()
    unmerged = logits_of(adapter, data, context)
    assert not torch.allclose(unmerged, zero_shot_logits(context, data[0]), atol=1e-3)  # B really acts
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)

    plain = adapter.merged()  # a plain open_clip tower: nn.MultiheadAttention holding W + (alpha / r) B A
    assert type(plain.transformer.resblocks[0].attn) is torch.nn.MultiheadAttention
    with torch.no_grad():
        exported = context.logit_scale * F.normalize(plain(data[0]), dim=-1) @ adapter.text.t()
    torch.testing.assert_close(exported, unmerged, atol=1e-5, rtol=0)

    adapter.eval()  # merged again; loading a new state must refresh the merged weights
    state = {name: torch.zeros_like(value) if name.endswith(".B") else value
             for name, value in adapter.trainable_state().items()}
    adapter.load_trainable_state(state)
    torch.testing.assert_close(logits_of(adapter, data, context), zero_shot_logits(context, data[0]), atol=1e-5, rtol=0)


def test_lora_rejects_unknown_targets(context):
    with pytest.raises(ValueError, match="lora_targets"):
        build_adapter("lora", context, LoRAOptions(lora_targets=["q", "mlp"]))


def contrastive_loss(scores, labels, scale):
    """FedCLIP's symmetric in-batch loss between adapted images and each sample's class embedding."""
    logits = scale * scores.image @ scores.classes[labels].t()
    target = torch.arange(len(labels))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def ce_loss(scores, labels, scale):
    return F.cross_entropy(scores.logits(scale), labels)


def evaluate_loss(adapter, data, context, loss_fn) -> float:
    adapter.eval()
    with torch.no_grad():
        return loss_fn(adapter(inputs_for(adapter, data)), data[2], context.logit_scale).item()


def train_steps(adapter, data, context, steps=8, lr=5e-3, loss_fn=ce_loss):
    adapter.train()
    optimizer = torch.optim.Adam([p for p in adapter.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(adapter(inputs_for(adapter, data)), data[2], context.logit_scale).backward()
        optimizer.step()
    adapter.eval()


@pytest.mark.parametrize("kind", ["attai"] + ZERO_SHOT_KINDS)
@pytest.mark.parametrize("loss_fn", [ce_loss, contrastive_loss], ids=["ce", "contrastive"])
def test_short_training_lowers_loss(kind, loss_fn, context, data):
    torch.manual_seed(0)
    adapter = build_adapter(kind, context, exact_start(kind))
    before = evaluate_loss(adapter, data, context, loss_fn)
    train_steps(adapter, data, context, steps=5, lr=1e-2, loss_fn=loss_fn)
    after = evaluate_loss(adapter, data, context, loss_fn)
    assert math.isfinite(after) and after < before - 1e-3, (before, after)


def test_prompt_eval_cache_follows_the_context(context, data):
    adapter = build_adapter("prompt", context, exact_start("prompt")).eval()
    first = logits_of(adapter, data, context)
    # A random change: a constant shift of every coordinate would be cancelled by the LayerNorms.
    change = 0.5 * torch.randn(adapter.context_vectors.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapter.context_vectors.add_(change)
    assert not torch.allclose(logits_of(adapter, data, context), first)
    with torch.no_grad():
        adapter.context_vectors.sub_(change)
    torch.testing.assert_close(logits_of(adapter, data, context), first, atol=1e-5, rtol=0)


def test_linear_head_scores_match_wf_plus_b(context, data):
    adapter = build_adapter("linear_head", context, None)
    with torch.no_grad():
        adapter.weight.add_(torch.randn_like(adapter.weight))
        adapter.bias.add_(torch.randn_like(adapter.bias))
        expected = F.normalize(data[1], dim=-1) @ adapter.weight.t() + adapter.bias
    torch.testing.assert_close(logits_of(adapter, data, context), expected, atol=1e-5, rtol=0)


def test_residual_adapter_gets_gradient_from_zero_start(context, data):
    """W2 = 0 makes the outer ReLU's input exactly 0; its gradient there must not be 0."""
    adapter = build_adapter("clip_adapter", context, None).train()
    ce_loss(adapter(data[1]), data[2], context.logit_scale).backward()
    assert adapter.image_adapter.up.weight.grad.abs().sum() > 0


_SPECIALS = [float("nan"), -0.0, 0.0, math.inf, -math.inf, 2.0**-149, -(2.0**-149), 2.0**-126, -(2.0**-126), 1.0, -1.0]


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.sampled_from(_SPECIALS)),
                       min_size=1, max_size=80),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
def test_relu_passing_zero_without_gradient_gives_where_bits(values, dtype):
    """Without autograd relu_passing_zero takes F.threshold (10x faster than where on the CPU); its values must be
    where's bit for bit (NaN -> 0, -0.0 kept, subnormals), and so must the hand-written step's gradient mask."""
    x = torch.tensor(values, dtype=torch.float32).to(dtype)
    expected = torch.where(x >= 0, x, torch.zeros((), dtype=dtype))
    with torch.no_grad():
        got = relu_passing_zero(x)
    assert torch.equal(got.view(_BITS[dtype]), expected.view(_BITS[dtype]))
    grad = torch.randn(x.shape).to(dtype)
    through = torch.ops.aten.threshold_backward(grad, nan_as_negative(x), below_zero(dtype))
    assert torch.equal(through.view(_BITS[dtype]), torch.where(x >= 0, grad, 0).view(_BITS[dtype]))


_BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def test_adapter_preset_keys_validate():
    assert AdapterSection().kind_options == ADAPTER_KINDS.options_for("attai")()
    residual = AdapterSection(kind="clip_adapter").kind_options
    lora = LoRAOptions()
    assert (residual.ratio, residual.reduction, lora.lora_rank, lora.lora_share) == (0.2, 4, 2, "both")
    assert lora.lora_targets == ["q", "k", "v", "o"] and PromptOptions().prompt_length == 0  # template words: zero-shot
    preset = preset_from_dict({"adapter": {"kind": "lora", "lora_rank": 4, "lora_share": "b_only"}})
    assert preset.adapter.kind_options == LoRAOptions(lora_rank=4, lora_share="b_only")
    with pytest.raises(ValueError, match=r"\[adapter.lora_share\] 'a_only' is not allowed"):
        preset_from_dict({"adapter": {"kind": "lora", "lora_share": "a_only"}})
    with pytest.raises(ValueError, match=r"\[adapter.lora_targets\] 'mlp' is not allowed"):
        preset_from_dict({"adapter": {"kind": "lora", "lora_targets": ["q", "mlp"]}})
    with pytest.raises(ValueError, match=r"\[adapter.ratio\] must be <= 1.0"):
        preset_from_dict({"adapter": {"kind": "clip_adapter", "ratio": 1.5}})
