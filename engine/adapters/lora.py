"""LoRA inside CLIP's image encoder (CLIP-LoRA, Zanella and Ben Ayed 2024, "Low-Rank Few-Shot Adaptation of
Vision-Language Models"; code: MaxZanella/CLIP-LoRA, loralib/layers.py).

On each chosen attention projection W (q, k, v: the three row blocks of nn.MultiheadAttention's
``in_proj_weight``; o: ``out_proj``): W' = W + (alpha / r) B A with A [r, in], B [out, r]. A starts
kaiming-uniform(a = sqrt 5) like the reference (and nn.Linear), B = 0, so round 0 is exactly zero-shot.
In training the LoRA path sees dropout(x) (p = 0.25 in the reference): y = W x + b + (alpha / r) B A drop(x).

Scaling: METHODS.md and the LoRA paper use alpha / r; the CLIP-LoRA code uses alpha / sqrt(r) (with
alpha = 1, r = 2). We follow alpha / r; set lora_alpha = sqrt(2) to match the code's scale at r = 2.

Federated averaging of LoRA: averaging A and B separately is not averaging the update B A, because
mean(B) mean(A) != mean(B A). ``lora_share = "b_only"`` is FFA-LoRA (Sun et al. 2024): A is frozen, drawn
from a fixed seed so every client holds the same A, and only B trains and is sent; then
mean_k(B_k) A = mean_k(B_k A) exactly. ``"both"`` sends A and B (the plain, biased average).

Memory: the adapter owns a copy of the image tower's module tree whose frozen base tensors are *shared*
with the context's CLIP model (the same Parameter objects, never written to: requires_grad is off and
merging writes into separate tensors). Per adapter (per client) the extra memory is the LoRA factors
(layers x targets x r (in + out) floats), the tower's small buffers, and, while merged for evaluation,
one merged copy of each adapted weight (4 d^2 per layer with all four targets: about 28M floats = 113 MB
for ViT-B/32's 12 layers of width 768; freed again by ``unmerge()``/``train()``). Training also keeps the
image tower's activations for backprop, like any in-encoder method.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.adapters.base import Adapter, ClassScores, register_adapter

LORA_TARGETS = ("q", "k", "v", "o")
# Fixed seed for A: every client (and every process) builds the same A, which b_only sharing needs.
LORA_A_SEED = 0


class LowRankUpdate(nn.Module):
    """delta(x) = (alpha / r) B A drop(x); as a weight: (alpha / r) B A."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float,
                 generator: torch.Generator):
        super().__init__()
        self.scaling = alpha / rank
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5), generator=generator)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self.dropout(x), self.A.to(x.dtype)), self.B.to(x.dtype)) * self.scaling

    def weight_delta(self) -> torch.Tensor:
        return (self.B @ self.A) * self.scaling


