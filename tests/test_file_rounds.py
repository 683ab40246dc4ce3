"""Rounds carried by files (engine.file_rounds, engine.signing, fedtui round ...).

The claim: when every client returns, export -> train -> aggregate over files gives the in-process run's
numbers (``fedtui run`` of the same preset and seed): the final adapter equals ``checkpoints/last`` and the
server's per-round accuracies equal the run's events. And whatever comes in is checked before use:
tampered, unsigned, unknown-key, wrong-signer, stale and duplicate updates are refused, each with its own
one-line message; nothing received is unpickled; an update holds only adapter tensors, counts and metrics.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("cryptography")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from engine import file_rounds as fr  # noqa: E402
from engine import signing  # noqa: E402
from conftest import TINY_PRESET  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHIPPED_CLIP = f"model.pretrained=local-dir:{REPO / 'engine' / 'assets' / 'fedtui-clip-tiny'}"
CLIENTS = ["art_painting", "cartoon", "photo"]  # the tiny preset: four styles, sketch held out -> K = 3
PLAIN = ["run.rounds=3", SHIPPED_CLIP]
# Everything a round carries forward at once: server moments (fedadam) in the package; at the sites Adam's
# moments kept across rounds, a personal layer (FedPer) and top-k residuals; and a cohort of 2 of 3 clients
# drawn afresh each round, so each client's random stream skips the rounds it sat out.
STATEFUL = PLAIN + [
    "federation.aggregation=fedadam", "federation.compression=topk", "train.reset_optimizer_each_round=false",
    "adapter.kind=clip_adapter", "federation.personal_layers=image_adapter.up", "train.lr=0.001",
    "federation.fraction=0.67",
]
# A robust rule against a faulty client whose noise comes from its own seeded stream, through a lossy codec.
ROBUST = PLAIN + [
    "federation.aggregation=median", "federation.compression=int8", 'federation.faulty=["photo"]',
    "federation.faulty_mode=noise", "federation.faulty_strength=3.0",
]


# --- helpers --------------------------------------------------------------------------------------------


def write_preset(folder: Path, cache: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny.toml"
    path.write_text(TINY_PRESET.format(out=folder / "runs", cache=cache))
    return path


def make_keys(folder: Path) -> dict:
    signing.generate_keypair(folder / "server", "server")
    for name in CLIENTS:
        signing.generate_keypair(folder / "clients", name)
    return {
        "server": signing.load_private_key(folder / "server" / "server.key"),
        "server_pub": signing.load_public_key(folder / "server" / "server.pub"),
        "clients_pub": signing.load_public_keys(folder / "clients"),
        "clients": {n: signing.load_private_key(folder / "clients" / f"{n}.key") for n in CLIENTS},
    }


def in_process(preset_path: Path, overrides: list[str]) -> Path:
    from engine.presets import load_preset
    from engine.runner import run

    result = run(load_preset(preset_path, overrides))
    assert result.status == "completed", result.summary
    return result.run_dir


def file_rounds(preset_path: Path, overrides: list[str], work: Path, keys: dict) -> list[Path]:
    """export, then per round every cohort client trains and the server aggregates; the packages in order."""
    package = fr.export_round(preset_path, work / "package-r1", keys["server"], overrides)
    packages = [package.path]
    while not package.final:
        r = package.round
        updates = []
        for client in package.cohort:
            out = work / f"update-r{r}-{client}"
            fr.train_round(package.path, client, keys["clients"][client], out, keys["server_pub"],
                           state_dir=work / f"state-{client}")
            updates.append(out)
        result = fr.aggregate_round(package.path, updates, keys["server"], keys["clients_pub"], work / f"package-r{r + 1}")
        assert not result.refused
        package = result.package
        packages.append(package.path)
    return packages


def events(path: Path, kind: str) -> list[dict]:
    return [e for e in map(json.loads, path.read_text().splitlines()) if e["event"] == kind]


def max_abs_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def flip_byte(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --- signing ----------------------------------------------------------------------------------------------


def test_keys_are_ed25519_private_0600_and_never_overwritten(tmp_path):
    key_path, pub_path = signing.generate_keypair(tmp_path, "photo")
    assert (key_path.name, pub_path.name) == ("photo.key", "photo.pub")
    assert key_path.stat().st_mode & 0o777 == 0o600
    assert key_path.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    prefix, _, name = pub_path.read_text().split()
    assert (prefix, name) == ("fedtui-ed25519", "photo")
    private, public = signing.load_private_key(key_path), signing.load_public_key(pub_path)
    assert private.public_raw == public.raw and private.fingerprint == public.fingerprint
    with pytest.raises(FileExistsError):
        signing.generate_keypair(tmp_path, "photo")
    os.chmod(key_path, 0o644)
    with pytest.raises(signing.KeyFileError, match="readable by others"):
        signing.load_private_key(key_path)
    (tmp_path / "cartoon.pub").write_text(pub_path.read_text().replace(" photo", " cartoon"))
    with pytest.raises(signing.KeyFileError, match="same key"):
        signing.load_public_keys(tmp_path)


def test_a_signed_folder_verifies_and_each_kind_of_damage_has_its_own_refusal(tmp_path):
    signing.generate_keypair(tmp_path / "keys", "photo")
    signing.generate_keypair(tmp_path / "other", "photo")
    key = signing.load_private_key(tmp_path / "keys" / "photo.key")
    trusted = signing.load_public_keys(tmp_path / "keys")

    def folder(name: str, signer=key) -> Path:
        path = tmp_path / name
        path.mkdir()
        (path / "update.safetensors").write_bytes(b"0123456789")
        signing.sign_folder(path, "fedtui-round-update", {"round": 1}, signer, "photo")
        return path

    good = signing.verify_folder(folder("good"), "fedtui-round-update", trusted)
    assert good.signer.name == "photo" and good.manifest["round"] == 1
    with pytest.raises(signing.Refused) as refused:  # the kind is signed: an update cannot pass as a package
        signing.verify_folder(tmp_path / "good", "fedtui-round-package", trusted)
    assert refused.value.reason == "tampered"

    reasons = {}
    flip_byte(folder("payload") / "update.safetensors")
    flip_byte(folder("manifest") / "manifest.json", offset=5)
    (folder("unsigned") / "manifest.sig").unlink()
    folder("stranger", signer=signing.load_private_key(tmp_path / "other" / "photo.key"))
    for name in ("payload", "manifest", "unsigned", "stranger"):
        with pytest.raises(signing.Refused) as refused:
            signing.verify_folder(tmp_path / name, "fedtui-round-update", trusted)
        reasons[name] = (refused.value.reason, str(refused.value))
    assert reasons["payload"][0] == "tampered" and "update.safetensors does not match its SHA-256" in reasons["payload"][1]
    assert reasons["manifest"][0] == "tampered" and "changed after signing" in reasons["manifest"][1]
    assert reasons["unsigned"][0] == "unsigned"
    assert reasons["stranger"][0] == "unknown-key"
    assert all("\n" not in message and str(tmp_path) in message for _, message in reasons.values())


# --- equality with the in-process run ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [PLAIN, STATEFUL, ROBUST],
                         ids=["mean", "fedadam-topk-personal-kept-adam-C0.67", "median-int8-faulty-noise"])
def test_three_clients_three_rounds_over_files_equal_the_in_process_run(tmp_path, feature_cache, overrides):
    preset_path = write_preset(tmp_path, feature_cache)
    run_dir = in_process(preset_path, overrides)
    packages = file_rounds(preset_path, overrides, tmp_path / "files", make_keys(tmp_path / "keys"))

    final = load_file(packages[-1] / fr.GLOBAL_FILE)
    last = load_file(run_dir / "checkpoints" / "last.safetensors")
    first = load_file(packages[0] / fr.GLOBAL_FILE)
    difference = max_abs_difference(final, last)
    print(f"\nmax |file rounds - in-process| over the final adapter: {difference:.3g}")
    assert difference <= 1e-6
    assert all(torch.equal(final[k], last[k]) for k in final), "not bit for bit (allowed only across machines)"
    assert max_abs_difference(final, first) > 1e-3  # the adapter moved: the comparison means something
    assert json.loads((packages[-1] / "manifest.json").read_text())["final"] is True

    # The server's evaluation each round equals the run's events (round 0 is zero-shot, at export).
    ours = {e["round"]: e for e in events(packages[-1] / fr.METRICS_FILE, "RoundFinished")}
    theirs = {e["round"]: e for e in events(run_dir / "metrics.jsonl", "RoundFinished")}
    assert sorted(ours) == sorted(theirs) == [0, 1, 2, 3]
    personal = any(o.startswith("federation.personal_layers") for o in overrides)
    for round_, expected in theirs.items():
        got = ours[round_]
        assert got["holdout_accuracy"] == expected["holdout_accuracy"]
        if personal and round_ > 0:  # the server holds the shared part only: the run's global_test
            assert {c: a["global_test"] for c, a in got["client_accuracy"].items()} == {
                c: a["global_test"] for c, a in expected["client_accuracy"].items()}
        else:
            assert got["client_accuracy"] == expected["client_accuracy"]
            assert got["selected"] == expected["selected"]
    # Each client's reported loss and example count, round by round.
    key = lambda e: (e["round"], e["client"])  # noqa: E731
    ours_clients = {key(e): e for e in events(packages[-1] / fr.METRICS_FILE, "ClientFinished")}
    theirs_clients = {key(e): e for e in events(run_dir / "metrics.jsonl", "ClientFinished")}
    assert ours_clients.keys() == theirs_clients.keys()
    for k, expected in theirs_clients.items():
        assert ours_clients[k]["examples"] == expected["examples"]
        assert ours_clients[k]["steps"] == expected["steps"]
        assert ours_clients[k]["mean_loss"] == pytest.approx(expected["mean_loss"], rel=1e-6)
        assert ours_clients[k]["bytes_up"] == expected["bytes_up"]
    if not personal:
        best = load_file(run_dir / "checkpoints" / "best.safetensors")
        assert max_abs_difference(load_file(packages[-1] / fr.BEST_FILE), best) <= 1e-6


def test_a_server_without_the_images_exports_the_same_initial_adapter(tmp_path, feature_cache):
    """The adapter's init needs the CLIP weights and the class names only: no image is read or encoded."""
    preset_path = write_preset(tmp_path, feature_cache)
    keys = make_keys(tmp_path / "keys")
    with_data = fr.export_round(preset_path, tmp_path / "a", keys["server"], [SHIPPED_CLIP])
    without = fr.export_round(preset_path, tmp_path / "b", keys["server"], [SHIPPED_CLIP], evaluate=False)
    assert (with_data.path / fr.GLOBAL_FILE).read_bytes() == (without.path / fr.GLOBAL_FILE).read_bytes()
    assert (with_data.roster, with_data.cohort) == (without.roster, without.cohort) == (CLIENTS, CLIENTS)
    assert with_data.manifest["server_evaluates"] and not without.manifest["server_evaluates"]
    assert events(with_data.path / fr.METRICS_FILE, "RoundFinished")[0]["round"] == 0  # zero-shot, at export
    assert (without.path / fr.METRICS_FILE).read_text() == ""


