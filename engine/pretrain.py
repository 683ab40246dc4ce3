"""Contrastive CLIP pre-training of a small open_clip model on the captioned synthetic corpus.

This is how the checkpoint that ships with fedtui is made, and anyone can re-make or vary it:
``pretrain(load_preset("presets/pretrain/tiny.toml"), sink)``. It uses open_clip's own model classes
and ``open_clip.ClipLoss`` and writes an ordinary open_clip ``local-dir`` folder, so the result loads
exactly like weights a user downloaded.

Every random choice is a pure function of (seed, epoch, position), so a run stopped and resumed lands
on the same weights as one that never stopped. ``SHIFTED_DOMAIN`` is left out of the default corpus:
zero-shot accuracy there is the distribution shift that federated adapters are meant to close.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import string
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from engine import modelzoo, synthetic
from engine.captions import PLAIN_SHARE, ZERO_SHOT_TEMPLATE, caption, class_prompts
from engine.presets import MAX_SEED, read_preset_toml
from engine.schema import PresetError, Problems, build_section, knob, suggest

RESUME_DIR = "resume"  # a sub-folder: open_clip's local-dir loader only looks at the top level
RESUME_FILE = "state.json"  # written last: it names (and hashes) the tensors file that goes with it
LEGACY_RESUME_FILE = "state.pt"  # the old pickled format: never loaded (unpickling can run any code)

# A pre-training preset is checked by the same kernel as a run preset (engine.schema), so its errors
# read the same and list every problem at once. The old name stays for the code that raises it.
PretrainPresetError = PresetError


# --- configuration ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSection:
    name: str = knob("fedtui-clip-tiny", help="recorded in the checkpoint's config")
    description: str = knob("", help="one line about the recipe")
    # One seed range for every fedtui config: a run preset's (numpy's legacy seeding stops at 2^32 - 1).
    seed: int = knob(0, min=0, max=MAX_SEED)
    out_dir: str = knob("runs/pretrain/fedtui-clip-tiny", help="checkpoint folder (--out overrides it)")
    # More threads than a few per core only adds contention (the bound a run preset uses too).
    threads: int = knob(0, min=0, max=1024, help="torch CPU threads; 0 keeps torch's default")
    fp16: bool = knob(True, help="weights file precision; training is always fp32")


@dataclass(frozen=True)
class ModelSection:
    arch: str = knob(modelzoo.SHIPPED_ARCH, help="fedtui's own architecture or any open_clip name")
    # open_clip initialises word embeddings with std 0.02. In a narrow text tower every prompt then
    # starts as nearly the same feature, and contrastive training sits for hundreds of steps in a
    # collapsed plateau (all features equal, vanishing gradients); wider embeddings start it apart.
    # Past 10 (twenty times what ends the plateau) the words drown the positional embedding
    # (std 0.01) that the tower reads word order from.
    token_embedding_std: float = knob(0.5, min=0.0, max=10.0, help="word embedding init std; 0 keeps open_clip's")


@dataclass(frozen=True)
class CorpusSection:
    domains: list[str] = knob(list(synthetic.COMMON_DOMAINS), choices=list(synthetic.DOMAINS))
    # The corpus is held in memory as bytes (12 KB an image at 64 px): a million is 12 GB of RAM and
    # about a day of rendering on one core.
    images: int = knob(24000, min=1, max=1_000_000, help="corpus size, balanced over domains and classes")
    # It must equal the model's input size (checked below); 1024 stops a typo before that.
    image_size: int = knob(64, min=8, max=1024)
    # A share of the captions, so at most all of them.
    plain_share: float = knob(
        PLAIN_SHARE, min=0.0, max=1.0, help="captions that only name the object (the rest add colour, size, place)"
    )


@dataclass(frozen=True)
class OptimSection:
    # An epoch passes over the whole corpus (the shipped recipe takes 8): 1,000 at its size is days of CPU.
    epochs: int = knob(4, min=1, max=1_000)
    # CLIP's loss holds two batch x batch logit matrices: at 16,384 that is 2 GiB before activations.
    batch_size: int = knob(64, min=2, max=16_384)
    # AdamW moves each weight by about lr a step; at 1 a single step outweighs every initial weight.
    lr: float = knob(1e-3, min=0.0, min_exclusive=True, max=1.0)
    # AdamW multiplies each weight by 1 - lr x weight_decay a step; past 10 the weights are erased
    # within a few hundred steps at any useful lr (and lr x weight_decay < 1 is checked below).
    weight_decay: float = knob(0.1, min=0.0, max=10.0)
    # A million steps is weeks of CPU training; a longer warm-up never reaches its peak lr.
    warmup_steps: int = knob(100, min=0, max=1_000_000)
    # No healthy run's gradient norm comes near 1e6; use 0 to disable clipping instead.
    grad_clip: float = knob(1.0, min=0.0, max=1e6, help="max gradient norm; 0 disables")


@dataclass(frozen=True)
class EvalSection:
    # Rendered for every domain and class each run: 5,000 is 140,000 images (1.7 GB), as a run preset allows.
    images_per_class: int = knob(30, min=1, max=5_000)
    seed: int = knob(1_000_003, min=0, max=MAX_SEED, help="must differ from run.seed")  # as run.seed
    template: str = knob(ZERO_SHOT_TEMPLATE, help="zero-shot prompt; {} is the class name")


@dataclass(frozen=True)
class PretrainConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    corpus: CorpusSection = field(default_factory=CorpusSection)
    optim: OptimSection = field(default_factory=OptimSection)
    eval: EvalSection = field(default_factory=EvalSection)
    source: str = "<defaults>"

    @property
    def steps_per_epoch(self) -> int:
        return self.corpus.images // self.optim.batch_size


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(PretrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(PretrainConfig) if f.name != "source"}


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> PretrainConfig:
    """Build the config from parsed TOML; every problem is collected, then raised as one PresetError."""
    problems = Problems(source)
    types = _section_types()
    for name in data:
        if name not in types:
            problems.add(name, f"unknown section.{suggest(name, list(types))}")
    sections = {name: build_section(cls, data.get(name, {}), problems, name) for name, cls in types.items()}
    problems.raise_if_any()
    config = PretrainConfig(**sections, source=source)
    check_keys_together(config, problems)
    problems.raise_if_any()
    return config


def load_preset(path: str | Path) -> PretrainConfig:
    """Read a pre-training preset: a missing, non-UTF-8 or invalid file reads as it does for a run preset."""
    return config_from_dict(read_preset_toml(path), source=str(path))


def check_keys_together(config: PretrainConfig, problems: Problems) -> None:
    """Checks that involve several keys, or the model's architecture, rather than one key's bounds."""
    run, c, o, e = config.run, config.corpus, config.optim, config.eval
    if not c.domains:
        problems.add("corpus.domains", f"needs at least one of {', '.join(synthetic.DOMAINS)}")
    if len(set(c.domains)) != len(c.domains):
        problems.add("corpus.domains", "lists a domain twice")
    if not run.out_dir:
        problems.add("run.out_dir", "must name a folder (an empty one would write into the current folder)")
    if c.images < o.batch_size:
        problems.add("corpus.images", f"must be at least optim.batch_size ({o.batch_size}), got {c.images}")
    if o.lr * o.weight_decay >= 1:
        problems.add(
            "optim.weight_decay",
            f"optim.lr x optim.weight_decay must be < 1 (AdamW scales every weight by 1 minus it each step), "
            f"got {o.lr * o.weight_decay:g}",
        )
    if e.seed == run.seed:
        problems.add("eval.seed", "must differ from run.seed, or the evaluation images are training images")
    try:  # exactly one automatic field, and it formats (as class_prompts will)
        fields = [name for _, name, _, _ in string.Formatter().parse(e.template) if name is not None]
        e.template.format("class")
    except (IndexError, KeyError, ValueError):
        fields = None
    if fields != [""]:
        problems.add(
            "eval.template",
            f"needs exactly one {{}} for the class name and no other braces (write {{{{ for a brace), "
            f"got {e.template!r}",
        )
    try:
        model_cfg = modelzoo.model_config(config.model.arch)
    except ValueError as error:
        problems.add("model.arch", str(error))
        return
    size = model_cfg["vision_cfg"]["image_size"]
    if size != c.image_size:
        problems.add(
            "corpus.image_size", f"must equal the model's image size ({size}) for {config.model.arch}, got {c.image_size}"
        )


# --- events ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PretrainStarted:
    out_dir: str
    arch: str
    parameters: int
    corpus_images: int
    domains: list[str]
    epochs: int
    steps_per_epoch: int
    start_epoch: int  # 1-based epoch the run starts in (> 1 after a resume)
    start_step: int
    time: float


@dataclass(frozen=True)
class CorpusProgress:
    rendered: int
    total: int


@dataclass(frozen=True)
class PretrainStep:
    epoch: int
    step: int  # 1-based within the epoch
    steps: int
    global_step: int
    total_steps: int
    loss: float
    lr: float
    logit_scale: float


@dataclass(frozen=True)
class EpochFinished:
    epoch: int
    epochs: int
    mean_loss: float
    zero_shot: dict[str, float]  # domain -> top-1 accuracy on the fixed evaluation set
    mean_seen: float  # mean over the corpus's domains
    mean_unseen: float | None  # mean over domains absent from the corpus (the shift)
    seconds: float
    checkpoint: str


@dataclass(frozen=True)
class PretrainFinished:
    status: str  # "completed" | "stopped"
    out_dir: str
    epochs_done: int
    seconds: float
    zero_shot: dict[str, float]


PretrainEvent = PretrainStarted | CorpusProgress | PretrainStep | EpochFinished | PretrainFinished
PretrainSink = Callable[[PretrainEvent], None]


# --- data ------------------------------------------------------------------------------------------------


def corpus_entry(config: PretrainConfig, position: int) -> tuple[str, str, int]:
    """(domain, class, render index) of corpus image ``position``: balanced over domains and classes."""
    domains = config.corpus.domains
    n_classes = len(synthetic.CLASSES)
    domain = domains[position % len(domains)]
    class_name = synthetic.CLASSES[(position // len(domains)) % n_classes]
    return domain, class_name, position // (len(domains) * n_classes)


def render_pixels(images) -> torch.Tensor:
    """uint8 [N, 3, H, W] from PIL images (the corpus is kept as bytes: a quarter of float memory)."""
    return torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8) for im in images])).permute(0, 3, 1, 2).contiguous()


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """The model's preprocessing for images already at its input size (open_clip's resize is then a no-op)."""
    mean = torch.tensor(modelzoo.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(modelzoo.CLIP_STD).view(1, 3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std


def evaluation_set(domains, images_per_class: int, seed: int, size: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Fixed images per domain: (uint8 pixels, labels in ``synthetic.CLASSES`` order)."""
    out = {}
    for domain in domains:
        images, labels = [], []
        for label, class_name in enumerate(synthetic.CLASSES):
            for index in range(images_per_class):
                images.append(synthetic.render(domain, class_name, index, seed, size))
                labels.append(label)
        out[domain] = (render_pixels(images), torch.tensor(labels))
    return out


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, eval_set, template: str = ZERO_SHOT_TEMPLATE, batch_size: int = 256) -> dict[str, float]:
    """Top-1 of logit_scale * f . t_k over the classes' prompts, per domain."""
    was_training = model.training
    model.eval()
    text = model.encode_text(tokenizer(class_prompts(synthetic.CLASSES, template)), normalize=True)
    result = {}
    for domain, (pixels, labels) in eval_set.items():
        hits = 0
        for start in range(0, len(labels), batch_size):
            features = model.encode_image(normalise(pixels[start : start + batch_size]), normalize=True)
            hits += int(((features @ text.T).argmax(1) == labels[start : start + batch_size]).sum())
        result[domain] = hits / len(labels)
    model.train(was_training)
    return result


