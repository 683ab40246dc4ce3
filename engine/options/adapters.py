"""Adapter kinds (``adapter.kind``) and the keys each one reads from ``[adapter]``.

Every kind's options extend ``AdapterOptions``, the keys that every kind accepts (``subspace_dim``):
``engine.adapters.base.build_adapter`` reads them from the options it is given, so they need no
separate path from the preset to the adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.schema import OptionsCatalog, knob

ADAPTER_KINDS = OptionsCatalog("adapter kind")

# Python's list indices: 0 is the first block, -1 the last. No open_clip tower has more than 64 blocks
# (ViT-bigG-14: 48), so 255 either way is past any real model; the tower's own depth is checked when built.
MAX_BLOCK_INDEX = 255


@dataclass(frozen=True)
class AdapterOptions:
    """Keys every adapter kind accepts."""

    # z has d entries and the client uploads exactly those; 2^24 (16.8 M floats, 64 MB) is far past any
    # "small upload", and d must also stay <= the kind's own trainable count (checked when it is built).
    subspace_dim: int = knob(
        0, min=0, max=2**24,
        help="random-subspace training (Li et al. 2018): train z in R^d, theta = theta_0 + P z, P a seeded "
             "Fastfood projection; clients upload d numbers; 0 = off",
    )


ADAPTER_KINDS.register("attai", help="FedCLIP's attention adapter on the image features")(AdapterOptions)
ADAPTER_KINDS.register("linear_head", help="a linear head initialised from the class prompts (zero-shot start)")(
    AdapterOptions
)


@ADAPTER_KINDS.register("clip_adapter", help="CLIP-Adapter (Gao et al.) on the image features")
@ADAPTER_KINDS.register("text_adapter", help="CLIP-Adapter on the class text features")
@ADAPTER_KINDS.register("both", help="CLIP-Adapter on the image and the text features")
@dataclass(frozen=True)
class ResidualAdapterOptions(AdapterOptions):
    ratio: float = knob(0.2, min=0.0, max=1.0, help="a in f* = a A(f) + (1 - a) f (Gao et al.)")
    # The bottleneck is d / reduction wide; beyond the feature width it would have no units left.
    reduction: int = knob(4, min=1, max=4096, help="bottleneck width d / reduction")


@ADAPTER_KINDS.register("lora", help="CLIP-LoRA: low-rank updates inside the image encoder's attention")
@dataclass(frozen=True)
class LoRAOptions(AdapterOptions):
    # A rank beyond the attention width is no longer low-rank; 1024 covers ViT-L/14 (width 1024).
    lora_rank: int = knob(2, min=1, max=1024, help="lora: rank r of B A")
    lora_alpha: float = knob(1.0, min=0.0, min_exclusive=True, max=1e4, help="lora: W' = W + (alpha / r) B A")
    lora_dropout: float = knob(0.25, min=0.0, max=1.0, help="lora: dropout on the LoRA path's input, training only")
    lora_targets: list[str] = knob(
        ["q", "k", "v", "o"], choices=["q", "k", "v", "o"],
        help="lora: attention projections to adapt, any of q, k, v, o (o = out_proj)",
    )
    lora_share: str = knob(
        "both", choices=["both", "b_only"], help="lora: send A and B, or freeze a seeded A and train/send B (FFA-LoRA)"
    )


@ADAPTER_KINDS.register("prompt", help="CoOp: learned context words in the class prompts")
@dataclass(frozen=True)
class PromptOptions(AdapterOptions):
    # CLIP's text encoder reads 77 tokens, two of them start and end markers.
    prompt_length: int = knob(
        0, min=0, max=75, help="prompt (CoOp): context vectors M; 0 = the template's word count (starts at zero-shot)"
    )


@ADAPTER_KINDS.register(
    "houlsby", help="Houlsby adapters: bottlenecks after attention and MLP inside the encoder blocks (needs images)"
)
@dataclass(frozen=True)
class HoulsbyOptions(AdapterOptions):
    # The bottleneck is width / reduction wide (at least 1 unit); beyond the widest open_clip tower
    # (ViT-bigG: 1664) every reduction gives one unit.
    houlsby_reduction: int = knob(16, min=1, max=4096, help="houlsby: bottleneck width = block width / reduction")
    houlsby_layers: list[int] = knob(
        [], min=-MAX_BLOCK_INDEX, max=MAX_BLOCK_INDEX,
        help="houlsby: block indices to adapt in each tower (-1 = the last); empty = every block",
    )
    houlsby_towers: list[str] = knob(
        ["image"], choices=["image", "text"], help="houlsby: encoders to adapt: image, text or both"
    )


@ADAPTER_KINDS.register("prefix", help="prefix-tuning: learned keys and values in every text-encoder attention layer")
@ADAPTER_KINDS.register(
    "prefix_image", help="prefix-tuning in the image encoder's attention layers instead (needs images)"
)
@dataclass(frozen=True)
class PrefixOptions(AdapterOptions):
    # Each prefix slot is one more key every token attends to; past 256 (more than CLIP's 77 text tokens or
    # ViT-B/16's 197 image tokens) the prefix outweighs the input itself.
    prefix_length: int = knob(8, min=1, max=256, help="prefix: key/value vectors prepended per attention layer")
    prefix_layers: list[int] = knob(
        [], min=-MAX_BLOCK_INDEX, max=MAX_BLOCK_INDEX,
        help="prefix: block indices that get a prefix (-1 = the last); empty = every block",
    )
