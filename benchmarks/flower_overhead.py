"""What Flower's deployment runtime costs against the in-process run, on loopback: time per round, and the
bytes on the wire against the bytes the run counts.

    .venv/bin/python benchmarks/flower_overhead.py [--clients 2 4 8] [--rounds 3] [--insecure] [--json out.json]

For each K: the same preset (the synthetic world, the shipped small CLIP, an iid split into K clients,
art_painting held out) runs once in-process (``engine.runner.run``) and once through ``fedtui flower local``'s
machinery (``engine.flower.local.run_local``: a SuperLink, K SuperNodes, TLS and SuperNode authentication
unless --insecure). The SuperNodes reach the SuperLink through a relay in this process that counts every
byte each way (TLS records, HTTP, Flower's polling and heartbeats: the Fleet API traffic a network between
the machines would carry; the ServerApp's own link to the SuperLink, on the server machine, is not counted).

Printed per K: seconds per round (the rounds' RoundFinished.seconds: train + exchange + aggregate + evaluate,
and the wall time between round starts), the overhead per round, the time from launch to round 1, the bytes
the run counts (ClientFinished bytes_up / bytes_down: the codec's payloads and the shared adapter) and the
bytes the relay saw. A fresh feature cache is filled once, before anything is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from engine import events as ev  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PRESET = """
[run]
name = "flower-overhead"
seed = 0
rounds = {rounds}
out_dir = "{out}"
cache_dir = "{cache}"

[data]
dataset = "synthetic"
images_per_class = 12
holdout = ["art_painting"]
partition = "iid"
clients = {clients}

[model]
arch = "fedtui-clip-tiny"
pretrained = "local-dir:{clip}"

[train]
batch_size = 8
lr = 1e-3
"""


class Relay:
    """A TCP relay on loopback that counts the bytes in each direction (client -> server is "up")."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.up = self.down = 0
        self.connections = 0
        self.lock = threading.Lock()
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ, None)
        self.running = True
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def counts(self) -> tuple[int, int]:
        with self.lock:
            return self.up, self.down

    def loop(self) -> None:
        while self.running:
            for key, _ in self.selector.select(timeout=0.2):
                if key.data is None:
                    client, _ = self.listener.accept()
                    try:
                        server = socket.create_connection(self.target)
                    except OSError:
                        client.close()
                        continue
                    self.connections += 1
                    self.selector.register(client, selectors.EVENT_READ, (server, "up"))
                    self.selector.register(server, selectors.EVENT_READ, (client, "down"))
                    continue
                source, (sink, direction) = key.fileobj, key.data
                try:
                    data = source.recv(1 << 16)
                except OSError:
                    data = b""
                if not data:
                    for sock in (source, sink):
                        try:
                            self.selector.unregister(sock)
                        except (KeyError, ValueError):
                            pass
                        sock.close()
                    continue
                try:
                    sink.sendall(data)
                except OSError:
                    continue
                with self.lock:
                    if direction == "up":
                        self.up += len(data)
                    else:
                        self.down += len(data)

    def close(self) -> None:
        self.running = False
        self.thread.join(timeout=2)
        self.listener.close()


def round_times(events: list) -> dict:
    finished = [e for e in events if isinstance(e, ev.RoundFinished) and e.round > 0]
    started = [e.time for e in events if isinstance(e, ev.RoundStarted)]
    gaps = [b - a for a, b in zip(started, started[1:])]
    return {
        "round_seconds": statistics.mean(e.seconds for e in finished),
        "between_round_starts": statistics.mean(gaps) if gaps else None,
        "counted_up": sum(e.bytes_up for e in events if isinstance(e, ev.ClientFinished)),
        "counted_down": sum(e.bytes_down for e in events if isinstance(e, ev.ClientFinished)),
    }