def encode_text_trimmed(model, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """open_clip's ``CLIP.encode_text`` run on the shortest prefix that holds every caption's end token.

    The text tower is causal and pools at the end token, so positions after it never reach the pooled
    feature: the result equals the full 77-token pass (up to float rounding) for a fifth of the cost on
    captions of a dozen tokens. The model and its weights stay exactly open_clip's.
    """
    from open_clip.transformer import text_global_pool

    length = int((tokens != 0).sum(1).max())  # SimpleTokenizer pads with 0
    tokens = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    x = model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear) else x @ model.text_projection
    return torch.nn.functional.normalize(x, dim=-1) if normalize else x


class _Captions:
    """Captions drawn per (epoch, position), tokenised once per distinct text (the set is small)."""

    def __init__(self, config: PretrainConfig, attributes, tokenizer):
        self.seed, self.attributes, self.tokenizer = config.run.seed, attributes, tokenizer
        self.plain_share = config.corpus.plain_share
        self.cache: dict[str, torch.Tensor] = {}

    def tokens(self, epoch: int, positions) -> torch.Tensor:
        rows = []
        for position in positions:
            rng = np.random.default_rng([self.seed, 7, epoch, int(position)])
            text = caption(self.attributes[position], rng, self.plain_share)
            if text not in self.cache:
                self.cache[text] = self.tokenizer([text])[0]
            rows.append(self.cache[text])
        return torch.stack(rows)


