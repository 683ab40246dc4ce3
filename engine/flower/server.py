"""The ServerApp's side of a Flower run: ``fedtui run``'s lifecycle and numbers, with the clients elsewhere.

``serve`` is ``engine.runner.run`` with one difference: a client's round is not trained here but asked of
its SuperNode through a ``Transport`` (``engine.flower.apps.GridTransport`` over Flower's Grid; a test may
pass its own). Everything else is the in-process run's own code:

- the run directory and its lifecycle (``engine.runner.RunSession``): preset.toml and manifest.json first,
  every event in metrics.jsonl as it happens (``RunStore``), summary.json as the fold ``RunSummary`` however
  the run ends, checkpoints best / last (and WiSE-FT's), a heartbeat after each round; so the console's runs
  screen and ``fedtui runs``-style listings show a Flower run like any other;
- the data, the adapter and the rule, built in the runner's order (``engine.file_rounds.build_side``);
- each round: the cohort (``sample_cohort``, seeded by run and round), the codec's ``decode`` of the bytes
  each client sent (``engine.file_rounds.decode_update``), the rule's ``aggregate`` (its state stays here,
  in memory, as in-process), ``Federation.evaluate`` on the server's data and the selection rule.

A client that does not answer (its SuperNode gone, its ClientApp failed, the round's timeout passed) or
whose update does not decode is reported by a Log event naming it and why, and the round goes on with those
that answered when at least ``min(federation.min_clients, cohort)`` did; otherwise the run fails with one
line. When every client answers, the per-round accuracies are the in-process run's (tests/test_flower.py).

A Flower run keeps its round state as ``fedtui run`` does (``state/``), so ``serve(..., resume=True)`` (and
``fedtui flower local --resume``) continues it from its last kept round with the same numbers.

Not here: ``loadaboost`` (a second exchange
within a round), ``centralised`` and ``local`` (nothing federated), and a server without the preset's
images (the server evaluates; with ``imagefolder`` it needs ``data.root``). With personal layers the server
holds only the shared part and reports each client's accuracy with the global adapter (``global_test``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch

from engine import events as ev
from engine import file_rounds as fr
from engine.compression import serialized_nbytes
from engine.control import RunControl
from engine.federation import Federation, RoundOutcome, finite, sample_cohort
from engine.flower import Answer, Dropped, FlowerError, RunInfo
from engine.presets import Preset, to_toml
from engine.runner import RunResult, RunSession
from engine.runstore import RunStore, new_run_dir
from engine.signing import Refused
from engine.strategies import ClientUpdate, Strategy, build_strategy

State = dict[str, torch.Tensor]
Log = Callable[[str, str], None]


class Transport(Protocol):
    def describe(self) -> dict[str, Any]: ...

    def start(self, info: RunInfo, log: Log) -> None:
        """Find each roster client's node (waiting for them a while); say who is missing."""

    def exchange(self, round_: int, cohort: list[str], shared: State) -> dict[str, Answer | Dropped]:
        """Send ``shared`` (the global adapter's shared tensors) and the round to each cohort client; one
        Answer or Dropped per client."""


def check_supported(preset: Preset, strategy: Strategy) -> None:
    reason = fr.unsupported_reason(preset, strategy)
    if reason:
        raise FlowerError(f"{reason}: not for fedtui's Flower apps; use `fedtui run`")


