"""A run's summary as a fold over its event stream.

``summary.json`` is ``fold(metrics.jsonl)``: the live run, a replay, a resumed run and a sweep's table
all compute it with this one class, so a number cannot mean one thing in the console and another in a
paper's CSV. Apply events in order; ``as_dict`` gives the summary at any point.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

from engine import events as ev

PER_ROUND_KEYS = ("round", "mean_val", "mean_test", "mean_holdout", "mean_loss", "bytes_up", "bytes_down", "seconds")


def _known(value: float | None) -> float | None:
    """Events carry NaN where a mean has no members (no val split); the summary says null."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


class RunSummary:
    def __init__(self, run_id: str = "", preset_name: str = "", rounds_planned: int = 0, selection: str = "best-val"):
        self.run_id, self.preset_name = run_id, preset_name
        self.rounds_planned, self.selection = rounds_planned, selection
        self.weights: str | None = None
        self.zero_shot: dict[str, Any] | None = None
        self.selected: dict[str, Any] | None = None
        self.rounds: list[dict[str, Any]] = []
        self.features: dict[str, Any] = {}
        self.communication: dict[str, Any] = {"bytes_up": 0, "bytes_down": 0, "skipped_updates": 0}
        self.wise: list[dict[str, Any]] = []

    @classmethod
    def of(cls, events: Iterable[ev.Event], **initial: Any) -> "RunSummary":
        summary = cls(**initial)
        for event in events:
            summary.apply(event)
        return summary

    def apply(self, event: ev.Event) -> None:
        if isinstance(event, ev.RunStarted):
            self.run_id, self.preset_name, self.rounds_planned = event.run_id, event.preset_name, event.rounds
            self.selection, self.weights = event.selection, event.weights
            self.communication.update(
                adapter_bytes=event.adapter_bytes, full_clip_bytes=event.full_clip_bytes, compression=event.compression
            )
        elif isinstance(event, ev.FeaturesReady):
            self.features = {"encoded": event.encoded, "cached": event.cached, "seconds": round(event.seconds, 3)}
        elif isinstance(event, ev.ClientFinished):
            self.communication["bytes_up"] += event.bytes_up
            self.communication["bytes_down"] += event.bytes_down
            self.communication["skipped_updates"] += int(event.skipped)
        elif isinstance(event, ev.RoundFinished):
            record = {
                "round": event.round,
                "clients": event.client_accuracy,
                "holdout": event.holdout_accuracy,
                "mean_val": _known(event.mean_val),
                "mean_test": _known(event.mean_test),
                "mean_holdout": _known(event.mean_holdout),
                "mean_loss": event.mean_loss,
                "bytes_up": event.bytes_up,
                "bytes_down": event.bytes_down,
                "seconds": event.seconds,
            }
            if event.round == 0:
                self.zero_shot = record
            else:
                self.rounds.append(record)
                if event.selected:
                    self.selected = record
        elif isinstance(event, ev.WiseEvaluated):
            self.wise.append(
                {"alpha": event.alpha, "mean_test": event.mean_test, "mean_holdout": event.mean_holdout,
                 "holdout": event.holdout, "clients": event.clients, "model": event.model}
            )

    def as_dict(self, status: str, seconds: float, error: str | None = None) -> dict[str, Any]:
        summary = {
            "status": status,
            "run_id": self.run_id,
            "preset_name": self.preset_name,
            "rounds_planned": self.rounds_planned,
            "rounds_completed": self.rounds[-1]["round"] if self.rounds else 0,
            "seconds": round(seconds, 3),
            "selection": self.selection,
            "zero_shot": self.zero_shot,
            "selected": self.selected,
            "final": self.rounds[-1] if self.rounds else None,
            "generalisation_accuracy": (self.selected or {}).get("mean_holdout"),
            "personalisation_accuracy": (self.selected or {}).get("mean_test"),
            "per_round": [{k: r[k] for k in PER_ROUND_KEYS} for r in self.rounds],
            "features": self.features,
            "communication": self.communication,
            "wise_ft": self.wise,
            "weights": self.weights,
        }
        if error is not None:
            summary["error"] = error
        return summary