# --- training --------------------------------------------------------------------------------------------


def _lr_at(config: PretrainConfig, global_step: int, total_steps: int) -> float:
    """Linear warm-up then cosine decay to zero (open_clip's ``cosine_lr`` schedule)."""
    warmup = config.optim.warmup_steps
    if global_step < warmup:
        return config.optim.lr * (global_step + 1) / warmup
    progress = (global_step - warmup) / max(1, total_steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) * config.optim.lr


def _optimizer(model, config: PretrainConfig) -> torch.optim.Optimizer:
    # As open_clip's training: no decay on gains, biases, embeddings and the temperature.
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        exclude = param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        exclude = exclude or "embedding" in name or name.endswith("class_embedding")
        (no_decay if exclude else decay).append(param)
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": config.optim.weight_decay}]
    return torch.optim.AdamW(groups, lr=config.optim.lr, betas=(0.9, 0.98), eps=1e-6)


def _stop_requested(control) -> bool:
    if control is None:
        return False
    if hasattr(control, "stop_requested"):  # engine.control.RunControl: also honours pause
        from engine.control import RunStopped

        try:
            control.checkpoint()
        except RunStopped:
            return True
        return False
    return bool(control.is_set())


def build_model(config: PretrainConfig):
    import open_clip

    modelzoo.register_model_configs()
    torch.manual_seed(config.run.seed)
    model = open_clip.create_model(config.model.arch, pretrained=None, device="cpu")
    if config.model.token_embedding_std:
        torch.nn.init.normal_(model.token_embedding.weight, std=config.model.token_embedding_std)
    tokenizer = open_clip.get_tokenizer(config.model.arch)
    return model, tokenizer


