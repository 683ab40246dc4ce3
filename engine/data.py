"""Data sources, per-domain splits and client partitions.

A source lists ``ImageRef``s (domain, class, where the pixels come from); the feature step turns each
ref into one frozen feature vector; this module then decides which rows every client trains,
validates and tests on. Splits follow FedCLIP's reference: per domain (or per client), shuffle with the
seed and cut contiguously into int(0.6n), int(0.2n) and int(0.2n) rows.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from engine.presets import Preset

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass(frozen=True)
class ImageRef:
    domain: str
    label: int
    location: str  # a file path, or "synthetic:<domain>/<class>/<index>"


class ImageSource:
    """Where images come from: lists refs, loads pixels, hashes content for the feature cache."""

    name = ""
    classes: list[str]
    domains: list[str]

    def refs(self, domain: str) -> list[ImageRef]:  # pragma: no cover - abstract
        raise NotImplementedError

    def load(self, ref: ImageRef) -> Image.Image:  # pragma: no cover - abstract
        raise NotImplementedError

    def content_hash(self, ref: ImageRef, image: Image.Image | None = None) -> str:  # pragma: no cover
        raise NotImplementedError


class SyntheticSource(ImageSource):
    """The built-in PACS-shaped world (engine.synthetic): styles as domains, shapes as classes."""

    name = "synthetic"

    def __init__(self, images_per_class: int, image_size: int, seed: int):
        from engine import synthetic

        self._synthetic = synthetic
        self.classes = list(synthetic.CLASSES)
        self.domains = list(synthetic.DOMAINS)
        self.images_per_class = images_per_class
        self.image_size = image_size
        # The world is fixed by its own seed, not the run's, so changing run.seed reshuffles splits and
        # inits but keeps the same pictures (and the feature cache warm).
        self.world_seed = seed

    def refs(self, domain: str) -> list[ImageRef]:
        return [
            ImageRef(domain, label, f"synthetic:{domain}/{name}/{index}")
            for label, name in enumerate(self.classes)
            for index in range(self.images_per_class)
        ]

    def load(self, ref: ImageRef) -> Image.Image:
        domain, class_name, index = ref.location[len("synthetic:") :].split("/")
        return self._synthetic.render(domain, class_name, int(index), self.world_seed, self.image_size)

    def content_hash(self, ref: ImageRef, image: Image.Image | None = None) -> str:
        image = image if image is not None else self.load(ref)
        digest = hashlib.sha1(f"{image.mode}:{image.size}:".encode())
        digest.update(image.tobytes())
        return digest.hexdigest()


class ImageFolderSource(ImageSource):
    """``root/<domain>/<class>/<image>``, the PACS / VLCS / Office-Home layout; classes are sorted folder names."""

    name = "imagefolder"

    def __init__(self, root: str | Path, domains: list[str]):
        self.root = Path(root).expanduser()
        self.domains = list(domains)
        class_sets = {d: sorted(p.name for p in (self.root / d).iterdir() if p.is_dir()) for d in domains}
        self.classes = sorted(set().union(*class_sets.values()))
        if not self.classes:  # resolve() reports this before a run; a folder emptied since then lands here
            raise ValueError(f"no class folders under {str(self.root)!r}/<domain>/")

    def refs(self, domain: str) -> list[ImageRef]:
        refs = []
        for label, name in enumerate(self.classes):
            folder = self.root / domain / name
            if not folder.is_dir():
                continue
            for path in sorted(folder.iterdir()):
                if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                    refs.append(ImageRef(domain, label, str(path)))
        return refs

    def load(self, ref: ImageRef) -> Image.Image:
        with Image.open(ref.location) as image:
            return image.convert("RGB")

    def content_hash(self, ref: ImageRef, image: Image.Image | None = None) -> str:
        return hashlib.sha1(Path(ref.location).read_bytes()).hexdigest()


def build_source(preset: Preset) -> ImageSource:
    data = preset.data
    if data.dataset == "synthetic":
        return SyntheticSource(data.images_per_class, data.image_size, seed=0)
    root = Path(data.root).expanduser()
    domains = data.domains or sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    return ImageFolderSource(root, domains)


def class_prompts(classes: list[str], template: str) -> list[str]:
    """FedCLIP's prompt per class; folder names such as ``art_painting`` read as words."""
    return [template.format(name.replace("_", " ")) for name in classes]


# --- splits and partitions -------------------------------------------------------------------------


@dataclass
class ClientSplit:
    name: str
    domain: str  # the domain, or "mixed" for iid / dirichlet clients
    train: np.ndarray  # row indices into the run's feature matrix
    val: np.ndarray
    test: np.ndarray
    class_histogram: list[int] = field(default_factory=list)


def split_sizes(n: int, fractions: list[float]) -> tuple[int, int, int]:
    """FedCLIP's reference sizes: int(n f) for each part separately; the few rows left over are unused."""
    return int(n * fractions[0]), int(n * fractions[1]), int(n * fractions[2])


