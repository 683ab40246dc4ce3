"""Rounds carried by files: federated training for sites whose machines never connect to a server.

Each round's model travels by hand (a USB stick, a one-way upload) as a signed folder
(``engine.signing``): safetensors and JSON only, every file hashed in a manifest signed with Ed25519.

    export     server  preset -> package (round 1)
    train      client  package + its own images -> update (signed, hashed)
    aggregate  server  package + updates -> package (round r + 1; the last one is marked final)

A *package* (round r) holds the global adapter to train round r from (``global.safetensors``), the
resolved preset (``preset.toml``), the server's state (``server.safetensors``: the rule's moments, e.g.
fedadam's, from ``strategy.state_tensors()``), the best adapter so far when the server evaluates
(``best.safetensors``) and the run's events so far (``metrics.jsonl``, the format of a run directory's).
Its manifest names the run, the round, the client roster, this round's cohort and the CLIP weights'
fingerprint. An *update* holds one client's shared delta exactly as the preset's codec encoded it
(``update.safetensors``: the bytes ``engine.compression`` would put on the wire) and, in its manifest,
the client's name, round, the digest of the package it trained on, its example count, mean loss, steps
and seconds. Nothing else leaves a site: no features, labels or images (tests/test_file_rounds.py checks).

Equal to the in-process run. The pieces are the engine's own: ``engine.prepare.prepare`` and the client
split by name, the adapter built under ``torch.manual_seed(run.seed)`` as the runner does, a
``Federation`` whose ``train_client`` trains the site's client, the codec's ``encode`` on the client and
``decode`` on the server, and ``build_strategy(...).aggregate`` with its state carried in the package.
What the in-process run keeps in memory between rounds is carried so:

- the global adapter and the server rule's state: in the package;
- each client's random stream (``seeded_generator(seed, 1, index)``, one per client for the whole run):
  rebuilt by replaying its draws. Local training draws exactly one ``torch.randperm(n_train)`` per
  epoch (``engine.training.train_locally``), and a client trains ``epochs`` epochs in every round whose
  cohort (``sample_cohort``, seeded by run and round) holds it, so the stream for round r is the seed plus
  those draws for the earlier rounds: nothing to store, and a site that lost its disk still trains right;
- what cannot be replayed, because it depends on the training itself: Adam's moments when
  ``train.reset_optimizer_each_round = false``, personal layers (``federation.personal_layers``) and
  top-k's error-feedback residual. These stay at the site, in ``--state DIR`` (one small safetensors +
  JSON per round trained; never sent). A preset that needs them refuses to train without it.

So when every client returns, the final adapter equals the in-process run's ``checkpoints/last`` and the
server's per-round accuracies equal its events (the test holds them equal exactly, on one machine; on
machines with other BLAS or thread counts the float32 sums may differ in their last bits).

Not carried: LoRA's dropout draws from torch's global stream, which the in-process run shares between
clients in order; here each client seeds it from (seed, client, round), so such runs are reproducible but
not equal to the in-process one. Rules that need all clients in one place are refused: ``centralised``
pools the images, ``local`` shares nothing, ``loadaboost`` sends clients back within a round.

Evaluation: the server evaluates when it has the preset's data (``prepare`` works there: the synthetic
world, or the images under ``data.root``); the adapter's init needs only the CLIP weights and the class
names. With personal layers the server sees only the shared part, so it reports held-out accuracy and each
client's accuracy with the global adapter (the in-process run's ``global_test``).

No UI imports here: the CLI (``fedtui/cli_rounds.py``) prints what these functions return or raise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from engine import events as ev
from engine import signing
from engine.signing import PrivateKey, PublicKey, Refused

State = dict[str, torch.Tensor]
Log = Callable[[str, str], None]

FORMAT = 1
PACKAGE = "fedtui-round-package"
UPDATE = "fedtui-round-update"
PRESET_FILE = "preset.toml"
GLOBAL_FILE = "global.safetensors"
SERVER_FILE = "server.safetensors"
BEST_FILE = "best.safetensors"
METRICS_FILE = "metrics.jsonl"
PAYLOAD_FILE = "update.safetensors"
# Keys a site may set for itself when it trains: where its data, weights and cache are and how its machine
# runs. Everything that shapes the training is the package's.
CLIENT_LOCAL_KEYS = (
    "data.root", "data.domains", "data.holdout", "run.cache_dir", "run.device", "run.threads",
    "model.pretrained", "model.encode_batch_size",
)
# What an update's manifest may say (besides kind, files and signer, which signing adds).
UPDATE_FIELDS = (
    "format", "run_id", "round", "package", "client", "examples", "mean_loss", "steps", "seconds", "skipped",
    "compression", "bytes_up",
)
MAX_EXAMPLES = 10**9


class FileRoundError(ValueError):
    """Bad input (exit 2): one line naming the file or option and why; nothing was written."""


class RoundFailed(RuntimeError):
    """Training or aggregation went non-finite (exit 1); nothing was written."""


class AggregationRefused(FileRoundError):
    """Too few good updates for ``federation.min_clients``; ``refusals`` are the one-line reasons."""

    def __init__(self, message: str, refusals: list[Refused]):
        super().__init__(message)
        self.refusals = refusals


def _quiet(level: str, text: str) -> None:
    pass


# --- the preset and the machinery both sides share ----------------------------------------------------


def unsupported_reason(preset, strategy) -> str | None:
    """Why the rule cannot run with its clients in other processes (files or Flower), or None when it can."""
    from engine.strategies import Strategy

    name = preset.federation.aggregation
    if strategy.pools_data:
        return f"federation.aggregation = {name!r} pools every client's images in one place"
    if strategy.personalises_everything:
        return f"federation.aggregation = {name!r} trains each client alone, so nothing travels"
    if type(strategy).extra_epochs is not Strategy.extra_epochs:
        return (f"federation.aggregation = {name!r} needs a second exchange within a round (clients train more "
                "after the server has seen every loss)")
    return None


def check_supported(preset, strategy) -> None:
    reason = unsupported_reason(preset, strategy)
    if reason:
        raise FileRoundError(f"{reason}: not for rounds carried by files; use `fedtui run`")


@dataclass
class Side:
    """One machine's view of the run: the preset, the rule, the adapter and (when there) the data."""

    preset: Any
    device: torch.device
    strategy: Any
    rounds: int
    epochs: int
    adapter: Any
    backbone: Any
    roster: list[str]
    data: Any = None  # PreparedRun, or None for a server without images

    @property
    def fed(self):
        return self.preset.federation


