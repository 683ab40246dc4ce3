"""The field's classic comparisons on the offline world, one table: each row an effect size +- sd over seeds.

    nice -n 10 .venv/bin/python benchmarks/phenomena.py                      # every row, seeds 0,1,2
    nice -n 10 .venv/bin/python benchmarks/phenomena.py --only faulty,wise --seeds 0-4
    nice -n 10 .venv/bin/python benchmarks/phenomena.py --sweep              # the adapter sweep instead

Every run is an ordinary run of ``presets/quickstart.toml`` (the 5-style world: pixel_art and sketch
shifted, art_painting held out; AttAI, CE, lr 5e-3, E = 1, 20 rounds) with a few keys changed, read and
resolved as ``fedtui run`` reads it and run by ``engine.runner.run``. Accuracies are the last round's.
Each effect is a difference between two settings at the same seed (same split, same partition), so the
table gives its mean, sample sd and median over the seeds, and whether it clears its target. A setting
is run once per seed and shared by every row that needs it. "pooled test" is the global model on every
client's test images together (client accuracies weighted by their test sizes, the clients' own
personalised model where personal layers are kept).

Rows (the keys each one changes):
  fed      federated (mean) vs local vs centralised: federation.aggregation on the domain clients (pixel_art's
           test split) and on 6 IID clients (data.partition = "iid", data.clients = 6; pooled test)
  noniid   IID vs Dirichlet(0.1) over 6 clients (data.partition, data.alpha), E = 1 and E = 5: gain of the
           global model over zero-shot on the pooled test
  epochs   E = 1, 5, 20 (train.local_epochs) and one-shot averaging (federation.aggregation = "one_shot")
  fedper   FedPer (federation.personal_layers = ["attention.2"], AttAI's output layer) on Dirichlet(0.1):
           personalised pooled test vs the federated global model (the summary's test vs global_test)
  faulty   one faulty client (federation.faulty = ["client-0"], faulty_mode = "scale", faulty_strength = 20)
           under fedavg, median and trimmed_mean, 6 IID clients: what the faulty client costs each rule
  wise     WiSE-FT (eval.wise_alphas) on the held-out art_painting, clip_adapter (lr 1e-2)
  compress federation.compression none / int8 / topk (topk_fraction 0.1 and 0.01, error feedback): accuracy
           vs bytes up

``--sweep`` prints the adapter sweep instead: adapter.kind x train.lr x train.weight_decay x train.loss on
the quickstart (pixel_art's gain, the clients' mean gain and the held-out change over zero-shot).
The benchmark takes several minutes on 2 cores (the first run also encodes the world once into the
feature cache); it is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import events as ev  # noqa: E402
from engine.presets import load_preset  # noqa: E402
from engine.runner import run  # noqa: E402

PRESET = Path(__file__).resolve().parent.parent / "presets" / "quickstart.toml"
SHIFTED = "pixel_art"
HELD_OUT = "art_painting"
IID6 = ("data.partition=iid", "data.clients=6")
DIR6 = ("data.partition=dirichlet", "data.alpha=0.1", "data.clients=6")
FAULTY = ('federation.faulty=["client-0"]', "federation.faulty_mode=scale", "federation.faulty_strength=20")
WISE = ("adapter.kind=clip_adapter", "train.lr=1e-2", "eval.wise_alphas=[0.0,0.25,0.5,0.75,1.0]")


def parse_seeds(text: str) -> list[int]:
    seeds: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        seeds.extend(range(int(first), int(last or first) + 1))
    return seeds


@dataclass
class Result:
    """What the rows read from one run's summary."""

    clients: dict[str, float]  # client -> last round's test accuracy (%)
    zero_shot: dict[str, float]
    global_test: dict[str, float]  # client -> the global model's test accuracy (personal layers only)
    holdout: dict[str, float]
    zero_shot_holdout: dict[str, float]
    test_sizes: dict[str, int]
    bytes_up: int
    wise: list[dict] = field(default_factory=list)  # the last model's WiSE-FT curve

    def pooled(self, which: str = "test") -> float:
        values = {"test": self.clients, "zero_shot": self.zero_shot, "global": self.global_test or self.clients}[which]
        total = sum(self.test_sizes.values())
        return sum(values[c] * n for c, n in self.test_sizes.items()) / total

    def mean(self) -> float:
        return statistics.mean(self.clients.values())

    def mean_zero_shot(self) -> float:
        return statistics.mean(self.zero_shot.values())


