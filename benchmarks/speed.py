"""How fast a round is against what it could be, and how fast a run starts (issue #12).

    .venv/bin/python benchmarks/speed.py            # everything, ~1-2 minutes on 2 cores
    .venv/bin/python benchmarks/speed.py --quick    # fewer repeats

Prints, in one run:

1. Round time at K = 4, 16 and 64 clients (quickstart's shape: d = 128 features, 7 classes, 168 training rows a
   client, batches of 32, E = 1, FedCLIP's Adam; AttAI and CLIP-Adapter by default, --kinds) for the engine's own round (``Federation.play_round`` plus
   its evaluation) against
   - a plain sequential PyTorch loop doing the same rounds (each client: load the global adapter, a fresh
     ``torch.optim.Adam``, its shuffled batches one after another; then the mean), and
   - the compute floor: the adapter's matmul FLOPs for the round (counted by ``torch.utils.flop_counter`` on
     one client's step) at the matmul rate measured here on the round's own shapes.
   Times are CPU seconds of this process (``time.process_time``), one thread as a run uses on this machine, the
   best of several repeats: on a shared machine wall time measures the neighbours.
2. The batched-vs-sequential crossover of local training alone, K = 1 .. 64 (``engine.batched.MIN_COHORT``).
3. Cold and warm start of ``fedtui run presets/quickstart.toml`` (fresh feature cache, then warm) against
   ``python -c "import torch"``, wall seconds (medians of runs alternated with it, and the best), and the warm
   run's peak memory (ru_maxrss, the highest of the runs).

Targets (issue #12): warm quickstart <= 1.5x ``import torch``; warm peak <= 600 MB; round at K = 64 <= 3x the
floor and >= 5x faster than the plain loop. The script reports; it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

D, CLASSES, ROWS, BATCH = 128, 7, 168, 32


def best(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.process_time()
        fn()
        times.append(time.process_time() - started)
    return min(times)


# --- 1. rounds -------------------------------------------------------------------------------------------------


def world(k: int, kind: str = "attai"):
    """A PreparedRun of k clients on random features (no model, no images) and the quickstart preset's settings."""
    from engine.backbone import CachedBackbone, ModelRecord
    from engine.data import ClientSplit
    from engine.prepare import PreparedRun
    from engine.presets import load_preset

    generator = torch.Generator().manual_seed(0)
    per_client = ROWS + 56 + 56
    n = k * per_client + 280
    features = torch.randn(n, D, generator=generator)
    labels = torch.randint(0, CLASSES, (n,), generator=generator)
    clients = []
    for i in range(k):
        rows = np.arange(i * per_client, (i + 1) * per_client)
        clients.append(ClientSplit(f"client-{i:02d}", "mixed", rows[:ROWS], rows[ROWS : ROWS + 56], rows[ROWS + 56 :]))
    record = ModelRecord("benchmark", "benchmark", "benchmark", 100.0, 0, "random")

    def no_model():
        raise RuntimeError("the benchmark has no model")

    data = PreparedRun(
        backbone=CachedBackbone(record, torch.device("cpu"), no_model), source=None, classes=list("abcdefg"),
        prompts=list("abcdefg"), text_features=torch.randn(CLASSES, D, generator=generator), features=features,
        labels=labels, domains=["mixed", "held"], row_domains=np.array(["mixed"] * n), clients=clients,
        holdout={"held": np.arange(k * per_client, n)}, encoded=0, cached=n, encode_seconds=0.0,
        data_fingerprint="benchmark",
    )
    preset = load_preset(ROOT / "presets" / "quickstart.toml", ["eval.wise_alphas=[]", f"adapter.kind={kind}"])
    return preset, data


def federation(k: int, mode: str, kind: str = "attai"):
    from engine.adapters import AdapterContext, build_adapter
    from engine.control import RunControl
    from engine.federation import Federation
    from engine.strategies import build_strategy

    preset, data = world(k, kind)
    torch.manual_seed(preset.run.seed)
    context = AdapterContext(D, data.classes, data.prompts, data.text_features, 100.0)
    adapter = build_adapter(preset.adapter.kind, context, preset.adapter.kind_options)
    strategy = build_strategy(preset.federation.aggregation, preset.federation.aggregation_options)
    fed = Federation(preset, data, adapter, strategy, preset.train.local_epochs, torch.device("cpu"),
                     lambda event: None, RunControl(), lambda name, state: None)
    fed.local_training = mode
    return fed


