"""CLIP-Adapter (Gao et al. 2021, "CLIP-Adapter: Better Vision-Language Models with Feature Adapters").

The residual bottleneck here is shared by the image-side kind (``clip_adapter``) and the text-side kinds
in ``text_adapter.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.adapters.base import Adapter, ClassScores, register_adapter, stacked_linear
from engine.stacked_backward import Backward, normalize_with_backward, stacked_linear_backward


def relu_passing_zero(x: torch.Tensor) -> torch.Tensor:
    """ReLU whose gradient at exactly 0 is 1 instead of PyTorch's 0; the forward value is identical.

    Why: the bottleneck starts with W2 = 0, so the outer ReLU's input is exactly 0 for every sample. With
    ``torch.relu`` (gradient 0 at 0) neither W2 nor W1 would ever receive a gradient and the adapter would
    stay at zero-shot forever. Both 0 and 1 are valid subgradients of ReLU at 0.

    Its value is ``torch.where(x >= 0, x, 0)`` (NaN -> 0, -0.0 kept). Where no gradient is asked for it comes
    from ``F.threshold`` at the float just below zero, the same values: on the CPU ``where`` with its boolean
    mask takes ~10x as long (0.57 ms against 0.06 ms for 1024 x 128 floats), most of CLIP-Adapter's evaluation.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return torch.where(x >= 0, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return _passing_zero(x)[0]


def _passing_zero(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(relu_passing_zero's values, a tensor that is > ``edge`` exactly where ``x >= 0``, ``edge``): the second
    and third are what ``threshold_backward`` needs for where's gradient mask."""
    edge = below_zero(x.dtype)
    passing = nan_as_negative(x)
    return F.threshold(passing, edge, 0.0), passing, edge


def below_zero(dtype: torch.dtype) -> float:
    """The largest float of ``dtype`` below zero (minus the smallest subnormal): ``x > below_zero`` exactly when
    ``x >= 0``, -0.0 included (with denormals flushed to zero -0.0 would fall on the other side: a sign of zero,
    no value, changes)."""
    info = torch.finfo(dtype)
    return -info.smallest_normal * info.eps


def nan_as_negative(x: torch.Tensor) -> torch.Tensor:
    """``x`` with NaN as -1, the rest unchanged: ``x >= 0`` is false for NaN, and ``F.threshold`` would pass it."""
    return torch.nan_to_num(x, nan=-1.0, posinf=math.inf, neginf=-math.inf)


class ResidualBottleneck(nn.Module):
    """f* = a A(f) + (1 - a) f with A(f) = ReLU(W2 ReLU(W1 f)), W1: d -> d/reduction, W2: d/reduction -> d.

    No biases, as in Gao et al.; 2 d^2 / reduction parameters (131,072 for d = 512, reduction 4).
    W1 has PyTorch's default Linear init; W2 = 0, so A(f) = 0 and f* = (1 - a) f at the start: after
    L2-normalisation that is exactly the zero-shot feature (WiSE-FT's a = 0 means "no adapter").
    """

    def __init__(self, dim: int, reduction: int, ratio: float):
        super().__init__()
        if reduction < 1 or dim // reduction < 1:
            raise ValueError(f"reduction must be in [1, {dim}], got {reduction}")
        self.ratio = float(ratio)
        self.down = nn.Linear(dim, dim // reduction, bias=False)
        self.up = nn.Linear(dim // reduction, dim, bias=False)
        nn.init.zeros_(self.up.weight)

    def residual(self, features: torch.Tensor) -> torch.Tensor:
        """A(f)."""
        return relu_passing_zero(self.up(torch.relu(self.down(features))))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.ratio * self.residual(features) + (1.0 - self.ratio) * features

    def stacked(self, params: dict[str, torch.Tensor], prefix: str, features: torch.Tensor) -> torch.Tensor:
        """``forward`` for G clients: ``params[prefix + ".down.weight"]`` is ``[G, ...]``, features ``[G, B, d]``."""
        hidden = torch.relu(stacked_linear(features, params[f"{prefix}.down.weight"]))
        residual = relu_passing_zero(stacked_linear(hidden, params[f"{prefix}.up.weight"]))
        return self.ratio * residual + (1.0 - self.ratio) * features

    def stacked_with_backward(self, params: dict[str, torch.Tensor], prefix: str, features: torch.Tensor):
        """``stacked`` and the function taking its output's gradient to the two weights' (autograd's kernels in
        autograd's order: engine.stacked_backward)."""
        down, up = params[f"{prefix}.down.weight"], params[f"{prefix}.up.weight"]
        hidden = torch.relu(stacked_linear(features, down))
        before = stacked_linear(hidden, up)
        residual, passing, edge = _passing_zero(before)
        adapted = self.ratio * residual + (1.0 - self.ratio) * features

        def backward(grad: torch.Tensor) -> dict[str, torch.Tensor]:
            # the sum's, the product's, then where's: the gradient where before >= 0, else 0
            grad_before = torch.ops.aten.threshold_backward(grad * self.ratio, passing, edge)
            grad_hidden, grad_up, _ = stacked_linear_backward(hidden, up, grad_before, bias=False, input_grad=True)
            grad_down_out = torch.ops.aten.threshold_backward(grad_hidden, hidden, 0)  # relu's
            _, grad_down, _ = stacked_linear_backward(features, down, grad_down_out, bias=False, input_grad=False)
            return {f"{prefix}.down.weight": grad_down, f"{prefix}.up.weight": grad_up}

        return adapted, backward


def bottleneck_from_options(dim: int, options) -> ResidualBottleneck:
    return ResidualBottleneck(dim, int(options.reduction), float(options.ratio))


@register_adapter
class ClipAdapter(Adapter):
    """Image side: f* = a A(f) + (1 - a) f on the raw encoder feature, then L2-normalised; text frozen.

    Starts exactly at zero-shot (W2 = 0, see ``ResidualBottleneck``). Preset keys: ratio (a), reduction.
    """

    kind = "clip_adapter"
    needs_images = False

    def __init__(self, context, options=None):
        super().__init__(context, options)
        self.image_adapter = bottleneck_from_options(context.feature_dim, self.options)
        self.register_buffer("text", F.normalize(context.class_text_features.float(), dim=-1), persistent=False)

    def forward(self, features: torch.Tensor) -> ClassScores:
        adapted = self.image_adapter(features.to(self.text.dtype))
        return ClassScores(image=F.normalize(adapted, dim=-1), classes=self.text)

    def stacked_forward(self, params: dict[str, torch.Tensor], features: torch.Tensor) -> ClassScores:
        adapted = self.image_adapter.stacked(params, "image_adapter", features.to(self.text.dtype))
        return ClassScores(image=F.normalize(adapted, dim=-1), classes=self.text.expand(len(features), *self.text.shape))

    def stacked_backward(self, params: dict[str, torch.Tensor], features: torch.Tensor) -> tuple[ClassScores, Backward]:
        adapted, adapter_backward = self.image_adapter.stacked_with_backward(params, "image_adapter",
                                                                             features.to(self.text.dtype))
        image, normalize_backward = normalize_with_backward(adapted)
        classes = self.text.expand(len(features), *self.text.shape)
        return ClassScores(image=image, classes=classes), lambda grad: adapter_backward(normalize_backward(grad))
