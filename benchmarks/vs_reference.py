"""fedtui against the FedCLIP reference code on the same images, weights and settings: whole-run wall time
and the per-round accuracies side by side (issue #12: "a whole 20-round run at least 50x faster").

    .venv/bin/python benchmarks/vs_reference.py --reference /path/to/PersonalizedFL
    .venv/bin/python benchmarks/vs_reference.py --reference ... --rounds 3 --images-per-class 30   # quick

The reference is microsoft/PersonalizedFL's ``fedclip/methods/fed_at_clip.py``, run as it is, from a
checkout you give (nothing of it is copied here). What this script supplies around it:

- the data: the offline world's four PACS-shaped styles written once as PNG files,
  ``<work>/pacs/<domain>/<class>/<index:04d>.png``; fedtui reads the very same files (``dataset =
  "imagefolder"``), so both sort them alike and cut the same 60/20/20 split with the same seed;
- the model: a stand-in for OpenAI's ``clip`` package (``load``, ``tokenize``) that returns the shipped small
  CLIP through fedtui's own loader (open_clip, ``local-dir:``), so both use the same weights, preprocessing
  and tokenizer;
- the device: the reference's helpers default to ``device='cuda'``; on a machine without CUDA those
  defaults are set to the CPU before its main runs. Nothing else of it is changed.

Both run in fresh processes on one thread (the reference with ``torch.set_num_threads(1)``, fedtui with
``run.threads = 1``), the reference's settings: AttAI, lr 5e-5, betas (0.9, 0.98), eps 1e-6, weight decay
0.2, the symmetric contrastive loss, batches of 32, E = 1, a uniform mean over the three client styles,
art_painting held out, evaluation every round. fedtui is timed twice: with an empty feature cache (it
encodes every image once) and warm (the usual case for a second run of a preset). Wall seconds of each
process, start to exit, imports included.

The accuracies are printed side by side, not asserted: the adapter's random initialisation and each
client's batch order come from torch's global random stream in the reference and from per-run and
per-client streams in fedtui, so the two runs start from different (near zero-shot) adapters and see the
same images in another order; at this learning rate they stay within a few test images of each other.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY_CLIP = ROOT / "engine" / "assets" / "fedtui-clip-tiny"
DOMAINS = ("art_painting", "cartoon", "photo", "sketch")  # the reference's PACS order; test_envs = [0]

CLIP_STAND_IN = '''\
"""OpenAI's clip package as FedCLIP's reference code calls it, answered with fedtui's shipped small CLIP."""
import os
import torch

_MODEL = os.environ["FEDTUI_REFERENCE_MODEL"]


def _backbone():
    import sys
    sys.path.insert(0, os.environ["FEDTUI_ROOT"])
    from engine.backbone import load_backbone
    from engine.presets import read_preset
    preset = read_preset(os.environ["FEDTUI_REFERENCE_PRESET"])
    return load_backbone(preset, torch.device("cpu"))


def load(name, device="cpu", jit=False):
    backbone = _backbone()
    return backbone.model.to(device), backbone.preprocess


def tokenize(texts):
    return _backbone_tokenizer()(texts if isinstance(texts, list) else [texts])


_TOKENIZER = None


def _backbone_tokenizer():
    global _TOKENIZER
    if _TOKENIZER is None:
        import open_clip
        _TOKENIZER = open_clip.get_tokenizer("local-dir:" + _MODEL)
    return _TOKENIZER
'''

REFERENCE_MAIN = '''\
import runpy, sys, torch
torch.set_num_threads(1)
fedclip = sys.argv[1]
sys.path.insert(0, fedclip)
import utils.clip_util as clu
import nets.models as models
if not torch.cuda.is_available():  # the helpers default to device='cuda'; everything else is as written
    clu.get_text_features_list.__defaults__ = ("cpu", False)
    clu.get_image_features.__defaults__ = ("cpu", False)
    models.ClipModelat.__init__.__defaults__ = ("Vit-B/32", "cpu", None, True, True)
sys.argv = [fedclip + "/methods/fed_at_clip.py"] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def write_world(root: Path, images_per_class: int, size: int) -> None:
    from engine import synthetic

    for domain in DOMAINS:
        for name in synthetic.CLASSES:
            folder = root / domain / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(images_per_class):
                synthetic.render(domain, name, index, 0, size).save(folder / f"{index:04d}.png")


def fedtui_preset(path: Path, data_root: Path, rounds: int) -> None:
    path.write_text(textwrap.dedent(f"""\
        [run]
        name = "vs-reference"
        seed = 0
        rounds = {rounds}
        threads = 1
        out_dir = "{path.parent / 'runs'}"

        [data]
        dataset = "imagefolder"
        root = "{data_root}"
        domains = {json.dumps(list(DOMAINS))}
        holdout = ["art_painting"]
        split = [0.6, 0.2, 0.2]
        partition = "domain"
        prompt_template = "a picture of a {{}}"

        [model]
        arch = "fedtui-clip-tiny"
        pretrained = "local-dir:{TINY_CLIP}"

        [adapter]
        kind = "attai"

        [train]
        local_epochs = 1
        batch_size = 32
        lr = 5e-5
        betas = [0.9, 0.98]
        eps = 1e-6
        weight_decay = 0.2
        loss = "contrastive"

        [federation]
        aggregation = "mean"

        [eval]
        every = 1
        selection = "best-val"
        wise_alphas = []
        """))


