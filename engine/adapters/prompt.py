"""CoOp: learnable prompt context on the text side (Zhou et al. 2022, "Learning to Prompt for Vision-Language
Models"; code: KaiyangZhou/CoOp, trainers/coop.py).

t_k = TextEncoder([SOT][v_1 .. v_M][CLASS_k tokens and the rest of the prompt][EOT]), class token at the end
(CoOp's default position), one context shared by all classes (unified context). M vectors of the text
width: M x width parameters (16 x 512 = 8,192 for ViT-B/32).

Initialisation (CoOp's two options):
- M equal to the number of tokens of the prompt template's words before the class name ("a picture of a"
  is 4 tokens; ``prompt_length = 0`` picks that count): the context is the token embedding of those words
  ("init from words"), and the token sequence is then exactly the zero-shot prompt, so round 0 equals
  zero-shot and WiSE-FT's a = 0 means "no adapter".
- any other M: v_i ~ N(0, 0.02^2) (CoOp's random init, its default M = 16), drawn from a fixed seed so all
  clients start from the same context. The template words are then
  replaced by the M learned vectors, so round 0 is NOT zero-shot; WiSE-FT's theta_0 is that random prompt.

The image side uses the cached frozen features (``needs_images = False``); the text encoder runs on the K
class prompts once per forward (not per sample), with gradients flowing only into the context; in eval mode
under no_grad the K class features are cached until the context changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.adapters.base import Adapter, ClassScores, register_adapter

CONTEXT_SEED = 0  # random context init: the same on every client and in every process
PLACEHOLDER = "X"  # CoOp's placeholder word; one BPE token whose embedding is replaced by the context


@dataclass
class TextTower:
    """The pieces of an open_clip text encoder that ``encode_text`` uses, for CLIP and CustomTextCLIP alike."""

    token_embedding: nn.Embedding
    positional_embedding: torch.Tensor
    transformer: nn.Module
    ln_final: nn.Module
    text_projection: torch.Tensor | nn.Linear | None
    attn_mask: torch.Tensor | None
    pool_type: str
    eos_id: int | None

    @classmethod
    def of(cls, model) -> "TextTower":
        text = getattr(model, "text", None)
        if text is not None and hasattr(text, "token_embedding"):  # CustomTextCLIP with a TextTransformer
            if getattr(text, "cls_emb", None) is not None or getattr(text, "use_pad_mask", False):
                raise NotImplementedError("prompt learning does not support text towers with a CLS token or pad mask")
            return cls(text.token_embedding, text.positional_embedding, text.transformer, text.ln_final,
                       text.text_projection, text.attn_mask, text.pool_type, getattr(text, "eos_id", None))
        if not hasattr(model, "token_embedding"):
            raise NotImplementedError(f"prompt learning needs an open_clip text transformer, got {type(model).__name__}")
        return cls(model.token_embedding, model.positional_embedding, model.transformer, model.ln_final,
                   model.text_projection, model.attn_mask, model.text_pool_type, getattr(model, "text_eos_id", None))

    def embed_prompts(self, module: nn.Module, context) -> None:
        """Tokenise the class prompts once and keep their frozen token embeddings on ``module`` as the
        (non-persistent) buffers ``tokens`` and ``embedded``, for kinds that rerun this tower every step."""
        tokens = context.tokenizer(context.prompts).to(self.token_embedding.weight.device)
        with torch.no_grad():
            embedded = self.token_embedding(tokens)
        module.register_buffer("tokens", tokens, persistent=False)
        module.register_buffer("embedded", embedded, persistent=False)

    def encode_embedded(self, embedded: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``encode_text`` from token embeddings instead of token ids (ids still pick the pooled position).

        With a causal mask the pooled (EOT) output depends only on positions up to EOT, so sequences are cut
        after the last EOT of the batch: the same features (up to float rounding) at a fraction of the cost.
        """
        length = tokens.shape[1]
        pooled_at = self.pool_positions(tokens)
        if self.attn_mask is not None and self.pool_type in ("argmax", "eos"):
            length = int(pooled_at.max()) + 1
        x = embedded[:, :length] + self.positional_embedding[:length].to(embedded.dtype)
        mask = None if self.attn_mask is None else self.attn_mask[:length, :length]
        x = self.transformer(x, attn_mask=mask)
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), pooled_at]
        if self.text_projection is None:
            return x
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(x)
        return x @ self.text_projection

    def pool_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.pool_type == "argmax":  # EOT has the highest id in CLIP's vocabulary
            return tokens.argmax(dim=-1)
        if self.pool_type == "eos":
            return (tokens == self.eos_id).int().argmax(dim=-1)
        if self.pool_type == "last":
            return torch.full((tokens.shape[0],), tokens.shape[1] - 1, dtype=torch.long)
        raise NotImplementedError(f"prompt learning does not support text pool type {self.pool_type!r}")