def measure(clients: int, rounds: int, tls: bool, work: Path, cache: Path) -> dict:
    from engine.flower.local import run_local
    from engine.presets import load_preset
    from engine.runner import run

    folder = work / f"k{clients}"
    folder.mkdir(parents=True, exist_ok=True)
    preset_path = folder / "preset.toml"
    preset_path.write_text(PRESET.format(rounds=rounds, out=folder / "runs", cache=cache, clients=clients,
                                         clip=REPO / "engine" / "assets" / "fedtui-clip-tiny"))
    in_events: list = []
    began = time.perf_counter()
    result = run(load_preset(preset_path), in_events.append)
    in_wall = time.perf_counter() - began
    assert result.status == "completed", result.summary
    local = round_times(in_events)

    relays: list[Relay] = []
    fl_events: list = []
    marks: dict[str, tuple[int, int]] = {}

    def through_relay(port: int) -> str:
        relays.append(Relay(port))
        return f"127.0.0.1:{relays[-1].port}"

    def sink(event) -> None:
        fl_events.append(event)
        if isinstance(event, ev.RoundStarted) and event.round == 1:
            marks["round1"] = relays[0].counts()
        if isinstance(event, ev.RoundFinished) and event.round == rounds:
            marks["last"] = relays[0].counts()

    began, launched = time.perf_counter(), time.time()
    flower = run_local(preset_path, [], clients, folder / "flower-run", tls=tls, auth=tls, wait_s=300,
                       timeout_s=600, sink=sink, fleet_address=through_relay)
    fl_wall = time.perf_counter() - began
    relay = relays[0]
    total_up, total_down = relay.counts()
    relay.close()
    assert flower.status == "completed", flower.summary
    remote = round_times(fl_events)
    first = next(e.time for e in fl_events if isinstance(e, ev.RoundStarted))
    up0, down0 = marks.get("round1", (0, 0))
    up1, down1 = marks.get("last", (total_up, total_down))
    return {
        "clients": clients, "rounds": rounds, "tls": tls,
        "in_process": {**local, "wall": in_wall},
        "flower": {**remote, "wall": fl_wall, "launch_to_round_1": first - launched,
                   "timings": flower.timings},
        "overhead_per_round": remote["round_seconds"] - local["round_seconds"],
        "wire": {"up_total": total_up, "down_total": total_down, "up_rounds": up1 - up0, "down_rounds": down1 - down0,
                 "connections": relay.connections},
    }


def kib(n: float) -> str:
    return f"{n / 1024:,.1f} KiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--insecure", action="store_true", help="plain HTTP, no SuperNode authentication")
    parser.add_argument("--json", type=Path, help="write the measurements here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="flower-overhead-") as tmp:
        work, cache = Path(tmp), Path(tmp) / "cache"
        for clients in args.clients:
            row = measure(clients, args.rounds, not args.insecure, work, cache)
            rows.append(row)
            local, remote, wire = row["in_process"], row["flower"], row["wire"]
            print(f"K={clients} ({'TLS + node auth' if row['tls'] else 'plain HTTP'}), {args.rounds} rounds:")
            print(f"  seconds per round   in-process {local['round_seconds']:.3f}   Flower {remote['round_seconds']:.2f}"
                  f"   overhead {row['overhead_per_round']:.2f}   (Flower, between round starts: "
                  f"{remote['between_round_starts']:.2f})")
            print(f"  wall                in-process {local['wall']:.1f} s   Flower {remote['wall']:.1f} s "
                  f"(launch to round 1: {remote['launch_to_round_1']:.1f} s)")
            print(f"  bytes the run counts  up {kib(remote['counted_up'])}   down {kib(remote['counted_down'])}"
                  f"   (in-process: up {kib(local['counted_up'])}, down {kib(local['counted_down'])})")
            print(f"  bytes on the wire     rounds: up {kib(wire['up_rounds'])}   down {kib(wire['down_rounds'])};"
                  f"   whole run: up {kib(wire['up_total'])}   down {kib(wire['down_total'])}"
                  f"   ({wire['connections']} connections)")
            print(f"  wire / counted (rounds)  up {wire['up_rounds'] / max(remote['counted_up'], 1):.2f}x   "
                  f"down {wire['down_rounds'] / max(remote['counted_down'], 1):.2f}x", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
