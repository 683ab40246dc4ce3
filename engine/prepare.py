"""Everything a run needs before its first round: device, backbone, features, clients, prompts.

A warm run of a kind that trains on cached features (``FEATURE_ONLY_KINDS``) with weights from a file gets its
backbone from the feature cache's model index (``engine.backbone.CachedBackbone``): no open_clip import, no
model built, no image read, unless some feature turns out to be missing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from engine.backbone import Backbone, CachedBackbone, ModelRecord, load_backbone, model_key, tag_key
from engine.data import ClientSplit, ImageSource, build_source, class_prompts, holdout_rows, make_clients
from engine.features import FeatureCache, ModelIndex, default_cache_dir, encode_images, load_pixels, prompt_features
from engine.presets import Preset

# Kinds that train on the cached image and prompt features alone: a run of one never needs CLIP's encoders once
# the cache is warm. The others (lora, prompt, prefix, houlsby, ...) run an encoder in the loop and load CLIP.
FEATURE_ONLY_KINDS = frozenset({"attai", "clip_adapter", "text_adapter", "both", "linear_head"})


def get_backbone(preset: Preset, device: torch.device, cache_dir, log, needs_encoders: bool) -> Backbone | CachedBackbone:
    """The model index's stand-in when it knows these weights and the kind needs no encoder, else the model."""
    with ModelIndex(cache_dir, log) as index:
        tag = tag_key(preset)
        tag_file = (index.record(tag) or {}).get("file") if tag else None
        keyed = model_key(preset, index.file_sha256, Path(tag_file) if tag_file else None)
        record = ModelRecord.from_json(index.record(keyed[0]) or {}) if keyed else None
        if record is not None and not needs_encoders:
            return CachedBackbone(record, device, lambda: load_backbone(preset, device), keyed[1])
        backbone = load_backbone(preset, device)
        if tag and backbone.weights_file is not None:
            if str(backbone.weights_file) != tag_file:
                index.put_record(tag, {"file": str(backbone.weights_file)})
            keyed = model_key(preset, index.file_sha256, backbone.weights_file)
            record = ModelRecord.from_json(index.record(keyed[0]) or {}) if keyed else None
        if keyed:
            backbone.weights_sha256 = keyed[1]
            if record != backbone.record():
                index.put_record(keyed[0], backbone.record().to_json())
        return backbone


@dataclass
class PreparedRun:
    backbone: Backbone | CachedBackbone
    source: ImageSource
    classes: list[str]
    prompts: list[str]
    text_features: torch.Tensor  # [K, d] raw prompt features
    features: torch.Tensor  # [N, d] raw image features, on the run's device
    labels: torch.Tensor  # [N] class indices, CPU
    domains: list[str]  # the domains in play
    row_domains: np.ndarray  # [N] domain of each row
    clients: list[ClientSplit]
    holdout: dict[str, np.ndarray]  # held-out domain -> rows
    encoded: int
    cached: int
    encode_seconds: float
    data_fingerprint: str
    pixels: torch.Tensor | None = None  # [N, 3, H, W] only for kinds that run the image encoder in the loop


def prepare(
    preset: Preset,
    device: torch.device,
    log: Callable[[str, str], None],
    checkpoint: Callable[[], None],
    needs_images: bool,
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> PreparedRun:
    source = build_source(preset)
    domains = list(preset.data.domains or source.domains)
    cache_dir = default_cache_dir(preset.run.cache_dir)
    needs_encoders = needs_images or preset.adapter.kind not in FEATURE_ONLY_KINDS
    backbone = get_backbone(preset, device, cache_dir, log, needs_encoders)
    if backbone.weights == "random":
        chance = 100.0 / len(source.classes)
        log(
            "warning",
            f"model.pretrained = 'none': the CLIP weights are RANDOM, so every accuracy will sit near chance "
            f"({chance:.0f}% for {len(source.classes)} classes). Use pretrained weights for meaningful numbers.",
        )

    refs = [ref for domain in domains for ref in source.refs(domain)]
    if not refs:
        raise ValueError(f"no images found for domains {domains}")
    prompts = class_prompts(source.classes, preset.data.prompt_template)
    with FeatureCache(cache_dir, backbone, log) as cache:
        encoded = encode_images(source, refs, backbone, cache, preset.model.encode_batch_size, checkpoint, progress)
        text_features = prompt_features(cache, backbone, prompts)
    for location, reason in encoded.skipped:
        log("warning", f"skipped unreadable image {location}: {reason}")
    log("info", f"features: {encoded.encoded} encoded, {encoded.cached} from cache ({cache.path})")

    labels = torch.tensor([ref.label for ref in encoded.refs], dtype=torch.long)
    row_domains = np.array([ref.domain for ref in encoded.refs])
    clients = make_clients(preset, domains, row_domains, labels.numpy())
    digest = hashlib.sha256()
    for content_hash, ref in zip(encoded.hashes, encoded.refs):
        digest.update(f"{content_hash}:{ref.domain}:{ref.label}\n".encode())

    pixels = None
    if needs_images:
        log("info", "this adapter runs the image encoder in the training loop: features cannot be cached for training")
        pixels = load_pixels(source, encoded.refs, backbone.preprocess)

    return PreparedRun(
        backbone=backbone,
        source=source,
        classes=list(source.classes),
        prompts=prompts,
        text_features=text_features.to(device),
        features=encoded.features.to(device),
        labels=labels,
        domains=domains,
        row_domains=row_domains,
        clients=clients,
        holdout=holdout_rows(list(preset.data.holdout), row_domains),
        encoded=encoded.encoded,
        cached=encoded.cached,
        encode_seconds=encoded.seconds,
        data_fingerprint=digest.hexdigest(),
        pixels=pixels,
    )
