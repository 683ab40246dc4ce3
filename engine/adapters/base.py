"""The adapter interface and registry shared by every adapter kind."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from engine.options.adapters import ADAPTER_KINDS
from engine.registry import Registry


def stacked_linear(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` for G clients: inputs ``[G, B, in]``, weight ``[G, out, in]``, bias ``[G, out]``. The same
    product as ``F.linear`` (``addmm``) per client: one batched GEMM with the bias as its accumulator."""
    if bias is None:
        return torch.bmm(inputs, weight.transpose(1, 2))
    return torch.baddbmm(bias.unsqueeze(1), inputs, weight.transpose(1, 2))


@dataclass
class ClassScores:
    """What an adapter produces for a batch: logits = scale * image @ classes.T (+ bias)."""

    image: torch.Tensor  # [B, d], L2-normalised
    classes: torch.Tensor  # [K, d], one embedding per class (L2-normalised unless the kind says otherwise)
    bias: torch.Tensor | None = None  # [K]

    def logits(self, scale: float) -> torch.Tensor:
        logits = scale * self.image @ self.classes.t()
        return logits if self.bias is None else logits + self.bias


@dataclass
class AdapterContext:
    """What the frozen backbone offers an adapter; built once per run by the runner."""

    feature_dim: int
    class_names: list[str]
    prompts: list[str]
    class_text_features: torch.Tensor  # [K, d] frozen text-encoder output for the prompts, not normalised
    logit_scale: float  # exp of the model's learned log-scale (100 for OpenAI weights)
    clip_model: Any = None  # the frozen open_clip model, for kinds that need an encoder in the loop
    tokenizer: Callable | None = None


class Adapter(nn.Module):
    kind: ClassVar[str] = ""
    # Kinds that run the image encoder in the training loop cannot use cached features.
    needs_images: ClassVar[bool] = False

    def __init__(self, context: AdapterContext, options: Any = None):
        super().__init__()
        # Kept off the module tree so the frozen CLIP never shows up in state_dict or parameters().
        object.__setattr__(self, "context", context)
        # The kind's own keys (engine/options/adapters.py); their defaults live only there.
        self.options = options if options is not None else ADAPTER_KINDS.options_for(self.kind)()

    def forward(self, inputs: torch.Tensor) -> ClassScores:  # pragma: no cover - abstract
        raise NotImplementedError

    def stacked_forward(self, params: dict[str, torch.Tensor], inputs: torch.Tensor) -> ClassScores:
        """``forward`` for G clients at once (``engine.batched``): ``params[name]`` is ``[G, ...]``, ``inputs``
        ``[G, B, ...]``; image ``[G, B, d]``, classes ``[G, C, d]`` (a shared table may be expanded), bias
        ``[G, C]``. Optional: a kind without one is vmapped through ``forward``, which gives the same numbers
        with more dispatch per step. One that has one must give ``forward``'s bits client by client
        (tests/test_speed_paths.py holds every batchable kind to that)."""
        raise NotImplementedError

    @classmethod
    def has_stacked_forward(cls) -> bool:
        return cls.stacked_forward is not Adapter.stacked_forward

    def stacked_backward(self, params: dict[str, torch.Tensor], inputs: torch.Tensor):
        """``stacked_forward`` run without autograd's graph, and the function taking the gradient of the loss
        with respect to the image features ``[G, B, d]`` to the gradients of ``params``. Optional: where a kind
        has one, a batched step skips autograd (engine.stacked_backward), so only a kind whose class table is its
        frozen text buffer, shared by every client, with no bias may define one; it must give autograd's bits
        (tests/test_stacked_backward.py)."""
        raise NotImplementedError

    @classmethod
    def has_stacked_backward(cls) -> bool:
        return cls.stacked_backward is not Adapter.stacked_backward

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The tensors a client sends: every parameter that trains, detached and cloned."""
        return {name: p.detach().clone() for name, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.named_parameters())
        missing = [name for name, p in params.items() if p.requires_grad and name not in state]
        if missing:
            raise KeyError(f"adapter state lacks {missing}")
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


class ZeroShotHead(nn.Module):
    """Plain CLIP: normalised image features against normalised prompt features, nothing trained."""

    def __init__(self, class_text_features: torch.Tensor):
        super().__init__()
        self.register_buffer("classes", F.normalize(class_text_features.float(), dim=-1))

    def forward(self, features: torch.Tensor) -> ClassScores:
        return ClassScores(F.normalize(features, dim=-1), self.classes)


ADAPTERS = Registry("adapter kind", "kind")
register_adapter = ADAPTERS.register


def build_adapter(kind: str, context: AdapterContext, options: Any = None, seed: int | None = None) -> Adapter:
    """The kind with its options; with ``options.subspace_dim = d > 0`` wrapped in random-subspace training
    (``engine.adapters.subspace``), whose projection comes from ``seed`` (default ``torch.initial_seed()``:
    the runner seeds torch with ``run.seed`` just before it builds the adapter)."""
    adapter = ADAPTERS.build(kind, context, options)
    dim = int(getattr(adapter.options, "subspace_dim", 0) or 0)
    if dim > 0:
        from engine.adapters.subspace import SubspaceAdapter

        adapter = SubspaceAdapter(adapter, dim, torch.initial_seed() if seed is None else seed)
    return adapter