# --- what is refused -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory, feature_cache):
    """Round 1 trained and aggregated, round 2's updates written: the material the refusal tests tamper with."""
    work = tmp_path_factory.mktemp("file-rounds")
    preset_path = write_preset(work, feature_cache)
    keys = make_keys(work / "keys")
    overrides = ["run.rounds=2", SHIPPED_CLIP]
    first = fr.export_round(preset_path, work / "package-r1", keys["server"], overrides)
    round1 = []
    for client in CLIENTS:
        fr.train_round(first.path, client, keys["clients"][client], work / f"update-r1-{client}", keys["server_pub"])
        round1.append(work / f"update-r1-{client}")
    second = fr.aggregate_round(first.path, round1, keys["server"], keys["clients_pub"], work / "package-r2").package
    round2 = {}
    for client in CLIENTS:
        fr.train_round(second.path, client, keys["clients"][client], work / f"update-r2-{client}", keys["server_pub"])
        round2[client] = work / f"update-r2-{client}"
    return {"work": work, "keys": keys, "package": second.path, "first": first.path, "round1": round1,
            "round2": round2, "preset": preset_path, "overrides": overrides}


def aggregate_with(setup: dict, bad: Path, tmp_path: Path, good: list[str] = ("cartoon", "photo")):
    updates = [bad] + [setup["round2"][c] for c in good]
    keys = setup["keys"]
    return fr.aggregate_round(setup["package"], updates, keys["server"], keys["clients_pub"], tmp_path / "next")


