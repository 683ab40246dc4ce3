"""Update codecs (``federation.compression``) and the keys each one reads from ``[federation]``."""

from __future__ import annotations

from dataclasses import dataclass

from engine.schema import NoOptions, OptionsCatalog, knob

CODECS = OptionsCatalog("compression")

CODECS.register("none", help="float32 tensors as they are")(NoOptions)
CODECS.register("fp16", help="half precision: half the bytes")(NoOptions)
CODECS.register("int8", help="per-tensor affine int8: a quarter of the bytes")(NoOptions)


@CODECS.register("topk", help="the largest entries per tensor, with error feedback")
@dataclass(frozen=True)
class TopKOptions:
    topk_fraction: float = knob(
        0.01, min=0.0, max=1.0, min_exclusive=True, help="compression topk: share of each tensor's entries sent"
    )
    topk_error_feedback: bool = knob(True, help="compression topk: carry the dropped part into the next round")