class RecomputedAttention(nn.Module):
    """Drop-in replacement for open_clip's nn.MultiheadAttention that recomputes attention from its weights.

    nn.MultiheadAttention keeps q, k, v in one ``in_proj_weight`` Parameter that F.multi_head_attention_forward
    reads directly, so an in-encoder method cannot hook a Linear there. Like CLIP-LoRA's
    PlainMultiheadAttentionLoRA we recompute attention ourselves: q/k/v from the three row blocks of the
    (shared, frozen) in_proj weight, scaled dot-product attention, then out_proj. Subclasses change the
    projections (``project``: LoRA) or add keys and values (``extra_keys_values``: prefix-tuning); with
    neither it gives nn.MultiheadAttention's result.
    """

    def __init__(self, mha: nn.MultiheadAttention, what: str = "LoRA"):
        super().__init__()
        if not mha._qkv_same_embed_dim or mha.in_proj_weight is None:
            raise NotImplementedError(f"{what} supports attention with equal q/k/v dimensions only")
        if mha.bias_k is not None or mha.add_zero_attn or mha.dropout:
            raise NotImplementedError(f"{what} does not support bias_k/bias_v, add_zero_attn or attention dropout")
        self.embed_dim = mha.embed_dim
        self.num_heads = mha.num_heads
        self.batch_first = mha.batch_first
        # The very same Parameter objects as the frozen CLIP: shared read-only, never copied.
        self.in_proj_weight = mha.in_proj_weight
        self.in_proj_bias = mha.in_proj_bias
        self.out_proj_weight = mha.out_proj.weight
        self.out_proj_bias = mha.out_proj.bias

    def base_weight(self, target: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        if target == "o":
            return self.out_proj_weight, self.out_proj_bias
        index = "qkv".index(target)
        d = self.embed_dim
        bias = None if self.in_proj_bias is None else self.in_proj_bias[index * d : (index + 1) * d]
        return self.in_proj_weight[index * d : (index + 1) * d], bias

    def project(self, x: torch.Tensor, target: str) -> torch.Tensor:
        weight, bias = self.base_weight(target)
        return F.linear(x, weight, bias)

    def extra_keys_values(self, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Keys and values [N, h, P, hd] every query also attends to (prepended), or None."""
        return None

    def forward(self, query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if key_padding_mask is not None or need_weights:
            raise NotImplementedError("recomputed attention supports neither key_padding_mask nor need_weights")
        if not self.batch_first:  # [L, N, E] -> [N, L, E]
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        batch, length, _ = query.shape
        heads, head_dim = self.num_heads, self.embed_dim // self.num_heads

        def split_heads(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(batch, -1, heads, head_dim).transpose(1, 2)  # [N, h, L, hd]

        q = split_heads(self.project(query, "q"))
        k = split_heads(self.project(key, "k"))
        v = split_heads(self.project(value, "v"))
        mask = None
        if attn_mask is not None:
            # nn.MultiheadAttention: bool True = masked out, float = additive; SDPA's bool means "attend".
            mask = attn_mask if attn_mask.dtype != torch.bool else torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill(
                attn_mask, float("-inf"))
            if mask.dim() == 3:  # [N * h, L, S]
                mask = mask.reshape(batch, heads, length, -1)
        extra = self.extra_keys_values(batch, q.dtype)
        if extra is not None:
            k = torch.cat([extra[0], k], dim=2)
            v = torch.cat([extra[1], v], dim=2)
            if mask is None and is_causal:
                mask = torch.full((length, length), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
            if mask is not None:  # every query sees the whole prefix: zeros in front of the mask's columns
                mask = F.pad(mask, (extra[0].shape[2], 0), value=0.0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None)
        out = self.project(out.transpose(1, 2).reshape(batch, length, self.embed_dim), "o")
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, None


class LoRAMultiheadAttention(RecomputedAttention):
    """Drop-in replacement for open_clip's nn.MultiheadAttention (same call, same result when B = 0).

    Dropout on the LoRA input cannot be expressed as a weight reparametrisation, hence the recomputed
    attention (``RecomputedAttention``) with each chosen projection plus its LoRA path.
    """

    def __init__(self, mha: nn.MultiheadAttention, targets, rank: int, alpha: float, dropout: float,
                 generator: torch.Generator):
        super().__init__(mha, "LoRA")
        d = self.embed_dim
        self.lora = nn.ModuleDict({t: LowRankUpdate(d, d, rank, alpha, dropout, generator) for t in targets})
        self.merged_weights: dict[str, torch.Tensor] | None = None

    # -- weights -------------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """W' = W + (alpha / r) B A into separate tensors; the shared base weights stay untouched."""
        self.merged_weights = {
            t: self.base_weight(t)[0] + update.weight_delta().to(self.in_proj_weight.dtype)
            for t, update in self.lora.items()
        }

    def unmerge(self) -> None:
        self.merged_weights = None

    def project(self, x: torch.Tensor, target: str) -> torch.Tensor:
        weight, bias = self.base_weight(target)
        if target not in self.lora:
            return F.linear(x, weight, bias)
        if self.merged_weights is not None:
            return F.linear(x, self.merged_weights[target], bias)
        return F.linear(x, weight, bias) + self.lora[target](x)

    def merged_module(self) -> nn.MultiheadAttention:
        """A plain nn.MultiheadAttention holding W' (no LoRA code on the inference path)."""
        plain = nn.MultiheadAttention(
            self.embed_dim, self.num_heads, bias=self.in_proj_bias is not None, batch_first=self.batch_first
        ).to(device=self.in_proj_weight.device, dtype=self.in_proj_weight.dtype)
        with torch.no_grad():
            d = self.embed_dim
            for index, target in enumerate("qkv"):
                weight = self.base_weight(target)[0]
                if target in self.lora:
                    weight = weight + self.lora[target].weight_delta().to(weight.dtype)
                plain.in_proj_weight[index * d : (index + 1) * d].copy_(weight)
            out = self.out_proj_weight
            if "o" in self.lora:
                out = out + self.lora["o"].weight_delta().to(out.dtype)
            plain.out_proj.weight.copy_(out)
            if self.in_proj_bias is not None:
                plain.in_proj_bias.copy_(self.in_proj_bias)
            if self.out_proj_bias is not None:
                plain.out_proj.bias.copy_(self.out_proj_bias)
        plain.requires_grad_(False)
        return plain


def shared_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s tree whose Parameters are the very same (frozen, read-only) objects.

    Wrapping the copy's blocks never touches the frozen CLIP the run (and every other client) uses; the
    cost is the tree's small buffers, not its weights. Nothing may write into the shared Parameters.
    """
    copied = copy.deepcopy(module, memo={id(p): p for p in module.parameters()})
    copied.requires_grad_(False)
    return copied


def transformer_blocks(tower: nn.Module, what: str = "LoRA") -> list[nn.Module]:
    """The residual attention blocks of an open_clip transformer (or a tower holding one as ``.transformer``)."""
    transformer = getattr(tower, "transformer", tower)
    blocks = getattr(transformer, "resblocks", None)
    if blocks is None:
        raise NotImplementedError(f"{what} needs an open_clip transformer (.resblocks), got {type(tower).__name__}")
    for block in blocks:
        attn = getattr(block, "attn", None)
        if not isinstance(attn, nn.MultiheadAttention):
            raise NotImplementedError(
                f"{what} supports open_clip's ResidualAttentionBlock (nn.MultiheadAttention), got {type(attn).__name__}"
            )
    return list(blocks)


def chosen_blocks(count: int, indices, key: str) -> list[int]:
    """Block numbers from a preset's list (Python indices, -1 = last; empty = all); an error names ``key``."""
    if not indices:
        return list(range(count))
    chosen = []
    for index in indices:
        if not -count <= index < count:
            raise ValueError(f"{key}: block {index} does not exist in a tower of {count} blocks")
        block = index % count
        if block in chosen:
            raise ValueError(f"{key}: block {block} is named twice ({list(indices)})")
        chosen.append(block)
    return sorted(chosen)


def _attention_modules(visual: nn.Module) -> list[tuple[nn.Module, str, nn.MultiheadAttention]]:
    """(parent, attribute, module) for every nn.MultiheadAttention in the tower's transformer blocks."""
    if getattr(getattr(visual, "transformer", None), "resblocks", None) is None:
        raise NotImplementedError("LoRA needs an open_clip VisionTransformer (visual.transformer.resblocks)")
    return [(block, "attn", block.attn) for block in transformer_blocks(visual, "LoRA")]


@register_adapter
class LoRAAdapter(Adapter):
    """CLIP-LoRA on the image tower; the text side is the frozen class-prompt features.

    Inputs are preprocessed images [B, 3, H, W] (``needs_images``): the adapter runs its own LoRA-wrapped
    view of the frozen image tower. ``eval()`` merges W' = W + (alpha / r) B A (no inference latency),
    ``train()`` unmerges; ``merge()``/``unmerge()`` do it explicitly and ``merged()`` exports a plain
    open_clip image tower holding W'. Preset keys: lora_rank, lora_alpha, lora_dropout, lora_targets,
    lora_share. Parameters: layers x |targets| x 2 r d ("both") or r d ("b_only").
    """

    kind = "lora"
    needs_images = True

    def __init__(self, context, options=None):
        super().__init__(context, options)
        if context.clip_model is None:
            raise ValueError("the lora adapter needs context.clip_model (it runs the image encoder)")
        targets = list(self.options.lora_targets)
        unknown = [t for t in targets if t not in LORA_TARGETS]
        if unknown or not targets or len(set(targets)) != len(targets):
            raise ValueError(f"lora_targets must be distinct names from {list(LORA_TARGETS)}, got {targets}")
        rank = int(self.options.lora_rank)
        alpha = float(self.options.lora_alpha)
        dropout = float(self.options.lora_dropout)
        self.share = str(self.options.lora_share)
        if self.share not in ("both", "b_only"):
            raise ValueError(f"lora_share must be 'both' or 'b_only', got {self.share!r}")

        # Copy the module tree but keep every Parameter object shared (frozen, read-only): see the module
        # docstring for why this is safe and what it costs.
        self.visual = shared_copy(context.clip_model.visual)
        generator = torch.Generator().manual_seed(LORA_A_SEED)
        self.lora_layers: list[LoRAMultiheadAttention] = []
        for parent, name, attn in _attention_modules(self.visual):
            layer = LoRAMultiheadAttention(attn, targets, rank, alpha, dropout, generator)
            setattr(parent, name, layer)
            self.lora_layers.append(layer)
        if self.share == "b_only":
            for layer in self.lora_layers:
                for update in layer.lora.values():
                    update.A.requires_grad_(False)  # frozen: excluded from trainable_state and the optimizer
        self.register_buffer("text", F.normalize(context.class_text_features.float(), dim=-1), persistent=False)
        self.train(False)  # built merged and in eval mode, like the frozen CLIP

    @property
    def is_merged(self) -> bool:
        return self.lora_layers[0].merged_weights is not None

    def merge(self) -> None:
        for layer in self.lora_layers:
            layer.merge()

    def unmerge(self) -> None:
        for layer in self.lora_layers:
            layer.unmerge()

    def train(self, mode: bool = True):
        super().train(mode)
        # The frozen tower stays in eval mode (no patch dropout etc., as in zero-shot); only the LoRA
        # dropouts follow the mode.
        self.visual.eval()
        for layer in self.lora_layers:
            layer.lora.train(mode)
        if mode:
            self.unmerge()
        else:
            self.merge()
        return self

    def load_trainable_state(self, state):
        super().load_trainable_state(state)
        if self.is_merged:
            self.merge()  # the merged weights were computed from the old factors

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """An independent plain open_clip image tower with W' written into its attention weights."""
        plain = copy.deepcopy(self.visual)
        for block, layer in zip(plain.transformer.resblocks, self.lora_layers, strict=True):
            block.attn = layer.merged_module()
        plain.eval()
        return plain

    def forward(self, images: torch.Tensor) -> ClassScores:
        dtype = self.lora_layers[0].in_proj_weight.dtype
        features = self.visual(images.to(dtype)).float()
        return ClassScores(image=F.normalize(features, dim=-1), classes=self.text)
