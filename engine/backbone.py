"""The frozen open_clip backbone: loading, fingerprinting, and encoding images and prompts.

``CachedBackbone`` stands in for it when a run needs nothing the model computes: the feature cache holds every
image and prompt feature, and ``engine.features.ModelIndex`` the few numbers a run reads off the model
(``ModelRecord``), found by ``model_key`` without importing open_clip. Anything else it is asked for loads the
real backbone then (and checks it is the model the record was made from).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from engine.presets import Preset

# Bump when what a model key covers changes, so older records are no longer found.
MODEL_KEY_VERSION = "fedtui-model-key-1"
# Files of a local-dir folder open_clip may take its weights from (engine.weights checks the same names first).
CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pth")
SMALL_FILE = 1 << 20  # other files of a local-dir folder (config, tokenizer) are hashed whole below this size


@dataclass(frozen=True)
class ModelRecord:
    """What a run reads off a loaded backbone, kept in the model index so a warm run need not load it."""

    fingerprint: str  # weights_fingerprint(model): SHA-256 over every tensor; names the feature cache file
    preprocess_fingerprint: str
    tokenizer_id: str
    logit_scale: float  # exp of the model's log-scale, as the run uses it
    parameter_bytes: int  # bytes of the whole state dict (the summary's "whole CLIP")
    weights: str  # describe_weights(model.pretrained)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelRecord | None:
        try:
            return cls(str(data["fingerprint"]), str(data["preprocess_fingerprint"]), str(data["tokenizer_id"]),
                       float(data["logit_scale"]), int(data["parameter_bytes"]), str(data["weights"]))
        except (KeyError, TypeError, ValueError):
            return None


@dataclass
class Backbone:
    model: Any  # open_clip CLIP, frozen, eval mode
    preprocess: Callable  # PIL image -> tensor, CLIP's eval transform
    tokenizer: Callable
    device: torch.device
    weights: str  # "pretrained:<tag>", "checkpoint:<path>", "local-dir:<path>" or "random"
    fingerprint: str  # sha256 of every weight, so the feature cache cannot mix models
    weights_sha256: str | None = None  # of the weights file, where the model came from one (set by prepare)
    weights_file: Path | None = None  # the file a tag's weights came from (open_clip's download cache)

    loaded = True  # the model is here (CachedBackbone: only once something needed it)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp().item())

    @property
    def preprocess_fingerprint(self) -> str:
        return hashlib.sha256(repr(self.preprocess).encode()).hexdigest()[:16]

    @property
    def parameter_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.model.state_dict().values())

    @functools.cached_property
    def tokenizer_id(self) -> str:
        """Which tokenizer turns the prompts into tokens: its class, context length and library version."""
        inner = getattr(self.tokenizer, "tokenizer", None)
        parts = [type(self.tokenizer).__module__, type(self.tokenizer).__qualname__,
                 str(getattr(self.tokenizer, "context_length", "")), str(getattr(inner, "name_or_path", "")),
                 open_clip_version()]
        return hashlib.sha256(":".join(parts).encode()).hexdigest()[:16]

    def record(self) -> ModelRecord:
        return ModelRecord(self.fingerprint, self.preprocess_fingerprint, self.tokenizer_id, self.logit_scale,
                           self.parameter_bytes, self.weights)

    def manifest_fields(self) -> dict[str, Any]:
        return {
            "weights_fingerprint": self.fingerprint,
            "weights_fingerprint_from": "the loaded model (SHA-256 over every tensor)",
            "weights_file_sha256": self.weights_sha256,
            "backbone_loaded": True,
        }

    def autocast(self):
        """fp16 autocast on CUDA as the reference runs CLIP there; plain float32 on the CPU."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            pixels = pixels.pin_memory().to(self.device, non_blocking=True)
        with self.autocast():
            return self.model.encode_image(pixels.to(self.device)).float()

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts).to(self.device)
        with self.autocast():
            return self.model.encode_text(tokens).float()


