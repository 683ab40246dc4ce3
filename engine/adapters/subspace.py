"""Random-subspace training of any adapter kind (Li et al. 2018, "Measuring the Intrinsic Dimension of
Objective Landscapes", ICLR; Aghajanyan et al. 2021, "Intrinsic Dimensionality Explains the Effectiveness
of Language Model Fine-Tuning", ACL).

``adapter.subspace_dim = d > 0`` wraps the kind: its trainable tensors, flattened to theta in R^D, become

    theta = theta_0 + P z,   z in R^d trained (z = 0 at the start), P in R^{D x d} fixed and random,

so the wrapped kind starts exactly where it would alone (z = 0 gives theta_0 bit for bit), a client trains
and uploads only z (d float32 numbers plus the safetensors header), and every aggregation rule, codec,
WiSE-FT mix and FedPer split acts on z (all of them linear or coordinate-wise in what they are given;
averaging z averages theta_0 + P z exactly, since P is linear and shared).

P is never sent: server and clients regenerate it from the run's seed. ``build_adapter`` takes
``torch.initial_seed()``, which the runner has just set to ``run.seed`` before building the adapter, so
every process of a run (a resumed one, a Flower client) derives the same P; pass ``seed`` to choose it.

P is a Fastfood transform (Le, Sarlos and Smola 2013), as Li et al. and Aghajanyan et al. use for large D:
with n = 2^ceil(log2 D), z zero-padded to n,

    P z = (H G Pi H B z)[:D] / (sqrt(n ||G||^2) sqrt(D / n))

where H is the n x n Walsh-Hadamard matrix (applied in O(n log n), never stored), B a random +-1 diagonal,
Pi a random permutation and G a Gaussian diagonal; the scaling gives columns of about unit length (the
intrinsic-dimension code's normalisation). Memory is O(n): three length-n vectors, against D x d floats for
a dense P (2.6 GB for a ViT-B/32 lora's 147,456 x 4,096). The product is differentiable in z (autograd
through the Hadamard butterflies), which is how z trains.

Training runs the wrapped adapter with theta_0 + P z substituted for its tensors
(``torch.func.functional_call``), so gradients reach z; in eval mode theta is written into the wrapped
adapter once per value of z (for lora that re-merges W + (alpha / r) B A). An adapter whose sent tensors
are not the ones its forward uses (prefix-tuning's MLP reparameterisation) offers ``use_plain_parameters()``,
which the wrapper calls first.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from engine.adapters.base import Adapter

PROJECTION_PURPOSE = 0x5B5  # mixed with the run's seed, so P's stream is independent of every other draw


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised fast Walsh-Hadamard transform along the last dimension (a power of two), H x with
    H = [[1, 1], [1, -1]] (x) ... (Sylvester order); additions only, so autograd keeps no activations."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {n}")
    h = 1
    while h < n:
        y = x.reshape(*x.shape[:-1], n // (2 * h), 2, h)
        x = torch.stack((y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]), dim=-2).reshape(*x.shape[:-1], n)
        h *= 2
    return x


def projection_generator(seed: int) -> torch.Generator:
    state = np.random.SeedSequence([int(seed), PROJECTION_PURPOSE]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state >> 1))


class FastfoodProjection(nn.Module):
    """z in R^d -> P z in R^D; see the module docstring. The three vectors are non-persistent buffers."""

    def __init__(self, total: int, dim: int, seed: int):
        super().__init__()
        if not 1 <= dim <= total:
            raise ValueError(f"subspace_dim must be in [1, {total}] (the kind's trainable count), got {dim}")
        self.total, self.dim, self.seed = total, dim, int(seed)
        n = 1 << max(0, (total - 1).bit_length())
        generator = projection_generator(seed)
        signs = torch.randint(0, 2, (n,), generator=generator).float() * 2 - 1
        permutation = torch.randperm(n, generator=generator)
        gaussian = torch.randn(n, generator=generator)
        self.register_buffer("signs", signs, persistent=False)
        self.register_buffer("permutation", permutation, persistent=False)
        self.register_buffer("gaussian", gaussian, persistent=False)
        self.n = n
        self.scale = 1.0 / float(np.sqrt(n * float((gaussian.double() ** 2).sum())) * np.sqrt(total / n))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        padded = torch.nn.functional.pad(z, (0, self.n - self.dim))
        x = fwht(self.signs * padded)
        x = fwht(x[self.permutation] * self.gaussian)
        return x[: self.total] * self.scale

    def matrix(self) -> torch.Tensor:
        """P as a dense [D, d] matrix (tests and small D only)."""
        return torch.stack([self(e) for e in torch.eye(self.dim)], dim=1)


class SubspaceAdapter(Adapter):
    """``inner`` trained in a random d-dimensional subspace around its start; sends {"z": z}."""

    kind = "subspace"

    def __init__(self, inner: Adapter, dim: int, seed: int):
        super().__init__(inner.context, inner.options)
        self.kind = inner.kind  # the wrapped kind names the run's adapter
        self.needs_images = inner.needs_images
        if hasattr(inner, "use_plain_parameters"):
            inner.use_plain_parameters()
        theta_0 = inner.trainable_state()
        self.names = list(theta_0)
        self.shapes = [tuple(theta_0[n].shape) for n in self.names]
        self.sizes = [theta_0[n].numel() for n in self.names]
        self.dtypes = [theta_0[n].dtype for n in self.names]
        self.register_buffer(
            "theta_0", torch.cat([theta_0[n].detach().float().reshape(-1) for n in self.names]), persistent=False
        )
        inner.requires_grad_(False)  # only z trains; the inner tensors are theta_0 + P z, written or substituted
        self.inner = inner
        self.projection = FastfoodProjection(self.theta_0.numel(), int(dim), seed)
        self.z = nn.Parameter(torch.zeros(int(dim)))
        self._written: tuple | None = None
        self.train(False)

    @property
    def inner_parameters(self) -> int:
        """D, the wrapped kind's trainable count."""
        return self.theta_0.numel()

    def theta(self) -> dict[str, torch.Tensor]:
        """theta_0 + P z as the wrapped kind's named tensors (differentiable in z)."""
        flat = self.theta_0 + self.projection(self.z.to(self.theta_0.dtype))
        out, start = {}, 0
        for name, shape, size, dtype in zip(self.names, self.shapes, self.sizes, self.dtypes):
            out[name] = flat[start : start + size].reshape(shape).to(dtype)
            start += size
        return out

    def write_inner(self) -> None:
        """Put theta into the wrapped adapter (once per value of z): its own eval path then runs as is."""
        key = (self.z._version, self.z.data_ptr())
        if self._written != key:
            with torch.no_grad():
                self.inner.load_trainable_state(self.theta())
            self._written = key

    def forward(self, inputs: torch.Tensor):
        if self.training:
            return torch.func.functional_call(self.inner, self.theta(), (inputs,), strict=False)
        self.write_inner()
        return self.inner(inputs)