# --- resume state ----------------------------------------------------------------------------------------
#
# No pickle: tensors (model weights, optimiser moments) go to a safetensors file, everything else
# (position, history, config, optimiser hyper-parameters, torch's RNG state) to JSON. The tensors file is
# named after its own SHA-256 and the JSON, written last, names and hashes it; each file is written to a
# temporary file in the same folder, fsynced and renamed into place. A crash at any point therefore
# leaves either the previous whole state or the new whole state, never a mix of the two.

STATE_FORMAT = 1
_TENSORS_PREFIX = "state-"
_TENSORS_SUFFIX = ".safetensors"
_MODEL_KEY = "model."
_OPTIM_KEY = "optimizer.state."


class ResumeStateError(RuntimeError):
    """A resume state that will not be loaded: an old pickled one, or one that is damaged or incomplete."""


def _resume_path(out_dir: Path) -> Path:
    return out_dir / RESUME_DIR / RESUME_FILE


def _legacy_resume_path(out_dir: Path) -> Path:
    return out_dir / RESUME_DIR / LEGACY_RESUME_FILE


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a directory; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees either the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _json_value(value: Any, what: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_value(v, what) for v in value]
    raise TypeError(f"{what}: {type(value).__name__} cannot be saved in a resume state without pickle")


def _state_tensors(model, optimizer) -> tuple[dict[str, torch.Tensor], dict, list]:
    """(named tensors, non-tensor optimiser state, param_groups without "params") of model + optimiser."""
    tensors = {_MODEL_KEY + name: value.detach().to("cpu").contiguous().clone() for name, value in model.state_dict().items()}
    optim = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in optim["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{_OPTIM_KEY}{int(index)}.{key}"] = value.detach().to("cpu").contiguous().clone()
            else:
                scalars.setdefault(str(int(index)), {})[key] = _json_value(value, f"optimizer state {index}.{key}")
    groups = [
        {k: _json_value(v, f"optimizer param_groups[{i}].{k}") for k, v in group.items() if k != "params"}
        | {"params": [int(p) for p in group["params"]]}
        for i, group in enumerate(optim["param_groups"])
    ]
    return tensors, scalars, groups