def split_indices(indices: np.ndarray, fractions: list[float], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FedCLIP's split: shuffle with the seed (np.random.seed + shuffle), cut at int(0.6n), +int(0.2n), +int(0.2n).

    As in the reference (PersonalizedFL fedclip datautil), when 0.6n or 0.2n is not whole the remainder
    rows belong to no split; e.g. 2,048 art_painting images give 1,228 / 409 / 409.
    """
    order = np.array(indices, copy=True)
    np.random.RandomState(seed).shuffle(order)
    n_train, n_val, n_test = split_sizes(len(order), fractions)
    return order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val : n_train + n_val + n_test]


def iid_partition(indices: np.ndarray, clients: int, seed: int) -> list[np.ndarray]:
    """Shuffle and deal into ``clients`` nearly equal shares."""
    order = np.array(indices, copy=True)
    np.random.RandomState(seed).shuffle(order)
    return [np.sort(part) for part in np.array_split(order, clients)]


def dirichlet_partition(
    labels: np.ndarray, indices: np.ndarray, clients: int, alpha: float, seed: int, min_size: int, max_tries: int = 1000
) -> list[np.ndarray]:
    """Label skew: per class, shares p ~ Dir_N(alpha); a client already holding >= n/N gets no more of it.

    Redrawn until every client holds at least ``min_size`` examples (the usual recipe, e.g. Hsu et al. /
    NIID-Bench); too large a ``min_size`` for the data is an error rather than an endless loop.
    """
    rng = np.random.RandomState(seed)
    labels = np.asarray(labels)
    indices = np.asarray(indices)
    n = len(indices)
    if clients * min_size > n:
        raise ValueError(f"{clients} clients x min_client_size {min_size} exceeds the {n} training examples")
    for _ in range(max_tries):
        shares: list[list[int]] = [[] for _ in range(clients)]
        for label in np.unique(labels[indices]):
            members = indices[labels[indices] == label].copy()
            rng.shuffle(members)
            p = rng.dirichlet(np.repeat(alpha, clients))
            p = np.array([pj * (len(s) < n / clients) for pj, s in zip(p, shares)])
            if p.sum() == 0:
                p = np.ones(clients)
            p = p / p.sum()
            cuts = (np.cumsum(p) * len(members)).astype(int)[:-1]
            for share, part in zip(shares, np.split(members, cuts)):
                share.extend(part.tolist())
        if min(len(s) for s in shares) >= min_size:
            return [np.sort(np.array(s, dtype=np.int64)) for s in shares]
    raise ValueError(f"no Dirichlet(alpha={alpha}) draw gave every client >= {min_size} examples in {max_tries} tries")


def make_clients(preset: Preset, domains: list[str], row_domains: np.ndarray, labels: np.ndarray) -> list[ClientSplit]:
    """Clients of the run from the rows that survived loading (``row_domains[i]`` is row i's domain)."""
    data, seed = preset.data, preset.run.seed
    training = [d for d in domains if d not in data.holdout and d != data.eval_domain]
    num_classes = int(labels.max()) + 1 if len(labels) else 0

    def client(name: str, domain: str, rows: np.ndarray) -> ClientSplit:
        train, val, test = split_indices(rows, data.split, seed)
        histogram = np.bincount(labels[train], minlength=num_classes).tolist()
        return ClientSplit(name, domain, train, val, test, histogram)

    if data.partition == "domain":
        clients = [client(d, d, np.flatnonzero(row_domains == d)) for d in training]
    else:
        pooled = np.flatnonzero(np.isin(row_domains, training))
        if data.partition == "iid":
            parts = iid_partition(pooled, data.clients, seed)
        else:
            try:
                parts = dirichlet_partition(labels, pooled, data.clients, data.alpha, seed, data.min_client_size)
            except ValueError as error:  # resolve() checked the listing; unreadable images dropped since can land here
                raise ValueError(f"data.min_client_size: {error}") from None
        width = len(str(data.clients - 1))
        clients = [client(f"client-{k:0{width}d}", "mixed", rows) for k, rows in enumerate(parts)]
    if data.eval_domain:
        val, test = shared_eval_rows(np.flatnonzero(row_domains == data.eval_domain), data.split, seed)
        for c in clients:  # the clients' own val/test rows are then unused
            c.val, c.test = val, test
    return clients


def shared_eval_rows(rows: np.ndarray, fractions: list[float], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``data.eval_domain``: all of that domain's rows as one val and one test set, in data.split's val:test
    ratio (0.2:0.2 gives half and half), shuffled and cut as every split is."""
    share = fractions[1] / (fractions[1] + fractions[2])
    _, val, test = split_indices(rows, [0.0, share, 1.0 - share], seed)
    return val, test


def holdout_rows(holdout: list[str], row_domains: np.ndarray) -> dict[str, np.ndarray]:
    """Held-out domains are tested whole with the server adapter."""
    return {d: np.flatnonzero(row_domains == d) for d in holdout}