def engine_rounds(k: int, rounds: int, kind: str, mode: str = "auto", parts: list | None = None):
    """The engine's own rounds; each call appends to ``parts``, if given, its CPU seconds per round of
    ``play_round`` (local training, upload, aggregation) and of ``evaluate``."""
    fed = federation(k, mode, kind)
    state = {"round": 0}

    def play():
        train = evaluate = 0.0
        for _ in range(rounds):
            state["round"] += 1
            started = time.process_time()
            outcome = fed.play_round(state["round"])
            middle = time.process_time()
            fed.evaluate(state["round"], outcome)
            train, evaluate = train + middle - started, evaluate + time.process_time() - middle
        if parts is not None:
            parts.append((train / rounds, evaluate / rounds))

    return play


def plain_rounds(k: int, rounds: int, kind: str):
    """The same rounds as a plain PyTorch loop: sequential clients, torch Adam, a uniform mean, evaluation."""
    from engine.losses import LOSSES

    fed = federation(k, "sequential", kind)
    adapter, train, data = fed.adapter, fed.preset.train, fed.data
    global_state = {n: v.clone() for n, v in adapter.trainable_state().items()}
    loss_fn = LOSSES[train.loss]  # the preset's loss, as the engine trains with
    generators = [torch.Generator().manual_seed(i) for i in range(k)]

    def play():
        nonlocal global_state
        for _ in range(rounds):
            states = []
            for i, client in enumerate(data.clients):
                adapter.load_trainable_state(global_state)
                optimizer = torch.optim.Adam([p for p in adapter.parameters() if p.requires_grad], lr=train.lr,
                                             betas=tuple(train.betas), eps=train.eps, weight_decay=train.weight_decay)
                order = client.train[torch.randperm(len(client.train), generator=generators[i]).numpy()]
                for start in range(0, len(order), BATCH):
                    chunk = order[start : start + BATCH]
                    if len(chunk) < 2:
                        continue
                    loss = loss_fn(adapter(data.features[chunk]), data.labels[chunk], 100.0)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    float(loss.detach())
                states.append(adapter.trainable_state())
            global_state = {n: torch.stack([s[n] for s in states]).mean(0) for n in global_state}
            adapter.load_trainable_state(global_state)
            with torch.no_grad():
                for client in data.clients:
                    for rows in (client.train, client.val, client.test):
                        adapter(data.features[rows]).logits(100.0).argmax(1)
                for rows in data.holdout.values():
                    adapter(data.features[rows]).logits(100.0).argmax(1)

    return play


def step_flops(kind: str) -> int:
    """Matmul FLOPs of one client's training step (forward and backward, batch of 32)."""
    from torch.utils.flop_counter import FlopCounterMode

    from engine.losses import LOSSES

    fed = federation(1, "sequential", kind)
    rows = fed.data.clients[0].train[:BATCH]
    with FlopCounterMode(display=False) as counter:
        loss = LOSSES[fed.preset.train.loss](fed.adapter(fed.data.features[rows]), fed.data.labels[rows], 100.0)
        loss.backward()
    return counter.get_total_flops()


def eval_flops(k: int, kind: str) -> int:
    """Matmul FLOPs of one round's evaluation: every client's train/val/test rows and the held-out rows, once."""
    from torch.utils.flop_counter import FlopCounterMode

    fed = federation(1, "sequential", kind)
    rows = np.arange(100)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fed.adapter(fed.data.features[rows]).logits(100.0)
    return counter.get_total_flops() * (k * (ROWS + 112) + 280) // 100


def matmul_rate(k: int) -> float:
    """FLOP/s of the round's own matmul shapes: a client batch through a d x d layer, batched over k clients."""
    x, w = torch.randn(k, BATCH, D), torch.randn(k, D, D)
    g = torch.randn(k, BATCH, D)

    def products():
        for _ in range(10):
            torch.bmm(x, w)
            torch.bmm(x.transpose(1, 2), g)

    seconds = best(products, 5)
    return 10 * 2 * (2 * k * BATCH * D * D) / seconds


def adam_alone(k: int, kind: str, repeats: int) -> float:
    """CPU seconds of a round's Adam steps alone at K = k: ``StackedAdam`` on the stacked parameters with
    stand-in gradients (torch's single-tensor Adam arithmetic, which the engine keeps bit for bit), the best of
    ``repeats``."""
    from engine.batched import StackedAdam

    fed = federation(k, "auto", kind)
    steps = ROWS // BATCH + (1 if ROWS % BATCH > 1 else 0)
    generator = torch.Generator().manual_seed(1)
    trained = {n: p for n, p in fed.adapter.named_parameters() if p.requires_grad}
    grads = [{n: 1e-3 * torch.randn(k, *p.shape, generator=generator) for n, p in trained.items()} for _ in range(steps)]

    def adam():
        optimizer = StackedAdam({n: p.detach().expand(k, *p.shape).clone() for n, p in trained.items()}, fed.preset.train)
        for grad in grads:
            optimizer.step(list(range(k)), grad)

    return best(adam, repeats)