def _save_state(out_dir: Path, model, optimizer, epoch: int, step: int, history: list, config: PretrainConfig) -> None:
    from safetensors.torch import save as save_tensors

    folder = out_dir / RESUME_DIR
    folder.mkdir(parents=True, exist_ok=True)
    tensors, scalars, groups = _state_tensors(model, optimizer)
    blob = save_tensors(tensors, metadata={"format": f"fedtui-pretrain-resume/{STATE_FORMAT}"})
    digest = hashlib.sha256(blob).hexdigest()
    tensors_name = f"{_TENSORS_PREFIX}{digest[:16]}{_TENSORS_SUFFIX}"
    _write_atomic(folder / tensors_name, blob)
    state = {
        "format": STATE_FORMAT,
        "epoch": epoch,  # 0-based epoch to continue in
        "step": step,  # 0-based step within it
        "tensors": tensors_name,
        "sha256": digest,
        "optimizer": {"param_groups": groups, "state": scalars},
        "torch_rng": [int(b) for b in torch.get_rng_state().tolist()],
        "history": history,
        "config": dataclasses.asdict(config),
    }
    _write_atomic(folder / RESUME_FILE, json.dumps(state).encode())
    # Only now is the new state whole: drop older tensors files, stray temporaries and an old pickle.
    for stale in folder.iterdir():
        if stale.name in (RESUME_FILE, tensors_name):
            continue
        if stale.name == LEGACY_RESUME_FILE or stale.name.endswith(".tmp") or (
            stale.name.startswith(_TENSORS_PREFIX) and stale.name.endswith(_TENSORS_SUFFIX)
        ):
            stale.unlink(missing_ok=True)


