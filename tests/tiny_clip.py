"""A tiny random-weight open_clip model and adapter context for adapter tests (no downloads, CPU, fast)."""

from __future__ import annotations

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIP

from engine.adapters.base import AdapterContext

CLASS_NAMES = ["dog", "guitar", "house"]
TEMPLATE = "a picture of a {}"
TEMPLATE_TOKENS = 4  # "a", "picture", "of", "a"


def tiny_clip(seed: int = 0) -> CLIP:
    """ViT with image 32, patch 8, width 64, 2 layers, 1 head; text width 64, 2 layers; embed 32."""
    torch.manual_seed(seed)
    model = CLIP(
        embed_dim=32,
        vision_cfg={"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 64},
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2},
    )
    model.eval().requires_grad_(False)
    return model


def tiny_context(model: CLIP | None = None) -> AdapterContext:
    model = model if model is not None else tiny_clip()
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=77)
    prompts = [TEMPLATE.format(name) for name in CLASS_NAMES]
    with torch.no_grad():
        text = model.encode_text(tokenizer(prompts))
    return AdapterContext(
        feature_dim=text.shape[1],
        class_names=list(CLASS_NAMES),
        prompts=prompts,
        class_text_features=text,
        logit_scale=float(model.logit_scale.exp()),
        clip_model=model,
        tokenizer=tokenizer,
    )


def tiny_dataset(count_per_class: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [N, 3, 32, 32]: a random prototype per class plus noise, so labels are learnable."""
    generator = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(len(CLASS_NAMES), 3, 32, 32, generator=generator)
    labels = torch.arange(len(CLASS_NAMES)).repeat_interleave(count_per_class)
    images = prototypes[labels] + 0.5 * torch.randn(len(labels), 3, 32, 32, generator=generator)
    return images, labels


def tiny_dataset_with_features(context: AdapterContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images, their frozen image features, labels): inputs for kinds with and without the encoder in the loop."""
    images, labels = tiny_dataset()
    with torch.no_grad():
        features = context.clip_model.encode_image(images)
    return images, features, labels


def zero_shot_logits(context: AdapterContext, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        image = F.normalize(context.clip_model.encode_image(images), dim=-1)
    text = F.normalize(context.class_text_features, dim=-1)
    return context.logit_scale * image @ text.t()
