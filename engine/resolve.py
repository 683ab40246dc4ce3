"""The one step between reading a preset and running it: everything a run needs to know before it writes a byte.

    preset = read_preset(path, overrides)   # the schema: keys, types, bounds, keys together
    preset = resolve(preset)                # the world: data, weights, this machine
    run(preset)

``fedtui run``, ``fedtui check``, every point of ``fedtui sweep`` and the console's editor call it
(through ``load_preset`` or directly), so a preset that passes here does not fail later for a reason
that could have been known. Every problem is collected and raised together as one ``PresetError``.
Paths were anchored to the preset file when it was read; this step only looks at them.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from engine.presets import Preset
from engine.schema import PresetError, Problems, suggest
from engine.weights import check_model

# Above a few threads per core torch's intra-op pool only contends with itself (a 2-core machine with
# 100,000 threads segfaulted and starved every other process of threads).
THREADS_PER_CORE = 4
# A batch of one is skipped by the contrastive loss, so a client needs two training rows to train at all.
MIN_TRAIN_ROWS = 2


def resolve(preset: Preset) -> Preset:
    problems = Problems(preset.source)
    check_machine(preset, problems)
    check_data(preset, problems)
    check_model(preset.model.arch, preset.model.pretrained, problems)
    problems.raise_if_any()
    return preset


def check_machine(preset: Preset, problems: Problems) -> None:
    cores = os.cpu_count() or 1
    limit = THREADS_PER_CORE * cores
    if preset.run.threads > limit:
        problems.add("run.threads", f"at most {limit} on this machine ({THREADS_PER_CORE} x {cores} cores), got {preset.run.threads}; 0 = all cores but one")
    if preset.run.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            problems.add("run.device", "'cuda' but this machine has no CUDA device; use 'auto' or 'cpu'")


def check_data(preset: Preset, problems: Problems) -> None:
    data = preset.data
    counts = domain_class_counts(preset, problems)  # {domain: [images per class]}
    if counts is None:
        return
    available = sorted(counts)
    for key, names in (("data.domains", data.domains), ("data.holdout", data.holdout)):
        for name in names:
            if name not in available:
                problems.add(key, f"unknown domain {name!r}.{suggest(name, available)}")
    used = data.domains or available
    for name in data.holdout:
        if name in available and name not in used:
            problems.add("data.holdout", f"{name!r} is not among data.domains {used}")
    if data.eval_domain:
        if data.eval_domain not in used:
            problems.add("data.eval_domain", f"{data.eval_domain!r} is not among the domains in play {used}")
        elif data.eval_domain in data.holdout:
            problems.add("data.eval_domain", f"{data.eval_domain!r} is also held out; pick one role for it")
        if len(data.split) == 3 and data.split[1] + data.split[2] <= 0:
            problems.add("data.eval_domain", "needs a val or test fraction in data.split to cut it into val and test")
    training = [d for d in used if d not in data.holdout and d != data.eval_domain and d in counts]
    if not training:
        problems.add("data.holdout", "every domain is held out; at least one must train")
        return
    if not problems:
        check_clients(preset, {d: counts[d] for d in training}, problems)
        names = client_names(preset, training)
        for name in preset.federation.faulty:
            if name not in names:
                problems.add("federation.faulty", f"no client {name!r}.{suggest(name, names)}")


def domain_class_counts(preset: Preset, problems: Problems) -> dict[str, list[int]] | None:
    data = preset.data
    if data.dataset == "synthetic":
        from engine import synthetic

        # The crop domains and the extra styles are opt-in (named in data.domains): the default world stays
        # the four styles.
        named = tuple(d for d in synthetic.OPT_IN_DOMAINS if d in data.domains)
        return {d: [data.images_per_class] * len(synthetic.CLASSES) for d in synthetic.DOMAINS + named}
    if not data.root:
        problems.add("data.root", "required for dataset = 'imagefolder' (<root>/<domain>/<class>/<image>)")
        return None
    root = Path(data.root)
    if not root.is_dir():
        problems.add("data.root", f"folder {str(root)!r} does not exist")
        return None
    try:
        counts = _folder_counts(str(root), root.stat().st_mtime_ns)
    except OSError as error:
        problems.add("data.root", f"{str(root)!r} cannot be listed: {error.strerror or error}")
        return None
    if not counts:
        problems.add("data.root", f"{str(root)!r} has no domain folders (<root>/<domain>/<class>/<image>)")
        return None
    for domain, per_class in counts.items():
        if (not data.domains or domain in data.domains) and sum(per_class) == 0:
            problems.add("data.root", f"domain {domain!r} has no images in class folders under {str(root / domain)!r}")
    return counts


@lru_cache(maxsize=16)
def _folder_counts(root: str, mtime_ns: int) -> dict[str, list[int]]:
    """Images per class per domain, by listing only; cached while the root is unchanged (the editor re-checks
    on every keystroke)."""
    from engine.data import IMAGE_SUFFIXES

    base = Path(root)
    domains = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes = sorted({c.name for d in domains for c in (base / d).iterdir() if c.is_dir()})
    return {
        d: [
            sum(1 for f in (base / d / c).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) if (base / d / c).is_dir() else 0
            for c in classes
        ]
        for d in domains
    }


def client_names(preset: Preset, training: list[str]) -> list[str]:
    """The names the run's clients will have (engine.data.make_clients names them the same way)."""
    if preset.data.partition == "domain":
        return list(training)
    width = len(str(preset.data.clients - 1))
    return [f"client-{k:0{width}d}" for k in range(preset.data.clients)]


def check_clients(preset: Preset, counts: dict[str, list[int]], problems: Problems) -> None:
    """Build the run's partition on labels alone (no image is read) and check every client can train."""
    from engine.data import dirichlet_partition, iid_partition, split_sizes

    data, seed = preset.data, preset.run.seed
    labels = np.concatenate([np.repeat(np.arange(len(c)), c) for c in counts.values()])
    if data.partition == "domain":
        sizes = {domain: sum(c) for domain, c in counts.items()}
    else:
        rows = np.arange(len(labels))
        if data.partition == "iid":
            parts = iid_partition(rows, data.clients, seed)
        else:
            try:
                parts = dirichlet_partition(labels, rows, data.clients, data.alpha, seed, data.min_client_size)
            except ValueError as error:
                problems.add("data.min_client_size", f"{error}; lower it, raise data.alpha or use fewer clients")
                return
        sizes = {f"client {k}": len(p) for k, p in enumerate(parts)}
    small = {name: n for name, n in sizes.items() if split_sizes(n, data.split)[0] < MIN_TRAIN_ROWS}
    if small:
        name, n = next(iter(small.items()))
        key = "data.clients" if data.partition != "domain" else "data.split"
        problems.add(
            key,
            f"{len(small)} client(s) would have fewer than {MIN_TRAIN_ROWS} training images "
            f"(e.g. {name}: {n} images, train fraction {data.split[0]}); use fewer clients or more data",
        )


def check_preset(preset: Preset) -> list[str]:
    """Every problem ``resolve`` finds, as lines (empty when the preset can run)."""
    try:
        resolve(preset)
    except PresetError as error:
        return [str(p) for p in error.problems]
    return []
