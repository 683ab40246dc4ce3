"""Encode each image once: frozen encoders mean features never change, so they are cached on disk.

The cache is one SQLite database per (weights fingerprint, preprocessing) pair, mapping an image's content
hash to its feature row (float32 bytes and a CRC-32 over key and bytes). Rows are committed batch by batch as
they are encoded, so a stop, a crash or a kill -9 loses at most the batch in flight, and a second run over the
same data encodes nothing.

SQLite (standard library) rather than checksummed append-only shards: its WAL journal already gives atomic,
crash-safe commits and lets two processes write one cache at once (each waits its turn through busy_timeout,
INSERT OR IGNORE keeps every row once), and a keyed lookup reads only the rows a run asks for, where shards
would need our own locking, compaction and an index read whole at start. Measured by
benchmarks/feature_cache.py on 5,000 rows of 512 floats, a commit every 64: ~0.1 s to write (20 us a row,
against milliseconds to encode one), ~0.03 s to read all back, a file 2% larger than the old npz; an npz
rewritten every batch for the same safety took ~0.7 s, growing with the square of the rows.

Damage costs time, never a wrong feature or a failed run: a row that fails its checksum is deleted and encoded
again; a file SQLite cannot read as a database is renamed ``<name>.damaged-<time>`` and a fresh one started.
Both are reported through the run's log, naming the path.

A second table names an image's content without decoding it (``source_key``: a synthetic image by generator
and arguments, a file by path, size and times), so a warm run neither renders nor decodes.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sqlite3
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import torch
from PIL import Image

from engine.backbone import Backbone
from engine.data import ImageFolderSource, ImageRef, ImageSource, SyntheticSource

T = TypeVar("T")
Log = Callable[[str, str], None]

BUSY_SECONDS = 120.0  # how long a writer waits for another process's transaction before it gives up
# A file changed again within one timestamp tick of the stat we keyed it by would keep its key; files younger
# than the coarsest common tick (FAT: 2 s) therefore get no key and are hashed from their bytes.
SETTLED_NS = 3 * 10**9
_DAMAGE = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS features"
    " (content_hash TEXT PRIMARY KEY, feature BLOB NOT NULL, crc INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS sources"
    " (source_key TEXT PRIMARY KEY, content_hash TEXT NOT NULL, crc INTEGER NOT NULL)",
)


def default_cache_dir(configured: str = "") -> Path:
    if configured:
        return Path(configured).expanduser()
    if os.environ.get("FEDTUI_CACHE"):
        return Path(os.environ["FEDTUI_CACHE"]).expanduser()
    return Path.home() / ".cache" / "fedtui"


@dataclass
class EncodedImages:
    features: torch.Tensor  # [N, d] raw encoder output, float32, rows in the order of ``refs``
    refs: list[ImageRef]  # the refs that loaded; unreadable images are dropped
    hashes: list[str]
    encoded: int
    cached: int
    skipped: list[tuple[str, str]]  # (location, reason) for images that could not be read
    seconds: float


def _crc(key: str, value: bytes) -> int:
    # The key is part of the checksum, so a damaged index that leads to another image's row fails it too.
    return zlib.crc32(value, zlib.crc32(key.encode()))


def _is_damage(error: sqlite3.DatabaseError) -> bool:
    # Only a damaged file is ours to heal; "database is locked", a full disk or no permission stay errors.
    return (getattr(error, "sqlite_errorcode", 0) & 0xFF) in _DAMAGE


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=BUSY_SECONDS, isolation_level=None)
    try:
        # The largest page: rows of any CLIP width (up to 1024 floats) sit whole in it, packed tight. New files only.
        db.execute("PRAGMA page_size=65536")
        db.execute("PRAGMA journal_mode=WAL")  # a commit is one append; readers never block the writer
        db.execute("PRAGMA synchronous=NORMAL")  # safe against a killed process; power loss may drop the last commits
        db.execute("PRAGMA cell_size_check=ON")  # find a damaged page when it is read, not after building on it
        for statement in _SCHEMA:
            db.execute(statement)
    except BaseException:
        db.close()
        raise
    return db


class FeatureCache:
    """Feature rows by content hash: ``put`` then ``save`` commits; damage is dropped and reported, never returned."""

    def __init__(self, cache_dir: Path, backbone: Backbone, log: Log = lambda level, text: None):
        self.path = cache_dir / "features" / f"{backbone.fingerprint[:24]}-{backbone.preprocess_fingerprint}.sqlite"
        self.log = log
        self.dropped = 0  # rows that failed their checksum this session
        self._features: list[tuple[str, bytes, int]] = []  # put since the last save
        self._sources: list[tuple[str, str, int]] = []
        # Rows read from this file, written into a fresh one should this one turn out damaged mid-run.
        self._served: list[tuple[str, bytes, int]] = []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = _connect(self.path)
        except sqlite3.DatabaseError as error:
            if not _is_damage(error):
                raise
            self._set_aside(error)
            self._db = _connect(self.path)

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def get(self, content_hash: str) -> np.ndarray | None:
        query = "SELECT feature, crc FROM features WHERE content_hash = ?"
        row = self._guard(lambda db: db.execute(query, (content_hash,)).fetchone(), None)
        if row is None:
            return None
        feature, crc = row
        if isinstance(feature, bytes) and crc == _crc(content_hash, feature):
            self._served.append((content_hash, feature, crc))
            return np.frombuffer(feature, dtype=np.float32)
        self._drop("DELETE FROM features WHERE content_hash = ?", content_hash)
        return None

    def put(self, content_hash: str, feature: np.ndarray) -> None:
        blob = np.ascontiguousarray(feature, dtype=np.float32).tobytes()
        self._features.append((content_hash, blob, _crc(content_hash, blob)))

    def source_hash(self, source_key: str) -> str | None:
        """The content hash last seen under ``source_key``, if any."""
        # As bytes: damaged text may not even decode, and the checksum is over the bytes anyway.
        query = "SELECT CAST(content_hash AS BLOB), crc FROM sources WHERE source_key = ?"
        row = self._guard(lambda db: db.execute(query, (source_key,)).fetchone(), None)
        if row is None:
            return None
        content_hash, crc = row
        if isinstance(content_hash, bytes) and crc == _crc(source_key, content_hash):
            return content_hash.decode()
        self._drop("DELETE FROM sources WHERE source_key = ?", source_key)
        return None

    def put_source(self, source_key: str, content_hash: str) -> None:
        self._sources.append((source_key, content_hash, _crc(source_key, content_hash.encode())))

    def save(self) -> None:
        """Commit what was put since the last save, in one short transaction."""
        if not (self._features or self._sources):
            return
        if not self._guard(self._commit, False):
            self._commit(self._db)  # the damaged file was set aside: the rows go into the fresh one
        self._features, self._sources = [], []

    def close(self) -> None:
        self.save()
        self._db.close()
        if self.dropped:
            self.log(
                "warning",
                f"feature cache {self.path}: {self.dropped} damaged row(s) failed their checksum; "
                "dropped and encoded again",
            )

    def _commit(self, db: sqlite3.Connection) -> bool:
        with db:  # COMMIT, or ROLLBACK on any error
            db.execute("BEGIN IMMEDIATE")  # take the write lock up front, waiting for another writer if need be
            db.executemany("INSERT OR IGNORE INTO features VALUES (?, ?, ?)", self._features)
            # The newest sighting wins: a key re-read because its hash had no row may have been stale.
            db.executemany("INSERT OR REPLACE INTO sources VALUES (?, ?, ?)", self._sources)
        return True

    def _drop(self, statement: str, key: str) -> None:
        self.dropped += 1
        self._guard(lambda db: db.execute(statement, (key,)), None)

    def _guard(self, operation: Callable[[sqlite3.Connection], T], fallback: T) -> T:
        """``operation`` on the database; if SQLite finds the file damaged, a fresh file and ``fallback``."""
        try:
            return operation(self._db)
        except sqlite3.DatabaseError as error:
            if not _is_damage(error):
                raise
            self._db.close()
            self._set_aside(error)
            self._db = _connect(self.path)
            self._features[:0] = self._served  # still valid: they passed their checksum when read
            self._served = []
            return fallback

    def _set_aside(self, error: sqlite3.DatabaseError) -> None:
        """Rename the damaged file, with its journal, out of the way: kept for a post-mortem, never read again."""
        aside = self.path.with_name(f"{self.path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        for suffix in ("", "-wal", "-shm"):
            with_suffix = self.path.with_name(self.path.name + suffix)
            if with_suffix.exists():
                os.replace(with_suffix, aside.with_name(aside.name + suffix))
        self.log(
            "warning", f"feature cache {self.path} is damaged ({error}); moved aside to {aside.name}, starting afresh"
        )


@functools.cache
def _generator_version() -> str:
    """The synthetic world's pixels follow from its code and the libraries that draw them, nothing else."""
    import PIL

    from engine import synthetic

    digest = hashlib.sha256(Path(synthetic.__file__).read_bytes())
    digest.update(f"{PIL.__version__}:{np.__version__}".encode())
    return digest.hexdigest()[:16]