# --- 2. crossover ----------------------------------------------------------------------------------------------


def crossover(repeats: int) -> list[tuple[int, float, float]]:
    from engine.adapters import AdapterContext, build_adapter
    from engine.batched import Job, adam_param_groups, train_cohort
    from engine.presets import TrainSection
    from engine.training import make_optimizer, train_locally

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    context = AdapterContext(D, list("abcdefg"), list("abcdefg"), torch.randn(CLASSES, D, generator=generator), 100.0)
    adapter = build_adapter("attai", context)
    theta = adapter.trainable_state()
    train = TrainSection(batch_size=BATCH)
    groups = adam_param_groups(train, len(theta))
    out = []
    for k in (1, 2, 3, 4, 8, 16, 64):
        features = torch.randn(ROWS * k, D, generator=generator)
        labels = torch.randint(0, CLASSES, (ROWS * k,), generator=generator)
        rows = [np.arange(ROWS * i, ROWS * (i + 1)) for i in range(k)]

        def sequential():
            for i in range(k):
                adapter.load_trainable_state(theta)
                train_locally(adapter, make_optimizer(adapter, train), lambda r: features[r], labels, rows[i], train,
                              1, 100.0, torch.Generator().manual_seed(i))

        def batched():
            jobs = [Job(str(i), theta, rows[i], 1, torch.Generator().manual_seed(i)) for i in range(k)]
            train_cohort(adapter, jobs, lambda r: features[r], labels, train, 100.0, groups)

        out.append((k, best(sequential, repeats), best(batched, repeats)))
    return out


# --- 3. start-up -----------------------------------------------------------------------------------------------


# Runs the command and reports on it from a small, fresh Python: a child's ru_maxrss includes the memory of the
# process that spawned it (Linux records the parent's high-water mark when the child execs), so a child of
# this benchmark, which holds torch and the round tables by then, would report this process's peak, not its own.
_LAUNCHER = """
import json, os, subprocess, sys, time
started = time.perf_counter()
process = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
anonymous = 0  # the child's private memory (RssAnon), sampled every 5 ms: what it allocated, not mapped from disk
while True:
    pid, status, usage = os.wait4(process.pid, os.WNOHANG)
    if pid:
        break
    try:
        with open(f"/proc/{process.pid}/status") as lines:
            anonymous = max([anonymous] + [int(l.split()[1]) // 1024 for l in lines if l.startswith("RssAnon:")])
    except OSError:
        pass
    time.sleep(0.005)
process.returncode = os.waitstatus_to_exitcode(status)
print(json.dumps([time.perf_counter() - started, usage.ru_utime + usage.ru_stime, usage.ru_maxrss // 1024,
                  process.returncode, anonymous]))
"""


def timed_process(args: list[str], env: dict) -> tuple[float, float, int, int, int]:
    """(wall seconds, CPU seconds, peak RSS in MB, exit code, peak anonymous MB sampled) of one child process."""
    import json

    report = subprocess.run([sys.executable, "-c", _LAUNCHER, *args], cwd=ROOT, env=env, capture_output=True,
                            text=True, check=True)
    return tuple(json.loads(report.stdout))