def timed(command: list[str], env: dict[str, str], cwd: Path) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{' '.join(command[:3])}... failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def reference_accuracies(stdout: str) -> list[dict[int, float]]:
    """Per round: {site: test accuracy} from the reference's own printout."""
    rounds: list[dict[int, float]] = []
    for line in stdout.splitlines():
        if line.startswith("============ Train epoch"):
            rounds.append({})
        match = re.match(r"\s*Test site-(\d+)\| Test Acc: ([0-9.]+)", line)
        if match and rounds:
            rounds[-1][int(match.group(1))] = float(match.group(2))
    return rounds


def fedtui_accuracies(run_dir: Path) -> list[dict[int, float]]:
    rounds = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event.get("event") == "RoundFinished" and event["round"] >= 1:
            sites = {DOMAINS.index(name): acc["test"] for name, acc in event["client_accuracy"].items()}
            sites[0] = event["holdout_accuracy"]["art_painting"]
            rounds.append(sites)
    return rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=Path, required=True,
                        help="a checkout of microsoft/PersonalizedFL (or its fedclip/ folder)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--images-per-class", type=int, default=150, help="as the quickstart world (1,050 a style)")
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()
    fedclip = args.reference / "fedclip" if (args.reference / "fedclip").is_dir() else args.reference
    if not (fedclip / "methods" / "fed_at_clip.py").is_file():
        sys.exit(f"{fedclip}: no methods/fed_at_clip.py; give a checkout of microsoft/PersonalizedFL")

    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory(prefix="fedtui-vs-reference-") as scratch:
        work = Path(scratch)
        data_root = work / "pacs"
        started = time.perf_counter()
        write_world(data_root, args.images_per_class, args.image_size)
        print(f"world: {len(DOMAINS)} styles x 7 classes x {args.images_per_class} PNGs in "
              f"{time.perf_counter() - started:.1f} s ({data_root})")
        preset = work / "vs-reference.toml"
        fedtui_preset(preset, data_root, args.rounds)
        stand_in = work / "stand_in"
        (stand_in / "clip").mkdir(parents=True)
        (stand_in / "clip" / "__init__.py").write_text(CLIP_STAND_IN)
        (work / "reference_main.py").write_text(REFERENCE_MAIN)
        run_in = work / "reference" / "cwd"  # it writes ../data/ and results/ next to where it runs
        run_in.mkdir(parents=True)

        env = {**os.environ, "FEDTUI_ROOT": str(ROOT), "FEDTUI_REFERENCE_MODEL": str(TINY_CLIP),
               "FEDTUI_REFERENCE_PRESET": str(preset), "PYTHONPATH": str(stand_in), "OMP_NUM_THREADS": "1",
               "FEDTUI_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1"}
        ref_seconds, ref_out = timed(
            [sys.executable, str(work / "reference_main.py"), str(fedclip), "--dataset", "pacs", "--root_dir",
             str(work) + "/", "--iters", str(args.rounds), "--seed", "0", "--test_envs", "0"], env, run_in)
        fedtui = [sys.executable, "-m", "fedtui", "run", str(preset), "--json"]
        cold_seconds, _ = timed(fedtui + ["--out", str(work / "cold")], env, ROOT)
        warm_seconds, _ = timed(fedtui + ["--out", str(work / "warm")], env, ROOT)
        base, _ = timed([sys.executable, "-c", "import torch"], env, ROOT)

        ours, theirs = fedtui_accuracies(work / "warm"), reference_accuracies(ref_out)
        print(f"\nwhole run, {args.rounds} rounds, 3 clients + art_painting held out, wall seconds (one thread):")
        print(f"  reference (fed_at_clip.py)   {ref_seconds:8.1f} s")
        print(f"  fedtui, empty feature cache  {cold_seconds:8.1f} s   {ref_seconds / cold_seconds:6.1f}x faster")
        print(f"  fedtui, warm cache           {warm_seconds:8.1f} s   {ref_seconds / warm_seconds:6.1f}x faster")
        print(f"  python -c 'import torch'     {base:8.1f} s")
        print("\ntest accuracy per round, reference / fedtui (site 0 = art_painting, held out):")
        print("  round  " + "  ".join(f"{d[:12]:>15}" for d in DOMAINS))
        for number, (a, b) in enumerate(zip(theirs, ours), 1):
            cells = "  ".join(f"{a.get(s, float('nan')) * 100:6.1f} / {b.get(s, float('nan')) * 100:5.1f}"
                              for s in range(len(DOMAINS)))
            print(f"  {number:5d}  {cells}")


if __name__ == "__main__":
    main()