class CachedBackbone:
    """The backbone as the model index recorded it: fingerprint, ids, ``logit_scale``, byte count, no model.

    ``model``, ``preprocess``, ``tokenizer`` and the encoders load the real backbone (``load``) on first use,
    and that backbone must have the recorded fingerprint: the feature file was chosen by it."""

    def __init__(self, record: ModelRecord, device: torch.device, load: Callable[[], Backbone],
                 weights_sha256: str | None = None):
        self.record_, self.device, self._load = record, device, load
        self.weights_sha256 = weights_sha256
        self._real: Backbone | None = None
        self.fingerprint = record.fingerprint
        self.preprocess_fingerprint = record.preprocess_fingerprint
        self.tokenizer_id = record.tokenizer_id
        self.logit_scale = record.logit_scale
        self.parameter_bytes = record.parameter_bytes
        self.weights = record.weights

    @property
    def loaded(self) -> bool:
        return self._real is not None

    def real(self) -> Backbone:
        if self._real is None:
            real = self._load()
            if real.fingerprint != self.fingerprint:
                raise RuntimeError(
                    f"the model index (models.sqlite in the feature cache) recorded weights {self.fingerprint[:16]} "
                    f"for this model, but loading it gives {real.fingerprint[:16]}; delete that file and run again"
                )
            real.weights_sha256 = self.weights_sha256
            self._real = real
        return self._real

    @property
    def model(self):
        return self.real().model

    @property
    def preprocess(self) -> Callable:
        return self.real().preprocess

    @property
    def tokenizer(self) -> Callable:
        return self.real().tokenizer

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.real().encode_images(pixels)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        return self.real().encode_prompts(prompts)

    def record(self) -> ModelRecord:
        return self.record_

    def manifest_fields(self) -> dict[str, Any]:
        return {
            "weights_fingerprint": self.fingerprint,
            "weights_fingerprint_from": (
                "the loaded model (SHA-256 over every tensor)" if self.loaded else
                "the feature cache's model index: recorded from the loaded model when this weights file "
                "(weights_file_sha256) was last loaded; this run did not load it"
            ),
            "weights_file_sha256": self.weights_sha256,
            "backbone_loaded": self.loaded,
        }


@functools.cache
def open_clip_version() -> str:
    """open_clip's version without importing it (the import costs seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("open_clip_torch")
    except PackageNotFoundError:
        import open_clip

        return open_clip.__version__


def local_dir_checkpoint(folder: Path) -> Path | None:
    """The weights file open_clip's local-dir loader picks (open_clip.factory._find_checkpoint_in_dir)."""
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES)
    if not found:
        return None
    preferred = ["open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                 "open_clip_pytorch_model.pth", "model.safetensors", "pytorch_model.bin", "pytorch_model.pth",
                 "model.pth"]
    named = [p for p in found if p.name in preferred]
    if named:
        return min(named, key=lambda p: preferred.index(p.name))
    found.sort(key=lambda p: p.suffix == ".safetensors", reverse=True)
    return found[0]


def is_tag(pretrained: str) -> bool:
    return not (pretrained in ("", "none") or pretrained.startswith("local-dir:") or Path(pretrained).expanduser().is_file())


def tag_key(preset: Preset) -> str | None:
    """Where the model index remembers which file an open_clip tag's weights were loaded from, for a tag."""
    arch, pretrained = preset.model.arch, preset.model.pretrained
    return f"tag:{MODEL_KEY_VERSION}:{open_clip_version()}:{arch}:{pretrained}" if is_tag(pretrained) else None


