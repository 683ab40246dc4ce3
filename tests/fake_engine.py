"""A scripted stand-in for ``engine.runner.run``: same signature, deterministic events, no torch.

It emits the same sequence the real runner promises (RunStarted, FeaturesReady, RoundFinished(0),
then per round RoundStarted, ClientProgress*, ClientFinished*, RoundFinished, and finally RunFinished
or RunFailed), honours ``RunControl`` through ``control.checkpoint()`` between steps, and, given an
``out_dir``, writes a run store entry (metrics.jsonl + summary.json) like the real run store.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:  # running pytest without an installed package or a pythonpath setting
    sys.path.insert(0, _ROOT)

from engine.control import RunControl, RunStopped  # noqa: E402
from engine.summary import RunSummary  # noqa: E402
from engine.events import (  # noqa: E402
    ClientFinished,
    ClientProgress,
    FeaturesReady,
    Log,
    RoundFinished,
    RoundStarted,
    RunFailed,
    RunFinished,
    RunStarted,
    event_to_json,
)

DOMAINS = ["photo", "sketch", "cartoon", "painting", "clipart"]
T0 = 1_700_000_000.0


@dataclass
class FakeResult:
    status: str
    run_dir: Path | None
    summary: dict[str, Any] = field(default_factory=dict)


class FakeEngine:
    """Callable like ``engine.runner.run``.

    steps: ClientProgress events per client per round. step_delay: seconds slept per step (0 = as
    fast as possible). fail_at_round: emit RunFailed when that round starts. out_dir: where to write a
    run directory (nothing is written when None). hold: an Event the run waits on before round 1, so a
    test can act while the run is certainly live.
    """

    def __init__(self, *, steps: int = 5, step_delay: float = 0.0, fail_at_round: int | None = None,
                 out_dir: Path | None = None, hold: threading.Event | None = None, run_id: str = "fake-0001",
                 extra_logs: int = 0):
        self.steps = steps
        self.step_delay = step_delay
        self.fail_at_round = fail_at_round
        self.out_dir = Path(out_dir) if out_dir else None
        self.hold = hold
        self.run_id = run_id
        self.extra_logs = extra_logs
        self.calls = 0
        self.started = threading.Event()
        self.finished = threading.Event()

    def __call__(self, preset, sink: Callable, control: RunControl | None = None, run_dir: Path | None = None):
        self.calls += 1
        control = control or RunControl()
        run_dir = Path(run_dir) if run_dir else (self.out_dir / self.run_id if self.out_dir else None)
        handle = None
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            handle = open(run_dir / "metrics.jsonl", "w", encoding="utf-8")
        shown_dir = str(run_dir) if run_dir else f"runs/{self.run_id}"
        clock = iter(T0 + 0.5 * i for i in range(10**9))

        def emit(event):
            if handle:
                handle.write(event_to_json(event) + "\n")
                handle.flush()
            fold.apply(event)
            sink(event)

        rounds = preset.run.rounds
        clients = self._clients(preset)
        # The summary is the real engine's fold over these events, so it cannot drift from a real run's shape.
        fold = RunSummary(self.run_id, preset.run.name, rounds, preset.eval.selection)
        summary: dict[str, Any] = {}
        best_val = -1.0
        try:
            emit(RunStarted(run_id=self.run_id, run_dir=shown_dir, preset_name=preset.run.name, rounds=rounds,
                            clients=clients, holdout=list(preset.data.holdout) or ["clipart"],
                            classes=["circle", "square", "triangle"], device="cpu", adapter=preset.adapter.kind,
                            aggregation=preset.federation.aggregation, trainable_parameters=263_168,
                            weights="random", time=next(clock)))
            self.started.set()
            emit(FeaturesReady(encoded=480, cached=0, seconds=1.25, feature_dim=512))
            emit(self._evaluate(0, clients, None, best_val))
            for i in range(self.extra_logs):
                emit(Log(level="info", text=f"burst line {i}", time=next(clock)))
            if self.hold is not None:
                while not self.hold.wait(0.05):
                    control.checkpoint()
            for r in range(1, rounds + 1):
                if self.fail_at_round == r:
                    raise RuntimeError(f"CUDA out of memory (scripted failure at round {r})")
                names = [c["client"] for c in clients]
                emit(RoundStarted(round=r, clients=names, time=next(clock)))
                losses = []
                for k, c in enumerate(clients):
                    for s in range(1, self.steps + 1):
                        control.checkpoint()
                        if self.step_delay:
                            time.sleep(self.step_delay)
                        emit(ClientProgress(round=r, client=c["client"], step=s, steps=self.steps,
                                            loss=round(self._loss(r, s, k), 4)))
                    mean = round(self._loss(r, self.steps / 2, k), 4)
                    losses.append(mean)
                    emit(ClientFinished(round=r, client=c["client"], mean_loss=mean, examples=c["examples"],
                                        steps=self.steps, seconds=0.4, bytes_up=1_052_672, bytes_down=1_052_672))
                emit(Log(level="info", text=f"round {r}: aggregated {len(names)} adapters", time=next(clock)))
                event = self._evaluate(r, clients, sum(losses) / len(losses), best_val)
                best_val = max(best_val, event.mean_val)
                emit(event)
            summary = fold.as_dict("completed", seconds=12.5)
            emit(RunFinished(status="completed", summary=summary, run_dir=shown_dir, seconds=12.5))
            status = "completed"
        except RunStopped:
            summary = fold.as_dict("stopped", seconds=3.0)
            emit(RunFinished(status="stopped", summary=summary, run_dir=shown_dir, seconds=3.0))
            status = "stopped"
        except Exception as error:  # the real runner never raises for run errors either
            emit(RunFailed(error=f"{type(error).__name__}: {error}", traceback="Traceback (most recent call last):\n"
                           f"  File \"engine/runner.py\", line 1, in run\n{type(error).__name__}: {error}",
                           run_dir=shown_dir))
            status = "failed"
            summary = fold.as_dict("failed", seconds=1.0, error=str(error))
        finally:
            if handle:
                handle.close()
            self.finished.set()
        if run_dir is not None:
            (run_dir / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
        return FakeResult(status=status, run_dir=run_dir, summary=summary)

    @staticmethod
    def _clients(preset) -> list[dict[str, Any]]:
        n = preset.data.clients if preset.data.partition != "domain" else 3
        out = []
        for k in range(n):
            domain = DOMAINS[k % 4] if preset.data.partition == "domain" else "mixed"
            name = domain if preset.data.partition == "domain" else f"client{k}"
            out.append({"client": name, "domain": domain, "examples": 72 + 8 * k, "val": 24, "test": 24})
        return out

    @staticmethod
    def _loss(r: int, s: float, k: int) -> float:
        return 2.0 * math.exp(-0.35 * (r - 1 + s / 5)) + 0.1 * k + 0.05 * math.sin(3 * s + k)

    @staticmethod
    def _evaluate(r: int, clients, mean_loss, best_val) -> RoundFinished:
        acc = {}
        for k, c in enumerate(clients):
            base = 0.42 + 0.45 * (1 - math.exp(-0.5 * r)) - 0.04 * k
            acc[c["client"]] = {"train": round(base + 0.05, 4), "val": round(base, 4), "test": round(base - 0.02, 4)}
        mean_val = round(sum(a["val"] for a in acc.values()) / len(acc), 4)
        mean_test = round(sum(a["test"] for a in acc.values()) / len(acc), 4)
        holdout = round(0.38 + 0.3 * (1 - math.exp(-0.4 * r)), 4)
        return RoundFinished(round=r, client_accuracy=acc, holdout_accuracy={"clipart": holdout},
                             mean_val=mean_val, mean_test=mean_test, mean_holdout=holdout,
                             mean_loss=None if mean_loss is None else round(mean_loss, 4),
                             bytes_up=1_052_672 * len(clients) if r else 0, bytes_down=0, seconds=0.5,
                             selected=mean_val > best_val)


# -- helpers shared by the app tests ---------------------------------------------------------------

SMOKE_PRESET = """\
[run]
name = "smoke"
description = "three rounds on the synthetic shapes"
rounds = 3

