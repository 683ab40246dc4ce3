"""A linear classifier head on the normalised image feature, initialised from the class-prompt text features.

l = W f + b with W_0 = tau [t_1 .. t_K] (rows: L2-normalised text features, tau the model's logit scale)
and b_0 = 0, so the initial logits are exactly CLIP's zero-shot logits tau f . t_k (the "zero-shot head"
initialisation of Wortsman et al. 2022, WiSE-FT, section 2). d K + K parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.adapters.base import Adapter, ClassScores, register_adapter


@register_adapter
class LinearHead(Adapter):
    """As ClassScores: image = f, classes = W / tau, bias = b, so that tau f (W / tau)^T + b = W f + b.

    The class embeddings are therefore not unit-norm once W trains. The contrastive loss reads only
    image/classes (the bias does not enter it); CE on ``logits(tau)`` uses all of l. A runner must call
    ``logits`` with the same tau as ``context.logit_scale`` for the logits to be W f + b.
    """

    kind = "linear_head"
    needs_images = False

    def __init__(self, context, options=None):
        super().__init__(context, options)
        self.scale = float(context.logit_scale)
        text = F.normalize(context.class_text_features.detach().float(), dim=-1)
        self.weight = nn.Parameter(self.scale * text)  # [K, d]
        self.bias = nn.Parameter(torch.zeros(text.shape[0]))

    def forward(self, features: torch.Tensor) -> ClassScores:
        image = F.normalize(features.to(self.weight.dtype), dim=-1)
        return ClassScores(image=image, classes=self.weight / self.scale, bias=self.bias)

    def stacked_forward(self, params: dict[str, torch.Tensor], features: torch.Tensor) -> ClassScores:
        image = F.normalize(features.to(params["weight"].dtype), dim=-1)
        return ClassScores(image=image, classes=params["weight"] / self.scale, bias=params["bias"])