class Runner:
    """Runs (overrides, seed) once and remembers the result; prints one line a run to stderr."""

    def __init__(self, out_dir: Path, extra: list[str]):
        self.out_dir, self.extra = out_dir, extra
        self.done: dict[tuple, Result] = {}
        self.started = time.time()

    def __call__(self, overrides: tuple[str, ...], seed: int) -> Result:
        key = (tuple(overrides), seed)
        if key not in self.done:
            self.done[key] = self._run(list(overrides), seed)
        return self.done[key]

    def _run(self, overrides: list[str], seed: int) -> Result:
        wise = any(o.startswith("eval.wise_alphas") for o in overrides)
        base = [f"run.out_dir={self.out_dir}", f"run.seed={seed}", *([] if wise else ["eval.wise_alphas=[]"])]
        preset = load_preset(PRESET, base + self.extra + overrides)
        started: list[ev.RunStarted] = []
        result = run(preset, lambda e: started.append(e) if isinstance(e, ev.RunStarted) else None)
        summary = result.summary
        if result.status != "completed":
            raise RuntimeError(f"{' '.join(overrides)} seed {seed}: {result.status} ({summary.get('error')})")
        final, zero = summary["final"], summary["zero_shot"]
        out = Result(
            clients={c: 100 * v["test"] for c, v in final["clients"].items()},
            zero_shot={c: 100 * v["test"] for c, v in zero["clients"].items()},
            global_test={c: 100 * v["global_test"] for c, v in final["clients"].items() if "global_test" in v},
            holdout={d: 100 * v for d, v in final["holdout"].items()},
            zero_shot_holdout={d: 100 * v for d, v in zero["holdout"].items()},
            test_sizes={c["client"]: c["test"] for c in started[0].clients},
            bytes_up=summary["communication"]["bytes_up"],
            wise=[w for w in summary.get("wise_ft") or [] if w.get("model", "last") == "last"],
        )
        print(f"  [{time.time() - self.started:5.0f} s] seed {seed} {' '.join(overrides) or '(quickstart)'}", file=sys.stderr)
        return out


@dataclass
class Row:
    group: str
    name: str
    metric: str
    effect: Callable[[Runner, int], float]  # the paired difference at one seed
    target: str = ""
    check: Callable[[list[float]], bool] | None = None
    detail: Callable[[Runner, list[int]], str] | None = None


def separated(values: list[float]) -> bool:
    """|mean| > 2 sd of the paired difference."""
    return abs(statistics.mean(values)) > 2 * statistics.stdev(values)


def median_at_least(bound: float) -> Callable[[list[float]], bool]:
    return lambda values: statistics.median(values) >= bound


def median_at_most(bound: float) -> Callable[[list[float]], bool]:
    return lambda values: statistics.median(values) <= bound


def mean_over(seeds, fn) -> str:
    values = [fn(s) for s in seeds]
    return f"{statistics.mean(values):.1f}"


