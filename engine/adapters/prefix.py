"""Prefix-tuning (Li and Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation", ACL;
code: XiangLi1999/PrefixTuning) in CLIP's text encoder (kind ``prefix``) or image encoder (``prefix_image``).

In every chosen attention layer l the queries also attend to P learned key and value vectors
(K_l, V_l in R^{P x w}, w the layer width, split into heads like the layer's own keys and values):

    Attn_l(x) = softmax(q [K_l; k(x)]^T / sqrt(d_h)) [V_l; v(x)]

The prefix is *in every layer's key/value space*, not an input token: nothing is prepended to the
token sequence, every token (under the text encoder's causal mask too) sees the whole prefix, and the
prefix's own activations are never computed. CoOp (kind ``prompt``) instead prepends M word embeddings at
the *input* only, which the encoder then processes: M x w parameters against prefix-tuning's
layers x 2 x P x w (tests/test_adapters_new.py shows both shapes).

No exact zero-shot start: the prefix keys enter the softmax's normaliser, so for any finite K_l the real
tokens lose a share lambda(x) = sum_p e^{q k_p} / (sum_p e^{q k_p} + sum_j e^{q k_j}) of the attention
(He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning", eq. 7):
Attn_l(x) = (1 - lambda(x)) Attn(x) + lambda(x) softmax(q K_l^T) V_l. Only keys at -infinity would give
lambda = 0, and they would get no gradient. We start with K_l = V_l = 0 (the prefix adds no content and
every query gives each prefix slot the logit 0), so round 0 of a run is the zero-shot head as always,
while the adapter's own start (WiSE-FT's a = 0) is zero-shot with every attention output damped by
1 - lambda(x); the test checks that formula exactly. Making the start exact means changing the method
(a separate softmax for the prefix with a zero-initialised gate, LLaMA-Adapter's "zero-init attention").

Training (the paper's reparameterisation, section 4.3): the prefixes are not optimised directly but as

    [K; V] = anchor + MLP(E),  E in R^{P x w},  MLP = Linear(w, w) -> tanh -> Linear(w, layers x 2 x w)

(the paper's P'_theta and MLP_theta; its code uses a 512-unit MLP for GPT-2). The anchor is the collapsed
prefix the client received (the global model), and MLP's last layer starts each round at zero, so a
client starts exactly from the state it was sent; the E and first layer are redrawn from a fixed seed at
every load (so a resumed run equals an uninterrupted one).

What leaves a client is the *collapsed* prefixes, never the MLP: ``trainable_state()`` returns
{"prefix_key", "prefix_value"} = anchor + MLP(E) ([layers, P, w] each), which the server averages and
sends back, and ``load_trainable_state`` makes them the new anchor with the MLP reset, after which the
adapter evaluates on the plain prefixes (the MLP is skipped). ``trainable_parameters()`` counts those
collapsed prefixes (what a run keeps and sends); ``reparameterisation_parameters()`` counts what the
optimiser additionally updates during a round (E and the MLP).

The anchor lives in the ``prefix_key`` / ``prefix_value`` Parameters (the names the federation sends), read
detached during training, so the optimiser never steps them. A local penalty on the sent tensors
(fedprox's proximal term) would act on that anchor instead of on the prefixes the MLP produces: that
combination is refused with an error at the second local step. Random-subspace training
(``subspace_dim``) trains the plain prefixes instead (``use_plain_parameters``).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.adapters.base import Adapter, ClassScores, register_adapter
from engine.adapters.lora import RecomputedAttention, chosen_blocks, shared_copy, transformer_blocks
from engine.adapters.prompt import TextTower

PREFIX_SEED = 0  # E and the MLP's first layer: the same on every client, in every round and process


class PrefixAttention(RecomputedAttention):
    """One attention layer with the prefix keys and values of its slot in the owner's prefix tensors."""

    def __init__(self, mha: nn.MultiheadAttention, owner: "PrefixTuning", slot: int):
        super().__init__(mha, "prefix-tuning")
        object.__setattr__(self, "owner", owner)  # not a submodule: the owner holds this layer
        self.slot = slot

    def extra_keys_values(self, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.owner.current_prefixes()
        heads, head_dim = self.num_heads, self.embed_dim // self.num_heads

        def split(x: torch.Tensor) -> torch.Tensor:  # [P, w] -> [N, h, P, hd]
            return x.to(dtype).reshape(1, -1, heads, head_dim).transpose(1, 2).expand(batch, -1, -1, -1)

        return split(keys[self.slot]), split(values[self.slot])


class Reparameterisation(nn.Module):
    """MLP(E) of Li and Liang's section 4.3, giving [layers, 2, P, w]; zero output until it trains."""

    def __init__(self, length: int, width: int, layers: int):
        super().__init__()
        self.shape = (length, layers, 2, width)
        self.embedding = nn.Parameter(torch.empty(length, width))
        self.hidden = nn.Linear(width, width)
        self.out = nn.Linear(width, layers * 2 * width)
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        """Drawn on the CPU from the fixed seed, then copied: the same values on any device."""
        generator = torch.Generator().manual_seed(PREFIX_SEED)
        width = self.embedding.shape[1]
        self.embedding.copy_(torch.randn(self.embedding.shape, generator=generator))  # nn.Embedding's N(0, 1)
        weight = torch.empty(self.hidden.weight.shape)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)  # nn.Linear's default init
        self.hidden.weight.copy_(weight)
        self.hidden.bias.copy_(torch.empty(width).uniform_(-1 / math.sqrt(width), 1 / math.sqrt(width), generator=generator))
        self.out.weight.zero_()
        self.out.bias.zero_()

    def forward(self) -> torch.Tensor:
        delta = self.out(torch.tanh(self.hidden(self.embedding)))  # [P, layers * 2 * w]
        return delta.reshape(self.shape).permute(1, 2, 0, 3)  # [layers, 2, P, w]


