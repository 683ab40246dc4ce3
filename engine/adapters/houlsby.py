"""Houlsby adapters inside CLIP's transformer blocks (Houlsby et al. 2019, "Parameter-Efficient Transfer
Learning for NLP", ICML; code: google-research/adapter-bert).

Each chosen block of the image tower (and, with ``houlsby_towers = ["image", "text"]``, of the text tower)
gets two bottleneck adapters, one on the output of the attention sub-layer and one on the output of the
MLP sub-layer, each before the residual add (the paper's Figure 2; CLIP's blocks are pre-LN, so there is
no LayerNorm after the add to place it before):

    x' = x + A(Attn(LN1(x)))        x'' = x' + A(MLP(LN2(x')))
    A(h) = h + W_up act(W_down h + b_down) + b_up,  W_down: w -> w / houlsby_reduction,  act = GELU

(GELU as adapter-bert; the bottleneck has at least one unit). W_down, b_down take nn.Linear's default
init drawn from a fixed seed (every client and process builds the same start); W_up and b_up are zero, so
A(h) = h exactly and round 0 is exactly zero-shot (WiSE-FT's a = 0 means "no adapter"). Per adapted block
of width w with m = max(1, w // reduction): 2 (2 w m + m + w) parameters. The paper also trains the
LayerNorms; here the encoder stays frozen and only the adapters train (and are sent).

The adapter is inserted by replacing the block's ``ls_1`` / ``ls_2`` (open_clip's LayerScale or Identity,
applied to exactly the sub-layer output) with "LayerScale, then A", so open_clip's own block code runs.

Like ``lora``, the image tower is in the training loop (``needs_images``: inputs are preprocessed images,
and the run says so in its log), through a copy of the tower whose frozen weights are shared with the
run's CLIP (``lora.shared_copy``). Evaluation of round 0 uses the zero-shot head on the cached features,
as for every kind. A bottleneck with a nonlinearity cannot be merged into the frozen weights; in eval
mode the adapted class-prompt features (text tower) are computed once per adapter state instead of once
per batch.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.adapters.base import Adapter, ClassScores, register_adapter
from engine.adapters.lora import chosen_blocks, shared_copy, transformer_blocks
from engine.adapters.prompt import TextTower

HOULSBY_SEED = 0  # W_down's init: the same on every client and in every process
TOWERS = ("image", "text")


class Bottleneck(nn.Module):
    """A(h) = h + W_up GELU(W_down h + b_down) + b_up; W_up = 0 and b_up = 0 at the start (A = identity)."""

    def __init__(self, width: int, hidden: int, generator: torch.Generator):
        super().__init__()
        self.down = nn.Linear(width, hidden)
        self.up = nn.Linear(hidden, width)
        with torch.no_grad():  # nn.Linear's own default init, from the fixed generator
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5), generator=generator)
            bound = 1.0 / math.sqrt(width)
            self.down.bias.uniform_(-bound, bound, generator=generator)
            self.up.weight.zero_()
            self.up.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(F.gelu(self.down(h.float()))).to(h.dtype)


class AdaptedSublayer(nn.Module):
    """Replaces a block's ``ls_1`` / ``ls_2``: the sub-layer output through its LayerScale, then the adapter."""

    def __init__(self, scale: nn.Module, adapter: Bottleneck):
        super().__init__()
        self.scale = scale
        self.adapter = adapter

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.scale(h))


def insert_adapters(tower: nn.Module, layers, reduction: int, generator: torch.Generator) -> list[int]:
    """Put two adapters into each chosen block of ``tower`` (a shared copy); returns the chosen block numbers."""
    blocks = transformer_blocks(tower, "houlsby")
    chosen = chosen_blocks(len(blocks), layers, "adapter.houlsby_layers")
    for index in chosen:
        block = blocks[index]
        if not (hasattr(block, "ls_1") and hasattr(block, "ls_2")):
            raise NotImplementedError("houlsby needs open_clip's ResidualAttentionBlock (ls_1 / ls_2 sub-layer outputs)")
        width = block.attn.embed_dim
        hidden = max(1, width // reduction)
        block.ls_1 = AdaptedSublayer(block.ls_1, Bottleneck(width, hidden, generator))
        block.ls_2 = AdaptedSublayer(block.ls_2, Bottleneck(width, hidden, generator))
    return chosen


@register_adapter
class HoulsbyAdapter(Adapter):
    """Bottleneck adapters after attention and MLP in each chosen encoder block; see the module docstring.

    Preset keys: houlsby_reduction, houlsby_layers (empty = every block; -1 = the last), houlsby_towers.
    """

    kind = "houlsby"
    needs_images = True

    def __init__(self, context, options=None):
        super().__init__(context, options)
        model = context.clip_model
        if model is None:
            raise ValueError("the houlsby adapter needs context.clip_model (it runs the encoders)")
        towers = list(self.options.houlsby_towers)
        if not towers or len(set(towers)) != len(towers) or any(t not in TOWERS for t in towers):
            raise ValueError(f"adapter.houlsby_towers must be distinct names from {list(TOWERS)}, got {towers}")
        reduction = int(self.options.houlsby_reduction)
        layers = list(self.options.houlsby_layers)
        generator = torch.Generator().manual_seed(HOULSBY_SEED)
        self.towers = towers
        self.dtype = next(model.visual.parameters()).dtype
        self.visual = shared_copy(model.visual)
        self.image_blocks = insert_adapters(self.visual, layers, reduction, generator) if "image" in towers else []
        self.text_blocks: list[int] = []
        if "text" in towers:
            if context.tokenizer is None:
                raise ValueError("houlsby_towers with 'text' needs context.tokenizer (it runs the text encoder)")
            tower = TextTower.of(model)
            self.text_transformer = shared_copy(tower.transformer)
            self.text_blocks = insert_adapters(self.text_transformer, layers, reduction, generator)
            self.text_tower = dataclasses.replace(tower, transformer=self.text_transformer)
            self.text_tower.embed_prompts(self, context)
            # The text adapters' tensors, for the eval cache's key (kept even when a wrapper freezes them).
            self.text_adapter_tensors = [p for p in self.text_transformer.parameters() if p.requires_grad]
        else:
            self.register_buffer("text", F.normalize(context.class_text_features.float(), dim=-1), persistent=False)
        self.train(False)  # the frozen towers run in eval mode, as in zero-shot

    def train(self, mode: bool = True):
        super().train(mode)
        self.visual.eval()  # no dropout anywhere: the adapters have none and the towers stay as in zero-shot
        if "text" in self.towers:
            self.text_transformer.eval()
        return self

    def class_features(self) -> torch.Tensor:
        """Normalised class-prompt features [K, d] from the adapted text tower."""
        return F.normalize(self.text_tower.encode_embedded(self.embedded, self.tokens).float(), dim=-1)

    def classes(self) -> torch.Tensor:
        if "text" not in self.towers:
            return self.text
        if self.training or torch.is_grad_enabled():
            return self.class_features()
        # In-place writes (optimizer steps, load_trainable_state) bump _version: the cache follows the adapter.
        key = tuple((p._version, p.data_ptr()) for p in self.text_adapter_tensors)
        cached = getattr(self, "_eval_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, self.class_features())
            self._eval_cache = cached
        return cached[1]

    def forward(self, images: torch.Tensor) -> ClassScores:
        features = self.visual(images.to(self.dtype)).float()
        return ClassScores(image=F.normalize(features, dim=-1), classes=self.classes())
