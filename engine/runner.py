"""Run a preset: federated adapter rounds on cached features, streamed as events, stored as a run directory.

``run()`` blocks; call it from a worker thread to keep a UI alive. It never raises for a failing run
(it emits ``RunFailed``, writes the summary and returns status "failed"); ``RunControl`` stops or pauses
it between batches.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from engine import events as ev
from engine.adapters import AdapterContext, build_adapter
from engine.adapters.base import ZeroShotHead
from engine.backbone import resolve_device
from engine.compression import build_codec, serialized_nbytes
from engine.control import RunControl, RunStopped
from engine.evaluation import accuracy, nanmean, strictly_improved
from engine.prepare import PreparedRun, prepare
from engine.presets import Preset, to_toml
from engine.runstore import RunStore, new_run_dir
from engine.strategies import ClientUpdate, build_strategy
from engine.training import NonFiniteLoss, make_optimizer, train_locally

State = dict[str, torch.Tensor]


class RunDiverged(Exception):
    """A loss or the adapter became non-finite: the run ends as "diverged" with its last finite checkpoint."""


@dataclass
class RunResult:
    status: str  # "completed" | "stopped" | "diverged" | "failed"
    run_dir: Path
    summary: dict[str, Any]


def run(
    preset: Preset,
    sink: Callable[[ev.Event], None] | None = None,
    control: RunControl | None = None,
    run_dir: Path | None = None,
) -> RunResult:
    control = control or RunControl()
    run_dir = Path(run_dir) if run_dir is not None else new_run_dir(preset.run.out_dir, preset.run.name)
    store = RunStore(run_dir)
    session = _Session(preset, store, sink or (lambda event: None), control)
    try:
        return session.execute()
    finally:
        store.close()


def default_threads() -> int:
    """All cores but one. Measured on a busy 2-core machine: intra-op threads contending for both cores
    made the tiny CLIP's encoder 10x slower (10.4 vs 1.0 ms an image) and would starve the console's
    UI thread; one core left free costs little on an idle machine and nothing on a large one."""
    return max(1, (os.cpu_count() or 2) - 1)


def seeded_generator(*keys: int) -> torch.Generator:
    """An independent random stream per purpose and client, so one client's draws never shift another's."""
    seed = int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(seed)


def sample_cohort(client_names: list[str], fraction: float, min_clients: int, seed: int, round_: int) -> list[str]:
    """Flower's rule: max(int(C * K), min_clients) clients, drawn afresh each round from a seeded stream."""
    count = min(len(client_names), max(int(fraction * len(client_names)), min_clients, 1))
    if count == len(client_names):
        return list(client_names)
    rng = np.random.default_rng([seed, round_, 0xC0])
    chosen = sorted(rng.choice(len(client_names), size=count, replace=False))
    return [client_names[i] for i in chosen]


def _split_keys(state: State, prefixes: list[str]) -> tuple[list[str], list[str]]:
    personal = [k for k in state if any(k.startswith(p) for p in prefixes)]
    return [k for k in state if k not in personal], personal


def _same_tensors(state: State, other: State | None) -> bool:
    """The very same tensor objects: loading ``state`` over ``other`` would change nothing."""
    return other is not None and state.keys() == other.keys() and all(state[k] is other[k] for k in state)


def _finite(state: State) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values())


def _norm(state: State) -> float:
    return float(torch.sqrt(sum((v.double() ** 2).sum() for v in state.values()))) if state else 0.0


