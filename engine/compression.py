"""What crosses the network: client updates serialised (and optionally compressed) into real bytes.

Byte counts are ``len()`` of the safetensors serialisation of exactly what would be sent, so they
include the header and the compressed form; the server decodes from those same bytes.

Codecs (preset key ``federation.compression``):

- ``none``: the delta's tensors as they are (float32 for adapters).
- ``fp16``: IEEE half precision; relative error <= 2^-11 per entry inside fp16's range (|x| <= 65504;
  larger magnitudes become inf, smaller than about 6e-8 flush towards 0).
- ``int8``: per-tensor affine quantisation, x_hat = (q - z) * s with q in int8; |x - x_hat| <= s/2.
- ``topk``: the k = ceil(fraction * numel) largest-magnitude entries per tensor as int32 indices and
  values, with error feedback (the dropped part is added to the client's next update).

A codec object lives for the whole run (top-k keeps each client's residual in it); ``encode`` runs on
the client, ``decode`` on the server and depends only on the payload and the tensors' shapes.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from engine.options.codecs import CODECS as CODEC_OPTIONS
from engine.registry import Registry

State = dict[str, torch.Tensor]


def serialize(tensors: State) -> bytes:
    return st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})


def deserialize(payload: bytes) -> State:
    return st_load(payload)


# safetensors' names for the dtypes an update may hold.
_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


def serialized_nbytes(tensors: State) -> int:
    """``len(serialize(tensors))`` from the format's arithmetic, without writing the bytes.

    safetensors writes an 8-byte header length, a compact JSON header padded with spaces to a multiple of 8,
    then the tensors' bytes back to back, sorted by dtype and then by name (so the data offsets in the header,
    and their digits, follow that order): ``{"<name>":{"dtype":"F32","shape":[d0,d1],"data_offsets":[a,b]},...}``.
    With one dtype the order is by name alone (Rust compares the UTF-8 bytes); JSON escapes match Python's
    ``json.dumps(ensure_ascii=False)``. Mixed or unusual dtypes take the real serialisation's length. Tested
    equal to ``len(serialize(...))`` (tests/test_speed_paths.py). The length depends on names, dtypes and shapes
    only, so it is remembered for each such signature: a round's clients all send the same one."""
    return _nbytes_of(tuple((name, value.dtype, tuple(value.shape)) for name, value in tensors.items()))


@functools.lru_cache(maxsize=256)
def _nbytes_of(signature: tuple[tuple[str, torch.dtype, tuple[int, ...]], ...]) -> int:
    dtypes = {dtype for _, dtype, _ in signature}
    if len(dtypes) > 1 or not dtypes <= _SAFETENSORS_DTYPES.keys():
        return len(serialize({name: torch.zeros(shape, dtype=dtype) for name, dtype, shape in signature}))
    parts, offset = [], 0
    for name, dtype, shape in sorted(signature, key=lambda entry: entry[0].encode("utf-8", "surrogatepass")):
        size = math.prod(shape) * dtype.itemsize
        dims = ",".join(str(d) for d in shape)
        parts.append(f'{json.dumps(name, ensure_ascii=False)}:{{"dtype":"{_SAFETENSORS_DTYPES[dtype]}",'
                     f'"shape":[{dims}],"data_offsets":[{offset},{offset + size}]}}')
        offset += size
    header = len(("{" + ",".join(parts) + "}").encode("utf-8", "surrogatepass"))
    return 8 + header + (-header) % 8 + offset


def _float32_at_least(value: float) -> float:
    """The smallest float32 >= value, so a rounded scale never shrinks the step (which could clip hi)."""
    rounded = np.float32(value)
    if float(rounded) < value:
        rounded = np.nextafter(rounded, np.float32(np.inf))
    return float(rounded)


def _part(name: str, part: str) -> str:
    """Payload key of one part of a compressed tensor; '#' keeps it apart from PyTorch's dotted names."""
    return f"{name}#{part}"


class Codec:
    """Turns a client's update (the delta from the global state) into bytes and back."""

    name: ClassVar[str] = ""

    def __init__(self, options: Any = None):
        # The codec's own keys (engine/options/codecs.py); their defaults live only there.
        self.options = options if options is not None else CODEC_OPTIONS.options_for(self.name)()

    def encode(self, client: str, delta: State) -> bytes:
        return serialize(delta)

    def decode(self, payload: bytes, like: State) -> State:
        return {k: v.to(like[k].device, like[k].dtype) for k, v in deserialize(payload).items()}

    def state_tensors(self) -> State:
        """What a resumed run needs back (top-k's residuals); nothing for stateless codecs."""
        return {}

    def load_state_tensors(self, tensors: State) -> None:
        pass

    def roundtrip(self, client: str, delta: State) -> tuple[State, int]:
        """(the delta as the server reconstructs it, bytes on the wire)."""
        payload = self.encode(client, delta)
        return self.decode(payload, delta), len(payload)


CODECS = Registry("compression", "name")
register_codec = CODECS.register


@register_codec
class NoCompression(Codec):
    """float32 tensors as they are."""

    name = "none"


@register_codec
class HalfPrecision(Codec):
    """Each tensor cast to float16: half the bytes of float32; relative rounding error <= 2^-11."""

    name = "fp16"

    def encode(self, client: str, delta: State) -> bytes:
        return serialize({k: v.to(torch.float16) for k, v in delta.items()})