class FlowerFederation(Federation):
    """``Federation`` whose clients train behind a transport: the same cohort, decode, rule and evaluation."""

    def __init__(self, *args: Any, transport: Transport, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.transport = transport

    def play_round(self, round_: int) -> RoundOutcome:
        fed = self.preset.federation
        started = time.perf_counter()
        cohort = sample_cohort(list(self.training_rows), fed.fraction, fed.min_clients, self.preset.run.seed, round_)
        self.emit(ev.RoundStarted(round=round_, clients=cohort, time=time.time()))
        shared_global = {k: self.global_state[k] for k in self.shared_keys}
        down = serialized_nbytes(shared_global) if shared_global else 0
        limit = fr.payload_limit(shared_global) if shared_global else 0
        answers = self.transport.exchange(round_, cohort, shared_global)
        received: list[Answer] = []
        accepted: list[ClientUpdate] = []
        for name in cohort:  # the in-process run uploads and aggregates in cohort order
            answer = answers.get(name) or Dropped(name, "no reply")
            state = None
            if isinstance(answer, Answer) and not answer.skipped:
                label = f"{name}'s update of round {round_}"
                try:
                    if not shared_global:
                        raise Refused("malformed", f"{label}: carries tensors, but this adapter shares none")
                    if len(answer.payload) > limit:
                        raise Refused("malformed", f"{label}: larger than any {fed.compression} update of this "
                                                   "adapter could be")
                    state = fr.decode_update(answer.payload, self.codec, shared_global, label, "its payload")
                except Refused as refusal:
                    answer = Dropped(name, f"refused: {refusal}")
            if isinstance(answer, Dropped):
                self.log("warning", f"round {round_}: client {name} dropped out ({answer.reason}); "
                                    "the round goes on without it")
                continue
            received.append(answer)
            if state is not None:
                accepted.append(ClientUpdate(name, state, answer.examples, answer.mean_loss))
            self.emit(ev.ClientFinished(
                round=round_, client=name, mean_loss=answer.mean_loss, examples=answer.examples, steps=answer.steps,
                seconds=round(answer.seconds, 4), bytes_up=len(answer.payload), bytes_down=down,
                skipped=answer.skipped,
            ))
        needed = min(fed.min_clients, len(cohort))
        if len(received) < needed:
            raise FlowerError(f"round {round_}: {len(received)} of {len(cohort)} client(s) answered and "
                              f"federation.min_clients = {fed.min_clients}; the run cannot go on")
        if accepted and self.shared_keys:
            new_shared = self.strategy.aggregate(shared_global, accepted)
            if not finite(new_shared):
                self.diverged(f"the aggregated adapter ({fed.aggregation}) of round {round_} is not finite")
            self.global_state.update({k: v.to(self.global_state[k].dtype) for k, v in new_shared.items()})
        losses = [a.mean_loss for a in received if a.mean_loss == a.mean_loss]
        return RoundOutcome(round_, float(np.mean(losses)) if losses else None, sum(len(a.payload) for a in received),
                            down * len(received), time.perf_counter() - started)

    def evaluate(self, round_: int, outcome: RoundOutcome | None = None, zero_shot: bool = False) -> None:
        if self.personal_keys and not zero_shot:  # the personal parts stay at the sites
            self.emit(fr._evaluate_global_only(self, round_, outcome))
            return
        super().evaluate(round_, outcome, zero_shot)


class FlowerSession(RunSession):
    """``engine.runner``'s run lifecycle (files, manifest, summary, failure handling) around a Flower federation."""

    def __init__(self, preset: Preset, store: RunStore, sink, control: RunControl, transport: Transport,
                 restored=None):
        super().__init__(preset, store, sink, control, restored)
        self.transport = transport

    def _run(self) -> None:
        preset, fed = self.preset, self.preset.federation
        check_supported(preset, build_strategy(fed.aggregation, fed.aggregation_options))
        side = fr.build_side(preset, True, self.log)  # threads, device, rule, data, then the adapter (runner's order)
        data, adapter, device = side.data, side.adapter, side.device
        self.write_manifest(
            device=str(device), weights=data.backbone.weights, **data.backbone.manifest_fields(),
            data_fingerprint=data.data_fingerprint, arch=preset.model.arch, adapter=preset.adapter.kind,
            trainable_parameters=adapter.trainable_parameters(), transport=self.transport.describe(),
        )
        federation = FlowerFederation(preset, data, adapter, side.strategy, side.epochs, device, self.emit,
                                      self.control, self.save_checkpoint, transport=self.transport)
        self.tell(ev.RunStarted(
            run_id=self.store.dir.name, run_dir=str(self.store.dir), preset_name=preset.run.name, rounds=side.rounds,
            clients=[
                {"client": c.name, "domain": c.domain, "examples": len(c.train), "val": len(c.val),
                 "test": len(c.test), "class_histogram": c.class_histogram,
                 **({"faulty": fed.faulty_mode} if c.name in fed.faulty else {})}
                for c in data.clients
            ],
            holdout=list(preset.data.holdout), classes=data.classes, device=str(device), adapter=preset.adapter.kind,
            aggregation=fed.aggregation, trainable_parameters=adapter.trainable_parameters(),
            weights=data.backbone.weights, time=time.time(), selection=preset.eval.selection,
            adapter_bytes=federation.adapter_bytes, full_clip_bytes=data.backbone.parameter_bytes,
            compression=fed.compression,
        ))
        self.tell(ev.FeaturesReady(encoded=data.encoded, cached=data.cached, seconds=data.encode_seconds,
                                   feature_dim=data.features.shape[1]))
        info = RunInfo(self.store.dir.name, to_toml(preset), side.roster, side.backbone.fingerprint,
                       list(federation.shared_keys))
        self.transport.start(info, self.log)

        # The clients' own state (Adam's moments, personal layers, top-k residuals) is kept at each site round by
        # round, and their random streams are replayed from the seed: the server's side is all a resume needs.
        first_round = self.restore(federation, side.rounds)
        self.play_rounds(federation, side.rounds, first_round)


def printer(event: ev.Event) -> None:
    """The ServerApp's own output (``flwr log RUN_ID``): its log lines and one line per evaluated round."""
    if isinstance(event, ev.Log):
        print(f"{event.level}: {event.text}", flush=True)
    elif isinstance(event, ev.RoundFinished):
        holdout = "n/a" if event.mean_holdout is None else f"{event.mean_holdout:.4f}"
        print(f"round {event.round}: mean test {event.mean_test:.4f}, held-out {holdout}", flush=True)
    elif isinstance(event, (ev.RunFinished, ev.RunFailed)):
        print(f"{type(event).__name__}: {getattr(event, 'status', '')}{getattr(event, 'error', '')}", flush=True)


def serve(preset_path: str | Path, transport: Transport, overrides: list[str] | None = None,
          run_dir: str | Path | None = None, sink=printer, control: RunControl | None = None,
          resume: bool = False) -> RunResult:
    """Run the preset with its clients behind ``transport``; the run directory is ``run_dir`` (made if missing)
    or a new one under ``run.out_dir``. ``resume``: continue ``run_dir`` from its last kept round; the preset
    must be the one it ran. A bad preset raises ``PresetError`` before anything is written, a run directory
    that cannot be continued ``FlowerError``; a failing run does not raise (its status says so), as
    ``engine.runner.run``."""
    from engine.presets import load_preset
    from engine.run_state import ResumeError
    from engine.runner import reopen

    preset = load_preset(preset_path, list(overrides or []))
    restored = None
    if resume:
        if not run_dir:
            raise FlowerError("resume needs the run directory to continue")
        run_dir = Path(run_dir)
        try:
            kept = (run_dir / "preset.toml").read_text(encoding="utf-8")
        except OSError as error:
            raise FlowerError(f"{run_dir}: no preset.toml to resume from ({error.strerror or error})") from None
        if kept != to_toml(preset):
            raise FlowerError(f"{run_dir}: the preset given is not the one this run ran (its preset.toml); "
                              "resume with the same preset and overrides")
        try:
            restored = reopen(run_dir)
        except ResumeError as error:
            raise FlowerError(str(error)) from None
    run_dir = Path(run_dir) if run_dir else new_run_dir(preset.run.out_dir, preset.run.name)
    store = RunStore(run_dir)
    session = FlowerSession(preset, store, sink or (lambda event: None), control or RunControl(), transport, restored)
    try:
        return session.execute()
    finally:
        store.close()