[data]
partition = "domain"

[model]  # runnable offline: the console resolves a preset (weights included) before it may start
arch = "fedtui-clip-tiny"
pretrained = "none"
"""

OTHER_PRESET = """\
[run]
name = "iid-eight"
description = "eight iid clients, FedAvg, C = 0.5"
rounds = 5

[data]
partition = "iid"
clients = 8

[model]
arch = "fedtui-clip-tiny"
pretrained = "none"

[federation]
aggregation = "fedavg"
fraction = 0.5
"""


def preset_folder(root: Path) -> Path:
    """Two shipped-looking presets in ``root/shipped`` (fixed names: snapshots show them)."""
    folder = root / "shipped"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "smoke.toml").write_text(SMOKE_PRESET, encoding="utf-8")
    (folder / "iid-eight.toml").write_text(OTHER_PRESET, encoding="utf-8")
    return folder


def make_app(root: Path, engine=None, **kwargs):
    """A FedtuiApp that sees only presets under ``root`` and never reads the real clock or home."""
    from fedtui.app import FedtuiApp
    from fedtui.app.catalog import PresetSources

    shipped = preset_folder(root)
    (root / "cwd").mkdir(exist_ok=True)
    sources = PresetSources(shipped=sorted(shipped.glob("*.toml")), user_dir=root / "user", cwd=root / "cwd")
    kwargs.setdefault("clock", lambda: 0.0)
    kwargs.setdefault("runs_dir", root / "runs")
    return FedtuiApp(engine_run=engine or FakeEngine(), preset_sources=sources, **kwargs)


async def wait_for(pilot, condition, timeout: float = 10.0, step: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await pilot.pause(step)