class _Session:
    def __init__(self, preset: Preset, store: RunStore, sink, control: RunControl):
        self.preset = preset
        self.store = store
        self.sink = sink
        self.control = control
        self.started = time.time()
        self.rounds: list[dict[str, Any]] = []
        self.zero_shot: dict[str, Any] | None = None
        self.selected: dict[str, Any] | None = None
        self.best_val: float | None = None
        self.manifest: dict[str, Any] = {}
        self.features_info: dict[str, Any] = {}
        self.communication: dict[str, Any] = {"bytes_up": 0, "bytes_down": 0, "skipped_updates": 0}
        self.wise: list[dict[str, Any]] = []
        self.planned_rounds = preset.run.rounds

    # --- events and files ----------------------------------------------------------------------

    def emit(self, event: ev.Event) -> None:
        try:
            self.store.append_event(event)
        finally:  # the UI hears of the event (and of a disk that filled up) even when the file cannot
            self.sink(event)

    def log(self, level: str, text: str) -> None:
        self.emit(ev.Log(level=level, text=text, time=time.time()))

    def summary(self, status: str, error: str | None = None) -> dict[str, Any]:
        summary = {
            "status": status,
            "run_id": self.store.dir.name,
            "preset_name": self.preset.run.name,
            "rounds_planned": self.planned_rounds,
            "rounds_completed": self.rounds[-1]["round"] if self.rounds else 0,
            "seconds": round(time.time() - self.started, 3),
            "selection": self.preset.eval.selection,
            "zero_shot": self.zero_shot,
            "selected": self.selected,
            "final": self.rounds[-1] if self.rounds else None,
            "generalisation_accuracy": (self.selected or {}).get("mean_holdout"),
            "personalisation_accuracy": (self.selected or {}).get("mean_test"),
            "per_round": [
                {k: r[k] for k in ("round", "mean_val", "mean_test", "mean_holdout", "mean_loss", "bytes_up", "bytes_down", "seconds")}
                for r in self.rounds
            ],
            "features": self.features_info,
            "communication": self.communication,
            "wise_ft": self.wise,
            "weights": self.manifest.get("weights"),
        }
        if error is not None:
            summary["error"] = error
        return summary

    def write_manifest(self, **extra: Any) -> None:
        import numpy
        import open_clip

        self.manifest.update(
            {
                "run_id": self.store.dir.name,
                "preset": self.preset.source,
                "seed": self.preset.run.seed,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
                "versions": {
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                    "open_clip": open_clip.__version__,
                    "numpy": numpy.__version__,
                    "fedtui": _fedtui_version(),
                },
                "host": platform.node(),
                "pid": os.getpid(),  # with the host and heartbeat.json: a run without a summary is running or killed
                **extra,
            }
        )
        self.store.write_json("manifest.json", self.manifest)

    # --- lifecycle -------------------------------------------------------------------------------

    def execute(self) -> RunResult:
        preset = self.preset
        self.store.write_text("preset.toml", to_toml(preset))
        try:
            self.write_manifest(device_requested=preset.run.device)
            self._run()
            status = "completed"
        except RunStopped:
            status = "stopped"
            self.log("warning", "stopped on request; the run directory holds everything up to the last round")
        except RunDiverged as diverged:
            return self._end_diverged(str(diverged))
        except OSError as error:  # the disk filled up or the run directory became unwritable
            return self._fail(f"cannot write {error.filename or self.store.dir}: {error.strerror or error}")
        except Exception as error:  # a failing run is reported, never raised into the UI thread
            return self._fail(f"{type(error).__name__}: {error}", traceback.format_exc())
        except BaseException:
            # Ctrl-C without a graceful stop: leave a summary that says so, then let it propagate.
            self.store.write_json("summary.json", self.summary("interrupted"))
            raise
        summary = self.summary(status)
        self.store.write_json("summary.json", summary)
        self.emit(ev.RunFinished(status=status, summary=summary, run_dir=str(self.store.dir), seconds=summary["seconds"]))
        return RunResult(status, self.store.dir, summary)

    def _fail(self, message: str, trace: str = "") -> RunResult:
        summary = self.summary("failed", error=message)
        # Best effort: on a full disk these writes fail too, and the event still reaches the sink.
        with contextlib.suppress(OSError):
            self.store.write_json("summary.json", summary)
            if trace:
                self.store.write_text("error.txt", trace)
        self.emit(ev.RunFailed(error=message, traceback=trace, run_dir=str(self.store.dir)))
        return RunResult("failed", self.store.dir, summary)

    def _end_diverged(self, message: str) -> RunResult:
        self.log("error", f"diverged: {message}; checkpoints/last.safetensors is the last finite adapter")
        summary = self.summary("diverged", error=message)
        self.store.write_json("summary.json", summary)
        self.emit(ev.RunFinished(status="diverged", summary=summary, run_dir=str(self.store.dir), seconds=summary["seconds"]))
        return RunResult("diverged", self.store.dir, summary)

    def _run(self) -> None:
        preset, fed = self.preset, self.preset.federation
        torch.set_num_threads(preset.run.threads or default_threads())
        device = resolve_device(preset.run.device)
        strategy = build_strategy(fed.aggregation, fed.aggregation_options)
        rounds, epochs = strategy.schedule(preset.run.rounds, preset.train.local_epochs)
        self.planned_rounds = rounds

        from engine.adapters.base import ADAPTERS

        needs_images = getattr(ADAPTERS.get(preset.adapter.kind), "needs_images", False)
        data = prepare(
            preset, device, self.log, self.control.checkpoint, needs_images,
            progress=lambda done, total: self.emit(ev.FeaturesProgress(done=done, total=total)),
        )
        self.features_info = {"encoded": data.encoded, "cached": data.cached, "seconds": round(data.encode_seconds, 3)}

        torch.manual_seed(preset.run.seed)  # the adapter's init, identical for every client
        context = AdapterContext(
            feature_dim=data.features.shape[1],
            class_names=data.classes,
            prompts=data.prompts,
            class_text_features=data.text_features,
            logit_scale=data.backbone.logit_scale,
            clip_model=data.backbone.model,
            tokenizer=data.backbone.tokenizer,
        )
        adapter = build_adapter(preset.adapter.kind, context, preset.adapter.kind_options).to(device)
        self.write_manifest(
            device=str(device),
            weights=data.backbone.weights,
            weights_fingerprint=data.backbone.fingerprint,
            data_fingerprint=data.data_fingerprint,
            arch=preset.model.arch,
            adapter=preset.adapter.kind,
            trainable_parameters=adapter.trainable_parameters(),
        )
        federation = _Federation(self, data, adapter, strategy, epochs, device)
        self.emit(
            ev.RunStarted(
                run_id=self.store.dir.name,
                run_dir=str(self.store.dir),
                preset_name=preset.run.name,
                rounds=rounds,
                clients=[
                    {"client": c.name, "domain": c.domain, "examples": len(c.train), "val": len(c.val),
                     "test": len(c.test), "class_histogram": c.class_histogram}
                    for c in data.clients
                ],
                holdout=list(preset.data.holdout),
                classes=data.classes,
                device=str(device),
                adapter=preset.adapter.kind,
                aggregation=fed.aggregation,
                trainable_parameters=adapter.trainable_parameters(),
                weights=data.backbone.weights,
                time=time.time(),
            )
        )
        self.emit(
            ev.FeaturesReady(
                encoded=data.encoded, cached=data.cached, seconds=data.encode_seconds, feature_dim=data.features.shape[1]
            )
        )
        federation.run(rounds)


