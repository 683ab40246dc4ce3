"""Run a preset: the run's lifecycle around the federated rounds (``engine.federation``).

``run()`` blocks; call it from a worker thread to keep a UI alive. It never raises for a failing run
(it emits ``RunFailed``, writes the summary and returns status "failed"); ``RunControl`` stops or pauses
it between batches. This module owns the run directory: the preset and manifest first, every event as
it happens, the state after each round (``engine.run_state``), and the summary, a fold over the events
(``engine.summary``) written however the run ends. ``resume=True`` continues a run directory from its
last completed round; the result equals an uninterrupted run's.
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

import torch

from engine import events as ev
from engine.adapters import AdapterContext, build_adapter
from engine.backbone import resolve_device
from engine.control import RunControl, RunStopped
from engine.federation import Federation, RunDiverged, sample_cohort, seeded_generator
from engine.prepare import prepare
from engine.presets import Preset, to_toml
from engine.run_state import ResumeError, RoundStateWriter, load_round_state, round_state_files, write_round_state
from engine.runstore import RunStore, new_run_dir
from engine.strategies import build_strategy
from engine.summary import RunSummary

__all__ = ["ResumeError", "RunDiverged", "RunResult", "default_threads", "run", "sample_cohort", "seeded_generator"]


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
    resume: bool = False,
) -> RunResult:
    control = control or RunControl()
    if resume and run_dir is None:
        raise ValueError("resume needs the run directory to continue")
    run_dir = Path(run_dir) if run_dir is not None else new_run_dir(preset.run.out_dir, preset.run.name)
    restored = reopen(run_dir) if resume else None
    store = RunStore(run_dir)
    session = RunSession(preset, store, sink or (lambda event: None), control, restored)
    try:
        return session.execute()
    finally:
        store.close()


def reopen(run_dir: Path):
    """A run directory to continue: its last kept round (None: none was kept, start over in it), with
    metrics.jsonl cut back to that round and the files of how it ended removed. A ResumeError (bad input)
    when its state cannot be read."""
    restored = load_round_state(run_dir)
    _rewind_metrics(run_dir, restored.metrics_bytes if restored else 0)
    return restored


def _rewind_metrics(run_dir: Path, length: int) -> None:
    """Drop what a killed run wrote after its last completed round, so the resumed file reads as one run."""
    path = Path(run_dir) / "metrics.jsonl"
    if path.exists() and path.stat().st_size > length:
        os.truncate(path, length)
    for name in ("summary.json", "error.txt", "heartbeat.json"):
        (Path(run_dir) / name).unlink(missing_ok=True)


def default_threads() -> int:
    """All cores but one. Measured on a busy 2-core machine: intra-op threads contending for both cores
    made the tiny CLIP's encoder 10x slower (10.4 vs 1.0 ms an image) and would starve the console's
    UI thread; one core left free costs little on an idle machine and nothing on a large one."""
    return max(1, (os.cpu_count() or 2) - 1)


class RunSession:
    """One run's lifecycle around its rounds: preset.toml and manifest.json first, every event into
    metrics.jsonl and the sink, round state after each round, summary.json however the run ends. ``_run``
    builds and plays the rounds; a subclass with other clients (``engine.flower.server.FlowerSession``)
    replaces only that."""

    def __init__(self, preset: Preset, store: RunStore, sink, control: RunControl, restored=None):
        self.preset, self.store, self.sink, self.control = preset, store, sink, control
        self.restored = restored
        self.started = time.time()
        # A resumed run's summary counts the earlier sessions' time up to the round it resumes after.
        self.earlier_seconds = float(restored.info.get("elapsed_seconds", 0.0)) if restored is not None else 0.0
        self.manifest: dict[str, Any] = {}
        self.state_writer = RoundStateWriter()
        self.fold = RunSummary(store.dir.name, preset.run.name, preset.run.rounds, preset.eval.selection)
        # A resumed run's earlier events are in metrics.jsonl already: fold them in, do not write them again.
        self.replaying = restored is not None
        if restored is not None:
            for event in ev.read_events(store.dir / "metrics.jsonl"):
                self.fold.apply(event)

    # --- events and files ----------------------------------------------------------------------

    def emit(self, event: ev.Event) -> None:
        self.fold.apply(event)
        try:
            self.store.append_event(event)
        finally:  # the UI hears of the event (and of a disk that filled up) even when the file cannot
            self.sink(event)

    def tell(self, event: ev.Event) -> None:
        """While a resumed run rebuilds what it had (encoding, the run's start), the UI hears it; the file has it."""
        if self.replaying:
            self.sink(event)
        else:
            self.emit(event)

    def log(self, level: str, text: str) -> None:
        self.tell(ev.Log(level=level, text=text, time=time.time()))

    def summary(self, status: str, error: str | None = None) -> dict[str, Any]:
        return self.fold.as_dict(status, self.elapsed(), error)

    def elapsed(self) -> float:
        return self.earlier_seconds + time.time() - self.started

    def write_manifest(self, **extra: Any) -> None:
        import numpy

        from engine.backbone import open_clip_version  # its version without the seconds its import costs

        self.manifest.update(
            {
                "run_id": self.store.dir.name,
                "preset": self.preset.source,
                "seed": self.preset.run.seed,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
                "versions": {
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                    "open_clip": open_clip_version(),
                    "numpy": numpy.__version__,
                    "fedtui": _fedtui_version(),
                },
                "host": platform.node(),
                "pid": os.getpid(),  # with the host and heartbeat.json: a run without a summary is running or killed
                **extra,
            }
        )
        self.store.write_json("manifest.json", self.manifest)

    def save_checkpoint(self, name: str, state: dict[str, torch.Tensor]) -> None:
        # One key: safetensors keeps metadata in a hash map whose order changes from process to process, and
        # a checkpoint must be the same bytes whoever wrote it (a resumed run's equal an uninterrupted run's).
        about = {"adapter": self.preset.adapter.kind, "run_id": self.store.dir.name, "preset": self.preset.to_dict()}
        metadata = {"fedtui": json.dumps(about, sort_keys=True)}
        self.store.save_checkpoint(name, state, metadata)

    # --- lifecycle -------------------------------------------------------------------------------

    def execute(self) -> RunResult:
        preset = self.preset
        try:
            if self.restored is None:
                self.store.write_text("preset.toml", to_toml(preset))
            else:
                self.manifest.update(self.store.read_json("manifest.json"))
                self.manifest.setdefault("resumed", []).append({"time": time.time(), "after_round": self.restored.round})
            self.write_manifest(device_requested=preset.run.device)
            self._run()
            status = "completed"
        except RunStopped:
            status = "stopped"
            self.log("warning", "stopped on request; `fedtui run --resume` continues from the last completed round")
        except RunDiverged as diverged:
            return self._end_diverged(str(diverged))
        except OSError as error:  # the disk filled up or the run directory became unwritable
            return self._fail(f"cannot write {error.filename or self.store.dir}: {error.strerror or error}")
        except Exception as error:  # a failing run is reported, never raised into the UI thread
            return self._fail(f"{type(error).__name__}: {error}", traceback.format_exc())
        except BaseException:
            # Ctrl-C without a graceful stop: leave a summary that says so, then let it propagate.
            with contextlib.suppress(OSError):
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
        with contextlib.suppress(OSError):
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

        from engine.adapters.base import ADAPTERS

        data = prepare(
            preset, device, self.log, self.control.checkpoint, ADAPTERS[preset.adapter.kind].needs_images,
            progress=lambda done, total: self.tell(ev.FeaturesProgress(done=done, total=total)),
        )

        torch.manual_seed(preset.run.seed)  # the adapter's init, identical for every client
        context = AdapterContext(
            feature_dim=data.features.shape[1],
            class_names=data.classes,
            prompts=data.prompts,
            class_text_features=data.text_features,
            logit_scale=data.backbone.logit_scale,
            # A warm run of a feature-only kind has no model (engine.prepare): nothing in it uses one.
            clip_model=data.backbone.model if data.backbone.loaded else None,
            tokenizer=data.backbone.tokenizer if data.backbone.loaded else None,
        )
        adapter = build_adapter(preset.adapter.kind, context, preset.adapter.kind_options).to(device)
        self.write_manifest(
            device=str(device),
            weights=data.backbone.weights,
            **data.backbone.manifest_fields(),
            data_fingerprint=data.data_fingerprint,
            arch=preset.model.arch,
            adapter=preset.adapter.kind,
            trainable_parameters=adapter.trainable_parameters(),
        )
        federation = Federation(preset, data, adapter, strategy, epochs, device, self.emit, self.control,
                                self.save_checkpoint)
        self.tell(
            ev.RunStarted(
                run_id=self.store.dir.name,
                run_dir=str(self.store.dir),
                preset_name=preset.run.name,
                rounds=rounds,
                clients=[
                    {"client": c.name, "domain": c.domain, "examples": len(c.train), "val": len(c.val),
                     "test": len(c.test), "class_histogram": c.class_histogram,
                     **({"faulty": fed.faulty_mode} if c.name in fed.faulty else {})}
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
                selection=preset.eval.selection,
                adapter_bytes=federation.adapter_bytes,
                full_clip_bytes=data.backbone.parameter_bytes,
                compression=fed.compression,
            )
        )
        self.tell(
            ev.FeaturesReady(
                encoded=data.encoded, cached=data.cached, seconds=data.encode_seconds, feature_dim=data.features.shape[1]
            )
        )
        self.play_rounds(federation, rounds, self.restore(federation, rounds))

    def play_rounds(self, federation, rounds: int, first_round: int) -> None:
        """``federation.run`` with each round kept (``keep_round``); however the rounds end, the last round's
        state is on the disk before the run says how it ended."""
        try:
            federation.run(rounds, first_round, lambda round_: self.keep_round(federation, round_))
        finally:
            self.state_writer.close()

    def restore(self, federation, rounds: int) -> int:
        """A resumed run's federation back where its last kept round left it; the round to play next."""
        if self.restored is None:
            return 1
        federation.load_state(self.restored.tensors, self.restored.info)
        self.log("info", f"resumed after round {self.restored.round} of {rounds}")  # said, not written:
        self.replaying = False  # the file reads as one uninterrupted run
        return self.restored.round + 1

    def keep_round(self, federation, round_: int) -> None:
        """After each round: what the next one depends on (``state/``), and a heartbeat that says the run lives."""
        tensors, info = federation.state()
        info["elapsed_seconds"] = round(self.elapsed(), 3)
        files = round_state_files(round_, tensors, info, self.store.metrics_length())

        def write() -> None:
            self.store.sync_metrics()  # metrics.jsonl on the disk as far as state.json says it reaches
            write_round_state(self.store.dir, files)

        self.state_writer.submit(write)
        self.store.write_json("heartbeat.json", {"time": time.time(), "round": round_})


def _fedtui_version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("fedtui")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "source"
