"""metrics.jsonl read back: nothing readable is lost, and nothing is lost without saying so."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import pytest

from engine import events as ev
from engine.runstore import RunStore

SAMPLES: dict[str, ev.Event] = {
    "RunStarted": ev.RunStarted(
        run_id="20240101-000000-tiny", run_dir="runs/20240101-000000-tiny", preset_name="tiny", rounds=2,
        clients=[{"client": "photo", "domain": "photo", "examples": 10, "val": 2, "test": 3,
                  "class_histogram": [5, 5]}],
        holdout=["sketch"], classes=["dog", "cat"], device="cpu", adapter="attai", aggregation="fedavg",
        trainable_parameters=263_168, weights="random", time=1_700_000_000.25,
    ),
    "FeaturesProgress": ev.FeaturesProgress(done=3, total=12),
    "FeaturesReady": ev.FeaturesReady(encoded=8, cached=4, seconds=0.5, feature_dim=128),
    "RoundStarted": ev.RoundStarted(round=1, clients=["photo", "cartoon"], time=1_700_000_001.0),
    "ClientProgress": ev.ClientProgress(round=1, client="photo", step=2, steps=4, loss=0.69),
    "ClientFinished": ev.ClientFinished(round=1, client="photo", mean_loss=0.6, examples=10, steps=4,
                                        seconds=0.1, bytes_up=1024, bytes_down=2048),
    "RoundFinished": ev.RoundFinished(
        round=1, client_accuracy={"photo": {"train": 0.5, "val": 0.5, "test": 0.25}},
        holdout_accuracy={"sketch": 0.5}, mean_val=0.5, mean_test=0.25, mean_holdout=0.5, mean_loss=0.6,
        bytes_up=1024, bytes_down=2048, seconds=0.2, selected=True,
    ),
    "WiseEvaluated": ev.WiseEvaluated(alpha=0.5, mean_test=0.75, mean_holdout=None, holdout={},
                                      clients={"photo": 0.75}, model="selected"),
    "Log": ev.Log(level="warning", text="weights are RANDOM", time=1_700_000_000.5),
    "RunFinished": ev.RunFinished(status="completed", summary={"rounds_completed": 2, "selected": {"round": 1}},
                                  run_dir="runs/x", seconds=3.5),
    "RunFailed": ev.RunFailed(error="boom", traceback="Traceback ...", run_dir=None),
}
STREAM = [SAMPLES[name] for name in ("RunStarted", "FeaturesReady", "RoundFinished", "RoundStarted",
                                     "ClientProgress", "ClientFinished", "RoundFinished", "Log", "RunFinished")]


def write_events(path: Path, events) -> Path:
    store = RunStore(path)  # the run store's own writer
    for event in events:
        store.append_event(event)
    store.close()
    return path / "metrics.jsonl"


def read(path: Path):
    warnings: list[ev.ReadWarning] = []
    return ev.read_events(path, warnings=warnings), warnings


def lines_of(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


# --- the union and the round trip -----------------------------------------------------------------


def test_event_types_are_the_union_written_once():
    assert list(ev.EVENT_TYPES.values()) == list(typing.get_args(ev.Event))
    assert set(SAMPLES) == set(ev.EVENT_TYPES), "give every event type a sample"


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_every_event_type_round_trips(name):
    event = SAMPLES[name]
    assert type(event).__name__ == name
    assert ev.event_from_dict(json.loads(ev.event_to_json(event))) == event


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_an_events_line_is_the_json_of_all_its_fields_in_order(name):
    """The line names the event, then every field in declaration order, nested values as they are: what
    dataclasses.asdict gives (event_to_dict reads the fields without its deep copy)."""
    import dataclasses

    event = SAMPLES[name]
    assert ev.event_to_json(event) == json.dumps({"event": name, **dataclasses.asdict(event)})


def test_a_file_of_every_event_type_reads_back_equal_and_without_warnings(tmp_path):
    events = list(SAMPLES.values())
    path = write_events(tmp_path, events)
    assert read(path) == (events, [])
    assert ev.read_events(path) == events  # the call existing callers make


def test_run_started_carries_the_schema_version_and_an_unversioned_file_is_schema_1(tmp_path):
    assert SAMPLES["RunStarted"].schema == ev.SCHEMA_VERSION
    line = ev.event_to_dict(SAMPLES["RunStarted"])
    assert line["schema"] == ev.SCHEMA_VERSION
    del line["schema"]
    assert ev.event_from_dict(line).schema == 1


# --- the review's case: an older file, on a real run ---------------------------------------------------


@pytest.mark.slow
def test_rounds_of_a_real_run_survive_a_missing_selected_field(tiny_preset_file):
    from engine import load_preset
    from engine.runner import run

    seen: list = []
    result = run(load_preset(tiny_preset_file), seen.append)
    assert result.status == "completed"
    path = result.run_dir / "metrics.jsonl"
    original = ev.read_events(path)
    assert original == seen
    rounds = [e for e in original if isinstance(e, ev.RoundFinished)]
    assert len(rounds) == 3 and any(r.selected for r in rounds)

    older = []
    for line in lines_of(path):  # what the file looked like before RoundFinished had "selected"
        data = json.loads(line)
        if data["event"] == "RoundFinished":
            del data["selected"]
        older.append(json.dumps(data) + "\n")
    path.write_text("".join(older), encoding="utf-8")

    events, warnings = read(path)
    assert warnings == []  # a field with a default is how the schema grows: filled silently
    assert [e.round for e in events if isinstance(e, ev.RoundFinished)] == [r.round for r in rounds]
    as_before = [
        ev.RoundFinished(**{**e.__dict__, "selected": False}) if isinstance(e, ev.RoundFinished) else e
        for e in original
    ]
    assert events == as_before  # every line, every other field unchanged


# --- damaged files ---------------------------------------------------------------------------------


def test_a_torn_last_line_is_skipped_silently(tmp_path):
    path = write_events(tmp_path, STREAM)
    whole = ev.event_to_json(SAMPLES["ClientProgress"])
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(whole[: len(whole) // 2])  # the writer died mid-line
    assert read(path) == (STREAM, [])


def test_a_complete_last_line_without_its_newline_is_still_read(tmp_path):
    path = write_events(tmp_path, STREAM)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(ev.event_to_json(SAMPLES["RunFailed"]))
    assert read(path) == (STREAM + [SAMPLES["RunFailed"]], [])


def test_a_garbage_line_in_the_middle_is_skipped_with_its_line_number(tmp_path):
    path = write_events(tmp_path, STREAM)
    lines = lines_of(path)
    lines.insert(4, '{"event": "ClientProgress", "round": 1, "cli\n')  # line 5
    lines.insert(7, "\n")  # a blank line: nothing to report
    path.write_text("".join(lines), encoding="utf-8")
    events, warnings = read(path)
    assert events == STREAM
    assert len(warnings) == 1 and warnings[0].lines == (5,) and warnings[0].skipped
    assert str(warnings[0]).startswith("line 5: not JSON")
    [text] = ev.describe_read_warnings(warnings)
    assert text.startswith("skipped 1 line of metrics.jsonl: line 5: not JSON (")


def test_a_damaged_last_line_that_ends_in_a_newline_is_not_torn_and_is_reported(tmp_path):
    path = write_events(tmp_path, STREAM)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("{oops}\n")
    events, warnings = read(path)
    assert events == STREAM and [w.lines for w in warnings] == [(len(STREAM) + 1,)]


def test_an_unknown_event_name_is_skipped_and_reported(tmp_path):
    path = write_events(tmp_path, STREAM)
    lines = lines_of(path)
    lines[3:3] = ['{"event": "ClientEvaluated", "round": 1}\n'] * 2  # lines 4 and 5
    path.write_text("".join(lines), encoding="utf-8")
    events, warnings = read(path)
    assert events == STREAM
    assert [(w.lines, w.skipped) for w in warnings] == [((4, 5), True)]
    assert "unknown event 'ClientEvaluated'" in warnings[0].message
    assert ev.describe_read_warnings(warnings) == [
        "skipped 2 lines of metrics.jsonl: lines 4, 5: unknown event 'ClientEvaluated'"
    ]


def test_a_future_schema_is_read_where_possible_and_reported(tmp_path):
    started = {**ev.event_to_dict(SAMPLES["RunStarted"]), "schema": ev.SCHEMA_VERSION + 1, "gpu_count": 8}
    rounds = [{**ev.event_to_dict(SAMPLES["RoundFinished"]), "round": r, "fairness": 0.1} for r in (1, 2)]
    lines = [started, ev.event_to_dict(SAMPLES["FeaturesReady"]), rounds[0],
             {"event": "ClientEvaluated", "round": 1, "client": "photo"}, rounds[1]]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")

    events, warnings = read(path)
    assert [type(e).__name__ for e in events] == ["RunStarted", "FeaturesReady", "RoundFinished", "RoundFinished"]
    assert events[0].schema == ev.SCHEMA_VERSION + 1 and events[0].run_id == SAMPLES["RunStarted"].run_id
    assert [e.round for e in events[2:]] == [1, 2]
    found = {(w.lines, w.skipped): w.message for w in warnings}
    assert set(found) == {((1,), False), ((3, 5), False), ((4,), True)}
    assert f"schema {ev.SCHEMA_VERSION + 1}" in warnings[0].message  # the newer schema is said first
    assert "ignored unknown field(s) 'gpu_count'" in warnings[1].message
    assert "ignored unknown field(s) 'fairness'" in found[(3, 5), False]
    assert "unknown event 'ClientEvaluated'" in found[(4,), True]
    skipped, lenient = ev.describe_read_warnings(warnings)
    assert skipped.startswith("skipped 1 line of metrics.jsonl: line 4: ")
    assert lenient.startswith("read 3 lines of metrics.jsonl leniently: line 1: ")


def test_missing_fields_follow_the_documented_rule(tmp_path):
    finished = ev.event_to_dict(SAMPLES["RoundFinished"])
    no_loss = {k: v for k, v in finished.items() if k != "mean_loss"}  # no default, admits None: null
    no_round = {k: v for k, v in finished.items() if k != "round"}  # no default, int: unclear, skipped
    text_round = {**finished, "round": "3"}  # wrong JSON type: skipped
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in (no_loss, no_round, text_round, finished)), "utf-8")

    events, warnings = read(path)
    assert events == [ev.RoundFinished(**{**SAMPLES["RoundFinished"].__dict__, "mean_loss": None}),
                      SAMPLES["RoundFinished"]]
    assert [(w.lines, w.skipped) for w in warnings] == [((1,), False), ((2,), True), ((3,), True)]
    assert "'mean_loss' read as null" in warnings[0].message
    assert "missing field(s) 'round'" in warnings[1].message
    assert "field 'round' is str, not int" in warnings[2].message
    with pytest.raises(ValueError):
        ev.event_from_dict(no_round)


def test_no_damage_makes_reading_raise(tmp_path):
    path = write_events(tmp_path, [SAMPLES["Log"]])
    nasty = [b"[]", b"null", b"42", b'"text"', b'{"event": 3}', b'{"no": "event"}', b'{"event": "Log"}',
             b'{"event": "Log", "level": null, "text": "t", "time": 1}', b"\xff\xfe not utf-8",
             b"[" * 100_000, b'{"event": "__init__"}', b'{"event": "Log", "level": "info", "text": ["x"], "time": 1}']
    with open(path, "ab") as handle:
        handle.write(b"\n".join(nasty) + b"\n")
        handle.write(ev.event_to_json(SAMPLES["Log"]).encode() + b"\n")
    events, warnings = read(path)
    assert events == [SAMPLES["Log"], SAMPLES["Log"]]
    skipped = sorted(n for w in warnings if w.skipped for n in w.lines)
    assert skipped == list(range(2, 2 + len(nasty)))  # every bad line named, none silently


@pytest.mark.slow
def test_the_fake_engine_and_a_real_run_fold_into_the_same_summary_shape(tiny_preset_file, tmp_path):
    """The console's tests drive a scripted engine; its summary must be the real fold's, key for key."""
    from engine import load_preset
    from engine.runner import run
    from fake_engine import FakeEngine

    preset = load_preset(tiny_preset_file)
    real = run(preset).summary
    fake = FakeEngine(out_dir=tmp_path / "runs", run_id="fake")(preset, lambda event: None).summary

    def shape(value):
        if isinstance(value, dict):
            return {k: shape(v) for k, v in value.items() if k not in ("clients", "holdout")}
        if isinstance(value, list):
            return [shape(value[0])] if value else []
        return type(value).__name__ if value is not None else None

    assert shape(fake).keys() == shape(real).keys()
    assert shape(fake["per_round"]) == shape(real["per_round"])
    assert fake["status"] == "completed" and fake["rounds_completed"] == preset.run.rounds
    assert json.loads((tmp_path / "runs" / "fake" / "summary.json").read_text()) == fake
