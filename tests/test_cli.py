"""The headless command through Typer's CliRunner: exit codes, outputs, bad input."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fedtui.cli import EXIT_BAD_INPUT, cli

runner = CliRunner()


@pytest.mark.slow
def test_run_prints_rounds_and_summary(tiny_preset_file, tmp_path):
    out = tmp_path / "the-run"
    result = runner.invoke(cli, ["run", str(tiny_preset_file), "--set", "run.rounds=1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "round   0 zero-shot" in result.output and "round   1" in result.output
    assert "personalisation" in result.output and "generalisation" in result.output
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"


@pytest.mark.slow
def test_run_json_prints_one_event_per_line(tiny_preset_file):
    result = runner.invoke(cli, ["run", str(tiny_preset_file), "--set", "run.rounds=1", "--json"])
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert events[-1]["event"] == "RunFinished" and any(e["event"] == "RunStarted" for e in events)


@pytest.mark.parametrize(
    "body, expected",
    [
        ("[train]\nlocal_epoch = 5\n", "[train.local_epoch] unknown key. Did you mean 'local_epochs'?"),
        ('[run]\nrounds = "many"\n', "[run.rounds] expected an integer, got 'many'"),
        ('[data]\ndataset = "imagefolder"\nroot = "no/such/root"\n', "[data.root] folder"),
    ],
)
def test_bad_presets_exit_2_with_a_clear_message_and_write_nothing(tmp_path, body, expected):
    path = tmp_path / "bad.toml"
    path.write_text(f'[model]\narch = "fedtui-clip-tiny"\npretrained = "none"\n' + body if "[model]" not in body else body)
    before = set(tmp_path.iterdir())
    result = runner.invoke(cli, ["run", str(path)])
    assert result.exit_code == EXIT_BAD_INPUT
    assert str(path) in result.output and expected in result.output
    assert set(tmp_path.iterdir()) == before


def test_bad_override_exits_2(tiny_preset_file):
    result = runner.invoke(cli, ["run", str(tiny_preset_file), "--set", "federation.aggregation=fedavgg"])
    assert result.exit_code == EXIT_BAD_INPUT
    assert "Did you mean 'fedavg'" in result.output


def test_a_bad_value_given_with_set_is_blamed_on_set_not_on_the_file(tmp_path):
    """The shipped file is fine; the message must point at what the user typed, and the file's own mistakes
    still at the file."""
    preset = tmp_path / "mine.toml"
    preset.write_text('[model]\narch = "fedtui-clip-tiny"\npretrained = "none"\n[train]\nbatch_size = 0\n')
    result = runner.invoke(cli, ["check", str(preset), "--set", "train.lr=nan", "--set", "run.rounds=1e9"])
    assert result.exit_code == EXIT_BAD_INPUT
    lines = result.output.replace("error: ", "").splitlines()
    assert "--set train.lr=nan: [train.lr] must be a finite number, got nan" in lines
    assert any(line.startswith("--set run.rounds=1e9: [run.rounds] expected an integer") for line in lines)
    assert any(line.startswith(f"{preset}: [train.batch_size]") for line in lines)


def test_presets_lists_shipped_presets_with_descriptions():
    result = runner.invoke(cli, ["presets"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "quickstart" in result.output and "Offline FedCLIP demo" in result.output
    assert "fedclip-pacs" in result.output


@pytest.mark.parametrize("code, expected", [(3, 3), (None, 0), ("a message", 1)])
def test_leaving_the_program_waits_for_threads_runs_exit_handlers_and_flushes(code, expected):
    """``fedtui`` run as the program skips Python's teardown (``leave``), but not what a normal exit does first:
    non-daemon threads finish, atexit handlers (trackers, logging) run, buffered output is written."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import atexit, sys, threading, time
        from fedtui.cli import leave
        atexit.register(lambda: print("atexit ran", flush=True))
        threading.Thread(target=lambda: (time.sleep(0.3), print("thread done", flush=True))).start()
        sys.stdout.write("buffered ")
        leave({code!r})
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == expected, done.stderr
    assert done.stdout.index("buffered") < done.stdout.index("thread done") < done.stdout.index("atexit ran")
    assert ("a message" in done.stderr) == (code == "a message")