class PrefixTuning(Adapter):
    """Shared by ``prefix`` (text encoder) and ``prefix_image`` (image encoder); see the module docstring.

    Preset keys: prefix_length (P), prefix_layers (empty = every block; -1 = the last).
    """

    tower = ""  # "text" or "image"

    def __init__(self, context, options=None):
        super().__init__(context, options)
        model = context.clip_model
        if model is None:
            raise ValueError(f"the {self.kind} adapter needs context.clip_model (it runs an encoder)")
        length = int(self.options.prefix_length)
        if self.tower == "text":
            if context.tokenizer is None:
                raise ValueError("the prefix adapter needs context.tokenizer (it runs the text encoder)")
            text = TextTower.of(model)
            self.encoder = shared_copy(text.transformer)
        else:
            self.encoder = shared_copy(model.visual)
        blocks = transformer_blocks(self.encoder, "prefix-tuning")
        chosen = chosen_blocks(len(blocks), list(self.options.prefix_layers), "adapter.prefix_layers")
        width = blocks[0].attn.embed_dim
        for slot, index in enumerate(chosen):
            blocks[index].attn = PrefixAttention(blocks[index].attn, self, slot)
        self.blocks = chosen
        # The collapsed prefixes: what is sent, aggregated and evaluated; zero at the start (see the docstring).
        self.prefix_key = nn.Parameter(torch.zeros(len(chosen), length, width))
        self.prefix_value = nn.Parameter(torch.zeros(len(chosen), length, width))
        self.reparam = Reparameterisation(length, width, len(chosen))
        self.reparameterise = True  # False: train the prefixes directly (random-subspace training)
        self.collapsed = True  # the MLP's output is exactly zero: evaluate on the plain prefixes
        self._prefixes: tuple[torch.Tensor, torch.Tensor] | None = None

        if self.tower == "text":
            self.text_tower = dataclasses.replace(text, transformer=self.encoder)
            self.text_tower.embed_prompts(self, context)
        else:
            self.dtype = next(model.visual.parameters()).dtype
            self.register_buffer("text", F.normalize(context.class_text_features.float(), dim=-1), persistent=False)
        self.train(False)

    # -- the prefixes ----------------------------------------------------------------------------------
    def use_plain_parameters(self) -> None:
        """Train ``prefix_key`` / ``prefix_value`` themselves (no MLP): what a wrapper that owns the
        parameterisation (random-subspace training) needs."""
        self.collapse()
        self.reparameterise = False
        self.reparam.requires_grad_(False)

    def prefixes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) [layers, P, w] as the encoder uses them now (in training: anchor + MLP(E))."""
        if not self.reparameterise:
            return self.prefix_key, self.prefix_value
        if self.training:
            if self.prefix_key.grad is not None or self.prefix_value.grad is not None:
                raise RuntimeError(
                    "prefix-tuning trains its prefixes through an MLP, so a local penalty on the sent prefixes "
                    "(fedprox's proximal term) cannot act on what trains; use another aggregation, or "
                    "adapter.subspace_dim > 0 (which trains the prefixes without the MLP)"
                )
            self.collapsed = False
        return self.values(detach_anchor=True)

    def values(self, detach_anchor: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefixes' current values; the plain tensors once collapsed (the MLP's output is then 0)."""
        if not self.reparameterise or self.collapsed:
            return self.prefix_key, self.prefix_value
        delta = self.reparam()
        keys = self.prefix_key.detach() if detach_anchor else self.prefix_key
        values = self.prefix_value.detach() if detach_anchor else self.prefix_value
        return keys + delta[:, 0], values + delta[:, 1]

    def current_prefixes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefixes of the forward pass in progress (computed once per pass, read by every layer)."""
        return self._prefixes if self._prefixes is not None else self.prefixes()

    @torch.no_grad()
    def collapse(self) -> None:
        """anchor <- anchor + MLP(E), MLP reset: the same prefixes, now plain tensors."""
        keys, values = self.values(detach_anchor=True)
        self.prefix_key.copy_(keys)
        self.prefix_value.copy_(values)
        self.reparam.reset()
        self.collapsed = True

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The collapsed prefixes (never the MLP): what a client sends and the server averages."""
        with torch.no_grad():
            keys, values = self.values(detach_anchor=True)
        return {"prefix_key": keys.detach().clone(), "prefix_value": values.detach().clone()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        missing = [name for name in ("prefix_key", "prefix_value") if name not in state]
        if missing:
            raise KeyError(f"adapter state lacks {missing}")
        with torch.no_grad():
            self.prefix_key.copy_(state["prefix_key"])
            self.prefix_value.copy_(state["prefix_value"])
            self.reparam.reset()
        self.collapsed = True

    def trainable_parameters(self) -> int:
        """The collapsed prefixes: layers x 2 x P x w (what a run keeps and sends)."""
        return self.prefix_key.numel() + self.prefix_value.numel()

    def reparameterisation_parameters(self) -> int:
        """What the optimiser updates besides, during a round: E (P w) and the MLP (w^2 + w + w 2 L w + 2 L w)."""
        return sum(p.numel() for p in self.reparam.parameters()) if self.reparameterise else 0

    # -- running ------------------------------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # the frozen encoder runs as in zero-shot
        return self

    def encode(self, run):
        self._prefixes = self.prefixes()
        try:
            return run()
        finally:
            self._prefixes = None

    def class_features(self) -> torch.Tensor:
        return F.normalize(
            self.encode(lambda: self.text_tower.encode_embedded(self.embedded, self.tokens)).float(), dim=-1
        )

    def classes(self) -> torch.Tensor:
        if self.training or torch.is_grad_enabled():
            return self.class_features()
        key = (self.collapsed, self.prefix_key._version, self.prefix_value._version, self.prefix_key.data_ptr(),
               tuple(p._version for p in self.reparam.parameters()))
        cached = getattr(self, "_eval_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, self.class_features())
            self._eval_cache = cached
        return cached[1]


@register_adapter
class PrefixAdapter(PrefixTuning):
    """Prefix-tuning in the text encoder: the K class prompts run through it once per forward; the image side
    uses the cached features (``needs_images = False``)."""

    kind = "prefix"
    needs_images = False
    tower = "text"

    def forward(self, features: torch.Tensor) -> ClassScores:
        classes = self.classes()
        return ClassScores(image=F.normalize(features.to(classes.dtype), dim=-1), classes=classes)


@register_adapter
class PrefixImageAdapter(PrefixTuning):
    """Prefix-tuning in the image encoder (``needs_images``: it runs the image tower on every batch, like lora)."""

    kind = "prefix_image"
    needs_images = True
    tower = "image"

    def forward(self, images: torch.Tensor) -> ClassScores:
        features = self.encode(lambda: self.encoder(images.to(self.dtype))).float()
        return ClassScores(image=F.normalize(features, dim=-1), classes=self.text)
