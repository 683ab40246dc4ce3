"""What the crash-safe feature cache costs against the npz file it replaced.

    .venv/bin/python benchmarks/feature_cache.py                  # 5,000 rows of 512 floats (ViT-B/32)
    .venv/bin/python benchmarks/feature_cache.py --rows 50000 --dim 768

Writes N random feature rows the way encode_images does (a commit every --batch rows), reads every row
back by content hash, and reports the file size; the old npz cache is measured written once at the end
(all it did, losing everything to a kill) and rewritten after every batch (what the same crash safety would
cost it). Best of --repeat. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.features import FeatureCache  # noqa: E402

BACKBONE = SimpleNamespace(fingerprint="0" * 64, preprocess_fingerprint="0" * 16)  # only names the file


def rows(n: int, dim: int) -> tuple[list[str], np.ndarray]:
    hashes = [hashlib.sha1(str(i).encode()).hexdigest() for i in range(n)]
    return hashes, np.random.default_rng(0).standard_normal((n, dim), dtype=np.float32)


def best(repeat: int, measure) -> float:
    return min(measure() for _ in range(repeat))


def timed(action) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def sqlite_write(folder: Path, hashes: list[str], features: np.ndarray, batch: int) -> float:
    for leftover in (folder / "features").glob("*"):
        leftover.unlink()

    def write() -> None:
        with FeatureCache(folder, BACKBONE) as cache:
            for start in range(0, len(hashes), batch):
                for content_hash, feature in zip(hashes[start : start + batch], features[start : start + batch]):
                    cache.put(content_hash, feature)
                cache.save()

    return timed(write)


def sqlite_read(folder: Path, hashes: list[str]) -> float:
    def read() -> None:
        with FeatureCache(folder, BACKBONE) as cache:
            assert all(cache.get(content_hash) is not None for content_hash in hashes)

    return timed(read)


def npz_save(path: Path, hashes: list[str], features: np.ndarray) -> None:
    """As engine/features.py saved before: the whole union, rewritten atomically."""
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, hashes=np.array(hashes, dtype="U40"), features=features)
    os.replace(tmp, path)


def npz_read(path: Path, hashes: list[str]) -> float:
    def read() -> None:
        with np.load(path, allow_pickle=False) as stored:
            loaded = dict(zip(stored["hashes"].tolist(), stored["features"]))
        assert all(loaded.get(content_hash) is not None for content_hash in hashes)

    return timed(read)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64, help="rows per commit (model.encode_batch_size)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    hashes, features = rows(args.rows, args.dim)
    batches = range(args.batch, args.rows + args.batch, args.batch)

    with tempfile.TemporaryDirectory() as tmp:
        folder, npz = Path(tmp), Path(tmp) / "old.npz"
        figures = {
            "sqlite, commit per batch": (
                best(args.repeat, lambda: sqlite_write(folder, hashes, features, args.batch)),
                best(args.repeat, lambda: sqlite_read(folder, hashes)),
                sum(p.stat().st_size for p in (folder / "features").glob("*")),
            ),
            "npz, written once at the end": (
                best(args.repeat, lambda: timed(lambda: npz_save(npz, hashes, features))),
                best(args.repeat, lambda: npz_read(npz, hashes)),
                npz.stat().st_size,
            ),
            "npz, rewritten every batch": (
                best(1, lambda: timed(lambda: [npz_save(npz, hashes[:end], features[:end]) for end in batches])),
                float("nan"),
                npz.stat().st_size,
            ),
        }

    mib = args.rows * args.dim * 4 / 2**20
    print(f"{args.rows:,} rows x {args.dim} float32 ({mib:.1f} MiB), {args.batch} rows per commit")
    print(f"{'':30} {'write s':>8} {'read s':>8} {'MiB':>7}")
    for name, (write, read, size) in figures.items():
        print(f"{name:30} {write:8.3f} {read:8.3f} {size / 2**20:7.2f}")


if __name__ == "__main__":
    main()