def model_key(preset: Preset, file_sha256: Callable[[Path], str], tag_file: Path | None = None) -> tuple[str, str] | None:
    """(model key, weights file SHA-256) for weights that come from a file, without loading them; None otherwise.

    The key covers what fixes the model, its preprocessing and its tokenizer: the weights file's bytes, the
    config open_clip builds it from (local-dir: the folder's config and every other small file, such as a
    tokenizer; a checkpoint file or a tag: the arch's config, and the tag's name, which fixes open_clip's
    pretrained settings), and open_clip's version. ``file_sha256`` hashes a file (engine.features.ModelIndex
    remembers it by path, size and times). A tag's file is the one a run that loaded the tag found it in
    (``tag_file``, recorded under ``tag_key``); random weights have no key: those runs load the model."""
    arch, pretrained = preset.model.arch, preset.model.pretrained
    parts = [MODEL_KEY_VERSION, open_clip_version()]
    try:
        if pretrained.startswith("local-dir:"):
            folder = Path(pretrained[len("local-dir:") :]).expanduser()
            weights = local_dir_checkpoint(folder)
            if weights is None:
                return None
            weights_sha = file_sha256(weights)
            parts += ["local-dir", f"weights={weights.name}:{weights_sha}"]
            for path in sorted(p for p in folder.iterdir() if p.is_file() and p != weights):
                size = path.stat().st_size
                content = hashlib.sha256(path.read_bytes()).hexdigest() if size <= SMALL_FILE else f"size={size}"
                parts.append(f"{path.name}:{content}")
        elif pretrained in ("", "none"):
            return None
        else:
            from engine.weights import known_configs

            config = known_configs().get(arch)
            tagged = is_tag(pretrained)
            if config is None or (tagged and (tag_file is None or not tag_file.is_file())):
                return None
            weights_sha = file_sha256(tag_file if tagged else Path(pretrained).expanduser())
            kind = ["tag", pretrained] if tagged else ["checkpoint"]
            parts += [*kind, arch, hashlib.sha256(config.read_bytes()).hexdigest(), weights_sha]
    except OSError:
        return None  # loading will say what is wrong with the files
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest(), weights_sha


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device = 'cuda' but torch sees no CUDA device; use 'auto' or 'cpu'")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def weights_fingerprint(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def describe_weights(pretrained: str) -> str:
    if pretrained in ("", "none"):
        return "random"
    if pretrained.startswith("local-dir:"):
        return pretrained
    if Path(pretrained).expanduser().is_file():
        return f"checkpoint:{pretrained}"
    return f"pretrained:{pretrained}"


def load_backbone(preset: Preset, device: torch.device) -> Backbone:
    """open_clip's own loader, so a tag, a checkpoint file and a local-dir folder behave as for any user."""
    import open_clip

    from engine import modelzoo

    modelzoo.register_model_configs()
    arch, pretrained = preset.model.arch, preset.model.pretrained
    if pretrained.startswith("local-dir:"):
        model_name = "local-dir:" + str(Path(pretrained[len("local-dir:") :]).expanduser())
        weights_arg = None  # open_clip reads config and weights from the folder
    else:
        if arch not in open_clip.list_models():
            raise ValueError(f"model.arch: unknown open_clip architecture {arch!r}")  # resolve() checks first
        model_name = arch
        weights_arg = None if pretrained in ("", "none") else pretrained
        path = Path(pretrained).expanduser()
        if weights_arg and path.is_file():
            weights_arg = str(path)
        elif weights_arg and weights_arg not in open_clip.list_pretrained_tags_by_model(arch):
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none for this arch"
            raise ValueError(f"model.pretrained: unknown tag {weights_arg!r} for {arch}; tags: {tags}")
    # Random weights must still be the same run to run.
    torch.manual_seed(preset.run.seed)
    with _recording_downloads() as downloaded:
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=weights_arg, device="cpu")
    model.eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(model_name)
    fingerprint = weights_fingerprint(model)
    model.to(device)
    backbone = Backbone(model, preprocess, tokenizer, device, describe_weights(pretrained), fingerprint)
    if is_tag(pretrained) and len(downloaded) == 1 and Path(downloaded[0]).is_file():
        backbone.weights_file = Path(downloaded[0]).resolve()
    return backbone


_DOWNLOADS = threading.Lock()


@contextlib.contextmanager
def _recording_downloads():
    """The file(s) open_clip's factory takes a tag's weights from (``download_pretrained`` returns the path it
    found in, or downloaded to, its cache), so the model index can key a tag by that file's bytes."""
    from open_clip import factory

    found: list[str] = []
    original = getattr(factory, "download_pretrained", None)
    if original is None:
        yield found
        return

    def recording(*args, **kwargs):
        path = original(*args, **kwargs)
        found.append(str(path))
        return path

    with _DOWNLOADS:
        factory.download_pretrained = recording
        try:
            yield found
        finally:
            factory.download_pretrained = original