@register_codec
class Int8Affine(Codec):
    """Per-tensor affine quantisation to int8 with an integer zero point (PyTorch's per-tensor scheme).

    Encode:  [lo, hi] = [min(min x, 0), max(max x, 0)]   (the range includes 0, so 0 is exact)
             s = (hi - lo) / 254,  z = round(-127 - lo / s),  q = clamp(round(x / s) + z, -128, 127)
    Decode:  x_hat = (q - z) * s
    Bound:   |x - x_hat| <= s / 2 for every entry. Because z is rounded to an integer, lo / s + z lies in
             [-127.5, -126.5]: using 254 steps (not 255) keeps every x / s + z within [-127.5, 127.5], so
             rounding plus clamping moves no value by more than half a step (no clipping error).
    Payload per tensor: q (int8, numel bytes), s (float32 scalar) and z (int32 scalar): about 1/4 of
    float32 for large tensors. s is rounded to float32 before quantising, so the bound uses the sent s.
    """

    name = "int8"
    LEVELS: ClassVar[int] = 254

    def encode(self, client: str, delta: State) -> bytes:
        tensors: State = {}
        for key, value in delta.items():
            q, scale, zero_point = self.quantise(value)
            tensors[_part(key, "q")] = q
            tensors[_part(key, "scale")] = scale
            tensors[_part(key, "zero_point")] = zero_point
        return serialize(tensors)

    @classmethod
    def quantise(cls, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = value.detach().to(torch.float64).cpu()
        if x.numel() and not bool(torch.isfinite(x).all()):
            raise ValueError("int8 compression: the update has inf or nan entries, which cannot be quantised")
        lo = min(float(x.min()), 0.0) if x.numel() else 0.0
        hi = max(float(x.max()), 0.0) if x.numel() else 0.0
        scale = _float32_at_least((hi - lo) / cls.LEVELS)  # the value sent; never below the exact step
        if scale == 0.0:  # all zeros (or empty): any scale reproduces them exactly
            scale = 1.0
        zero_point = round(-127 - lo / scale)
        q = torch.clamp(torch.round(x / scale) + zero_point, -128, 127).to(torch.int8)
        return q, torch.tensor(scale, dtype=torch.float32), torch.tensor(zero_point, dtype=torch.int32)

    def decode(self, payload: bytes, like: State) -> State:
        tensors = deserialize(payload)
        out: State = {}
        for key, reference in like.items():
            q = tensors[_part(key, "q")].to(torch.float64)
            scale = float(tensors[_part(key, "scale")])
            zero_point = int(tensors[_part(key, "zero_point")])
            restored = ((q - zero_point) * scale).reshape(reference.shape)
            out[key] = restored.to(reference.device, reference.dtype)
        return out


@register_codec
class TopK(Codec):
    """Top-k sparsification with error feedback (Stich et al. 2018, "Sparsified SGD with Memory";
    Karimireddy et al. 2019, "Error Feedback Fixes SignSGD").

    Client k keeps a residual e_k (0 at first) per tensor. Each round it compresses c = delta + e_k:
    sends the k = ceil(fraction * numel) entries of c with the largest |c| (flat int32 indices and their
    values) and keeps e_k <- c - topk(c), so nothing is lost, only delayed. Without error feedback
    (``federation.topk_error_feedback = false``) the dropped part is discarded, which biases the
    aggregate (plain top-k can stall away from the optimum). ``federation.topk_fraction`` is the fraction.
    """

    name = "topk"

    def __init__(self, options: Any = None):
        super().__init__(options)
        self.residuals: dict[str, State] = {}  # client -> tensor name -> e_k

    @property
    def fraction(self) -> float:
        return float(self.options.topk_fraction)

    @property
    def error_feedback(self) -> bool:
        return bool(self.options.topk_error_feedback)

    def kept_count(self, numel: int) -> int:
        """k = ceil(fraction * numel), at least 1 for a non-empty tensor, at most numel."""
        if numel == 0:
            return 0
        return min(numel, max(1, math.ceil(round(self.fraction * numel, 9))))

    def encode(self, client: str, delta: State) -> bytes:
        memory = self.residuals.setdefault(client, {})
        tensors: State = {}
        for key, value in delta.items():
            corrected = value.detach().cpu().clone()
            residual = memory.get(key)
            if self.error_feedback and residual is not None and residual.shape == corrected.shape:
                corrected = corrected + residual.to(corrected.dtype)
            flat = corrected.reshape(-1)
            if flat.numel() >= 2**31:
                raise ValueError(f"topk compression: tensor {key!r} is too large for int32 indices")
            indices = torch.topk(flat.abs(), self.kept_count(flat.numel()), sorted=False).indices
            values = flat[indices]
            if self.error_feedback:
                dropped = flat.clone()
                dropped[indices] = 0
                memory[key] = dropped.reshape(corrected.shape)
            tensors[_part(key, "indices")] = indices.to(torch.int32)
            tensors[_part(key, "values")] = values
        return serialize(tensors)

    def decode(self, payload: bytes, like: State) -> State:
        tensors = deserialize(payload)
        out: State = {}
        for key, reference in like.items():
            indices = tensors[_part(key, "indices")].to(torch.int64)
            values = tensors[_part(key, "values")]
            dense = torch.zeros(reference.numel(), dtype=reference.dtype)
            dense[indices] = values.to(reference.dtype)
            out[key] = dense.reshape(reference.shape).to(reference.device)
        return out

    def state_tensors(self) -> State:
        return {f"{client}/{key}": value for client, memory in self.residuals.items() for key, value in memory.items()}

    def load_state_tensors(self, tensors: State) -> None:
        self.residuals = {}
        for name, value in tensors.items():
            client, key = name.split("/", 1)
            self.residuals.setdefault(client, {})[key] = value


def build_codec(name: str, options: Any = None) -> Codec:
    return CODECS.build(name, options)
