"""Experiment trackers for ``fedtui run --log tensorboard|mlflow|wandb``: event sinks around the engine's stream.

Each tracker folds the events (``engine.events``) into what its tool shows:

- hyper-parameters: the preset's keys flattened (``train.lr``, ``data.holdout``, ...), at ``RunStarted``;
- per-round scalars, step = round (0 is the zero-shot evaluation): ``client/<name>/loss`` and
  ``client/<name>/bytes_up`` (``ClientFinished``), ``client/<name>/<split>_accuracy``, ``mean/val_accuracy``,
  ``mean/test_accuracy``, ``mean/holdout_accuracy``, ``holdout/<domain>/accuracy``, ``mean/loss``,
  ``bytes/up``, ``bytes/down``, ``round/seconds`` (``RoundFinished``);
- the run directory as an artefact once the run has returned (MLflow ``run/``, W&B an artifact of type
  ``run``; TensorBoard writes into ``<run_dir>/tensorboard`` by default, so there it is the run directory).

Trackers live here, not in ``engine/``, because their packages bring their own dependencies; each is an
optional extra (``pip install 'fedtui[tensorboard]'``, ``[mlflow]``, ``[wandb]``). ``open_trackers`` runs before
the run directory is made: a missing package or an unusable tracking store is bad input (exit 2, nothing
written). Once the run is going, a tracker that fails says so once (a warning ``Log`` event to the console)
and is dropped; the run goes on.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from engine import events as ev

TRACKERS = ("tensorboard", "mlflow", "wandb")
EXTRAS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


class TrackerError(Exception):
    """A tracker that cannot be used: one line."""


@dataclass(frozen=True)
class TrackerSpec:
    kind: str  # tensorboard | mlflow | wandb
    target: str | None  # tensorboard: log folder; mlflow: tracking URI; wandb: project


def parse_specs(values: list[str]) -> list[TrackerSpec]:
    """``--log`` values: ``tensorboard[=DIR]``, ``mlflow[=TRACKING_URI]``, ``wandb[=PROJECT]``."""
    specs: list[TrackerSpec] = []
    for value in values:
        kind, sep, target = value.partition("=")
        kind = kind.strip().lower()
        if kind not in TRACKERS:
            raise TrackerError(f"--log {value!r}: one of {', '.join(TRACKERS)} (optionally =DIR / =URI / =PROJECT)")
        if any(s.kind == kind for s in specs):
            raise TrackerError(f"--log {kind} is given twice")
        specs.append(TrackerSpec(kind, target.strip() or None if sep else None))
    return specs


def flat_params(preset) -> dict[str, Any]:
    """The preset's keys as ``section.key`` -> value (lists kept as lists)."""
    return {f"{section}.{key}": value for section, values in preset.to_dict().items() for key, value in values.items()}


