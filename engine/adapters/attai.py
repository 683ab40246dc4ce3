"""FedCLIP's attention adapter (AttAI), as the reference code (microsoft/PersonalizedFL fedclip/) runs it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.adapters.base import Adapter, ClassScores, register_adapter, stacked_linear


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
