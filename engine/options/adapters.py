"""Adapter kinds (``adapter.kind``) and the keys each one reads from ``[adapter]``.

``tensors`` names the top-level tensor prefixes each kind trains, so ``federation.personal_layers`` can
be checked before a run starts without building the model.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.schema import NoOptions, OptionsCatalog, knob

ADAPTER_KINDS = OptionsCatalog("adapter kind")

ADAPTER_KINDS.register("attai", help="FedCLIP's attention adapter on the image features")(NoOptions)
ADAPTER_KINDS.register("linear_head", help="a linear head initialised from the class prompts (zero-shot start)")(
    NoOptions
)


@ADAPTER_KINDS.register("clip_adapter", help="CLIP-Adapter (Gao et al.) on the image features")
@ADAPTER_KINDS.register("text_adapter", help="CLIP-Adapter on the class text features")
@ADAPTER_KINDS.register("both", help="CLIP-Adapter on the image and the text features")
@dataclass(frozen=True)
class ResidualAdapterOptions:
    ratio: float = knob(0.2, min=0.0, max=1.0, help="a in f* = a A(f) + (1 - a) f (Gao et al.)")
    # The bottleneck is d / reduction wide; beyond the feature width it would have no units left.
    reduction: int = knob(4, min=1, max=4096, help="bottleneck width d / reduction")


@ADAPTER_KINDS.register("lora", help="CLIP-LoRA: low-rank updates inside the image encoder's attention")
@dataclass(frozen=True)
class LoRAOptions:
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
class PromptOptions:
    # CLIP's text encoder reads 77 tokens, two of them start and end markers.
    prompt_length: int = knob(
        0, min=0, max=75, help="prompt (CoOp): context vectors M; 0 = the template's word count (starts at zero-shot)"
    )
