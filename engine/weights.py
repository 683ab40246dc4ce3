"""Checks on ``[model]`` that a run would otherwise fail on minutes in: the weights exist, load safely, fit the arch.

Each check reads as little as it can: a config file, a safetensors header, a pickle's opcodes (never
executed). Only an open_clip tag imports open_clip, to learn the tags it knows and where each would be
downloaded from; a tag whose file is not in the local cache is reported at once when the machine is
offline, instead of after open_clip's retries.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickletools
import socket
import struct
import zipfile
from pathlib import Path

from engine.schema import Problems

CONFIG_FILE = "open_clip_config.json"
LOCAL_DIR_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "open_clip_model.bin")
FEDTUI_CONFIGS = Path(__file__).resolve().parent / "model_configs"
HUB_HOST = "huggingface.co"

# What a tensor checkpoint's pickle may name: torch's tensor-rebuilding helpers, storage and dtype
# types, and the containers a state dict is made of (the same idea as torch.load(weights_only=True)).
# Anything else could run code when unpickled.
SAFE_GLOBALS = {
    ("collections", "OrderedDict"), ("torch", "Size"), ("torch", "device"), ("torch", "dtype"),
    ("_codecs", "encode"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("numpy", "ndarray"), ("numpy", "dtype"),
}


def known_configs() -> dict[str, Path]:
    """Architecture name -> its JSON config: fedtui's own and open_clip's, found without importing open_clip."""
    configs: dict[str, Path] = {}
    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            configs.update({p.stem: p for p in Path(folder, "model_configs").glob("*.json")})
    configs.update({p.stem: p for p in FEDTUI_CONFIGS.glob("*.json")})
    return configs


def check_model(arch: str, pretrained: str, problems: Problems) -> None:
    configs = known_configs()
    if pretrained.startswith("local-dir:"):
        check_local_dir(Path(pretrained[len("local-dir:") :]), arch, configs, problems)
        return
    if arch.startswith("hf-hub:"):
        return  # open_clip fetches config and weights together; only a download can tell
    if arch not in configs:
        problems.add("model.arch", f"unknown open_clip architecture {arch!r}.{_close(arch, list(configs))}")
        return
    if pretrained in ("", "none"):
        return
    from engine.presets import looks_like_path

    if looks_like_path(pretrained):
        check_checkpoint_file(Path(pretrained), "model.pretrained", problems)
    else:
        check_tag(arch, pretrained, problems)


def _close(name: str, allowed: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, allowed, n=3, cutoff=0.6)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else " See `python -c 'import open_clip; print(open_clip.list_models())'`."


def check_local_dir(folder: Path, arch: str, configs: dict[str, Path], problems: Problems) -> None:
    key = "model.pretrained"
    if not folder.is_dir():
        problems.add(key, f"local-dir folder {str(folder)!r} does not exist")
        return
    config_path = folder / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        model_cfg = config["model_cfg"]
    except FileNotFoundError:
        problems.add(key, f"local-dir folder {str(folder)!r} has no {CONFIG_FILE}")
        return
    except (OSError, ValueError, KeyError, TypeError) as error:
        problems.add(key, f"{str(config_path)!r} is not an open_clip config ({type(error).__name__}: {error})")
        return
    weights = [folder / name for name in LOCAL_DIR_WEIGHTS if (folder / name).is_file()]
    if not weights:
        problems.add(key, f"local-dir folder {str(folder)!r} has none of {', '.join(LOCAL_DIR_WEIGHTS)}")
    else:
        check_checkpoint_file(weights[0], key, problems)
    # open_clip builds the model from the folder's config and ignores the name: a different arch in
    # the preset would be silently wrong in the manifest and in every comparison made from it.
    named = (config.get("fedtui") or {}).get("name") if isinstance(config.get("fedtui"), dict) else None
    if arch == named:
        return
    if arch in configs:
        try:
            if json.loads(configs[arch].read_text(encoding="utf-8")) == model_cfg:
                return
        except (OSError, ValueError):
            pass
    hint = f" it holds {named!r}" if named else " its model_cfg matches no known architecture of that name"
    problems.add("model.arch", f"{arch!r} does not agree with {str(config_path)!r}:{hint}")


def check_checkpoint_file(path: Path, key: str, problems: Problems) -> None:
    if not path.is_file():
        problems.add(key, f"checkpoint file {str(path)!r} does not exist")
        return
    try:
        if path.suffix == ".safetensors":
            _check_safetensors(path)
        else:
            _check_pickle_checkpoint(path)
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        problems.add(key, f"checkpoint file {str(path)!r} cannot be loaded safely: {error}")


def _check_safetensors(path: Path) -> None:
    """The header parses and every tensor's bytes lie inside the file: catches truncation at no cost."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ValueError("too short to be safetensors")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise ValueError("its safetensors header runs past the end of the file (truncated?)")
        header = json.loads(handle.read(length))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end > size:
        raise ValueError(f"truncated: the tensors need {8 + length + end} bytes, the file has {size}")


