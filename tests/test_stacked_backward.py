"""A kind's hand-written batched backward (engine.stacked_backward) gives autograd's numbers, every bit.

The reference is what engine.batched computes without it: the kind's stacked forward and the batched loss
under autograd, ``torch.autograd.grad`` of the summed losses. Inputs vary in cohort size, batch rows, width,
class count, magnitude and the memory layout a stack is kept in (``StackedAdam.adopt_layout`` transposes
weight stacks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import engine.adapters  # noqa: F401  (registers the kinds)
from engine.adapters.base import ADAPTERS, AdapterContext, build_adapter
from engine.batched import ClientNonFinite, Job, _batched_loss_function, adam_param_groups, in_layout, train_cohort
from engine.presets import TrainSection
from engine.stacked_backward import shared_classes_loss

BY_HAND = sorted(kind for kind, cls in ADAPTERS.items() if cls.has_stacked_backward())


def test_fedclips_attention_adapter_has_a_hand_written_backward():
    assert "attai" in BY_HAND


def autograd_step(adapter, params, features, labels, loss):
    leaves = {n: t.detach().requires_grad_() for n, t in params.items()}
    totals, plain = _batched_loss_function(adapter, loss, 100.0, lambda p: None)(leaves, features, labels)
    grads = torch.autograd.grad(totals.sum(), list(leaves.values()))
    return plain.detach(), dict(zip(leaves, grads))


def hand_step(adapter, params, features, labels, loss):
    with torch.no_grad():
        scores, backward = adapter.stacked_backward(params, features)
        plain, grad_image = shared_classes_loss(scores.image, scores.classes, labels, loss, 100.0)
        return plain, backward(grad_image)


@pytest.mark.parametrize("kind", BY_HAND)
@settings(max_examples=40, deadline=None)
@given(
    clients=st.integers(1, 8), rows=st.integers(2, 40), width=st.sampled_from([8, 48, 128]),
    classes=st.integers(2, 12), loss=st.sampled_from(["ce", "contrastive"]), transposed=st.booleans(),
    magnitude=st.sampled_from([1e-3, 1.0, 30.0]), zero_row=st.booleans(), seed=st.integers(0, 2**31 - 1),
)
def test_the_hand_written_step_is_autograds_bit_for_bit(kind, clients, rows, width, classes, loss, transposed,
                                                         magnitude, zero_row, seed):
    generator = torch.Generator().manual_seed(seed)
    names = [str(i) for i in range(classes)]
    context = AdapterContext(width, names, names, torch.randn(classes, width, generator=generator), 100.0)
    torch.manual_seed(seed)
    adapter = build_adapter(kind, context)
    params = {n: p.detach().unsqueeze(0) + 0.3 * torch.randn(clients, *p.shape, generator=generator)
              for n, p in adapter.named_parameters() if p.requires_grad}
    if transposed:  # the layout adopt_layout gives weight stacks: each client's matrix stored transposed
        params = {n: in_layout(t, [0, 2, 1]) if t.dim() == 3 else t for n, t in params.items()}
    features = magnitude * torch.randn(clients, rows, width, generator=generator)
    labels = torch.randint(0, classes, (clients, rows), generator=generator)
    if zero_row:  # an all-zero feature: its adapted vector has norm 0, where F.normalize's clamp and mask act
        features[-1, 0] = 0.0

    expected_loss, expected = autograd_step(adapter, params, features, labels, loss)
    loss_value, grads = hand_step(adapter, params, features, labels, loss)

    assert torch.equal(loss_value, expected_loss)
    assert grads.keys() == expected.keys()
    for name, grad in expected.items():
        assert grads[name].shape == grad.shape, name
        assert torch.equal(grads[name], grad), f"{name}: {int((grads[name] != grad).sum())} entries differ"


@pytest.mark.parametrize("kind", BY_HAND)
def test_a_non_finite_loss_on_the_hand_written_path_names_its_client(kind):
    generator = torch.Generator().manual_seed(0)
    context = AdapterContext(16, list("abc"), list("abc"), torch.randn(3, 16, generator=generator), 100.0)
    adapter = build_adapter(kind, context)
    assert adapter.has_stacked_backward()
    features = torch.randn(60, 16, generator=generator)
    features[45] = float("nan")  # a row of the third client's
    labels = torch.randint(0, 3, (60,), generator=generator)
    train = TrainSection(batch_size=8)
    start = adapter.trainable_state()
    jobs = [Job(f"client-{k}", start, np.arange(20 * k, 20 * (k + 1)), 1, torch.Generator().manual_seed(k))
            for k in range(3)]
    with pytest.raises(ClientNonFinite) as raised:
        train_cohort(adapter, jobs, lambda r: features[r], labels, train, 100.0, adam_param_groups(train, len(start)))
    assert raised.value.client == "client-2"
    assert "nan" in str(raised.value)