def _scalar_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\- ]", "_", text) or "_"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class Tracker:
    """The event fold shared by every tool; a subclass writes ``start``, ``scalars``, ``finish``."""

    kind = "tracker"

    def __init__(self, spec: TrackerSpec):
        self.spec = spec
        self.run_dir: Path | None = None
        self.status = "running"
        self.summary: dict[str, Any] = {}

    # the fold ----------------------------------------------------------------------------------------
    def handle(self, event: ev.Event, preset) -> None:
        if isinstance(event, ev.RunStarted):
            self.run_dir = Path(event.run_dir)
            params = flat_params(preset)
            params.update({"fedtui.trainable_parameters": event.trainable_parameters, "fedtui.weights": event.weights,
                           "fedtui.device": event.device})
            self.start(event, params)
        elif isinstance(event, ev.ClientFinished):
            values = {f"client/{_scalar_name(event.client)}/bytes_up": event.bytes_up}
            if not event.skipped:
                values[f"client/{_scalar_name(event.client)}/loss"] = event.mean_loss
            self._scalars(event.round, values)
        elif isinstance(event, ev.RoundFinished):
            values: dict[str, Any] = {
                "mean/val_accuracy": event.mean_val, "mean/test_accuracy": event.mean_test,
                "mean/holdout_accuracy": event.mean_holdout, "mean/loss": event.mean_loss,
                "bytes/up": event.bytes_up, "bytes/down": event.bytes_down, "round/seconds": event.seconds,
            }
            for client, splits in event.client_accuracy.items():
                for split, accuracy in splits.items():
                    values[f"client/{_scalar_name(client)}/{_scalar_name(split)}_accuracy"] = accuracy
            for domain, accuracy in event.holdout_accuracy.items():
                values[f"holdout/{_scalar_name(domain)}/accuracy"] = accuracy
            self._scalars(event.round, values)
        elif isinstance(event, ev.RunFinished):
            self.status, self.summary, self.run_dir = event.status, event.summary, Path(event.run_dir)
        elif isinstance(event, ev.RunFailed):
            self.status = "failed"

    def _scalars(self, step: int, values: dict[str, Any]) -> None:
        values = {k: float(v) for k, v in values.items() if _finite(v)}
        if values:
            self.scalars(step, values)

    # the tool ----------------------------------------------------------------------------------------
    def start(self, event: ev.RunStarted, params: dict[str, Any]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def scalars(self, step: int, values: dict[str, float]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def finish(self, status: str) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


class TensorBoardTracker(Tracker):
    """Event files through torch's ``SummaryWriter`` (needs the ``tensorboard`` package): scalars, the
    hyper-parameters in the HParams tab, the preset as text. Default folder ``<run_dir>/tensorboard``."""

    kind = "tensorboard"

    def __init__(self, spec: TrackerSpec):
        super().__init__(spec)
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (imports tensorboard)
        except ImportError:
            raise TrackerError("--log tensorboard needs the tensorboard package: pip install 'fedtui[tensorboard]'") from None
        self.writer = None
        self.logdir: Path | None = None

    def start(self, event: ev.RunStarted, params: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.logdir = Path(self.spec.target) / event.run_id if self.spec.target else Path(event.run_dir) / "tensorboard"
        self.writer = SummaryWriter(str(self.logdir))
        plain = {k: v if isinstance(v, (int, float, str, bool)) else _text(v) for k, v in params.items()}
        for summary in hparams(plain, {"mean/val_accuracy": float("nan"), "mean/test_accuracy": float("nan"),
                                       "mean/holdout_accuracy": float("nan")}):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("preset", "\n".join(f"    {k} = {_text(v)}" for k, v in params.items()))
        self.writer.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)

    def finish(self, status: str) -> None:
        if self.writer is not None:
            self.writer.add_text("status", status)
            self.writer.close()
            self.writer = None


class MlflowTracker(Tracker):
    """An MLflow run (``MlflowClient``, no global state): params, metrics per round, the run directory as
    artefacts under ``run/``, status. Tracking URI from ``--log mlflow=URI``, else ``MLFLOW_TRACKING_URI``, else
    MLflow's default; experiment ``MLFLOW_EXPERIMENT_NAME`` or ``fedtui``."""

    kind = "mlflow"
    STATUS = {"completed": "FINISHED", "stopped": "KILLED", "interrupted": "KILLED", "running": "KILLED"}

    def __init__(self, spec: TrackerSpec):
        super().__init__(spec)
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise TrackerError("--log mlflow needs the mlflow package: pip install 'fedtui[mlflow]'") from None
        try:
            self.client = MlflowClient(tracking_uri=spec.target) if spec.target else MlflowClient()
            self.uri = self.client.tracking_uri
        except Exception as error:  # noqa: BLE001 - mlflow raises its own kinds for a store it cannot use
            raise TrackerError(f"--log mlflow: cannot use the tracking store: {_one_line(error)}") from None
        self.run_id: str | None = None

    def start(self, event: ev.RunStarted, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "fedtui"
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        run = self.client.create_run(experiment_id, run_name=event.run_id,
                                     tags={"fedtui.run_dir": event.run_dir, "fedtui.preset": event.preset_name})
        self.run_id = run.info.run_id
        items = [Param(k, _text(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def scalars(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        if self.run_id is None:
            return
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def finish(self, status: str) -> None:
        if self.run_id is None:
            return
        if self.run_dir is not None and self.run_dir.is_dir():
            self.client.log_artifacts(self.run_id, str(self.run_dir), artifact_path="run")
        self.client.set_terminated(self.run_id, self.STATUS.get(status, "FAILED"))
        self.run_id = None


class WandbTracker(Tracker):
    """A W&B run: config = the preset's flattened keys, ``run.log`` per round, the run directory as an artifact
    of type ``run``. Project from ``--log wandb=PROJECT``, else ``WANDB_PROJECT``, else ``fedtui``; W&B's own
    variables apply (``WANDB_MODE=offline``, ``WANDB_DIR``, ``WANDB_API_KEY``)."""

    kind = "wandb"

    def __init__(self, spec: TrackerSpec):
        super().__init__(spec)
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise TrackerError("--log wandb needs the wandb package: pip install 'fedtui[wandb]'") from None
        self.run = None
        self.step = -1

    def start(self, event: ev.RunStarted, params: dict[str, Any]) -> None:
        import wandb

        project = self.spec.target or os.environ.get("WANDB_PROJECT") or "fedtui"
        self.run = wandb.init(project=project, name=event.run_id, config=params, reinit="create_new",
                              tags=[event.preset_name])

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.run is not None:
            self.step = max(self.step, step)  # W&B steps only go forward: a resumed round logs at its own step
            self.run.log(values, step=self.step)

    def finish(self, status: str) -> None:
        if self.run is None:
            return
        import wandb

        self.run.summary["fedtui.status"] = status
        if self.run_dir is not None and self.run_dir.is_dir():
            artifact = wandb.Artifact(_artifact_name(self.run_dir.name), type="run")
            artifact.add_dir(str(self.run_dir))
            self.run.log_artifact(artifact)
        self.run.finish(exit_code=0 if status == "completed" else 1)
        self.run = None


def _artifact_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "-", text)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


_KINDS: dict[str, Callable[[TrackerSpec], Tracker]] = {
    "tensorboard": TensorBoardTracker, "mlflow": MlflowTracker, "wandb": WandbTracker,
}


def open_trackers(values: list[str]) -> list[Tracker]:
    """Parse ``--log`` values and check each tracker can be used (its package imports, its store opens);
    ``TrackerError`` (one line) if not. Nothing is written yet."""
    return [_KINDS[spec.kind](spec) for spec in parse_specs(values)]


class TrackedSink:
    """``sink`` plus every tracker: the sink sees each event first; a tracker that raises is reported once
    (a warning ``Log`` event into ``sink``) and dropped. ``close(status)`` ends each tracker's run and
    uploads the run directory; call it after ``engine.runner.run`` has returned."""

    def __init__(self, sink: Callable[[ev.Event], None], trackers: list[Tracker], preset):
        self.sink = sink
        self.trackers = list(trackers)
        self.preset = preset

    def __call__(self, event: ev.Event) -> None:
        self.sink(event)
        for tracker in list(self.trackers):
            try:
                tracker.handle(event, self.preset)
            except Exception as error:  # noqa: BLE001 - a tracker never stops a run
                self._drop(tracker, error)

    def _drop(self, tracker: Tracker, error: BaseException) -> None:
        if tracker in self.trackers:
            self.trackers.remove(tracker)
        self.sink(ev.Log("warning", f"--log {tracker.kind} stopped logging: {_one_line(error)}", time.time()))

    def close(self, status: str | None = None) -> None:
        for tracker in list(self.trackers):
            try:
                tracker.finish(status or tracker.status)
            except Exception as error:  # noqa: BLE001
                self._drop(tracker, error)
        self.trackers = []


__all__ = ["TRACKERS", "MlflowTracker", "TensorBoardTracker", "TrackedSink", "Tracker", "TrackerError", "TrackerSpec",
           "WandbTracker", "flat_params", "open_trackers", "parse_specs"]