class _Federation:
    """The rounds themselves: sample, train locally, compress, aggregate, evaluate."""

    def __init__(self, session: _Session, data: PreparedRun, adapter, strategy, epochs: int, device: torch.device):
        self.s = session
        self.preset = session.preset
        self.data = data
        self.adapter = adapter
        self.strategy = strategy
        self.epochs = epochs
        self.device = device
        fed = self.preset.federation
        self.codec = build_codec(fed.compression, fed.compression_options)
        self.scale = data.backbone.logit_scale
        self.theta_0 = adapter.trainable_state()
        shared, personal = _split_keys(self.theta_0, fed.personal_layers)
        if fed.personal_layers and not personal:
            raise ValueError(
                f"federation.personal_layers {fed.personal_layers} matches no adapter tensor; "
                f"names: {', '.join(self.theta_0)}"
            )
        if getattr(strategy, "personalises_everything", False):
            shared, personal = [], list(self.theta_0)
        self.shared_keys, self.personal_keys = shared, personal
        self.global_state: State = {k: v.clone() for k, v in self.theta_0.items()}
        self.personal: dict[str, State] = {c.name: {k: self.theta_0[k].clone() for k in personal} for c in data.clients}
        self.optimizer_states: dict[str, Any] = {}
        self.client_seconds: dict[str, float] = {}  # training time of this round, until its upload
        self.zero_shot_head = ZeroShotHead(data.text_features).to(device)
        names = [c.name for c in data.clients]
        self.generators = {name: seeded_generator(self.preset.run.seed, 1, i) for i, name in enumerate(names)}
        self.clients = {c.name: c for c in data.clients}
        if getattr(strategy, "pools_data", False):
            pooled = np.concatenate([c.train for c in data.clients])
            self.training_rows = {"pooled": pooled}
            self.generators["pooled"] = seeded_generator(self.preset.run.seed, 2)
        else:
            self.training_rows = {c.name: c.train for c in data.clients}
        shared_state = {k: self.global_state[k] for k in self.shared_keys}
        self.s.communication.update(
            {
                "adapter_bytes": serialized_nbytes(shared_state) if shared_state else 0,
                "full_clip_bytes": sum(t.numel() * t.element_size() for t in data.backbone.model.state_dict().values()),
                "compression": fed.compression,
            }
        )

    # --- inputs -----------------------------------------------------------------------------------

    def inputs(self, rows: np.ndarray) -> torch.Tensor:
        if self.data.pixels is not None:
            return self.data.pixels[rows].to(self.device)
        return self.data.features[rows]

    def zero_shot_inputs(self, rows: np.ndarray) -> torch.Tensor:
        return self.data.features[rows]

    def client_state(self, name: str) -> State:
        state = dict(self.global_state)
        state.update(self.personal.get(name, {}))
        return state

    # --- rounds -----------------------------------------------------------------------------------

    def run(self, rounds: int) -> None:
        self.evaluate(0, zero_shot=True)
        fed = self.preset.federation
        trainers = list(self.training_rows)
        every = self.preset.eval.every
        for round_ in range(1, rounds + 1):
            self.s.control.checkpoint()
            started = time.perf_counter()
            cohort = sample_cohort(trainers, fed.fraction, fed.min_clients, self.preset.run.seed, round_)
            self.s.emit(ev.RoundStarted(round=round_, clients=cohort, time=time.time()))
            trained = {name: self.train_client(round_, name, self.epochs) for name in cohort}
            updates = [ClientUpdate(n, state, len(self.training_rows[n]), loss) for n, (state, loss, _) in trained.items()]
            for name, extra in self.strategy.extra_epochs(updates).items():
                if extra > 0:
                    state, loss, steps = self.train_client(round_, name, extra, start=trained[name][0])
                    trained[name] = (state, loss, trained[name][2] + steps)
            accepted, bytes_up, bytes_down = self.upload(round_, trained)
            if accepted and self.shared_keys:
                shared_global = {k: self.global_state[k] for k in self.shared_keys}
                new_shared = self.strategy.aggregate(shared_global, accepted)
                if not _finite(new_shared):
                    self.diverged(f"the aggregated adapter ({fed.aggregation}) of round {round_} is not finite")
                self.global_state.update({k: v.to(self.global_state[k].dtype) for k, v in new_shared.items()})
            losses = [loss for _, loss, _ in trained.values() if loss == loss]
            round_info = {
                "mean_loss": float(np.mean(losses)) if losses else None,
                "bytes_up": bytes_up,
                "bytes_down": bytes_down,
                "train_seconds": time.perf_counter() - started,
            }
            if round_ % every == 0 or round_ == rounds:
                self.evaluate(round_, **round_info)
            self.s.store.write_json("heartbeat.json", {"time": time.time(), "round": round_})
        self.finish()

    def train_client(self, round_: int, name: str, epochs: int, start: State | None = None) -> tuple[State, float, int]:
        """Train ``name`` from the global state (plus its personal part), return (state, mean loss, steps)."""
        self.adapter.load_trainable_state(start if start is not None else self.client_state(name))
        optimizer = make_optimizer(self.adapter, self.preset.train)
        keep_optimizer = not self.preset.train.reset_optimizer_each_round
        if keep_optimizer and name in self.optimizer_states:
            optimizer.load_state_dict(self.optimizer_states[name])
        trainable = {n: p for n, p in self.adapter.named_parameters() if p.requires_grad}
        global_shared = {k: self.global_state[k] for k in self.shared_keys}

        def penalty():
            return self.strategy.local_penalty({k: trainable[k] for k in self.shared_keys}, global_shared)

        def on_step(step: int, steps: int, loss: float) -> None:
            if step == steps or step % 5 == 0:
                self.s.emit(ev.ClientProgress(round=round_, client=name, step=step, steps=steps, loss=loss))

        try:
            result = train_locally(
                self.adapter, optimizer, self.inputs, self.data.labels, self.training_rows[name], self.preset.train,
                epochs, self.scale, self.generators[name], penalty, self.s.control.checkpoint, on_step,
            )
        except NonFiniteLoss as error:
            self.diverged(f"client {name}, round {round_}: {error}")
        state = self.adapter.trainable_state()
        if not _finite(state):
            self.diverged(f"client {name}, round {round_}: its adapter is not finite after local training")
        if keep_optimizer:
            self.optimizer_states[name] = optimizer.state_dict()
        self.client_seconds[name] = self.client_seconds.get(name, 0.0) + result.seconds
        return state, result.mean_loss, result.steps

    def diverged(self, message: str):
        """Keep the last finite global adapter as checkpoints/last, then end the run as diverged."""
        self.save("last")
        raise RunDiverged(message)

    def upload(self, round_: int, trained: dict[str, tuple[State, float, int]]):
        """Each client sends its shared update, compressed; the server rebuilds it from the real bytes."""
        fed = self.preset.federation
        accepted: list[ClientUpdate] = []
        bytes_up_total = bytes_down_total = 0
        shared_global = {k: self.global_state[k] for k in self.shared_keys}
        down = serialized_nbytes(shared_global) if shared_global else 0
        seconds = self.client_seconds
        for name, (state, loss, steps) in trained.items():
            if name in self.personal:
                self.personal[name] = {k: state[k].clone() for k in self.personal_keys}
            delta = {k: state[k] - shared_global[k] for k in self.shared_keys}
            sent = 0
            if delta:
                relative = _norm(delta) / max(_norm(shared_global), 1e-12)
                if fed.skip_threshold and relative < fed.skip_threshold:
                    self.s.communication["skipped_updates"] += 1
                else:
                    decoded, sent = self.codec.roundtrip(name, delta)
                    rebuilt = {k: shared_global[k] + decoded[k] for k in self.shared_keys}
                    accepted.append(ClientUpdate(name, rebuilt, len(self.training_rows[name]), loss))
            bytes_up_total += sent
            bytes_down_total += down
            self.s.emit(
                ev.ClientFinished(
                    round=round_, client=name, mean_loss=loss, examples=len(self.training_rows[name]), steps=steps,
                    seconds=round(seconds.pop(name, 0.0), 4), bytes_up=sent, bytes_down=down,
                )
            )
        self.s.communication["bytes_up"] += bytes_up_total
        self.s.communication["bytes_down"] += bytes_down_total
        return accepted, bytes_up_total, bytes_down_total

    # --- evaluation ---------------------------------------------------------------------------------

    def measure(self, state_for: Callable[[str], State], zero_shot: bool) -> tuple[dict, dict]:
        labels = self.data.labels
        if zero_shot:
            model, inputs = self.zero_shot_head, self.zero_shot_inputs
        else:
            model, inputs = self.adapter, self.inputs
        clients: dict[str, dict[str, float]] = {}
        loaded: State | None = None
        for name, split in self.clients.items():
            state = None if zero_shot else state_for(name)
            # Without personal layers every client sees the same state: load (and, for LoRA, merge) it once.
            if state is not None and not _same_tensors(state, loaded):
                self.adapter.load_trainable_state(state)
                loaded = state
            check = self.s.control.checkpoint
            clients[name] = {
                part: accuracy(model, inputs, labels, getattr(split, part), self.scale, checkpoint=check)
                for part in ("train", "val", "test")
            }
        if not zero_shot and not _same_tensors(self.global_state, loaded):
            self.adapter.load_trainable_state(self.global_state)
        holdout = {
            d: accuracy(model, inputs, labels, rows, self.scale, checkpoint=self.s.control.checkpoint)
            for d, rows in self.data.holdout.items()
        }
        return clients, holdout

    def evaluate(self, round_: int, zero_shot: bool = False, mean_loss=None, bytes_up=0, bytes_down=0, train_seconds=0.0):
        started = time.perf_counter()
        clients, holdout = self.measure(self.client_state, zero_shot)
        if self.personal_keys and not zero_shot:
            global_clients, _ = self.measure(lambda name: self.global_state, zero_shot=False)
            for name, acc in clients.items():
                acc["global_test"] = global_clients[name]["test"]
        mean_val = nanmean(a["val"] for a in clients.values())
        mean_test = nanmean(a["test"] for a in clients.values())
        mean_holdout = nanmean(holdout.values())
        selected = False
        if not zero_shot:
            rule = self.preset.eval.selection
            selected = rule == "last" or strictly_improved(mean_val if mean_val is not None else -1.0, self.s.best_val)
            if selected and rule == "best-val":
                self.s.best_val = mean_val if mean_val is not None else -1.0
        record = {
            "round": round_,
            "clients": clients,
            "holdout": holdout,
            "mean_val": mean_val,
            "mean_test": mean_test,
            "mean_holdout": mean_holdout,
            "mean_loss": mean_loss,
            "bytes_up": bytes_up,
            "bytes_down": bytes_down,
            "seconds": round(train_seconds + time.perf_counter() - started, 4),
        }
        if zero_shot:
            self.s.zero_shot = record
        else:
            self.s.rounds.append(record)
            if selected:
                self.s.selected = record
                self.save("best")
        self.s.emit(
            ev.RoundFinished(
                round=round_, client_accuracy=clients, holdout_accuracy=holdout, mean_val=mean_val if mean_val is not None else float("nan"),
                mean_test=mean_test if mean_test is not None else float("nan"), mean_holdout=mean_holdout, mean_loss=mean_loss,
                bytes_up=bytes_up, bytes_down=bytes_down, seconds=record["seconds"], selected=selected,
            )
        )

    def save(self, name: str, state: State | None = None) -> None:
        state = state if state is not None else self.global_state
        metadata = {"adapter": self.preset.adapter.kind, "run_id": self.s.store.dir.name, "preset": json.dumps(self.preset.to_dict())}
        self.s.store.save_checkpoint(name, state, metadata)

    def finish(self) -> None:
        self.save("last")
        alphas = list(self.preset.eval.wise_alphas)
        final_alpha = self.preset.eval.wise_alpha
        if not alphas and final_alpha == 1.0:
            return
        from engine.wise import interpolate

        theta_1 = dict(self.global_state)
        for alpha in sorted(set(alphas + [final_alpha])):
            self.global_state = interpolate(self.theta_0, theta_1, alpha)
            clients, holdout = self.measure(lambda name: self.global_state, zero_shot=False)
            entry = {
                "alpha": alpha,
                "mean_test": nanmean(a["test"] for a in clients.values()),
                "mean_holdout": nanmean(holdout.values()),
                "holdout": holdout,
                "clients": {n: a["test"] for n, a in clients.items()},
            }
            if alpha in alphas:
                self.s.wise.append(entry)
            if alpha == final_alpha and final_alpha != 1.0:
                self.save("wise", self.global_state)
                self.s.log("info", f"WiSE-FT final model at a = {alpha}: saved as checkpoints/wise.safetensors")
        self.global_state = theta_1
        for entry in self.s.wise:
            holdout = "n/a" if entry["mean_holdout"] is None else f"{entry['mean_holdout']:.3f}"
            self.s.log("info", f"WiSE-FT a={entry['alpha']:.2f}: mean test {entry['mean_test']:.3f}, held-out {holdout}")


def _fedtui_version() -> str:
    try:
        from importlib.metadata import version

        return version("fedtui")
    except Exception:  # running from a source tree that was never installed
        return "source"