def start_up(repeats: int) -> dict:
    # Bytecode as `make demo` (and pip, for an installed package) leaves it, even under PYTHONDONTWRITEBYTECODE.
    subprocess.run([sys.executable, "-m", "compileall", "-q", "engine", "fedtui"], cwd=ROOT, check=True)
    fedtui = [sys.executable, "-m", "fedtui", "run", "presets/quickstart.toml"]
    with tempfile.TemporaryDirectory() as folder:
        env = {**os.environ, "FEDTUI_CACHE": str(Path(folder) / "cache"), "HF_HUB_OFFLINE": "1"}
        cold = timed_process(fedtui + ["--out", str(Path(folder) / "cold")], env)
        # Alternated, so a slow spell of the machine (its timings drift by 20% from minute to minute) weighs on
        # both sides of the ratio alike.
        torch_only, warm = [], []
        for i in range(repeats):
            torch_only.append(timed_process([sys.executable, "-c", "import torch"], env))
            warm.append(timed_process(fedtui + ["--out", str(Path(folder) / f"warm{i}")], env))
    return {"torch": torch_only, "cold": cold, "warm": warm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kinds", default="attai,clip_adapter", help="adapter kinds for the round table")
    parser.add_argument("--parts", default="rounds,crossover,startup", help="which of the three parts to run")
    args = parser.parse_args()
    repeats = 2 if args.quick else 4
    torch.set_num_threads(1)
    from engine.runner import default_threads

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} thread "
          f"(a run uses {default_threads()} here), load average {os.getloadavg()[0]:.1f}")

    parts = set(args.parts.split(","))
    rate = matmul_rate(64)
    for kind in args.kinds.split(",") if "rounds" in parts else []:
        print(f"\n1. rounds: {kind}, d={D}, {ROWS} rows a client, batch {BATCH}, E=1, {args.rounds} rounds, "
              "CPU time per round (training, upload, aggregation, evaluation)")
        flops_step = step_flops(kind)
        steps = ROWS // BATCH + (1 if ROWS % BATCH > 1 else 0)
        print(f"   {'K':>3} {'engine':>9} {'plain loop':>11} {'floor':>8} {'engine/floor':>13} {'plain/engine':>13}")
        split: dict[int, list[tuple[float, float]]] = {}  # per K, each repeat's (training, evaluation) a round
        for k in (4, 16, 64):
            engine_s = best(engine_rounds(k, args.rounds, kind, parts=split.setdefault(k, [])), repeats) / args.rounds
            plain_s = best(plain_rounds(k, args.rounds, kind), max(1, repeats // 2)) / args.rounds
            floor_s = (flops_step * steps * k + eval_flops(k, kind)) / rate
            print(f"   {k:>3} {engine_s * 1e3:>7.1f}ms {plain_s * 1e3:>9.1f}ms {floor_s * 1e3:>6.1f}ms "
                  f"{engine_s / floor_s:>12.1f}x {plain_s / engine_s:>12.1f}x")
        print(f"   floor: {flops_step / 1e6:.2f} MFLOP a client step (matmuls, forward and backward) "
              f"at {rate / 1e9:.0f} GFLOP/s (batched d x d products measured here)")
        k = 64
        train_s, evaluate_s = min(split[k][1:], key=sum)  # the repeat best() took (the first call warms up)
        adam_s = adam_alone(k, kind, repeats)
        train_floor, eval_floor = flops_step * steps * k / rate, eval_flops(k, kind) / rate
        print(f"   K={k}, where the round goes: local training, upload and aggregation {train_s * 1e3:.1f} ms "
              f"({train_s / train_floor:.1f}x its matmul floor of {train_floor * 1e3:.1f} ms), evaluation "
              f"{evaluate_s * 1e3:.1f} ms ({evaluate_s / eval_floor:.1f}x its floor of "
              f"{eval_floor * 1e3:.1f} ms).\n   The round's Adam steps alone (torch's single-tensor arithmetic, which "
              f"the engine keeps bit for bit) take {adam_s * 1e3:.1f} ms:\n   with the matmuls at the floor "
              f"that is already {(adam_s + train_floor + eval_floor) / (train_floor + eval_floor):.1f}x the "
              "floor before any activation, normalisation, loss or evaluation step")

    if "crossover" in parts:
        print("\n2. local training alone, sequential vs batched (engine.batched), CPU ms for one epoch of every client")
        print(f"   {'K':>3} {'sequential':>11} {'batched':>9} {'speed-up':>9}")
    for k, sequential, batched in crossover(repeats) if "crossover" in parts else []:
        print(f"   {k:>3} {sequential * 1e3:>9.1f}ms {batched * 1e3:>7.1f}ms {sequential / batched:>8.2f}x")

    if "startup" not in parts:
        return
    runs = 4 if args.quick else 9
    print(f"\n3. start-up: fedtui run presets/quickstart.toml; medians of {runs} runs alternated with import torch "
          "(and the best): wall s, CPU s (user + sys), peak RSS")
    timings = start_up(runs)
    median = lambda values: float(np.median(values))
    torch_wall, torch_cpu = median([t[0] for t in timings["torch"]]), median([t[1] for t in timings["torch"]])
    torch_best = min(t[0] for t in timings["torch"])
    rows = [("python -c 'import torch'", timings["torch"]), ("cold (empty cache)", [timings["cold"]]),
            ("warm", timings["warm"])]
    for label, samples in rows:
        wall, cpu, best_wall = median([r[0] for r in samples]), median([r[1] for r in samples]), min(r[0] for r in samples)
        peak, code, anonymous = max(r[2] for r in samples), max(r[3] for r in samples), max(r[4] for r in samples)
        print(f"   {label:<26} {wall:6.2f} s wall ({wall / torch_wall:4.2f}x import torch; best {best_wall:.2f} s, "
              f"{best_wall / torch_best:4.2f}x), {cpu:6.2f} s CPU ({cpu / torch_cpu:4.2f}x), "
              f"peak {peak} MB (anonymous {anonymous} MB), exit {code}")
    print("   peak: ru_maxrss. It counts torch's shared libraries as far as they are mapped in, which depends on how\n"
          "   much of them the page cache holds (import torch alone: 630-880 MB on one machine); anonymous: the\n"
          "   process's own allocations (RssAnon, sampled every 5 ms), which do not.")


if __name__ == "__main__":
    main()