def build_side(preset, with_data: bool, log: Log = _quiet) -> Side:
    """What the runner builds before round 1, in the same order: threads, device, rule, data, then the
    adapter under ``torch.manual_seed(run.seed)``. Without data: only the CLIP weights and class names."""
    from engine.adapters import AdapterContext, build_adapter
    from engine.adapters.base import ADAPTERS
    from engine.backbone import load_backbone, resolve_device
    from engine.data import build_source, class_prompts
    from engine.prepare import prepare
    from engine.resolve import client_names
    from engine.runner import default_threads
    from engine.strategies import build_strategy

    fed = preset.federation
    torch.set_num_threads(preset.run.threads or default_threads())
    device = resolve_device(preset.run.device)
    strategy = build_strategy(fed.aggregation, fed.aggregation_options)
    check_supported(preset, strategy)
    rounds, epochs = strategy.schedule(preset.run.rounds, preset.train.local_epochs)
    data = None
    if with_data:
        data = prepare(preset, device, log, lambda: None, ADAPTERS[preset.adapter.kind].needs_images)
        backbone, classes, prompts, text = data.backbone, data.classes, data.prompts, data.text_features
        feature_dim, domains = data.features.shape[1], data.domains
    else:
        source = build_source(preset)
        backbone = load_backbone(preset, device)
        classes = list(source.classes)
        prompts = class_prompts(classes, preset.data.prompt_template)
        text = backbone.encode_prompts(prompts)
        feature_dim, domains = text.shape[1], list(preset.data.domains or source.domains)
    if data is not None:
        roster = [c.name for c in data.clients]
    else:  # engine.data.make_clients' names, from the domains alone
        not_training = set(preset.data.holdout) | {getattr(preset.data, "eval_domain", "")}
        roster = client_names(preset, [d for d in domains if d not in not_training])
    # As engine.runner: a backbone the feature cache stands in for (not loaded) gives the adapter no model, and
    # whatever loads one (seeding torch itself) happens before the seed that fixes the adapter's init.
    loaded = getattr(backbone, "loaded", True)
    clip_model, tokenizer = (backbone.model, backbone.tokenizer) if loaded else (None, None)
    torch.manual_seed(preset.run.seed)  # the adapter's init, identical for every client (as engine.runner)
    context = AdapterContext(
        feature_dim=feature_dim, class_names=classes, prompts=prompts, class_text_features=text,
        logit_scale=backbone.logit_scale, clip_model=clip_model, tokenizer=tokenizer,
    )
    adapter = build_adapter(preset.adapter.kind, context, preset.adapter.kind_options).to(device)
    return Side(preset, device, strategy, rounds, epochs, adapter, backbone, roster, data)


def make_federation(side: Side, data, emit: Callable[[ev.Event], None] = lambda event: None,
                    save: Callable[[str, State], None] = lambda name, state: None):
    from engine.control import RunControl
    from engine.federation import Federation

    return Federation(side.preset, data, side.adapter, side.strategy, side.epochs, side.device, emit, RunControl(), save)


def cohort(preset, roster: list[str], round_: int) -> list[str]:
    from engine.federation import sample_cohort

    fed = preset.federation
    return sample_cohort(list(roster), fed.fraction, fed.min_clients, preset.run.seed, round_)


def replayed_stream(preset, roster: list[str], name: str, round_: int, epochs: int, train_rows: int) -> torch.Generator:
    """Client ``name``'s random stream as the in-process run holds it when round ``round_`` starts.

    ``Federation`` seeds it once, ``seeded_generator(seed, 1, index)``, and ``train_locally`` draws one
    ``torch.randperm(train_rows)`` from it per local epoch in every round the client trains; replaying those
    draws for rounds 1 .. round_ - 1 gives the very same state."""
    from engine.federation import seeded_generator

    generator = seeded_generator(preset.run.seed, 1, roster.index(name))
    for past in range(1, round_):
        if name in cohort(preset, roster, past):
            for _ in range(epochs):
                torch.randperm(train_rows, generator=generator)
    return generator