def _load_state(out_dir: Path, model, optimizer, config: PretrainConfig) -> dict:
    """Load the resume state in ``out_dir`` into ``model`` and ``optimizer``; returns its JSON part.

    Nothing here unpickles: the JSON is parsed as data and the tensors come from safetensors, whose
    header is JSON too. A state from another preset is a ``PretrainPresetError``; anything else
    unexpected is a ``ResumeStateError`` naming the folder.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as load_tensors

    path = _resume_path(out_dir)
    folder = path.parent

    def bad(message: str) -> ResumeStateError:
        return ResumeStateError(
            f"the resume state in {folder} {message}; delete {folder} to start over, or run without --resume"
        )

    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise bad(f"cannot be read ({RESUME_FILE}: {error})") from None
    try:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise bad(f"has an unknown format ({RESUME_FILE} format {state.get('format') if isinstance(state, dict) else None!r})")
        ours = json.loads(json.dumps(dataclasses.asdict(config)))  # as it reads back from JSON
        if not isinstance(state["config"], dict) or _comparable(state["config"]) != _comparable(ours):
            raise PretrainPresetError(config.source, None, f"the resume state in {out_dir} was made by a different preset")
        epoch, step = state["epoch"], state["step"]
        if not (
            type(epoch) is int and type(step) is int and 0 <= epoch <= config.optim.epochs
            and 0 <= step < config.steps_per_epoch and isinstance(state["history"], list)
            and len(state["history"]) == epoch  # one record per finished epoch
            and all(isinstance(h, dict) and isinstance(h.get("zero_shot"), dict) for h in state["history"])
        ):
            raise bad("holds a malformed position or history")
        name = state["tensors"]
        if not (isinstance(name, str) and name == Path(name).name and name.startswith(_TENSORS_PREFIX) and name.endswith(_TENSORS_SUFFIX)):
            raise bad(f"names an unexpected tensors file {name!r}")
        try:
            blob = (folder / name).read_bytes()
        except OSError:
            raise bad(f"is incomplete: {name} is missing") from None
        if hashlib.sha256(blob).hexdigest() != state["sha256"]:
            raise bad(f"is damaged: {name} does not match the hash in {RESUME_FILE}")
        try:
            tensors = load_tensors(blob)
        except SafetensorError as error:
            raise bad(f"is malformed: {name} is not a safetensors file ({error})") from None

        weights = {k[len(_MODEL_KEY) :]: v for k, v in tensors.items() if k.startswith(_MODEL_KEY)}
        optim_state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith(_OPTIM_KEY):
                index, _, field_name = key[len(_OPTIM_KEY) :].partition(".")
                optim_state.setdefault(int(index), {})[field_name] = value
            elif not key.startswith(_MODEL_KEY):
                raise bad(f"holds an unexpected tensor {key!r}")
        saved = state["optimizer"]
        for index, entry in saved["state"].items():
            optim_state.setdefault(int(index), {}).update(entry)
        current = optimizer.state_dict()["param_groups"]
        if len(saved["param_groups"]) != len(current):
            raise bad("has a different number of optimiser parameter groups")
        groups = []
        for group, fresh in zip(saved["param_groups"], current):
            # JSON has no tuples: give back the types the optimiser used (AdamW's betas).
            groups.append({k: tuple(v) if isinstance(fresh.get(k), tuple) and isinstance(v, list) else v for k, v in group.items()})
        rng = state["torch_rng"]
        if not (isinstance(rng, list) and all(isinstance(b, int) and 0 <= b < 256 for b in rng)):
            raise bad("holds a malformed RNG state")

        model.load_state_dict(weights)
        optimizer.load_state_dict({"state": optim_state, "param_groups": groups})
        torch.set_rng_state(torch.tensor(rng, dtype=torch.uint8))
        return state
    except (ResumeStateError, PretrainPresetError):
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as error:
        raise bad(f"is malformed or does not fit this model ({type(error).__name__}: {error})") from None


def _comparable(config_dict: dict) -> dict:
    """What must match for a resume to continue the same run (output folder and threads may change)."""
    data = {k: v for k, v in config_dict.items() if k != "source"}
    data["run"] = {k: v for k, v in data["run"].items() if k not in ("out_dir", "threads", "description")}
    return data


def _write_model(out_dir: Path, model, config: PretrainConfig, history: list) -> Path:
    extra = {
        "preset": config.source,
        "name": config.run.name,
        "seed": config.run.seed,
        "corpus_domains": config.corpus.domains,
        "history": history,
    }
    if history:
        # The figures a user can re-measure: this model on the fixed evaluation set it was tracked on.
        extra["zero_shot"] = {
            "template": config.eval.template,
            "images_per_class": config.eval.images_per_class,
            "seed": config.eval.seed,
            "accuracy": history[-1]["zero_shot"],
        }
    return modelzoo.write_checkpoint_folder(
        model, modelzoo.model_config(config.model.arch), out_dir, fp16=config.run.fp16, extra=extra
    )


def pretrain(config: PretrainConfig, sink: PretrainSink, control=None, *, out_dir: str | Path | None = None, resume: bool = False) -> Path:
    """Run pre-training; returns the open_clip local-dir folder it wrote.

    ``control``: a ``threading.Event`` (set means stop) or an ``engine.control.RunControl``, checked
    between batches. A stop saves the exact position, and ``resume=True`` continues from it (or from the
    last finished epoch). Without ``resume`` an existing resume state in ``out_dir`` is overwritten.
    """
    started = time.time()
    out = Path(out_dir or config.run.out_dir)
    if config.run.threads:
        torch.set_num_threads(config.run.threads)

    model, tokenizer = build_model(config)
    optimizer = _optimizer(model, config)
    start_epoch, start_step, history = 0, 0, []
    if resume and _legacy_resume_path(out).is_file():
        # Refused, not loaded and not silently replaced: unpickling it could run any code, and starting
        # over would throw away the position it records.
        raise ResumeStateError(
            f"{_legacy_resume_path(out)} is a resume state in the old pickled format, which fedtui no longer "
            f"loads (unpickling a file can run arbitrary code); delete {out / RESUME_DIR} to start over, "
            f"or run without --resume"
        )
    if resume and _resume_path(out).is_file():
        state = _load_state(out, model, optimizer, config)
        start_epoch, start_step, history = state["epoch"], state["step"], state["history"]

    epochs, steps = config.optim.epochs, config.steps_per_epoch
    total_steps, batch = epochs * steps, config.optim.batch_size
    sink(
        PretrainStarted(
            str(out), config.model.arch, sum(p.numel() for p in model.parameters()), config.corpus.images,
            list(config.corpus.domains), epochs, steps, start_epoch + 1, start_step, started,
        )
    )
    if start_epoch >= epochs:
        _write_model(out, model, config, history)
        sink(PretrainFinished("completed", str(out), epochs, time.time() - started, history[-1]["zero_shot"] if history else {}))
        return out

    pixels, attributes = _render_corpus(config, sink)
    captions = _Captions(config, attributes, tokenizer)
    eval_set = evaluation_set(synthetic.DOMAINS, config.eval.images_per_class, config.eval.seed, config.corpus.image_size)
    loss_fn = _clip_loss()
    max_log_scale = math.log(100)  # CLIP's clamp on the temperature

    model.train()
    for epoch in range(start_epoch, epochs):
        epoch_started, losses = time.time(), []
        order = np.random.default_rng([config.run.seed, 11, epoch]).permutation(config.corpus.images)
        for step in range(start_step if epoch == start_epoch else 0, steps):
            if _stop_requested(control):
                _save_state(out, model, optimizer, epoch, step, history, config)
                _write_model(out, model, config, history)
                sink(PretrainFinished("stopped", str(out), epoch, time.time() - started, history[-1]["zero_shot"] if history else {}))
                return out
            positions = order[step * batch : (step + 1) * batch]
            global_step = epoch * steps + step
            lr = _lr_at(config, global_step, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            image_features = model.encode_image(normalise(pixels[positions]), normalize=True)
            text_features = encode_text_trimmed(model, captions.tokens(epoch, positions))
            loss = loss_fn(image_features, text_features, model.logit_scale.exp())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, max_log_scale)
            losses.append(loss.item())
            sink(PretrainStep(epoch + 1, step + 1, steps, global_step + 1, total_steps, losses[-1], lr, model.logit_scale.exp().item()))

        accuracy = zero_shot_accuracy(model, tokenizer, eval_set, config.eval.template)
        seen = [accuracy[d] for d in config.corpus.domains]
        unseen = [accuracy[d] for d in synthetic.DOMAINS if d not in config.corpus.domains]
        record = {
            "epoch": epoch + 1,
            "mean_loss": float(np.mean(losses)) if losses else float("nan"),
            "zero_shot": accuracy,
        }
        history.append(record)
        _save_state(out, model, optimizer, epoch + 1, 0, history, config)
        _write_model(out, model, config, history)
        sink(
            EpochFinished(
                epoch + 1, epochs, record["mean_loss"], accuracy, float(np.mean(seen)),
                float(np.mean(unseen)) if unseen else None, time.time() - epoch_started, str(out),
            )
        )

    shutil.rmtree(out / RESUME_DIR, ignore_errors=True)  # finished: the folder is now just a checkpoint
    sink(PretrainFinished("completed", str(out), epochs, time.time() - started, history[-1]["zero_shot"]))
    return out


def _clip_loss():
    import open_clip

    return open_clip.ClipLoss()


def _render_corpus(config: PretrainConfig, sink: PretrainSink):
    total, size, seed = config.corpus.images, config.corpus.image_size, config.run.seed
    pixels = torch.empty((total, 3, size, size), dtype=torch.uint8)
    attributes = []
    chunk = 512
    for start in range(0, total, chunk):
        images = []
        for position in range(start, min(total, start + chunk)):
            domain, class_name, index = corpus_entry(config, position)
            attributes.append(synthetic.attributes(domain, class_name, index, seed))
            images.append(synthetic.render(domain, class_name, index, seed, size))
        pixels[start : start + len(images)] = render_pixels(images)
        sink(CorpusProgress(start + len(images), total))
    return pixels, attributes