def source_key(source: ImageSource, ref: ImageRef) -> str | None:
    """A key that fixes ``ref``'s content without reading its pixels, or None where there is none to trust."""
    if isinstance(source, SyntheticSource):
        return f"{_generator_version()}:{source.world_seed}:{source.image_size}:{ref.location}"
    if isinstance(source, ImageFolderSource):
        try:
            stat = os.stat(ref.location)
        except OSError:
            return None  # loading will fail too, and say why
        if time.time_ns() - stat.st_ctime_ns < SETTLED_NS:
            return None
        # ctime as well as mtime: a file replaced by one with copied times (cp -p) still gets a new key.
        return f"file:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}:{os.path.abspath(ref.location)}"
    return None


def _look_up(
    source: ImageSource, ref: ImageRef, cache: FeatureCache | None
) -> tuple[str, np.ndarray | None, Image.Image | None]:
    """(content hash, cached feature or None, image or None): the image is read only when the key cannot say."""
    key = source_key(source, ref) if cache is not None else None
    known = cache.source_hash(key) if key else None
    hit = cache.get(known) if known else None
    if hit is not None:
        return known, hit, None
    image = source.load(ref)
    content_hash = source.content_hash(ref, image)
    if key and content_hash != known:
        cache.put_source(key, content_hash)
    return content_hash, cache.get(content_hash) if cache is not None else None, image