def tampered_payload(setup, tmp_path):
    path = copy(setup["round2"]["art_painting"], tmp_path / "bad")
    flip_byte(path / fr.PAYLOAD_FILE, offset=len((path / fr.PAYLOAD_FILE).read_bytes()) // 2)
    return path


def tampered_manifest(setup, tmp_path):
    path = copy(setup["round2"]["art_painting"], tmp_path / "bad")
    text = (path / "manifest.json").read_text()
    assert '"round": 2' in text
    (path / "manifest.json").write_text(text.replace('"round": 2', '"round": 3'))
    return path


def unsigned(setup, tmp_path):
    path = copy(setup["round2"]["art_painting"], tmp_path / "bad")
    (path / "manifest.sig").unlink()
    return path


def unknown_key(setup, tmp_path):
    path = copy(setup["round2"]["art_painting"], tmp_path / "bad")
    signing.generate_keypair(tmp_path / "stranger", "art_painting")
    manifest = json.loads((path / "manifest.json").read_text())
    stranger = signing.load_private_key(tmp_path / "stranger" / "art_painting.key")
    signing.sign_folder(path, fr.UPDATE, {k: v for k, v in manifest.items() if k not in ("files", "signer", "kind")},
                        stranger, "art_painting")
    return path


def wrong_signer(setup, tmp_path):
    """cartoon's key signs an update that says it is art_painting's."""
    path = copy(setup["round2"]["art_painting"], tmp_path / "bad")
    manifest = json.loads((path / "manifest.json").read_text())
    signing.sign_folder(path, fr.UPDATE, {k: v for k, v in manifest.items() if k not in ("files", "signer", "kind")},
                        setup["keys"]["clients"]["cartoon"], "cartoon")
    return path


def stale(setup, tmp_path):
    return setup["round1"][0]  # art_painting's round-1 update, signed and intact, offered again in round 2


REFUSALS = {
    "tampered-payload": (tampered_payload, "tampered", "update.safetensors does not match its SHA-256"),
    "tampered-manifest": (tampered_manifest, "tampered", "changed after signing"),
    "unsigned": (unsigned, "unsigned", "unsigned (no manifest.sig)"),
    "unknown-key": (unknown_key, "unknown-key", "signed by an unknown key"),
    "wrong-signer": (wrong_signer, "wrong-signer", "says it is from 'art_painting' but is signed with cartoon's key"),
    "stale": (stale, "stale", "art_painting's update for round 1, but this is round 2 (stale)"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_bad_update_is_refused_with_its_own_message_and_the_good_ones_go_on(two_rounds, tmp_path, case):
    make, reason, words = REFUSALS[case]
    bad = make(two_rounds, tmp_path)
    result = aggregate_with(two_rounds, bad, tmp_path)
    assert [r.reason for r in result.refused] == [reason]
    message = str(result.refused[0])
    print(f"\n{case}: {message}")
    assert words in message and str(bad) in message and "\n" not in message
    assert [r.client for r in result.received] == ["cartoon", "photo"]  # min_clients = 1: the round goes on
    assert result.package.manifest["refused"] == [{"reason": reason, "message": message}]


@pytest.mark.slow
def test_every_refusal_message_is_different(two_rounds, tmp_path):
    client_keys = two_rounds["keys"]["clients_pub"]
    package = fr.open_package(two_rounds["package"], two_rounds["keys"]["server_pub"])
    from engine.compression import build_codec

    shared = {k: v for k, v in package.global_state().items() if k in package.manifest["shared_keys"]}
    messages = set()
    for case, (make, reason, _) in REFUSALS.items():
        bad = make(two_rounds, tmp_path / case)
        with pytest.raises(signing.Refused) as refused:
            fr.check_update(bad, package, client_keys, build_codec("none"), shared, set())
        assert refused.value.reason == reason
        messages.add(str(refused.value).replace(str(bad), "<update>"))
    assert len(messages) == len(REFUSALS)
    with pytest.raises(signing.Refused, match="a second update from photo") as refused:
        fr.check_update(two_rounds["round2"]["photo"], package, client_keys, build_codec("none"), shared, {"photo"})
    assert refused.value.reason == "duplicate"


@pytest.mark.slow
def test_too_few_good_updates_for_min_clients_writes_nothing(two_rounds, tmp_path):
    result_dir = tmp_path / "next"
    with pytest.raises(fr.AggregationRefused, match="0 good update.*min_clients = 1; nothing written") as refused:
        fr.aggregate_round(two_rounds["package"], [unsigned(two_rounds, tmp_path)], two_rounds["keys"]["server"],
                           two_rounds["keys"]["clients_pub"], result_dir)
    assert [r.reason for r in refused.value.refusals] == ["unsigned"]
    assert not result_dir.exists()


@pytest.mark.slow
def test_min_clients_three_and_one_bad_update_refuses_the_round(two_rounds, tmp_path, feature_cache):
    keys = two_rounds["keys"]
    package = fr.export_round(two_rounds["preset"], tmp_path / "p1", keys["server"],
                              two_rounds["overrides"] + ["federation.min_clients=3"])
    updates = []
    for client in CLIENTS:
        fr.train_round(package.path, client, keys["clients"][client], tmp_path / f"u-{client}", keys["server_pub"])
        updates.append(tmp_path / f"u-{client}")
    flip_byte(updates[0] / fr.PAYLOAD_FILE)
    with pytest.raises(fr.AggregationRefused, match="2 good update.*min_clients = 3; nothing written") as refused:
        fr.aggregate_round(package.path, updates, keys["server"], keys["clients_pub"], tmp_path / "p2")
    assert [r.reason for r in refused.value.refusals] == ["tampered"]
    assert not (tmp_path / "p2").exists()


@pytest.mark.slow
def test_a_client_refuses_a_tampered_or_foreign_package(two_rounds, tmp_path):
    keys = two_rounds["keys"]
    package = copy(two_rounds["package"], tmp_path / "package")
    flip_byte(package / fr.GLOBAL_FILE)
    with pytest.raises(signing.Refused, match="global.safetensors does not match") as refused:
        fr.train_round(package, "photo", keys["clients"]["photo"], tmp_path / "u", keys["server_pub"])
    assert refused.value.reason == "tampered"
    signing.generate_keypair(tmp_path / "impostor", "server")
    impostor = signing.load_public_key(tmp_path / "impostor" / "server.pub")
    with pytest.raises(signing.Refused, match="unknown key") as refused:
        fr.train_round(two_rounds["package"], "photo", keys["clients"]["photo"], tmp_path / "u", impostor)
    assert refused.value.reason == "unknown-key"
    assert not (tmp_path / "u").exists()
    with pytest.raises(fr.FileRoundError, match="the package fixes it"):
        fr.train_round(two_rounds["package"], "photo", keys["clients"]["photo"], tmp_path / "u", keys["server_pub"],
                       overrides=["train.lr=1.0"])


# --- what leaves a site --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_an_update_holds_only_adapter_tensors_counts_and_metrics(two_rounds):
    package = fr.open_package(two_rounds["package"], two_rounds["keys"]["server_pub"])
    adapter = package.global_state()
    shared = package.manifest["shared_keys"]
    for client, update in two_rounds["round2"].items():
        assert sorted(p.name for p in update.iterdir()) == ["manifest.json", "manifest.sig", "update.safetensors"]
        tensors = load_file(update / fr.PAYLOAD_FILE)  # codec "none": the delta's tensors as they are
        assert sorted(tensors) == sorted(shared)
        for name, value in tensors.items():
            assert value.shape == adapter[name].shape and value.dtype == adapter[name].dtype
        assert sum(v.numel() for v in tensors.values()) == sum(adapter[k].numel() for k in shared)
        manifest = json.loads((update / "manifest.json").read_text())
        assert set(manifest) <= set(fr.UPDATE_FIELDS) | {"kind", "files", "signer"}
        assert set(manifest["files"]) == {"update.safetensors"}
        for key in ("examples", "steps", "round", "bytes_up"):
            assert isinstance(manifest[key], int)
        assert isinstance(manifest["mean_loss"], float) and isinstance(manifest["seconds"], float)
        assert manifest["client"] == client and manifest["compression"] == "none"
        assert all(isinstance(v, (str, bool)) for k, v in manifest.items()
                   if k in ("run_id", "package", "client", "kind", "compression", "skipped"))


def test_nothing_received_is_unpickled():
    from test_no_pickle import pickle_uses

    for path in (REPO / "engine" / "file_rounds.py", REPO / "engine" / "signing.py", REPO / "fedtui" / "cli_rounds.py"):
        assert pickle_uses(path.read_text(), str(path)) == []
        assert "torch.load" not in path.read_text()


def test_the_file_rounds_modules_import_no_ui_packages():
    code = ("import sys, engine.file_rounds, engine.signing\n"
            "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('textual', 'rich', 'typer'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == ""


# --- the real command line ------------------------------------------------------------------------------------


def fedtui(*args, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "fedtui.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stderr
    return done


@pytest.mark.slow
def test_one_round_through_the_command_line_equals_the_in_process_run(tmp_path, feature_cache):
    preset_path = write_preset(tmp_path, feature_cache)
    overrides = ["run.rounds=1", SHIPPED_CLIP]
    run_dir = in_process(preset_path, overrides)
    sets = [a for o in overrides for a in ("--set", o)]
    for name in ["server", *CLIENTS]:
        fedtui("keys", "--out", "server" if name == "server" else f"site-{name}", "--name", name, cwd=tmp_path)
    (tmp_path / "server" / "clients").mkdir()
    for name in CLIENTS:  # each site hands its public key to the server, and gets the server's
        shutil.copy(tmp_path / f"site-{name}" / f"{name}.pub", tmp_path / "server" / "clients")
        shutil.copy(tmp_path / "server" / "server.pub", tmp_path / f"site-{name}")
    assert fedtui("keys", "--out", "server", "--name", "server", cwd=tmp_path, check=False).returncode == 2

    fedtui("round", "export", preset_path, "--out", "usb/package-r1", "--key", "server/server.key", *sets, cwd=tmp_path)
    for name in CLIENTS:
        done = fedtui("round", "train", "usb/package-r1", "--client", name, "--key", f"site-{name}/{name}.key",
                      "--out", f"usb/update-{name}", cwd=tmp_path)
        assert f"update {name} round 1" in done.stderr
    # A tampered copy among them: refused with its line, the round goes on with the good ones.
    shutil.copytree(tmp_path / "usb" / "update-photo", tmp_path / "usb" / "update-photo-copy")
    flip_byte(tmp_path / "usb" / "update-photo-copy" / fr.PAYLOAD_FILE)
    done = fedtui("round", "aggregate", "--package", "usb/package-r1", "--updates", "usb/update-photo-copy",
                  *[f"usb/update-{n}" for n in CLIENTS], "--key", "server/server.key",
                  "--clients-pub", "server/clients", "--out", "usb/final", cwd=tmp_path)
    assert "refused: update usb/update-photo-copy: update.safetensors does not match its SHA-256" in done.stderr
    assert "aggregated 3 update(s)" in done.stderr and "final model" in done.stderr

    final = load_file(tmp_path / "usb" / "final" / fr.GLOBAL_FILE)
    difference = max_abs_difference(final, load_file(run_dir / "checkpoints" / "last.safetensors"))
    print(f"\nmax |command line - in-process| over the final adapter: {difference:.3g}")
    assert difference <= 1e-6

    # Exit 2 with one line each: an update alone and unsigned; a package checked with another server's key.
    (tmp_path / "usb" / "update-photo-copy" / "manifest.sig").unlink()
    done = fedtui("round", "aggregate", "--package", "usb/package-r1", "--updates", "usb/update-photo-copy",
                  "--key", "server/server.key", "--clients-pub", "server/clients", "--out", "usb/nope",
                  cwd=tmp_path, check=False)
    assert done.returncode == 2 and not (tmp_path / "usb" / "nope").exists()
    assert "refused: update usb/update-photo-copy: unsigned (no manifest.sig)" in done.stderr
    assert "0 good update(s)" in done.stderr
    fedtui("keys", "--out", "other", "--name", "server", cwd=tmp_path)
    done = fedtui("round", "train", "usb/package-r1", "--client", "photo", "--key", "site-photo/photo.key",
                  "--server-pub", "other/server.pub", "--out", "usb/nope", cwd=tmp_path, check=False)
    assert done.returncode == 2 and "refused: package usb/package-r1: signed by an unknown key" in done.stderr