def template_prefix(prompts: list[str], class_names: list[str]) -> str:
    """The prompt text before the class name, the same for every class ("a picture of a ").

    A class name may also occur inside the template ("a" in "a picture of a a"), so every occurrence is a
    candidate and the prefix is the longest candidate common to all classes.
    """
    common: set[str] | None = None
    for prompt, name in zip(prompts, class_names, strict=True):
        candidates = {prompt[:at] for at in range(len(prompt)) if prompt.startswith(name, at)}
        if not candidates:
            raise ValueError(f"class name {name!r} does not occur in its prompt {prompt!r}")
        common = candidates if common is None else common & candidates
    if not common:
        raise ValueError("prompt learning needs one template for all classes; the text before the class names differs")
    return max(common, key=len)


def count_tokens(tokenizer, text: str) -> list[int]:
    """The BPE ids of ``text`` without SOT/EOT."""
    ids = tokenizer([text])[0].tolist()[1:]  # drop SOT
    return ids[: ids.index(max(ids))]  # up to EOT, the largest id in CLIP's vocabulary


@register_adapter
class PromptAdapter(Adapter):
    """CoOp's learnable context; see the module docstring for the equation and the zero-shot start.

    Preset key: prompt_length (M; 0 = the template's word-token count, the exact zero-shot start).
    """

    kind = "prompt"
    needs_images = False

    def __init__(self, context, options=None):
        super().__init__(context, options)
        model, tokenizer = context.clip_model, context.tokenizer
        if model is None or tokenizer is None:
            raise ValueError("the prompt adapter needs context.clip_model and context.tokenizer (it runs the text encoder)")
        self.tower = TextTower.of(model)  # a plain dataclass: the frozen CLIP pieces stay off the module tree
        prefix = template_prefix(context.prompts, context.class_names)
        prefix_ids = count_tokens(tokenizer, prefix.strip()) if prefix.strip() else []
        length = int(self.options.prompt_length) or len(prefix_ids)
        if length < 1:
            raise ValueError("prompt_length = 0 needs template words before the class name")
        self.starts_at_zero_shot = length == len(prefix_ids)

        # Class prompts with M placeholder words where the context goes: [SOT][X]*M[class ... ][EOT].
        suffixes = [prompt[len(prefix):] for prompt in context.prompts]
        tokens = tokenizer([" ".join([PLACEHOLDER] * length + [suffix]) for suffix in suffixes])
        placeholder_id = count_tokens(tokenizer, PLACEHOLDER)
        if len(placeholder_id) != 1 or not bool((tokens[:, 1 : 1 + length] == placeholder_id[0]).all()):
            raise ValueError("the tokenizer did not keep the context placeholders at positions 1..M")
        eot = self.tower.pool_positions(tokens)
        # The tokenizer truncates silently (putting EOT last); a prompt that reaches the end was cut.
        if bool((eot <= length).any()) or bool((eot >= tokens.shape[1] - 1).any()):
            raise ValueError(f"prompt_length {length} leaves no room for the class names within the context length")
        device = self.tower.token_embedding.weight.device
        tokens = tokens.to(device)
        with torch.no_grad():
            embedded = self.tower.token_embedding(tokens).float()
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("sot_embedding", embedded[:, :1].clone(), persistent=False)  # [K, 1, w]
        self.register_buffer("class_embedding", embedded[:, 1 + length :].clone(), persistent=False)  # [K, L-1-M, w]

        width = embedded.shape[-1]
        if self.starts_at_zero_shot:  # CoOp's "init from words": the template's own token embeddings
            with torch.no_grad():
                words = self.tower.token_embedding(torch.tensor(prefix_ids, device=device)).float()
            self.context_vectors = nn.Parameter(words.clone())
        else:  # CoOp's random init, from a fixed seed so every client builds the same start
            generator = torch.Generator().manual_seed(CONTEXT_SEED)
            self.context_vectors = nn.Parameter(0.02 * torch.randn(length, width, generator=generator).to(device))

    def class_features(self) -> torch.Tensor:
        """Raw text features [K, d] of the K class prompts under the current context (grad flows to it)."""
        count = self.tokens.shape[0]
        dtype = self.tower.token_embedding.weight.dtype
        context = self.context_vectors.unsqueeze(0).expand(count, -1, -1)
        embedded = torch.cat([self.sot_embedding, context, self.class_embedding], dim=1).to(dtype)
        return self.tower.encode_embedded(embedded, self.tokens).float()

    def normalised_class_features(self) -> torch.Tensor:
        """In eval mode without grad the K prompts are encoded once per context value, not once per batch."""
        if self.training or torch.is_grad_enabled():
            return F.normalize(self.class_features(), dim=-1)
        # _version counts in-place writes (optimizer steps, load_trainable_state), so edits invalidate it.
        key = (self.context_vectors._version, self.context_vectors.data_ptr())
        cached = getattr(self, "_eval_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, F.normalize(self.class_features(), dim=-1))
            self._eval_cache = cached
        return cached[1]

    def forward(self, features: torch.Tensor) -> ClassScores:
        classes = self.normalised_class_features()
        return ClassScores(image=F.normalize(features.to(classes.dtype), dim=-1), classes=classes)