def own_rows(data, name: str):
    """The prepared run cut down to one client's rows: its features, labels and split, nothing else."""
    from engine.data import ClientSplit

    split = next(c for c in data.clients if c.name == name)
    keep = np.concatenate([split.train, split.val, split.test]).astype(np.int64)
    local = np.full(len(data.labels), -1, dtype=np.int64)
    local[keep] = np.arange(len(keep))
    index = torch.as_tensor(keep)
    mine = ClientSplit(name, split.domain, local[split.train], local[split.val], local[split.test],
                       list(split.class_histogram))
    return dataclasses.replace(
        data, features=data.features[index.to(data.features.device)], labels=data.labels[index],
        row_domains=data.row_domains[keep], clients=[mine], holdout={},
        pixels=None if data.pixels is None else data.pixels[index],
    )


def codec_keeps_state(codec) -> bool:
    from engine.compression import Codec

    return type(codec).state_tensors is not Codec.state_tensors and bool(
        getattr(codec.options, "topk_error_feedback", True))


# --- folders -------------------------------------------------------------------------------------------


def check_out(out: Path, what: str = "--out") -> None:
    """Fail before any work when ``out`` cannot become a new folder."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileRoundError(f"{what} {out} is a file, not a folder; nothing was written")
    if out.is_dir() and any(out.iterdir()):
        raise FileRoundError(f"{what} {out} exists and is not empty; nothing was written")


@contextlib.contextmanager
def new_folder(out: Path):
    """A folder filled beside ``out`` and renamed into place at the end: a reader never sees half of one."""
    out = Path(out)
    check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.is_dir():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_tensors(path: Path, tensors: State) -> None:
    path.write_bytes(st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}))


def load_tensors(path: Path) -> State:
    """safetensors only: a header and raw numbers, nothing executed."""
    return st_load(path.read_bytes())


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


# --- packages ------------------------------------------------------------------------------------------


@dataclass
class Package:
    """A verified package: its manifest, its digest and where it lies."""

    path: Path
    manifest: dict[str, Any]
    digest: str

    @property
    def round(self) -> int:
        return int(self.manifest["round"])

    @property
    def final(self) -> bool:
        return bool(self.manifest.get("final"))

    @property
    def roster(self) -> list[str]:
        return list(self.manifest["clients"])

    @property
    def cohort(self) -> list[str]:
        return list(self.manifest["cohort"])

    @property
    def run_id(self) -> str:
        return str(self.manifest["run_id"])

    def global_state(self) -> State:
        return load_tensors(self.path / GLOBAL_FILE)

    def preset(self, overrides: list[str] | None = None):
        from engine.presets import read_preset

        return read_preset(self.path / PRESET_FILE, overrides or [])


PACKAGE_FIELDS = {"format": int, "run_id": str, "round": int, "rounds": int, "final": bool, "clients": list,
                  "cohort": list, "weights_fingerprint": str, "shared_keys": list, "personal_keys": list}


def open_package(path: Path, server_key: PublicKey) -> Package:
    verified = signing.verify_folder(path, PACKAGE, {server_key.name: server_key}, label=f"package {path}")
    manifest = verified.manifest
    for key, kind in PACKAGE_FIELDS.items():
        if not isinstance(manifest.get(key), kind):
            raise Refused("malformed", f"package {path}: its manifest has no valid {key!r}")
    if manifest["format"] != FORMAT:
        raise Refused("malformed", f"package {path}: format {manifest['format']}, this fedtui reads {FORMAT}")
    for name in (PRESET_FILE, GLOBAL_FILE, SERVER_FILE, METRICS_FILE):
        if name not in manifest["files"]:
            raise Refused("malformed", f"package {path}: {name} is not in its signed manifest")
    return Package(Path(path), manifest, verified.digest)


def write_package(out: Path, key: PrivateKey, side_preset, round_: int, rounds: int, roster: list[str],
                  global_state: State, shared_keys: list[str], personal_keys: list[str], server_state: State,
                  events: list[ev.Event], previous: Package | None, weights: str, fingerprint: str,
                  server_evaluates: bool, best_val: float | None, best_round: int | None, best_state: State | None,
                  extra: dict[str, Any] | None = None) -> Path:
    from engine.presets import to_toml

    final = round_ > rounds
    manifest = {
        "format": FORMAT,
        "run_id": previous.run_id if previous else secrets.token_hex(16),
        "run_name": side_preset.run.name,
        "round": round_,
        "rounds": rounds,
        "final": final,
        "clients": list(roster),
        "cohort": [] if final else cohort(side_preset, roster, round_),
        "aggregation": side_preset.federation.aggregation,
        "compression": side_preset.federation.compression,
        "adapter": side_preset.adapter.kind,
        "shared_keys": list(shared_keys),
        "personal_keys": list(personal_keys),
        "weights": weights,
        "weights_fingerprint": fingerprint,
        "server_evaluates": server_evaluates,
        "best_val": best_val,
        "best_round": best_round,
        "previous": previous.digest if previous else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **(extra or {}),
    }
    with new_folder(out) as folder:
        (folder / PRESET_FILE).write_text(to_toml(side_preset), encoding="utf-8")
        save_tensors(folder / GLOBAL_FILE, global_state)
        save_tensors(folder / SERVER_FILE, server_state)
        if best_state is not None:
            save_tensors(folder / BEST_FILE, best_state)
        old = (previous.path / METRICS_FILE).read_text(encoding="utf-8") if previous else ""
        (folder / METRICS_FILE).write_text(old + "".join(ev.event_to_json(e) + "\n" for e in events), encoding="utf-8")
        signing.sign_folder(folder, PACKAGE, manifest, key, signer="server")
    return Path(out)


def load_server_preset(path: Path, overrides: list[str], evaluate: bool | None, log: Log):
    """(preset, has_data): the schema always; the world (data) only where the server evaluates."""
    from engine.presets import read_preset
    from engine.resolve import resolve
    from engine.schema import PresetError

    preset = read_preset(path, overrides)
    try:
        return resolve(preset), evaluate is not False
    except PresetError as error:
        data_only = all((p.key or "").startswith("data.") for p in error.problems)
        if evaluate or not data_only or preset.data.dataset != "imagefolder":
            raise
        log("warning", f"the server does not have the preset's images ({error.problems[0]}): it will not "
                       "evaluate; the adapter's init needs only the CLIP weights and the class folders' names")
        return preset, False


def export_round(preset_path: Path, out: Path, key: PrivateKey, overrides: list[str] | None = None,
                 evaluate: bool | None = None, log: Log = _quiet) -> Package:
    """The round-1 package: the initial adapter theta_0, the resolved preset, an empty server state."""
    from engine.federation import split_keys

    check_out(out)
    preset, has_data = load_server_preset(Path(preset_path), overrides or [], evaluate, log)
    if float(getattr(preset.adapter.kind_options, "lora_dropout", 0.0) or 0.0) > 0:
        log("warning", "adapter.lora_dropout > 0: each site seeds its dropout per client and round, so this run is "
                       "reproducible but not equal to `fedtui run`'s (which shares torch's stream between clients)")
    side = build_side(preset, has_data, log)
    theta_0 = side.adapter.trainable_state()
    shared, personal = split_keys(theta_0, side.fed.personal_layers)
    events: list[ev.Event] = []
    if has_data:
        federation = make_federation(side, side.data, emit=events.append)
        federation.evaluate(0, zero_shot=True)
    write_package(
        out, key, preset, 1, side.rounds, side.roster, theta_0, shared, personal, side.strategy.state_tensors(),
        events, None, side.backbone.weights, side.backbone.fingerprint, has_data, None, None, None,
    )
    return open_package(out, PublicKey("server", key.public_raw))


# --- a client's round ----------------------------------------------------------------------------------


@dataclass
class TrainResult:
    path: Path
    client: str
    round: int
    examples: int
    mean_loss: float
    steps: int
    bytes_up: int
    skipped: bool
    state_file: Path | None = None


def _state_name(client: str, round_: int) -> str:
    return f"{client}-r{round_:05d}"


def check_client_overrides(overrides: list[str]) -> None:
    from engine.presets import parse_override
    from engine.schema import PresetError

    for text in overrides:
        try:
            section, key, _ = parse_override(text)
        except PresetError as error:
            raise FileRoundError(f"--set {text}: {error.message}") from None
        if f"{section}.{key}" not in CLIENT_LOCAL_KEYS:
            raise FileRoundError(f"--set {section}.{key}: the package fixes it; a site may set only "
                                 f"{', '.join(CLIENT_LOCAL_KEYS)}")


def train_round(package_path: Path, client: str, key: PrivateKey, out: Path, server_key: PublicKey,
                overrides: list[str] | None = None, state_dir: Path | None = None, log: Log = _quiet) -> TrainResult:
    """Verify the package, train this site's client for the package's round on its own rows, write the
    signed update. Raises ``Refused`` for a package that does not verify, ``FileRoundError`` for bad input."""
    from engine.resolve import resolve
    from engine.schema import PresetError

    overrides = list(overrides or [])
    check_client_overrides(overrides)
    check_out(out)
    package = open_package(Path(package_path), server_key)
    round_, roster = package.round, package.roster
    where = f"package {package_path}"
    if package.final:
        raise FileRoundError(f"{where} is the final model (after round {package.manifest['rounds']}); nothing to train")
    if client not in roster:
        raise FileRoundError(f"{where}: no client {client!r} in this run (clients: {', '.join(roster)})")
    if client not in package.cohort:
        raise FileRoundError(f"{where}: {client} is not in round {round_}'s cohort ({', '.join(package.cohort)}); "
                             "it sits this round out")
    try:
        preset = resolve(package.preset(overrides))
    except PresetError as error:
        raise FileRoundError(str(error)) from None
    side = build_side(preset, True, log)
    if side.backbone.fingerprint != package.manifest["weights_fingerprint"]:
        raise FileRoundError(f"this site's CLIP weights ({side.backbone.weights}, sha256 {side.backbone.fingerprint[:16]}) "
                             f"are not the package's ({package.manifest.get('weights')}, "
                             f"{package.manifest['weights_fingerprint'][:16]}); every site must load the same weights")
    if client not in [c.name for c in side.data.clients]:
        raise FileRoundError(f"this site's data has no client {client!r} (it has: "
                             f"{', '.join(c.name for c in side.data.clients)}); check data.root / data.domains")
    if cohort(preset, roster, round_) != package.cohort:
        raise FileRoundError(f"{where}: its cohort is not the one the preset draws for round {round_}")
    global_state = package.global_state()
    site = train_site(side, client, round_, roster, global_state, package.manifest["shared_keys"], package.run_id,
                      package.digest, state_dir, where)
    manifest = {
        "format": FORMAT, "run_id": package.run_id, "round": round_, "package": package.digest, "client": client,
        "examples": site.examples, "mean_loss": _finite_or_none(site.mean_loss), "steps": site.steps,
        "seconds": site.seconds, "skipped": site.skipped, "compression": site.compression,
        "bytes_up": len(site.payload),
    }
    with new_folder(out) as folder:
        if not site.skipped:
            (folder / PAYLOAD_FILE).write_bytes(site.payload)
        signing.sign_folder(folder, UPDATE, manifest, key, signer=client)
    state_file = site.keep_state()
    return TrainResult(Path(out), client, round_, site.examples, site.mean_loss, site.steps, len(site.payload),
                       site.skipped, state_file)


@dataclass
class SiteUpdate:
    """One site's trained round, before it is written anywhere: the codec's bytes and what the server is told.

    ``keep_state()`` writes what the site keeps for its next round (``--state``; nothing when the preset keeps
    no client state) and is called once the update itself is safely out."""

    client: str
    round: int
    examples: int
    mean_loss: float
    steps: int
    seconds: float
    skipped: bool
    compression: str
    payload: bytes
    keep_state: Callable[[], Path | None]


def train_site(side: Side, client: str, round_: int, roster: list[str], global_state: State, shared_keys: list[str],
               run_id: str, digest: str, state_dir: Path | None, where: str) -> SiteUpdate:
    """Train ``client`` for round ``round_`` from ``global_state`` on this site's own rows, exactly as the
    in-process run trains that client, and encode its update with the preset's codec.

    ``side`` is this site's ``build_side(preset, True)`` (its data is dropped here: only the client's rows
    stay); ``roster`` the run's clients in order (each client's random stream is indexed by it); ``run_id`` and
    ``digest`` name the run and what was trained on in the state kept at the site. Used by ``train_round``
    (rounds carried by files) and by the Flower ClientApp (``engine.flower``)."""
    from engine.federation import RunDiverged, norm

    preset = side.preset
    theta_0 = side.adapter.trainable_state()
    if {k: (tuple(v.shape), v.dtype) for k, v in global_state.items()} != {
            k: (tuple(v.shape), v.dtype) for k, v in theta_0.items()}:
        raise FileRoundError(f"{where}: its adapter's tensors are not this preset's adapter's "
                             f"({preset.adapter.kind}); was it written by another version?")

    mine = own_rows(side.data, client)
    side.data = None  # the other clients' rows are not this site's to keep
    federation = make_federation(side, mine, save=lambda name, state: None)
    if federation.shared_keys != list(shared_keys):
        raise FileRoundError(f"{where}: its shared tensors are not this preset's")
    train_rows = len(mine.clients[0].train)
    federation.global_state = {k: v.to(side.device) for k, v in global_state.items()}
    federation.generators = {client: replayed_stream(preset, roster, client, round_, side.epochs, train_rows)}
    federation.client_index = {client: roster.index(client)}
    keep_optimizer = not preset.train.reset_optimizer_each_round
    needs_state = keep_optimizer or bool(federation.personal_keys) or codec_keeps_state(federation.codec)
    earlier = [r for r in range(1, round_) if client in cohort(preset, roster, r)]
    if needs_state and state_dir is None:
        raise FileRoundError(
            "this preset keeps client state between rounds (optimiser moments, personal layers or top-k "
            "residuals): give --state DIR, a folder that stays at this site")
    if needs_state and earlier:
        _load_client_state(federation, Path(state_dir), client, earlier[-1], run_id)
    # LoRA's dropout draws from torch's global stream: seed it per client and round (see the module docstring).
    torch.manual_seed(int(np.random.SeedSequence([preset.run.seed, 4, roster.index(client), round_])
                          .generate_state(1, dtype=np.uint64)[0] >> 1))

    try:
        trained = federation.train_client(round_, client, side.epochs)
    except RunDiverged as error:
        raise RoundFailed(str(error)) from None
    # The client's half of Federation.upload: keep personal tensors, the delta (as a faulty client sends
    # it, for robustness studies), the skip rule, the codec's real bytes.
    fed = preset.federation
    shared_global = {k: federation.global_state[k] for k in federation.shared_keys}
    if client in federation.personal:
        federation.personal[client] = {k: trained.state[k].clone() for k in federation.personal_keys}
    delta = {k: trained.state[k] - shared_global[k] for k in federation.shared_keys}
    if client in federation.faulty:
        delta = federation.misbehave(client, round_, delta)
    payload, skipped = b"", False
    if delta:
        relative = norm(delta) / max(norm(shared_global), 1e-12)
        if fed.skip_threshold and relative < fed.skip_threshold:
            skipped = True
        else:
            payload = federation.codec.encode(client, delta)
    else:
        skipped = True  # nothing is shared (every tensor is personal)
    examples = len(mine.clients[0].train)
    seconds = round(federation.client_seconds.pop(client, 0.0), 4)

    def keep_state() -> Path | None:
        if state_dir is None or not needs_state:
            return None
        return _save_client_state(federation, Path(state_dir), client, round_, _Trained(run_id, digest), keep_optimizer)

    return SiteUpdate(client, round_, examples, trained.mean_loss, trained.steps, seconds, skipped, fed.compression,
                      payload, keep_state)


@dataclass
class _Trained:
    """What the state kept at a site names: the run, and the package (or message) it trained on."""

    run_id: str
    digest: str


def _save_client_state(federation, folder: Path, client: str, round_: int, package: Package, keep_optimizer: bool) -> Path:
    """Personal tensors, Adam's moments and the codec's residual after this round: they never leave the site."""
    tensors: State = {f"personal/{k}": v for k, v in federation.personal.get(client, {}).items()}
    tensors.update({f"codec/{k}": v for k, v in federation.codec.state_tensors().items() if k.startswith(f"{client}/")})
    groups = None
    if keep_optimizer and client in federation.optimizer_states:
        saved = federation.optimizer_states[client]
        for index, slots in saved["state"].items():
            tensors.update({f"optimizer/{index}/{slot}": v for slot, v in slots.items()})
        groups = saved["param_groups"]
    folder.mkdir(parents=True, exist_ok=True)
    name = _state_name(client, round_)
    tmp = folder / f".{name}.tmp{os.getpid()}"
    save_tensors(tmp, tensors)
    os.replace(tmp, folder / f"{name}.safetensors")
    info = {"format": FORMAT, "client": client, "round": round_, "run_id": package.run_id,
            "package": package.digest, "optimizer_param_groups": groups}
    tmp.write_text(json.dumps(info, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, folder / f"{name}.json")
    return folder / f"{name}.safetensors"


def _load_client_state(federation, folder: Path, client: str, round_: int, run_id: str) -> None:
    name = _state_name(client, round_)
    tensors_path, info_path = folder / f"{name}.safetensors", folder / f"{name}.json"
    if not tensors_path.is_file() or not info_path.is_file():
        raise FileRoundError(f"--state {folder}: no state of {client} after round {round_} ({name}.safetensors/.json), "
                             f"which this round starts from; it is written when the site trains round {round_}")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        tensors = load_tensors(tensors_path)
    except (OSError, ValueError) as error:
        raise FileRoundError(f"--state {folder}: {name} cannot be read: {error}") from None
    if info.get("run_id") != run_id or info.get("client") != client:
        raise FileRoundError(f"--state {folder}: {name} belongs to another run or client")

    def part(prefix: str) -> State:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    if federation.personal_keys:
        federation.personal[client] = {k: v.to(federation.device) for k, v in part("personal/").items()}
    codec_state = part("codec/")
    if codec_state:
        federation.codec.load_state_tensors(codec_state)
    if info.get("optimizer_param_groups") is not None:
        slots: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in part("optimizer/").items():
            index, slot = key.split("/", 1)
            slots.setdefault(int(index), {})[slot] = value
        federation.optimizer_states[client] = {"state": slots, "param_groups": info["optimizer_param_groups"]}


# --- the server's round ---------------------------------------------------------------------------------


@dataclass
class Received:
    client: str
    examples: int
    mean_loss: float
    steps: int
    seconds: float
    bytes_up: int
    skipped: bool
    state: State | None  # the client's shared tensors as the server rebuilds them; None when skipped


@dataclass
class AggregateResult:
    package: Package
    received: list[Received]
    refused: list[Refused] = field(default_factory=list)
    evaluated: bool = False
    round_finished: ev.RoundFinished | None = None


def check_update(path: Path, package: Package, client_keys: dict[str, PublicKey], codec, shared_global: State,
                 seen: set[str]) -> Received:
    """One update, verified (signature from the named client's key, hashes, run, round, package, cohort) and
    decoded; ``Refused`` with one line that says which update and why."""
    label = f"update {path}"
    verified = signing.verify_folder(path, UPDATE, client_keys, label=label)
    m = verified.manifest
    client = m.get("client")
    if client != verified.signer.name:
        raise Refused("wrong-signer", f"{label}: says it is from {client!r} but is signed with "
                                      f"{verified.signer.name}'s key")
    if m.get("format") != FORMAT:
        raise Refused("malformed", f"{label}: format {m.get('format')!r}, this fedtui reads {FORMAT}")
    if m.get("run_id") != package.run_id:
        raise Refused("other-run", f"{label}: from another run ({str(m.get('run_id'))[:8]}..., this run is "
                                   f"{package.run_id[:8]}...)")
    round_ = m.get("round")
    if not isinstance(round_, int) or isinstance(round_, bool):
        raise Refused("malformed", f"{label}: no round number")
    if round_ != package.round:
        stale = round_ < package.round
        raise Refused("stale" if stale else "wrong-round",
                      f"{label}: {client}'s update for round {round_}, but this is round {package.round} "
                      f"({'stale' if stale else 'from the future'})")
    if m.get("package") != package.digest:
        raise Refused("other-package", f"{label}: trained on another round-{round_} package than {package.path}")
    if client not in package.cohort:
        raise Refused("not-in-cohort", f"{label}: {client} is not in round {round_}'s cohort "
                                       f"({', '.join(package.cohort)})")
    if client in seen:
        raise Refused("duplicate", f"{label}: a second update from {client} this round")
    unknown = sorted(set(m) - set(UPDATE_FIELDS) - {"kind", "files", "signer"})
    if unknown:
        raise Refused("malformed", f"{label}: unexpected manifest fields {unknown}")
    examples, steps, skipped = m.get("examples"), m.get("steps"), m.get("skipped")
    if not isinstance(examples, int) or isinstance(examples, bool) or not 1 <= examples <= MAX_EXAMPLES:
        raise Refused("malformed", f"{label}: examples must be a whole number from 1 to {MAX_EXAMPLES}")
    if not isinstance(steps, int) or not isinstance(skipped, bool):
        raise Refused("malformed", f"{label}: steps or skipped missing")
    loss = m.get("mean_loss")
    loss = float("nan") if loss is None else loss
    if not isinstance(loss, (int, float)):
        raise Refused("malformed", f"{label}: mean_loss is not a number")
    files = set(m["files"])
    state = None
    if not skipped:
        if files != {PAYLOAD_FILE}:
            raise Refused("malformed", f"{label}: holds {sorted(files)}, an update holds only {PAYLOAD_FILE}")
        payload_path = Path(path) / PAYLOAD_FILE
        if payload_path.stat().st_size > payload_limit(shared_global):
            raise Refused("malformed", f"{label}: {PAYLOAD_FILE} is larger than any {m.get('compression')} "
                                       f"update of this adapter could be")
        state = decode_update(payload_path.read_bytes(), codec, shared_global, label)
    elif files:
        raise Refused("malformed", f"{label}: a skipped update carries no tensors")
    return Received(client, examples, float(loss), steps, float(m.get("seconds") or 0.0), int(m.get("bytes_up") or 0),
                    skipped, state)


def payload_limit(shared_global: State) -> int:
    """More bytes than any codec's update of this adapter could take: such a payload is refused unread."""
    return 2 * len(st_save({k: v.contiguous().cpu() for k, v in shared_global.items()})) + (64 << 10)


def decode_update(payload: bytes, codec, shared_global: State, label: str, what: str = PAYLOAD_FILE) -> State:
    """The client's shared tensors as the server rebuilds them from the codec's bytes (``shared_global`` plus
    the decoded delta), or ``Refused("malformed")`` naming ``label``: bytes the codec cannot read, tensors that
    are not this adapter's shared ones, inf or nan. Used for updates carried by files and by Flower."""
    try:
        decoded = codec.decode(payload, shared_global)
    except Exception as error:  # any failure to decode is the sender's malformed payload
        raise Refused("malformed", f"{label}: {what} is not a {codec.name} update of this adapter "
                                   f"({type(error).__name__}: {error})") from None
    if set(decoded) != set(shared_global) or any(decoded[k].shape != shared_global[k].shape for k in decoded):
        raise Refused("malformed", f"{label}: its tensors are not this adapter's shared tensors")
    if not all(bool(torch.isfinite(v).all()) for v in decoded.values()):
        raise Refused("malformed", f"{label}: the update has inf or nan entries")
    return {k: shared_global[k] + decoded[k] for k in shared_global}


def aggregate_round(package_path: Path, update_paths: list[Path], key: PrivateKey, client_keys: dict[str, PublicKey],
                    out: Path, evaluate: bool | None = None, log: Log = _quiet) -> AggregateResult:
    """Verify every update, aggregate the good ones with the preset's rule (if ``federation.min_clients``
    of the cohort came back good), evaluate where the server has the data, and write the next package."""
    from engine.compression import build_codec, serialized_nbytes
    from engine.federation import RoundOutcome, finite
    from engine.resolve import resolve
    from engine.schema import PresetError
    from engine.strategies import ClientUpdate, build_strategy

    started = time.perf_counter()
    check_out(out)
    server_key = PublicKey("server", key.public_raw)
    package = open_package(Path(package_path), server_key)
    if package.final:
        raise FileRoundError(f"package {package_path} is the final model; there is no round left to aggregate")
    round_ = package.round
    evaluates = bool(package.manifest.get("server_evaluates")) if evaluate is None else evaluate
    try:
        preset = package.preset()
        if evaluates:
            preset = resolve(preset)
    except PresetError as error:
        raise FileRoundError(str(error)) from None
    fed = preset.federation
    strategy = build_strategy(fed.aggregation, fed.aggregation_options)
    check_supported(preset, strategy)
    strategy.load_state_tensors({k[len("strategy/"):]: v for k, v in load_tensors(package.path / SERVER_FILE).items()
                                 if k.startswith("strategy/")})
    global_state = package.global_state()
    shared_keys, personal_keys = list(package.manifest["shared_keys"]), list(package.manifest["personal_keys"])
    shared_global = {k: global_state[k] for k in shared_keys}
    codec = build_codec(fed.compression, fed.compression_options)

    received: list[Received] = []
    refused: list[Refused] = []
    seen: set[str] = set()
    for path in update_paths:
        try:
            got = check_update(Path(path), package, client_keys, codec, shared_global, seen)
        except Refused as refusal:
            refused.append(refusal)  # the caller says so, once (AggregateResult.refused)
            continue
        seen.add(got.client)
        received.append(got)
    needed = min(fed.min_clients, len(package.cohort))
    if len(received) < needed:
        raise AggregationRefused(
            f"round {round_}: {len(received)} good update(s) of {len(package.cohort)} in the cohort, "
            f"federation.min_clients = {fed.min_clients}; nothing written", refused)
    order = {name: i for i, name in enumerate(package.cohort)}
    received.sort(key=lambda r: order[r.client])  # the in-process run aggregates in cohort order
    accepted = [ClientUpdate(r.client, r.state, r.examples, r.mean_loss) for r in received if not r.skipped]
    if accepted and shared_keys:
        new_shared = strategy.aggregate(shared_global, accepted)
        if not finite(new_shared):
            raise RoundFailed(f"the aggregated adapter ({fed.aggregation}) of round {round_} is not finite; nothing written")
        global_state.update({k: v.to(global_state[k].dtype) for k, v in new_shared.items()})

    down = serialized_nbytes(shared_global) if shared_global else 0
    events: list[ev.Event] = [ev.RoundStarted(round=round_, clients=package.cohort, time=time.time())]
    events += [ev.Log(level="warning", text=str(r), time=time.time()) for r in refused]
    events += [ev.ClientFinished(round=round_, client=r.client, mean_loss=r.mean_loss, examples=r.examples,
                                 steps=r.steps, seconds=r.seconds, bytes_up=r.bytes_up, bytes_down=down,
                                 skipped=r.skipped) for r in received]
    losses = [r.mean_loss for r in received if r.mean_loss == r.mean_loss]
    rounds = int(package.manifest["rounds"])
    best_val, best_round = package.manifest.get("best_val"), package.manifest.get("best_round")
    best_path = package.path / BEST_FILE
    best_state = load_tensors(best_path) if BEST_FILE in package.manifest["files"] else None
    finished = None
    if evaluates and (round_ % preset.eval.every == 0 or round_ == rounds):
        side = build_side(preset, True, log)
        if side.roster != package.roster:
            raise FileRoundError(f"the server's data gives clients {side.roster}, the package {package.roster}")
        picked: dict[str, State] = {}
        federation = make_federation(side, side.data, emit=events.append,
                                     save=lambda name, state: picked.__setitem__(name, state))
        federation.global_state = {k: v.to(side.device) for k, v in global_state.items()}
        federation.selection.best_val = best_val
        outcome = RoundOutcome(round_, float(np.mean(losses)) if losses else None,
                               sum(r.bytes_up for r in received), down * len(received), time.perf_counter() - started)
        if personal_keys:
            finished = _evaluate_global_only(federation, round_, outcome)
            events.append(finished)
        else:
            federation.evaluate(round_, outcome)
            finished = next(e for e in reversed(events) if isinstance(e, ev.RoundFinished))
        if "best" in picked:
            best_val, best_round = federation.selection.best_val, round_
            best_state = {k: v.detach().cpu().clone() for k, v in picked["best"].items()}
    write_package(
        out, key, preset, round_ + 1, rounds, package.roster, global_state, shared_keys, personal_keys,
        {f"strategy/{k}": v for k, v in strategy.state_tensors().items()}, events, package,
        package.manifest.get("weights", ""), package.manifest["weights_fingerprint"],
        bool(package.manifest.get("server_evaluates")), best_val, best_round, best_state,
        extra={"received": [r.client for r in received],
               "refused": [{"reason": r.reason, "message": str(r)} for r in refused]},
    )
    return AggregateResult(open_package(Path(out), server_key), received, refused, finished is not None, finished)


def _evaluate_global_only(federation, round_: int, outcome) -> ev.RoundFinished:
    """With personal layers the server has only the shared part: each client's accuracy with the global
    adapter (the in-process run's ``global_test``) and the held-out domains (which use the global adapter)."""
    from engine.evaluation import nanmean

    state = federation.global_state
    clients, holdout = federation.evaluator.measure(lambda name: state, restore=state)
    for accuracy in clients.values():
        accuracy["global_test"] = accuracy["test"]
    mean_val = nanmean(a["val"] for a in clients.values())
    mean_test = nanmean(a["test"] for a in clients.values())
    selected = federation.selection.consider(mean_val)
    if selected:
        federation.save("best", state)
    return ev.RoundFinished(
        round=round_, client_accuracy=clients, holdout_accuracy=holdout,
        mean_val=mean_val if mean_val is not None else float("nan"),
        mean_test=mean_test if mean_test is not None else float("nan"), mean_holdout=nanmean(holdout.values()),
        mean_loss=outcome.mean_loss, bytes_up=outcome.bytes_up, bytes_down=outcome.bytes_down,
        seconds=round(outcome.train_seconds, 4), selected=selected,
    )
