"""The frozen open_clip backbone: loading, fingerprinting, and encoding images and prompts."""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from engine.presets import Preset


@dataclass
class Backbone:
    model: Any  # open_clip CLIP, frozen, eval mode
    preprocess: Callable  # PIL image -> tensor, CLIP's eval transform
    tokenizer: Callable
    device: torch.device
    weights: str  # "pretrained:<tag>", "checkpoint:<path>", "local-dir:<path>" or "random"
    fingerprint: str  # sha256 of every weight, so the feature cache cannot mix models

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp().item())

    @property
    def preprocess_fingerprint(self) -> str:
        return hashlib.sha256(repr(self.preprocess).encode()).hexdigest()[:16]

    def autocast(self):
        """fp16 autocast on CUDA as the reference runs CLIP there; plain float32 on the CPU."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            pixels = pixels.pin_memory().to(self.device, non_blocking=True)
        with self.autocast():
            return self.model.encode_image(pixels.to(self.device)).float()

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts).to(self.device)
        with self.autocast():
            return self.model.encode_text(tokens).float()


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device = 'cuda' but torch sees no CUDA device; use 'auto' or 'cpu'")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def weights_fingerprint(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def describe_weights(pretrained: str) -> str:
    if pretrained in ("", "none"):
        return "random"
    if pretrained.startswith("local-dir:"):
        return pretrained
    if Path(pretrained).expanduser().is_file():
        return f"checkpoint:{pretrained}"
    return f"pretrained:{pretrained}"


def load_backbone(preset: Preset, device: torch.device) -> Backbone:
    """open_clip's own loader, so a tag, a checkpoint file and a local-dir folder behave as for any user."""
    import open_clip

    from engine import modelzoo

    modelzoo.register_model_configs()
    arch, pretrained = preset.model.arch, preset.model.pretrained
    if pretrained.startswith("local-dir:"):
        model_name = "local-dir:" + str(Path(pretrained[len("local-dir:") :]).expanduser())
        weights_arg = None  # open_clip reads config and weights from the folder
    else:
        if arch not in open_clip.list_models():
            raise ValueError(f"model.arch: unknown open_clip architecture {arch!r}")  # resolve() checks first
        model_name = arch
        weights_arg = None if pretrained in ("", "none") else pretrained
        path = Path(pretrained).expanduser()
        if weights_arg and path.is_file():
            weights_arg = str(path)
        elif weights_arg and weights_arg not in open_clip.list_pretrained_tags_by_model(arch):
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none for this arch"
            raise ValueError(f"model.pretrained: unknown tag {weights_arg!r} for {arch}; tags: {tags}")
    # Random weights must still be the same run to run.
    torch.manual_seed(preset.run.seed)
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=weights_arg, device="cpu")
    model.eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(model_name)
    fingerprint = weights_fingerprint(model)
    model.to(device)
    return Backbone(model, preprocess, tokenizer, device, describe_weights(pretrained), fingerprint)
