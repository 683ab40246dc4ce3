"""The federated rounds: sample a cohort, train locally, compress the updates, aggregate, evaluate.

``Federation`` owns everything a round changes (the global adapter, personal tensors, optimiser
moments, codec residuals, random streams, the selection rule's memory) and nothing else: it talks to
the run through an ``emit`` callable and a checkpoint saver, and ``state()`` / ``load_state()`` hand
its whole state to ``engine.run_state`` after each round, which is what resume builds on.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from engine import events as ev, training
from engine.adapters.base import ZeroShotHead
from engine.allocator import keep_freed_memory
from engine.batched import ClientNonFinite, Job, adam_param_groups, choose_batched, train_cohort
from engine.compression import NoCompression, build_codec, serialized_nbytes
from engine.control import RunControl
from engine.evaluation import Evaluator, Selection, nanmean
from engine.prepare import PreparedRun
from engine.presets import Preset
from engine.strategies import ClientUpdate
from engine.training import NonFiniteLoss, make_optimizer, train_locally

State = dict[str, torch.Tensor]


class RunDiverged(Exception):
    """A loss or the adapter became non-finite: the run ends as "diverged" with its last finite checkpoint."""


@dataclass
class TrainedClient:
    state: State
    mean_loss: float
    steps: int


@dataclass
class RoundOutcome:
    round: int
    mean_loss: float | None
    bytes_up: int
    bytes_down: int
    train_seconds: float


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


def split_keys(state: State, prefixes: list[str]) -> tuple[list[str], list[str]]:
    personal = [k for k in state if any(k.startswith(p) for p in prefixes)]
    return [k for k in state if k not in personal], personal


def finite(state: State) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values())


def norm(state: State) -> float:
    return float(torch.sqrt(sum((v.double() ** 2).sum() for v in state.values()))) if state else 0.0


def _consecutive(rows: np.ndarray) -> bool:
    """rows is a, a + 1, ..., b (checked from its ends first: a shuffled training batch fails at once)."""
    return len(rows) > 1 and int(rows[-1]) - int(rows[0]) == len(rows) - 1 and bool((np.diff(rows) == 1).all())


class Federation:
    def __init__(self, preset: Preset, data: PreparedRun, adapter, strategy, epochs: int, device: torch.device,
                 emit: Callable[[ev.Event], None], control: RunControl, save: Callable[[str, State], None]):
        keep_freed_memory()  # rounds allocate and free the same tensors again and again: engine/allocator.py
        self.preset, self.data, self.adapter, self.strategy = preset, data, adapter, strategy
        self.epochs, self.device = epochs, device
        self.emit, self.control, self.save = emit, control, save
        fed = preset.federation
        self.codec = build_codec(fed.compression, fed.compression_options)
        self.scale = data.backbone.logit_scale
        self.theta_0 = adapter.trainable_state()
        shared, personal = split_keys(self.theta_0, fed.personal_layers)
        if fed.personal_layers and not personal:
            raise ValueError(
                f"federation.personal_layers {fed.personal_layers} matches no adapter tensor; "
                f"names: {', '.join(self.theta_0)}"
            )
        if strategy.personalises_everything:
            shared, personal = [], list(self.theta_0)
        self.shared_keys, self.personal_keys = shared, personal
        self.global_state: State = {k: v.clone() for k, v in self.theta_0.items()}
        self.personal: dict[str, State] = {c.name: {k: self.theta_0[k].clone() for k in personal} for c in data.clients}
        self.optimizer_states: dict[str, Any] = {}
        self.client_seconds: dict[str, float] = {}  # training time of this round, until its upload
        self.local_training = os.environ.get("FEDTUI_LOCAL_TRAINING", "auto")  # see train_clients
        self._param_groups: list[dict[str, Any]] | None = None  # Adam's param_groups, for the batched path
        self.selection = Selection(preset.eval.selection)
        self.selected_state: State | None = None  # the selection rule's adapter, for WiSE-FT on it too
        names = [c.name for c in data.clients]
        self.generators = {name: seeded_generator(preset.run.seed, 1, i) for i, name in enumerate(names)}
        self.clients = {c.name: c for c in data.clients}
        self.client_index = {name: i for i, name in enumerate(names)}
        # Faulty clients (robustness studies): label flipping acts in training, the other modes on the update.
        self.faulty = set(preset.federation.faulty)
        self.flipped_labels = (len(data.classes) - 1) - data.labels
        if strategy.pools_data:
            self.training_rows = {"pooled": np.concatenate([c.train for c in data.clients])}
            self.generators["pooled"] = seeded_generator(preset.run.seed, 2)
        else:
            self.training_rows = {c.name: c.train for c in data.clients}
        self.evaluator = Evaluator(
            adapter, ZeroShotHead(data.text_features).to(device), self.clients, data.holdout,
            self.inputs, lambda rows: data.features[rows], data.labels, self.scale, control.checkpoint,
        )

    @property
    def adapter_bytes(self) -> int:
        shared = {k: self.global_state[k] for k in self.shared_keys}
        return serialized_nbytes(shared) if shared else 0

    def inputs(self, rows: np.ndarray) -> torch.Tensor:
        if self.data.pixels is None and _consecutive(rows):  # an evaluation batch of every split: a view, not a copy
            return self.data.features[int(rows[0]) : int(rows[-1]) + 1]
        # index_select with a tensor: indexing with a NumPy array goes through a slower generic path.
        index = torch.from_numpy(np.asarray(rows, dtype=np.int64))
        if self.data.pixels is not None:
            return self.data.pixels.index_select(0, index).to(self.device)
        return self.data.features.index_select(0, index.to(self.data.features.device))

    def client_state(self, name: str) -> State:
        state = dict(self.global_state)
        state.update(self.personal.get(name, {}))
        return state

    # --- rounds -----------------------------------------------------------------------------------

    def run(self, rounds: int, first_round: int = 1, after_round: Callable[[int], None] = lambda r: None) -> None:
        if first_round == 1:
            self.evaluate(0, zero_shot=True)
        every = self.preset.eval.every
        for round_ in range(first_round, rounds + 1):
            self.control.checkpoint()
            outcome = self.play_round(round_)
            if round_ % every == 0 or round_ == rounds:
                self.evaluate(round_, outcome)
            after_round(round_)
        self.finish()

    def play_round(self, round_: int) -> RoundOutcome:
        fed = self.preset.federation
        started = time.perf_counter()
        cohort = sample_cohort(list(self.training_rows), fed.fraction, fed.min_clients, self.preset.run.seed, round_)
        self.emit(ev.RoundStarted(round=round_, clients=cohort, time=time.time()))
        trained = self.train_clients(round_, {name: self.epochs for name in cohort})
        updates = [ClientUpdate(n, t.state, len(self.training_rows[n]), t.mean_loss) for n, t in trained.items()]
        extra = {name: e for name, e in self.strategy.extra_epochs(updates).items() if e > 0}
        if extra:
            more = self.train_clients(round_, extra, starts={name: trained[name].state for name in extra})
            for name, again in more.items():
                trained[name] = TrainedClient(again.state, again.mean_loss, trained[name].steps + again.steps)
        accepted, bytes_up, bytes_down = self.upload(round_, trained)
        if accepted and self.shared_keys:
            shared_global = {k: self.global_state[k] for k in self.shared_keys}
            new_shared = self.strategy.aggregate(shared_global, accepted)
            if not finite(new_shared):
                self.diverged(f"the aggregated adapter ({fed.aggregation}) of round {round_} is not finite")
            self.global_state.update({k: v.to(self.global_state[k].dtype) for k, v in new_shared.items()})
        losses = [t.mean_loss for t in trained.values() if t.mean_loss == t.mean_loss]
        return RoundOutcome(round_, float(np.mean(losses)) if losses else None, bytes_up, bytes_down,
                            time.perf_counter() - started)

    def train_clients(self, round_: int, epochs: dict[str, int],
                      starts: dict[str, State] | None = None) -> dict[str, TrainedClient]:
        """Train each named client ``epochs[name]`` epochs from ``starts[name]`` (default: its state this round).

        Kinds that can (``engine.batched``) train the whole cohort in one batched computation, with the same
        batches, random streams and Adam arithmetic as one client after another; the others, and a cohort of
        one, train one by one. ``self.local_training`` (env ``FEDTUI_LOCAL_TRAINING``: auto | batched |
        sequential) forces a path; auto is a fixed rule, so a resumed run takes the same path."""
        starts = starts or {}
        # A replaced ``train_locally`` (fault injection in a test, a profiler's wrapper) is meant to see every
        # client, so the cohort then trains one by one through it.
        instrumented = train_locally is not training.train_locally
        if instrumented or not choose_batched(self.adapter, len(epochs), self.local_training):
            return {name: self.train_client(round_, name, e, start=starts.get(name)) for name, e in epochs.items()}
        train = self.preset.train
        keep_optimizer = not train.reset_optimizer_each_round
        jobs = [
            Job(name, starts[name] if name in starts else self.client_state(name), self.training_rows[name], e,
                self.generators[name], self.optimizer_states.get(name) if keep_optimizer else None,
                None if name not in self.faulty else self.labels_for(name))
            for name, e in epochs.items()
        ]
        global_shared = {k: self.global_state[k] for k in self.shared_keys}

        def penalty(params: State):
            return self.strategy.local_penalty({k: params[k] for k in self.shared_keys}, global_shared)

        def on_step(name: str, step: int, steps: int, loss: float) -> None:
            if step == steps or step % 5 == 0:
                self.emit(ev.ClientProgress(round=round_, client=name, step=step, steps=steps, loss=loss))

        if self._param_groups is None:
            count = sum(1 for p in self.adapter.parameters() if p.requires_grad)
            self._param_groups = adam_param_groups(train, count)
        try:
            results = train_cohort(self.adapter, jobs, self.inputs, self.data.labels, train, self.scale,
                                   self._param_groups, penalty, keep_optimizer, self.control.checkpoint, on_step)
        except ClientNonFinite as error:
            self.diverged(f"client {error.client}, round {round_}: {error}")
        trained: dict[str, TrainedClient] = {}
        for job, result in zip(jobs, results):
            if not result.finite:
                self.diverged(f"client {job.name}, round {round_}: its adapter is not finite after local training")
            if keep_optimizer:
                self.optimizer_states[job.name] = result.optimizer_state
            self.client_seconds[job.name] = self.client_seconds.get(job.name, 0.0) + result.seconds
            trained[job.name] = TrainedClient(result.state, result.mean_loss, result.steps)
        return trained

    def train_client(self, round_: int, name: str, epochs: int, start: State | None = None) -> TrainedClient:
        """Train ``name`` from the global state (plus its personal part)."""
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
                self.emit(ev.ClientProgress(round=round_, client=name, step=step, steps=steps, loss=loss))

        try:
            result = train_locally(
                self.adapter, optimizer, self.inputs, self.labels_for(name), self.training_rows[name], self.preset.train,
                epochs, self.scale, self.generators[name], penalty, self.control.checkpoint, on_step,
            )
        except NonFiniteLoss as error:
            self.diverged(f"client {name}, round {round_}: {error}")
        state = self.adapter.trainable_state()
        if not finite(state):
            self.diverged(f"client {name}, round {round_}: its adapter is not finite after local training")
        if keep_optimizer:
            self.optimizer_states[name] = optimizer.state_dict()
        self.client_seconds[name] = self.client_seconds.get(name, 0.0) + result.seconds
        return TrainedClient(state, result.mean_loss, result.steps)

    def diverged(self, message: str):
        """Keep the last finite global adapter as checkpoints/last, then end the run as diverged."""
        self.save("last", self.global_state)
        raise RunDiverged(message)

    def upload(self, round_: int, trained: dict[str, TrainedClient]) -> tuple[list[ClientUpdate], int, int]:
        """Each client sends its shared update, compressed; the server rebuilds it from the real bytes."""
        fed = self.preset.federation
        accepted: list[ClientUpdate] = []
        bytes_up_total = bytes_down_total = 0
        shared_global = {k: self.global_state[k] for k in self.shared_keys}
        down = serialized_nbytes(shared_global) if shared_global else 0
        for name, client in trained.items():
            if name in self.personal:
                self.personal[name] = {k: client.state[k].clone() for k in self.personal_keys}
            delta = {k: client.state[k] - shared_global[k] for k in self.shared_keys}
            if name in self.faulty:
                delta = self.misbehave(name, round_, delta)
            sent, skipped = 0, False
            if delta:
                # The norms (float64, a pass over the adapter twice) only when a threshold asks for them.
                if fed.skip_threshold and norm(delta) / max(norm(shared_global), 1e-12) < fed.skip_threshold:
                    skipped = True
                else:
                    decoded, sent = self.send(name, delta)
                    rebuilt = {k: shared_global[k] + decoded[k] for k in self.shared_keys}
                    accepted.append(ClientUpdate(name, rebuilt, len(self.training_rows[name]), client.mean_loss))
            bytes_up_total += sent
            bytes_down_total += down
            self.emit(
                ev.ClientFinished(
                    round=round_, client=name, mean_loss=client.mean_loss, examples=len(self.training_rows[name]),
                    steps=client.steps, seconds=round(self.client_seconds.pop(name, 0.0), 4), bytes_up=sent,
                    bytes_down=down, skipped=skipped,
                )
            )
        return accepted, bytes_up_total, bytes_down_total

    def send(self, name: str, delta: State) -> tuple[State, int]:
        """(the delta as the server rebuilds it, bytes on the wire). Uncompressed float tensors come back from
        safetensors exactly as they went in, so that round trip is skipped and only its length computed."""
        if type(self.codec) is NoCompression:
            return delta, serialized_nbytes(delta)
        return self.codec.roundtrip(name, delta)

    def labels_for(self, name: str) -> torch.Tensor:
        fed = self.preset.federation
        return self.flipped_labels if name in self.faulty and fed.faulty_mode == "label_flip" else self.data.labels

    def misbehave(self, name: str, round_: int, delta: State) -> State:
        """A faulty client's update as sent (federation.faulty_mode), drawn from its own seeded stream."""
        mode, strength = self.preset.federation.faulty_mode, self.preset.federation.faulty_strength
        if mode == "scale":
            return {k: v * strength for k, v in delta.items()}
        if mode == "sign_flip":
            return {k: -strength * v for k, v in delta.items()}
        if mode == "free_rider":  # sends the global model back: an update of zero
            return {k: torch.zeros_like(v) for k, v in delta.items()}
        if mode == "noise":
            generator = seeded_generator(self.preset.run.seed, 3, self.client_index[name], round_)
            count = sum(v.numel() for v in delta.values())
            rms = float(torch.sqrt(sum((v.double() ** 2).sum() for v in delta.values()) / max(count, 1)))
            return {
                k: v + (strength * rms) * torch.randn(v.shape, generator=generator, dtype=v.dtype).to(v.device)
                for k, v in delta.items()
            }
        return delta  # label_flip: the update of a client trained on flipped labels

    # --- evaluation ---------------------------------------------------------------------------------

    def evaluate(self, round_: int, outcome: RoundOutcome | None = None, zero_shot: bool = False) -> None:
        started = time.perf_counter()
        clients, holdout = self.evaluator.measure(None if zero_shot else self.client_state, restore=self.global_state)
        if self.personal_keys and not zero_shot:
            global_clients, _ = self.evaluator.measure(lambda name: self.global_state, restore=self.global_state)
            for name, acc in clients.items():
                acc["global_test"] = global_clients[name]["test"]
        mean_val = nanmean(a["val"] for a in clients.values())
        mean_test = nanmean(a["test"] for a in clients.values())
        selected = not zero_shot and self.selection.consider(mean_val)
        if selected:
            self.save("best", self.global_state)
            self.selected_state = {k: v.clone() for k, v in self.global_state.items()}
        train_seconds = outcome.train_seconds if outcome else 0.0
        self.emit(
            ev.RoundFinished(
                round=round_, client_accuracy=clients, holdout_accuracy=holdout,
                mean_val=mean_val if mean_val is not None else float("nan"),
                mean_test=mean_test if mean_test is not None else float("nan"), mean_holdout=nanmean(holdout.values()),
                mean_loss=outcome.mean_loss if outcome else None, bytes_up=outcome.bytes_up if outcome else 0,
                bytes_down=outcome.bytes_down if outcome else 0,
                seconds=round(train_seconds + time.perf_counter() - started, 4), selected=selected,
            )
        )

    def finish(self) -> None:
        self.save("last", self.global_state)
        alphas = list(self.preset.eval.wise_alphas)
        final_alpha = self.preset.eval.wise_alpha
        if not alphas and final_alpha == 1.0:
            return
        curve = self.evaluator.wise_curve(self.theta_0, self.global_state, sorted(set(alphas + [final_alpha])))
        for point in curve:
            if point["alpha"] == final_alpha and final_alpha != 1.0:
                self.save("wise", point["state"])
                self.log("info", f"WiSE-FT final model at a = {final_alpha} on the last round's adapter: "
                                 "saved as checkpoints/wise.safetensors")
        self.report_wise(curve, alphas, "last")
        # The selection rule's round is what a paper reports: mix that one with the zero-shot start too.
        if alphas and self.selected_state is not None and not all(
            torch.equal(self.selected_state[k], self.global_state[k]) for k in self.global_state
        ):
            self.report_wise(self.evaluator.wise_curve(self.theta_0, self.selected_state, alphas), alphas, "selected")
            self.adapter.load_trainable_state(self.global_state)

    def report_wise(self, curve: list[dict], alphas: list[float], model: str) -> None:
        for point in curve:
            if point["alpha"] in alphas:
                self.emit(ev.WiseEvaluated(
                    alpha=point["alpha"], mean_test=point["mean_test"], mean_holdout=point["mean_holdout"],
                    holdout=point["holdout"], clients=point["clients"], model=model,
                ))
                holdout = "n/a" if point["mean_holdout"] is None else f"{point['mean_holdout']:.3f}"
                self.log("info", f"WiSE-FT ({model}) a={point['alpha']:.2f}: mean test {point['mean_test']:.3f}, "
                                 f"held-out {holdout}")

    def log(self, level: str, text: str) -> None:
        self.emit(ev.Log(level=level, text=text, time=time.time()))

    # --- the state a resumed run needs back ------------------------------------------------------------

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON) holding everything the next round depends on."""
        tensors: dict[str, torch.Tensor] = {f"global/{k}": v for k, v in self.global_state.items()}
        for client, personal in self.personal.items():
            tensors.update({f"personal/{client}/{k}": v for k, v in personal.items()})
        tensors.update({f"strategy/{k}": v for k, v in self.strategy.state_tensors().items()})
        tensors.update({f"codec/{k}": v for k, v in self.codec.state_tensors().items()})
        tensors.update({f"generator/{n}": g.get_state() for n, g in self.generators.items()})
        if self.selected_state is not None:
            tensors.update({f"selected/{k}": v for k, v in self.selected_state.items()})
        tensors["torch_rng"] = torch.get_rng_state()
        groups: dict[str, Any] = {}
        for client, optimizer_state in self.optimizer_states.items():
            for index, slots in optimizer_state["state"].items():
                tensors.update({f"optimizer/{client}/{index}/{slot}": v for slot, v in slots.items()})
            groups[client] = optimizer_state["param_groups"]
        return tensors, {"best_val": self.selection.best_val, "optimizer_param_groups": groups}

    def load_state(self, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        self.global_state = {k: v.clone() for k, v in part("global/").items()}
        for client in self.personal:
            self.personal[client] = part(f"personal/{client}/")
        self.strategy.load_state_tensors(part("strategy/"))
        self.codec.load_state_tensors(part("codec/"))
        for name, generator in self.generators.items():
            generator.set_state(tensors[f"generator/{name}"])
        torch.set_rng_state(tensors["torch_rng"])
        self.selection.best_val = info["best_val"]
        self.selected_state = part("selected/") or None
        self.optimizer_states = {}
        for client, param_groups in info["optimizer_param_groups"].items():
            slots: dict[int, dict[str, torch.Tensor]] = {}
            for key, value in part(f"optimizer/{client}/").items():
                index, slot = key.split("/", 1)
                slots.setdefault(int(index), {})[slot] = value
            self.optimizer_states[client] = {"state": slots, "param_groups": param_groups}
        self.adapter.load_trainable_state(self.global_state)
