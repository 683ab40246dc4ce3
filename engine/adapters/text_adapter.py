"""CLIP-Adapter's residual bottleneck on the text side (class-prompt features), alone or with the image side.

Gao et al. (2021) study the adapter on either branch and on both; the rule is the same on each:
t* = a A(t) + (1 - a) t on the raw frozen text feature of a class prompt, then L2-normalised.
The class features are K x d, so the text adapter runs once per forward, not per sample.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.adapters.base import Adapter, ClassScores, register_adapter
from engine.adapters.clip_adapter import bottleneck_from_options


@register_adapter
class TextAdapter(Adapter):
    """Text side only: t*_k = a A(t_k) + (1 - a) t_k; the image feature is used as is (normalised).

    2 d^2 / reduction parameters; starts exactly at zero-shot (W2 = 0). Preset keys: ratio, reduction.
    """

    kind = "text_adapter"
    needs_images = False

    def __init__(self, context, options=None):
        super().__init__(context, options)
        self.text_adapter = bottleneck_from_options(context.feature_dim, self.options)
        self.register_buffer("raw_text", context.class_text_features.detach().float().clone(), persistent=False)

    def forward(self, features: torch.Tensor) -> ClassScores:
        classes = F.normalize(self.text_adapter(self.raw_text), dim=-1)
        return ClassScores(image=F.normalize(features.to(classes.dtype), dim=-1), classes=classes)

    def stacked_forward(self, params: dict[str, torch.Tensor], features: torch.Tensor) -> ClassScores:
        text = self.raw_text.expand(len(features), *self.raw_text.shape)
        classes = F.normalize(self.text_adapter.stacked(params, "text_adapter", text), dim=-1)
        return ClassScores(image=F.normalize(features.to(classes.dtype), dim=-1), classes=classes)


@register_adapter
class ImageTextAdapter(Adapter):
    """Both sides: f* on the image feature and t*_k on each class feature, two independent bottlenecks.

    2 x 2 d^2 / reduction parameters; starts exactly at zero-shot. Preset keys: ratio, reduction (shared).
    """

    kind = "both"
    needs_images = False

    def __init__(self, context, options=None):
        super().__init__(context, options)
        self.image_adapter = bottleneck_from_options(context.feature_dim, self.options)
        self.text_adapter = bottleneck_from_options(context.feature_dim, self.options)
        self.register_buffer("raw_text", context.class_text_features.detach().float().clone(), persistent=False)

    def forward(self, features: torch.Tensor) -> ClassScores:
        image = F.normalize(self.image_adapter(features.to(self.raw_text.dtype)), dim=-1)
        classes = F.normalize(self.text_adapter(self.raw_text), dim=-1)
        return ClassScores(image=image, classes=classes)

    def stacked_forward(self, params: dict[str, torch.Tensor], features: torch.Tensor) -> ClassScores:
        adapted = self.image_adapter.stacked(params, "image_adapter", features.to(self.raw_text.dtype))
        text = self.raw_text.expand(len(features), *self.raw_text.shape)
        classes = F.normalize(self.text_adapter.stacked(params, "text_adapter", text), dim=-1)
        return ClassScores(image=F.normalize(adapted, dim=-1), classes=classes)
