"""Gradients of a batched training step written out by hand, with autograd's own operations.

A batched step (``engine.batched``) at a small cohort is dispatch-bound: at K = 4 (quickstart) the arithmetic
of a step is ~0.2 ms, but autograd's graph (recording ~25 nodes in the forward, then scheduling them, saving
and unpacking their inputs, reducing broadcast gradients) brings forward and backward to ~1 ms. Here the
forward runs without a graph and the backward calls, in order, the very kernels autograd's derivative formulas
call (``_log_softmax_backward_data``, the ``bmm`` products with the same operand layouts, ``sum_to``'s
reductions, ...), so every gradient is autograd's, bit for bit: tests/test_stacked_backward.py holds each
supported (kind, loss) to ``torch.autograd.grad`` on random inputs, every bit.

Supported: a kind whose class table is the frozen text buffer shared by every client (no bias), the two
built-in losses, and no local penalty; anything else keeps autograd (``engine.batched``). A kind opts in by
defining ``stacked_backward`` (engine/adapters/attai.py).
"""

from __future__ import annotations

from typing import Callable

import torch

Grads = dict[str, torch.Tensor]
Backward = Callable[[torch.Tensor], Grads]


def normalize_with_backward(adapted: torch.Tensor, eps: float = 1e-12):
    """``F.normalize(adapted, dim=-1)`` and the function taking its output's gradient to ``adapted``'s.

    F.normalize is ``adapted / norm.clamp_min(eps).expand_as(adapted)``; its gradient reaches ``adapted``
    twice, through the division and through the norm, and autograd adds the two (an addition of two terms,
    the same in either order)."""
    norm = torch.linalg.vector_norm(adapted, 2, -1, keepdim=True)
    denominator = norm.clamp_min(eps).expand_as(adapted)
    image = adapted / denominator

    def backward(grad: torch.Tensor) -> torch.Tensor:
        through_division = grad / denominator  # div: grad / other
        # div's -grad * ((self / other) / other); self / other is the image itself, the same division
        to_denominator = (-grad * (image / denominator)).sum([-1], keepdim=True)  # then sum_to
        if bool((norm >= eps).all()):
            # The usual case, where clamp_min passes every gradient and the norm's own gradient,
            # grad * (adapted / norm) with no norm 0 to mask, divides by exactly the denominator: that quotient
            # is the image, already computed (the same bits, two passes over [G, B, d] fewer).
            return through_division + to_denominator * image
        to_norm = torch.where(norm >= eps, to_denominator, torch.zeros((), dtype=grad.dtype))  # clamp_min
        through_norm = to_norm * (adapted / norm).masked_fill_(norm == 0, 0)  # the 2-norm's gradient
        return through_division + through_norm

    return image, backward


def stacked_linear_backward(inputs: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, bias: bool,
                            input_grad: bool) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Gradients of ``engine.adapters.base.stacked_linear`` (``baddbmm(bias.unsqueeze(1), x, W.mT)`` or
    ``bmm(x, W.mT)``): (to the inputs if asked, to the weight, to the bias if it has one), as autograd's
    baddbmm/bmm formulas and the broadcast bias's reduction compute them."""
    to_inputs = grad.bmm(weight) if input_grad else None  # grad.bmm(batch2.mT), batch2 = W.mT
    to_weight = inputs.transpose(1, 2).bmm(grad).transpose(1, 2)  # batch1.mT.bmm(grad), through W.mT's transpose
    to_bias = grad.sum([1], keepdim=True).squeeze(1) if bias else None  # sum_to [G, 1, out], then the unsqueeze
    return to_inputs, to_weight, to_bias


def _mean_nll_gradient(log_probs: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Gradient of ``(-log_probs.gather(-1, target[..., None]).squeeze(-1)).mean(-1)`` summed with ``weight``
    per group (``weight`` [G], autograd's incoming gradient), to the logits that ``log_probs`` came from."""
    rows = target.shape[-1]
    picked = -(weight.unsqueeze(-1).expand(target.shape) / rows)  # mean's backward, then neg's
    scattered = log_probs.new_zeros(log_probs.shape).scatter_add_(-1, target.unsqueeze(-1), picked.unsqueeze(-1))
    return torch._log_softmax_backward_data(scattered, log_probs, -1, log_probs.dtype)


def shared_classes_loss(image: torch.Tensor, classes: torch.Tensor, labels: torch.Tensor, loss: str,
                        scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(each group's loss [G], the gradient of their sum to ``image``), for ``engine.batched``'s losses.

    ``image`` [G, B, d]; ``classes`` the class table every group shares, expanded to [G, C, d] (stride 0);
    ``labels`` [G, B]. The forward is ``engine.batched._batched_loss_function``'s, operation for operation."""
    ones = torch.ones((), dtype=image.dtype, device=image.device).expand(len(labels))  # sum()'s backward
    scaled = scale * image
    if loss == "contrastive":
        picked = classes[0][labels]
        logits = scaled.bmm(picked.transpose(1, 2))  # what `@` runs for two 3-d operands, without its reshapes
        target = torch.arange(labels.shape[1], device=labels.device).expand_as(labels)
        by_row = torch.log_softmax(logits, dim=-1)
        by_column = torch.log_softmax(logits.transpose(1, 2), dim=-1)
        value = (_nll(by_row, target) + _nll(by_column, target)) / 2
        half = ones / 2  # the division by 2's backward
        grad_logits = _mean_nll_gradient(by_row, target, half) + _mean_nll_gradient(by_column, target, half).transpose(1, 2)
        grad_scaled = grad_logits.bmm(picked)
    elif loss == "ce":
        logits = scaled.bmm(classes.transpose(1, 2))
        log_probs = torch.log_softmax(logits, dim=-1)
        value = _nll(log_probs, labels)
        grad_scaled = _mean_nll_gradient(log_probs, labels, ones).bmm(classes)
    else:
        raise ValueError(f"no hand-written gradient for loss {loss!r}")
    return value, grad_scaled * scale


def _nll(log_probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (-log_probs.gather(-1, target.unsqueeze(-1)).squeeze(-1)).mean(dim=-1)
