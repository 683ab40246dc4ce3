"""Headroom per style: zero-shot vs a linear probe on the frozen CLIP's image features.

    nice -n 10 .venv/bin/python benchmarks/probe.py                          # every synthetic style
    nice -n 10 .venv/bin/python benchmarks/probe.py --styles sketch,photo --per-class 150 --seeds 0,1,2
    nice -n 10 .venv/bin/python benchmarks/probe.py --model local-dir:runs/pretrain/fedtui-clip-tiny

Zero-shot is the frozen CLIP with the class prompts ("a picture of a {}"); the linear probe is a
logistic regression on the same L2-normalised image features, trained in torch (full-batch L-BFGS)
on a training split, its L2 penalty picked on a validation split, scored on a held-out test split
(60/20/20, as a run splits a client). Zero-shot is scored on the same test split. The probe is
(close to) the ceiling of any adapter that works on cached features: what an adapter can gain on a
style is about probe minus zero-shot. Each seed renders its own images (world seed = seed) and its
own split; the table gives mean +- sample sd over the seeds.

The model loads as the engine loads it (open_clip ``create_model_and_transforms``, a ``local-dir``
folder for the shipped CLIP) and every image goes through the preprocessing open_clip returns.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from engine import modelzoo, synthetic  # noqa: E402
from engine.captions import ZERO_SHOT_TEMPLATE, class_prompts  # noqa: E402

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)  # probe penalties tried; the validation split picks one


def load(model_name: str):
    import open_clip

    modelzoo.register_model_configs()
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, device="cpu")
    model.eval().requires_grad_(False)
    return model, preprocess, open_clip.get_tokenizer(model_name)


@torch.no_grad()
def encode_style(model, preprocess, style: str, per_class: int, seed: int, size: int, batch: int = 256):
    """(L2-normalised features [N, D], labels [N]) of ``per_class`` images per class in ``style``."""
    refs = [(label, index) for label in range(len(synthetic.CLASSES)) for index in range(per_class)]
    features = []
    for start in range(0, len(refs), batch):
        chunk = refs[start : start + batch]
        pixels = torch.stack([preprocess(synthetic.render(style, synthetic.CLASSES[c], i, seed, size)) for c, i in chunk])
        features.append(model.encode_image(pixels, normalize=True))
    return torch.cat(features), torch.tensor([c for c, _ in refs])


def split(n: int, seed: int, fractions=(0.6, 0.2, 0.2)):
    order = np.random.RandomState(seed).permutation(n)
    a, b = int(fractions[0] * n), int((fractions[0] + fractions[1]) * n)
    return torch.from_numpy(order[:a]), torch.from_numpy(order[a:b]), torch.from_numpy(order[b:])


def fit_logistic(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression, mean cross-entropy + l2 * ||W||^2, full-batch L-BFGS."""
    torch.manual_seed(0)
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    optimiser = torch.optim.LBFGS([w, b], lr=1.0, max_iter=300, history_size=20, line_search_fn="strong_wolfe")
    scale = 10.0  # features are unit vectors: a fixed gain keeps the problem well conditioned

    def closure():
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(scale * x @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimiser.step(closure)
    return (scale * w).detach(), b.detach()


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).float().mean())


def probe_once(features, labels, text, seed: int) -> dict[str, float]:
    train, val, test = split(len(labels), seed)
    classes = text.shape[0]
    best = None
    for l2 in L2_GRID:
        w, b = fit_logistic(features[train], labels[train], classes, l2)
        score = accuracy(features[val] @ w + b, labels[val])
        if best is None or score > best[0]:
            best = (score, w, b, l2)
    _, w, b, l2 = best
    return {
        "zero_shot": accuracy(features[test] @ text.T, labels[test]),
        "probe": accuracy(features[test] @ w + b, labels[test]),
        "probe_train": accuracy(features[train] @ w + b, labels[train]),
        "l2": l2,
        "test_n": len(test),
    }


def mean_sd(values) -> tuple[float, float]:
    values = list(values)
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=modelzoo.shipped_model_name(), help="open_clip model name (local-dir:...)")
    parser.add_argument("--styles", default=",".join(synthetic.DOMAINS), help="comma-separated synthetic styles")
    parser.add_argument("--per-class", type=int, default=150, help="images per class and style")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated; each renders its own images and split")
    parser.add_argument("--template", default=ZERO_SHOT_TEMPLATE)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    styles = [s for s in args.styles.split(",") if s]
    seeds = [int(s) for s in args.seeds.split(",") if s]

    started = time.time()
    model, preprocess, tokenizer = load(args.model)
    size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    with torch.no_grad():
        text = model.encode_text(tokenizer(class_prompts(synthetic.CLASSES, args.template)), normalize=True)

    rows = {}
    for style in styles:
        results = []
        for seed in seeds:
            features, labels = encode_style(model, preprocess, style, args.per_class, seed, size)
            results.append(probe_once(features, labels, text, seed))
        rows[style] = results
        zs, pr = mean_sd(100 * r["zero_shot"] for r in results), mean_sd(100 * r["probe"] for r in results)
        gain = mean_sd(100 * (r["probe"] - r["zero_shot"]) for r in results)
        print(f"  {style}: zero-shot {zs[0]:.1f} probe {pr[0]:.1f} gain {gain[0]:+.1f} ({time.time() - started:.0f} s)", file=sys.stderr)

    n = len(synthetic.CLASSES) * args.per_class
    print(f"{args.model}")
    print(
        f"{args.per_class} images per class ({n} per style), split 60/20/20, test n = {rows[styles[0]][0]['test_n']}, "
        f"seeds {args.seeds}; mean +- sd; chance {100 / len(synthetic.CLASSES):.1f}%"
    )
    print()
    print("| style | zero-shot % | linear probe % | probe - zero-shot (pp) | probe train % |")
    print("|---|---|---|---|---|")
    for style, results in rows.items():
        zs = mean_sd(100 * r["zero_shot"] for r in results)
        pr = mean_sd(100 * r["probe"] for r in results)
        gain = mean_sd(100 * (r["probe"] - r["zero_shot"]) for r in results)
        tr = mean_sd(100 * r["probe_train"] for r in results)
        print(f"| {style} | {zs[0]:.1f} ± {zs[1]:.1f} | {pr[0]:.1f} ± {pr[1]:.1f} | {gain[0]:+.1f} ± {gain[1]:.1f} | {tr[0]:.1f} |")
    print(f"\n{time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