def _check_pickle_checkpoint(path: Path) -> None:
    """A torch.save file whose pickle names only tensor-rebuilding globals; read opcode by opcode, never run."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("data.pkl")]
            if not names:
                raise ValueError("a zip file without a torch data.pkl")
            _check_pickle_globals(archive.read(names[0]))
    else:
        with path.open("rb") as handle:  # the legacy format: a pickle stream first
            _check_pickle_globals(handle.read(1 << 20), partial=True)


def _check_pickle_globals(data: bytes, partial: bool = False) -> None:
    strings: list[str] = []
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
                strings.append(arg)
            elif opcode.name == "GLOBAL":
                _allow(*str(arg).split(" ", 1))
            elif opcode.name == "STACK_GLOBAL":
                if len(strings) < 2:
                    raise ValueError("an unreadable pickle global")
                _allow(strings[-2], strings[-1])
            elif opcode.name in ("INST", "OBJ"):
                raise ValueError(f"the pickle builds arbitrary objects ({opcode.name})")
    except ValueError:
        raise
    except Exception as error:  # noqa: BLE001 - pickletools raises many kinds on damaged data
        if not partial:
            raise ValueError(f"not a readable pickle ({type(error).__name__})") from None


def _allow(module: str, name: str) -> None:
    rebuilds = module in ("torch", "torch._utils") and (name.startswith("_rebuild_") or name.endswith("Storage"))
    dtypes = module == "torch" and name in ("float32", "float16", "bfloat16", "float64", "int64", "int32", "uint8")
    if not (rebuilds or dtypes or (module, name) in SAFE_GLOBALS):
        raise ValueError(f"its pickle would call {module}.{name}, which is not a tensor type (refused unread)")


def check_tag(arch: str, tag: str, problems: Problems) -> None:
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(arch)
    if tag not in tags:
        allowed = ", ".join(tags) or "none for this architecture; use 'none' or a checkpoint file"
        problems.add("model.pretrained", f"unknown tag {tag!r} for {arch}; tags: {allowed}")
        return
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if _cached(cfg):
        return
    offline = _offline_reason()
    if offline:
        source = cfg.get("hf_hub") or cfg.get("url") or "the hub"
        problems.add(
            "model.pretrained",
            f"{arch} '{tag}' weights must be downloaded ({source}) and {offline}; "
            "download them where there is a network, or use a checkpoint file or 'local-dir:<folder>'",
        )


def _cached(cfg: dict) -> bool:
    """open_clip would find these weights without a download (its URL cache or the Hugging Face cache)."""
    if cfg.get("file"):
        return Path(cfg["file"]).is_file()
    hub = cfg.get("hf_hub", "")
    if hub:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return False
        repo, filename = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
        candidates = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        return any(isinstance(try_to_load_from_cache(repo, name), str) for name in candidates)
    url = cfg.get("url", "")
    return bool(url) and (Path("~/.cache/clip").expanduser() / os.path.basename(url)).is_file()


def _offline_reason() -> str | None:
    """Why nothing can be downloaded now, or None: HF_HUB_OFFLINE, or the hub does not answer within 3 s."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    try:
        socket.create_connection((HUB_HOST, 443), timeout=3).close()
    except OSError as error:
        return f"{HUB_HOST} cannot be reached ({error.strerror or type(error).__name__})"
    return None