def rows() -> list[Row]:
    fed, local, central = (), ("federation.aggregation=local",), ("federation.aggregation=centralised",)
    pix = lambda r: r.clients[SHIFTED]  # noqa: E731
    out = [
        Row("fed", "federated - zero-shot", f"{SHIFTED} test", lambda R, s: pix(R(fed, s)) - R(fed, s).zero_shot[SHIFTED],
            ">= +15 pp", median_at_least(15.0),
            lambda R, ss: f"zero-shot {mean_over(ss, lambda s: R(fed, s).zero_shot[SHIFTED])}, federated "
            f"{mean_over(ss, lambda s: pix(R(fed, s)))}, centralised {mean_over(ss, lambda s: pix(R(central, s)))}, "
            f"local {mean_over(ss, lambda s: pix(R(local, s)))}"),
        Row("fed", "centralised - federated", f"{SHIFTED} test", lambda R, s: pix(R(central, s)) - pix(R(fed, s)),
            "|d| > 2 sd", separated),
        Row("fed", "local - federated", f"{SHIFTED} test", lambda R, s: pix(R(local, s)) - pix(R(fed, s)),
            "|d| > 2 sd", separated),
        Row("fed", "local - centralised", f"{SHIFTED} test", lambda R, s: pix(R(local, s)) - pix(R(central, s)),
            "|d| > 2 sd", separated),
        Row("fed", "federated - local, 6 IID clients", "pooled test",
            lambda R, s: R(IID6, s).pooled() - R(IID6 + local, s).pooled(), "|d| > 2 sd", separated,
            lambda R, ss: f"zero-shot {mean_over(ss, lambda s: R(IID6, s).pooled('zero_shot'))}, federated "
            f"{mean_over(ss, lambda s: R(IID6, s).pooled())}, centralised {mean_over(ss, lambda s: R(IID6 + central, s).pooled())}, "
            f"local {mean_over(ss, lambda s: R(IID6 + local, s).pooled())}"),
        Row("fed", "centralised - federated, 6 IID clients", "pooled test",
            lambda R, s: R(IID6 + central, s).pooled() - R(IID6, s).pooled()),
    ]
    for epochs in (1, 5):
        e = (f"train.local_epochs={epochs}",)
        gain = lambda r: r.pooled() - r.pooled("zero_shot")  # noqa: E731
        out.append(Row(
            "noniid", f"IID - Dirichlet(0.1), E = {epochs}", "pooled test gain over zero-shot",
            lambda R, s, e=e, gain=gain: gain(R(IID6 + e, s)) - gain(R(DIR6 + e, s)), "|d| > 2 sd", separated,
            lambda R, ss, e=e, gain=gain: f"gain IID {mean_over(ss, lambda s: gain(R(IID6 + e, s))):s}, "
            f"Dirichlet {mean_over(ss, lambda s: gain(R(DIR6 + e, s)))}"))
    e1 = ()
    for label, setting in (("E = 5", ("train.local_epochs=5",)), ("E = 20", ("train.local_epochs=20",)),
                           ("one-shot (20 epochs, one average)", ("federation.aggregation=one_shot",))):
        out.append(Row(
            "epochs", f"{label} - E = 1", f"{SHIFTED} test", lambda R, s, setting=setting: pix(R(setting, s)) - pix(R(e1, s)),
            detail=lambda R, ss, setting=setting: f"mean client test {mean_over(ss, lambda s: R(setting, s).mean())} vs "
            f"{mean_over(ss, lambda s: R(e1, s).mean())}"))
    fedper = DIR6 + ('federation.personal_layers=["attention.2"]',)
    out += [
        Row("fedper", "FedPer - federated global, Dirichlet(0.1)", "pooled test",
            lambda R, s: R(fedper, s).pooled() - R(DIR6, s).pooled(), ">= +5 pp", median_at_least(5.0),
            lambda R, ss: f"FedPer {mean_over(ss, lambda s: R(fedper, s).pooled())}, plain federated "
            f"{mean_over(ss, lambda s: R(DIR6, s).pooled())}"),
        Row("fedper", "FedPer: personal - its global model", "pooled test (test - global_test)",
            lambda R, s: R(fedper, s).pooled() - R(fedper, s).pooled("global"), ">= +5 pp", median_at_least(5.0)),
    ]
    for rule, bound, check in (("fedavg", ">= 5 pp lost", median_at_least(5.0)), ("median", "<= 1 pp lost", median_at_most(1.0)),
                               ("trimmed_mean", "<= 1 pp lost", median_at_most(1.0))):
        clean = IID6 + (f"federation.aggregation={rule}",)
        out.append(Row(
            "faulty", f"{rule}: clean - one faulty client (x20)", "pooled test",
            lambda R, s, clean=clean: R(clean, s).pooled() - R(clean + FAULTY, s).pooled(), bound, check,
            lambda R, ss, clean=clean: f"clean {mean_over(ss, lambda s: R(clean, s).pooled())}, with the faulty client "
            f"{mean_over(ss, lambda s: R(clean + FAULTY, s).pooled())}"))

    def wise_at(result: Result, alpha: float) -> float:
        return next(100 * w["holdout"][HELD_OUT] for w in result.wise if abs(w["alpha"] - alpha) < 1e-9)

    def wise_curve(R, ss) -> str:
        alphas = [w["alpha"] for w in R(WISE, ss[0]).wise]
        return "curve " + ", ".join(f"a={a:g}: {mean_over(ss, lambda s, a=a: wise_at(R(WISE, s), a))}" for a in alphas)

    out += [
        Row("wise", "WiSE-FT a = 0.5 - best of a = 0 and 1", f"held-out {HELD_OUT}",
            lambda R, s: wise_at(R(WISE, s), 0.5) - max(wise_at(R(WISE, s), 0.0), wise_at(R(WISE, s), 1.0)),
            "> 0", lambda v: statistics.median(v) > 0, wise_curve),
        Row("wise", "WiSE-FT best 0 < a < 1 - best end", f"held-out {HELD_OUT}",
            lambda R, s: max(wise_at(R(WISE, s), a) for a in (0.25, 0.5, 0.75))
            - max(wise_at(R(WISE, s), 0.0), wise_at(R(WISE, s), 1.0)),
            "> 0", lambda v: statistics.median(v) > 0),
    ]
    for codec, label in (("int8", "int8"), ("topk_fraction=0.1", "topk 10%"), ("topk_fraction=0.01", "topk 1%")):
        setting = ("federation.compression=topk", f"federation.{codec}") if codec.startswith("topk") else ("federation.compression=int8",)
        out.append(Row(
            "compress", f"{label} - none", f"{SHIFTED} test", lambda R, s, setting=setting: pix(R(setting, s)) - pix(R((), s)),
            detail=lambda R, ss, setting=setting: f"bytes up {R(setting, ss[0]).bytes_up / 1e6:.2f} MB vs "
            f"{R((), ss[0]).bytes_up / 1e6:.2f} MB ({R((), ss[0]).bytes_up / R(setting, ss[0]).bytes_up:.1f}x less); mean "
            f"client test {mean_over(ss, lambda s: R(setting, s).mean())} vs {mean_over(ss, lambda s: R((), s).mean())}"))
    return out


