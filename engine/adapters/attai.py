"""FedCLIP's attention adapter (AttAI), as the reference code (microsoft/PersonalizedFL fedclip/) runs it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.adapters.base import Adapter, ClassScores, register_adapter, stacked_linear
from engine.stacked_backward import Backward, normalize_with_backward, stacked_linear_backward


@register_adapter
class AttentionAdapter(Adapter):
    """f* = softmax(W2 tanh(W1 f + b1) + b2) * f, softmax over the feature dimension.

    As in the reference, the adapter sees the raw (unnormalised) encoder output and the product is
    normalised afterwards; PyTorch's default Linear init, so it starts near, not at, zero-shot.
    """

    kind = "attai"

    def __init__(self, context, options=None):
        super().__init__(context, options)
        d = context.feature_dim
        self.attention = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, d), nn.Softmax(dim=1))
        self.register_buffer("text", F.normalize(context.class_text_features.float(), dim=-1), persistent=False)

    def forward(self, features: torch.Tensor) -> ClassScores:
        adapted = self.attention(features) * features
        return ClassScores(image=F.normalize(adapted, dim=-1), classes=self.text)

    def stacked_forward(self, params: dict[str, torch.Tensor], features: torch.Tensor) -> ClassScores:
        hidden = torch.tanh(stacked_linear(features, params["attention.0.weight"], params["attention.0.bias"]))
        scores = stacked_linear(hidden, params["attention.2.weight"], params["attention.2.bias"])
        adapted = torch.softmax(scores, dim=2) * features
        return ClassScores(image=F.normalize(adapted, dim=-1), classes=self.text.expand(len(features), *self.text.shape))

    def stacked_backward(self, params: dict[str, torch.Tensor], features: torch.Tensor) -> tuple[ClassScores, Backward]:
        """``stacked_forward`` without a graph, and the function taking the image's gradient to the parameters'
        (engine.stacked_backward: autograd's kernels in autograd's order, so autograd's bits)."""
        w1, b1 = params["attention.0.weight"], params["attention.0.bias"]
        w2, b2 = params["attention.2.weight"], params["attention.2.bias"]
        hidden = torch.tanh(stacked_linear(features, w1, b1))
        attention = torch.softmax(stacked_linear(hidden, w2, b2), dim=2)
        image, normalize_backward = normalize_with_backward(attention * features)

        def backward(grad_image: torch.Tensor) -> dict[str, torch.Tensor]:
            grad_attention = normalize_backward(grad_image) * features
            grad_scores = torch._softmax_backward_data(grad_attention, attention, 2, attention.dtype)
            grad_hidden, grad_w2, grad_b2 = stacked_linear_backward(hidden, w2, grad_scores, bias=True, input_grad=True)
            grad_before_tanh = torch.ops.aten.tanh_backward(grad_hidden, hidden)
            _, grad_w1, grad_b1 = stacked_linear_backward(features, w1, grad_before_tanh, bias=True, input_grad=False)
            return {"attention.0.weight": grad_w1, "attention.0.bias": grad_b1,
                    "attention.2.weight": grad_w2, "attention.2.bias": grad_b2}

        return ClassScores(image=image, classes=self.text.expand(len(features), *self.text.shape)), backward