def encode_images(
    source: ImageSource,
    refs: list[ImageRef],
    backbone: Backbone,
    cache: FeatureCache | None,
    batch_size: int,
    checkpoint: Callable[[], None] = lambda: None,
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> EncodedImages:
    """Features for ``refs``: cached rows where the content is known, the encoder for the rest.

    Each encoded batch is committed to the cache at once, so a stop or a crash keeps all but the batch in flight.
    """
    started = time.perf_counter()
    rows: list[np.ndarray | None] = []
    hashes: list[str] = []
    kept: list[ImageRef] = []
    skipped: list[tuple[str, str]] = []
    pending: list[tuple[int, torch.Tensor]] = []  # (row, preprocessed pixels) awaiting the encoder
    encoded = cached = 0

    def flush() -> None:
        nonlocal encoded
        if not pending:
            return
        checkpoint()
        features = backbone.encode_images(torch.stack([p for _, p in pending])).cpu().numpy()
        for (row, _), feature in zip(pending, features):
            rows[row] = feature
            if cache is not None:
                cache.put(hashes[row], feature)
        if cache is not None:
            cache.save()
        encoded += len(pending)
        pending.clear()

    for i, ref in enumerate(refs):
        try:
            content_hash, hit, image = _look_up(source, ref, cache)
        except sqlite3.Error:
            raise  # the cache's own trouble, not the image's
        except Exception as error:  # PIL raises many kinds for damaged files; each is a skip, not a crash
            skipped.append((ref.location, f"{type(error).__name__}: {error}"))
            continue
        kept.append(ref)
        hashes.append(content_hash)
        rows.append(hit)
        if hit is not None:
            cached += 1
        else:
            pending.append((len(rows) - 1, backbone.preprocess(image)))
            if len(pending) >= batch_size:
                flush()
        if i % 256 == 0:
            progress(i, len(refs))
    flush()
    progress(len(refs), len(refs))
    features = torch.from_numpy(np.stack(rows)) if rows else torch.zeros(0, 0)
    return EncodedImages(features, kept, hashes, encoded, cached, skipped, time.perf_counter() - started)


def load_pixels(source: ImageSource, refs: list[ImageRef], preprocess: Callable) -> torch.Tensor:
    """Preprocessed images, for adapter kinds that run the image encoder in the training loop."""
    return torch.stack([preprocess(source.load(ref)) for ref in refs])