def phenomena(runner: Runner, seeds: list[int], only: set[str] | None) -> None:
    table = [r for r in rows() if only is None or r.group in only]
    lines = []
    for row in table:
        values = [row.effect(runner, s) for s in seeds]
        mean, sd, median = statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0, statistics.median(values)
        verdict = "" if row.check is None else ("met" if row.check(values) else "NOT met")
        detail = row.detail(runner, seeds) if row.detail else ""
        lines.append(f"| {row.name} | {row.metric} | {mean:+.1f} ± {sd:.1f} | {median:+.1f} | {row.target} {verdict} | {detail} |")
    print(f"presets/quickstart.toml with the keys each row names; seeds {','.join(map(str, seeds))}; "
          f"accuracy in %, effects in percentage points (paired by seed)\n")
    print("| comparison | measured on | effect: mean ± sd | median | target | detail (means) |")
    print("|---|---|---|---|---|---|")
    print("\n".join(lines))


SWEEP_AXES = {
    "adapter.kind": ["attai", "clip_adapter", "linear_head"],
    "train.lr": ["1e-3", "1e-2"],
    "train.weight_decay": ["0", "0.2"],
    "train.loss": ["ce", "contrastive"],
}


def sweep(runner: Runner, seeds: list[int], extra_lrs: list[str]) -> None:
    axes = dict(SWEEP_AXES, **{"train.lr": SWEEP_AXES["train.lr"] + extra_lrs})
    print(f"presets/quickstart.toml, one run per setting and seed ({','.join(map(str, seeds))}); last round; "
          f"gains over zero-shot in pp, mean ± sd\n")
    print("| adapter | lr | weight decay | loss | pixel_art gain | mean client gain | held-out change |")
    print("|---|---|---|---|---|---|---|")
    for values in itertools.product(*axes.values()):
        setting = tuple(f"{k}={v}" for k, v in zip(axes, values))
        results = [runner(setting, s) for s in seeds]
        cells = []
        for fn in (lambda r: r.clients[SHIFTED] - r.zero_shot[SHIFTED], lambda r: r.mean() - r.mean_zero_shot(),
                   lambda r: r.holdout[HELD_OUT] - r.zero_shot_holdout[HELD_OUT]):
            v = [fn(r) for r in results]
            cells.append(f"{statistics.mean(v):+.1f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.1f}")
        print(f"| {' | '.join(values)} | {' | '.join(cells)} |", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0-2", help="e.g. 0-2 or 0,3,7 (at least 2 for an sd)")
    parser.add_argument("--only", default="", help="comma-separated row groups: fed,noniid,epochs,fedper,faulty,wise,compress")
    parser.add_argument("--sweep", action="store_true", help="print the adapter sweep table instead")
    parser.add_argument("--extra-lr", default="", help="--sweep: more learning rates, comma-separated")
    parser.add_argument("--set", dest="extra", action="append", default=[], help="a key for every run, e.g. run.threads=2")
    parser.add_argument("--out", default="", help="keep the run directories here (default: a temporary folder)")
    args = parser.parse_args(argv)
    seeds = parse_seeds(args.seeds)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="fedtui-phenomena-") as scratch:
        runner = Runner(Path(args.out or scratch), args.extra)
        if args.sweep:
            sweep(runner, seeds, [v for v in args.extra_lr.split(",") if v])
        else:
            phenomena(runner, seeds, {g for g in args.only.split(",") if g} or None)
    print(f"\n{len(runner.done)} runs, {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
