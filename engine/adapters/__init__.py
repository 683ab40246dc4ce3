"""Adapters: the small trainable part each client trains and the server aggregates.

Every kind maps a batch of inputs (cached image features, or preprocessed images for kinds that need
the image encoder in the loop) to ``ClassScores``: L2-normalised image embeddings and class embeddings,
so that one loss and one evaluation serve every kind. Only ``trainable_state()`` leaves a client.

Kinds: attai (FedCLIP), clip_adapter, text_adapter, both (CLIP-Adapter family), linear_head (zero-shot
initialised head), lora (CLIP-LoRA, needs images), houlsby (bottleneck adapters inside the encoder blocks,
needs images), prefix (prefix-tuning in the text encoder), prefix_image (in the image encoder, needs
images), prompt (CoOp). ``adapter.subspace_dim > 0`` wraps any kind in random-subspace training
(``engine.adapters.subspace``).
"""

from __future__ import annotations

from engine.adapters.base import Adapter, AdapterContext, ClassScores, build_adapter, register_adapter
from engine.adapters import attai as _attai  # noqa: F401  (registers "attai")
from engine.adapters import clip_adapter as _clip_adapter  # noqa: F401  (registers "clip_adapter")
from engine.adapters import houlsby as _houlsby  # noqa: F401  (registers "houlsby")
from engine.adapters import linear_head as _linear_head  # noqa: F401  (registers "linear_head")
from engine.adapters import lora as _lora  # noqa: F401  (registers "lora")
from engine.adapters import prefix as _prefix  # noqa: F401  (registers "prefix", "prefix_image")
from engine.adapters import prompt as _prompt  # noqa: F401  (registers "prompt")
from engine.adapters import text_adapter as _text_adapter  # noqa: F401  (registers "text_adapter", "both")

__all__ = ["Adapter", "AdapterContext", "ClassScores", "build_adapter", "register_adapter"]
