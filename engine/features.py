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
and arguments, a file by path, size and times), so a warm run neither renders nor decodes. A third holds the
class prompts' text features, keyed by tokenizer, device type and prompt text (the file is already the
weights'), so a warm run needs no text encoder either.

``ModelIndex`` (``<cache>/models.sqlite``) lets a warm run find all of that without building the model:
it maps a cheap key for the weights (``engine.backbone.model_key``: the SHA-256 of the weights file and its
config, the file's hash itself kept by (path, size, times) like the image source keys) to what the run would
otherwise read off the loaded model: the full weights fingerprint, which names the feature file, the
preprocessing and tokenizer ids, ``logit_scale`` and the parameter bytes. When every image feature and every
prompt's text feature is then found, the run neither imports open_clip nor builds CLIP
(``engine.backbone.CachedBackbone``); the first miss loads it.

On CUDA the images to encode are read, hashed and preprocessed by DataLoader workers into pinned memory
while the GPU encodes the previous batch (fp16 autocast, as the reference runs CLIP).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import sqlite3
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import torch
from PIL import Image

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
    "CREATE TABLE IF NOT EXISTS texts (text_key TEXT PRIMARY KEY, feature BLOB NOT NULL, crc INTEGER NOT NULL)",
)
_INDEX_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS files (file_key TEXT PRIMARY KEY, sha256 TEXT NOT NULL, crc INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS models (model_key TEXT PRIMARY KEY, record TEXT NOT NULL, crc INTEGER NOT NULL)",
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


def _connect(path: Path, schema: tuple[str, ...] = _SCHEMA) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=BUSY_SECONDS, isolation_level=None)
    try:
        # The largest page: rows of any CLIP width (up to 1024 floats) sit whole in it, packed tight. New files only.
        db.execute("PRAGMA page_size=65536")
        _while_locked(db, "PRAGMA journal_mode=WAL")  # a commit is one append; readers never block the writer
        db.execute("PRAGMA synchronous=NORMAL")  # safe against a killed process; power loss may drop the last commits
        db.execute("PRAGMA cell_size_check=ON")  # find a damaged page when it is read, not after building on it
        for statement in schema:
            _while_locked(db, statement)
    except BaseException:
        db.close()
        raise
    return db


def _while_locked(db: sqlite3.Connection, statement: str) -> None:
    """Execute, retrying while another process holds the file. SQLite's busy timeout does not cover every
    case: two processes creating one new cache file at once (two runs started together) can both ask to
    switch it to WAL, and one gets "database is locked" at once rather than after a wait."""
    deadline = time.monotonic() + BUSY_SECONDS
    pause = 0.01
    while True:
        try:
            db.execute(statement)
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) and "busy" not in str(error) or time.monotonic() > deadline:
                raise
        time.sleep(pause * (1 + random.random()))
        pause = min(pause * 2, 0.5)


class _Database:
    """One SQLite file whose rows carry a CRC: damaged rows are dropped, a damaged file is set aside and restarted.

    Rows are ``(key, value, crc)`` in ``tables``; ``put`` queues one and ``save`` commits the queue in one
    short transaction."""

    tables: dict[str, str] = {}  # table -> its key column
    text_tables: frozenset[str] = frozenset()  # tables whose values are TEXT rather than BLOB
    schema: tuple[str, ...] = ()
    replaced: frozenset[str] = frozenset()  # a row may change under its key (INSERT OR REPLACE), else IGNORE
    what = "cache"  # for messages

    def __init__(self, path: Path, log: Log):
        self.path, self.log = path, log
        self.dropped = 0  # rows that failed their checksum this session
        self._pending: dict[str, list[tuple[str, Any, int]]] = {t: [] for t in self.tables}  # put since the last save
        # Rows read from this file, written into a fresh one should this one turn out damaged mid-run.
        self._served: dict[str, list[tuple[str, Any, int]]] = {t: [] for t in self.tables}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = _connect(self.path, self.schema)
        except sqlite3.DatabaseError as error:
            if not _is_damage(error):
                raise
            self._set_aside(error)
            self._db = _connect(self.path, self.schema)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _get(self, table: str, key: str) -> bytes | None:
        """The value stored under ``key`` if its checksum holds; text values come back as their UTF-8 bytes."""
        column, value_column = self.tables[table], _VALUE_COLUMNS[table]
        text = table in self.text_tables
        # Text as bytes: damaged text may not even decode, and the checksum is over the bytes anyway.
        selected = f"CAST({value_column} AS BLOB)" if text else value_column
        query = f"SELECT {selected}, crc FROM {table} WHERE {column} = ?"
        row = self._guard(lambda db: db.execute(query, (key,)).fetchone(), None)
        if row is None:
            return None
        value, crc = row
        if isinstance(value, bytes) and crc == _crc(key, value):
            self._served[table].append((key, value.decode() if text else value, crc))
            return value
        self._drop(f"DELETE FROM {table} WHERE {column} = ?", key)
        return None

    def _get_many(self, table: str, keys: list[str]) -> dict[str, bytes]:
        """``_get`` for many keys at once (one query per 500): {key: value} for the rows whose checksum holds."""
        column, value_column = self.tables[table], _VALUE_COLUMNS[table]
        text = table in self.text_tables
        selected = f"CAST({value_column} AS BLOB)" if text else value_column
        found: dict[str, bytes] = {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), 500):
            chunk = unique[start : start + 500]
            query = f"SELECT {column}, {selected}, crc FROM {table} WHERE {column} IN ({','.join('?' * len(chunk))})"
            rows = self._guard(lambda db: db.execute(query, chunk).fetchall(), None)
            if rows is None:  # the file was damaged and set aside: nothing more to find in it
                return found
            for key, value, crc in rows:
                if isinstance(value, bytes) and crc == _crc(key, value):
                    self._served[table].append((key, value.decode() if text else value, crc))
                    found[key] = value
                else:
                    self._drop(f"DELETE FROM {table} WHERE {column} = ?", key)
        return found

    def _put(self, table: str, key: str, value: bytes | str) -> None:
        """Queue a row; text tables take ``str`` (stored as TEXT, checksummed over its UTF-8 bytes)."""
        self._pending[table].append((key, value, _crc(key, value.encode() if isinstance(value, str) else value)))

    def save(self) -> None:
        """Commit what was put since the last save, in one short transaction."""
        if not any(self._pending.values()):
            return
        if not self._guard(self._commit, False):
            self._commit(self._db)  # the damaged file was set aside: the rows go into the fresh one
        self._pending = {t: [] for t in self.tables}

    def close(self) -> None:
        self.save()
        self._db.close()
        if self.dropped:
            self.log(
                "warning",
                f"{self.what} {self.path}: {self.dropped} damaged row(s) failed their checksum; "
                "dropped and encoded again",
            )

    def _commit(self, db: sqlite3.Connection) -> bool:
        with db:  # COMMIT, or ROLLBACK on any error
            db.execute("BEGIN IMMEDIATE")  # take the write lock up front, waiting for another writer if need be
            for table, rows in self._pending.items():
                if rows:
                    verb = "INSERT OR REPLACE" if table in self.replaced else "INSERT OR IGNORE"
                    db.executemany(f"{verb} INTO {table} VALUES (?, ?, ?)", rows)
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
            self._db = _connect(self.path, self.schema)
            for table, rows in self._served.items():
                self._pending[table][:0] = rows  # still valid: they passed their checksum when read
            self._served = {t: [] for t in self.tables}
            return fallback

    def _set_aside(self, error: sqlite3.DatabaseError) -> None:
        """Rename the damaged file, with its journal, out of the way: kept for a post-mortem, never read again."""
        aside = self.path.with_name(f"{self.path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        for suffix in ("", "-wal", "-shm"):
            with_suffix = self.path.with_name(self.path.name + suffix)
            if with_suffix.exists():
                os.replace(with_suffix, aside.with_name(aside.name + suffix))
        self.log(
            "warning", f"{self.what} {self.path} is damaged ({error}); moved aside to {aside.name}, starting afresh"
        )


_VALUE_COLUMNS = {"features": "feature", "sources": "content_hash", "texts": "feature", "files": "sha256",
                  "models": "record"}


class FeatureCache(_Database):
    """Feature rows by content hash, content hashes by source key, prompt features by text key: ``put`` then
    ``save`` commits; damage is dropped and reported, never returned."""

    tables = {"features": "content_hash", "sources": "source_key", "texts": "text_key"}
    text_tables = frozenset({"sources"})
    schema = _SCHEMA
    # The newest sighting of a source wins: a key re-read because its hash had no row may have been stale.
    replaced = frozenset({"sources"})
    what = "feature cache"

    def __init__(self, cache_dir: Path, backbone, log: Log = lambda level, text: None):
        name = f"{backbone.fingerprint[:24]}-{backbone.preprocess_fingerprint}.sqlite"
        super().__init__(cache_dir / "features" / name, log)

    def get(self, content_hash: str) -> np.ndarray | None:
        blob = self._get("features", content_hash)
        return None if blob is None else np.frombuffer(blob, dtype=np.float32)

    def put(self, content_hash: str, feature: np.ndarray) -> None:
        self._put("features", content_hash, np.ascontiguousarray(feature, dtype=np.float32).tobytes())

    def get_many(self, content_hashes: list[str]) -> dict[str, np.ndarray]:
        return {k: np.frombuffer(v, dtype=np.float32) for k, v in self._get_many("features", content_hashes).items()}

    def source_hashes(self, source_keys: list[str]) -> dict[str, str]:
        """``source_hash`` for many keys at once."""
        return {k: v.decode() for k, v in self._get_many("sources", source_keys).items()}

    def source_hash(self, source_key: str) -> str | None:
        """The content hash last seen under ``source_key``, if any."""
        content_hash = self._get("sources", source_key)
        return None if content_hash is None else content_hash.decode()

    def put_source(self, source_key: str, content_hash: str) -> None:
        self._put("sources", source_key, content_hash)

    def get_text(self, text_key: str) -> np.ndarray | None:
        blob = self._get("texts", text_key)
        return None if blob is None else np.frombuffer(blob, dtype=np.float32)

    def put_text(self, text_key: str, feature: np.ndarray) -> None:
        self._put("texts", text_key, np.ascontiguousarray(feature, dtype=np.float32).tobytes())


class ModelIndex(_Database):
    """``<cache>/models.sqlite``: weights-file hashes by (path, size, times), and model records by model key.

    A model record (JSON) is what a run reads off a loaded backbone (``engine.backbone.ModelRecord``); it is
    written whenever a run loads a model that has a key, and read by the next run instead of loading it."""

    tables = {"files": "file_key", "models": "model_key"}
    text_tables = frozenset({"files", "models"})
    schema = _INDEX_SCHEMA
    replaced = frozenset({"files", "models"})
    what = "model index"

    def __init__(self, cache_dir: Path, log: Log = lambda level, text: None):
        super().__init__(cache_dir / "models.sqlite", log)

    def file_sha256(self, path: Path) -> str:
        """SHA-256 of the file's bytes, remembered under its (size, mtime, ctime, absolute path)."""
        stat = os.stat(path)
        key = f"file:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}:{os.path.abspath(path)}"
        settled = time.time_ns() - stat.st_ctime_ns >= SETTLED_NS
        known = self._get("files", key) if settled else None
        if known is not None:
            return known.decode()
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        if settled:
            self._put("files", key, digest.hexdigest())
            self.save()
        return digest.hexdigest()

    def record(self, model_key: str) -> dict[str, Any] | None:
        blob = self._get("models", model_key)
        if blob is None:
            return None
        try:
            return json.loads(blob)
        except ValueError:
            return None

    def put_record(self, model_key: str, record: dict[str, Any]) -> None:
        self._put("models", model_key, json.dumps(record, sort_keys=True))
        self.save()


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
    backbone,
    cache: FeatureCache | None,
    batch_size: int,
    checkpoint: Callable[[], None] = lambda: None,
    progress: Callable[[int, int], None] = lambda done, total: None,
    workers: int | None = None,
) -> EncodedImages:
    """Features for ``refs``: cached rows where the content is known, the encoder for the rest.

    Each encoded batch is committed to the cache at once, so a stop or a crash keeps all but the batch in flight.
    ``workers`` (default: some on CUDA, none on the CPU) read, hash and preprocess the images to encode in
    DataLoader worker processes, into pinned memory on CUDA; the results are the same either way.
    """
    if workers is None:
        workers = min(8, max(1, (os.cpu_count() or 2) - 1)) if backbone.device.type == "cuda" else 0
    started = time.perf_counter()
    rows: list[np.ndarray | None] = [None] * len(refs)
    hashes: list[str | None] = [None] * len(refs)
    failed: dict[int, str] = {}  # ref index -> why it could not be read
    pending: list[tuple[int, torch.Tensor]] = []  # (ref index, preprocessed pixels) awaiting the encoder
    encoded = cached = 0

    def flush(pixels: torch.Tensor | None = None) -> None:
        nonlocal encoded
        if not pending:
            return
        checkpoint()
        batch = pixels if pixels is not None else torch.stack([p for _, p in pending])
        features = backbone.encode_images(batch).cpu().numpy()
        for (index, _), feature in zip(pending, features):
            rows[index] = feature
            if cache is not None:
                cache.put(hashes[index], feature)
        if cache is not None:
            cache.save()
        encoded += len(pending)
        pending.clear()

    def skip(index: int, error: BaseException | str) -> None:
        failed[index] = error if isinstance(error, str) else f"{type(error).__name__}: {error}"

    # A warm cache answers in two queries a batch of 500 refs: their keys' content hashes, then those hashes' rows.
    keys = [source_key(source, ref) for ref in refs] if cache is not None else [None] * len(refs)
    hash_of = cache.source_hashes([k for k in keys if k]) if cache is not None else {}
    stored = cache.get_many(list(hash_of.values())) if hash_of else {}
    to_read: list[tuple[int, str | None, str | None]] = []  # (ref index, source key, content hash it had)
    for i, ref in enumerate(refs):
        content_hash = hash_of.get(keys[i]) if keys[i] else None
        if content_hash is not None and content_hash in stored:
            hashes[i], rows[i] = content_hash, stored[content_hash]
            cached += 1
            if i % 256 == 0:
                progress(i, len(refs))
            continue
        if workers:
            key = source_key(source, ref) if cache is not None else None
            known = cache.source_hash(key) if key else None
            hit = cache.get(known) if known else None
            if hit is None:
                to_read.append((i, key, known))
                continue
            content_hash, image = known, None
        else:
            try:
                content_hash, hit, image = _look_up(source, ref, cache)
            except sqlite3.Error:
                raise  # the cache's own trouble, not the image's
            except Exception as error:  # PIL raises many kinds for damaged files; each is a skip, not a crash
                skip(i, error)
                continue
        hashes[i] = content_hash
        if hit is not None:
            rows[i] = hit
            cached += 1
        else:
            pending.append((i, backbone.preprocess(image)))
            if len(pending) >= batch_size:
                flush()
        if i % 256 == 0:
            progress(i, len(refs))
    if to_read:
        for batch in _read_in_workers(source, refs, to_read, backbone, batch_size, workers):
            fresh: list[int] = []  # rows of batch["pixels"] to encode (the readable images, in order)
            readable = 0
            for (i, key, known), (content_hash, error) in zip(batch["items"], batch["results"]):
                if error is not None:
                    skip(i, error)
                    continue
                readable += 1
                if key and content_hash != known:
                    cache.put_source(key, content_hash)
                hashes[i] = content_hash
                hit = cache.get(content_hash) if cache is not None else None
                if hit is not None:  # another image (or another key) with this content was encoded before
                    rows[i] = hit
                    cached += 1
                else:
                    pending.append((i, None))
                    fresh.append(readable - 1)
            if fresh:
                pixels = batch["pixels"]
                flush(pixels if len(fresh) == len(pixels) else pixels[torch.as_tensor(fresh)])
            progress(len(refs) - len(to_read) + batch["done"], len(refs))
    flush()
    progress(len(refs), len(refs))
    kept = [i for i in range(len(refs)) if i not in failed]
    features = torch.from_numpy(np.stack([rows[i] for i in kept])) if kept else torch.zeros(0, 0)
    skipped = [(refs[i].location, failed[i]) for i in sorted(failed)]
    return EncodedImages(features, [refs[i] for i in kept], [hashes[i] for i in kept], encoded, cached, skipped,
                         time.perf_counter() - started)


class _ReadImages(torch.utils.data.Dataset):
    """(content hash, preprocessed pixels, error) for each image to encode, computed in a worker process."""

    def __init__(self, source: ImageSource, refs: list[ImageRef], preprocess: Callable):
        self.source, self.refs, self.preprocess = source, refs, preprocess

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int):
        ref = self.refs[index]
        try:
            image = self.source.load(ref)
            return self.source.content_hash(ref, image), self.preprocess(image), None
        except Exception as error:  # a damaged file is a skip, reported by the main process
            return None, None, f"{type(error).__name__}: {error}"


def _collate(items):
    good = [pixels for _, pixels, error in items if error is None]
    return {"results": [(content_hash, error) for content_hash, _, error in items],
            "pixels": torch.stack(good) if good else torch.zeros(0)}


def _read_in_workers(source, refs, to_read, backbone, batch_size: int, workers: int):
    """Batches of what ``_ReadImages`` computes for ``to_read``, in order, with ``items`` and ``done`` added."""
    loader = torch.utils.data.DataLoader(
        _ReadImages(source, [refs[i] for i, _, _ in to_read], backbone.preprocess),
        batch_size=batch_size, num_workers=workers, collate_fn=_collate,
        pin_memory=backbone.device.type == "cuda", prefetch_factor=4,
        multiprocessing_context="fork" if "fork" in torch.multiprocessing.get_all_start_methods() else None,
    )
    done = 0
    for batch in loader:
        items = to_read[done : done + len(batch["results"])]
        done += len(items)
        yield {**batch, "items": items, "done": done}


def prompt_features(cache: FeatureCache | None, backbone, prompts: list[str]) -> torch.Tensor:
    """[K, d] raw text features of the class prompts, from the cache when it has every one (CPU float32).

    Keyed by tokenizer, device type (CUDA encodes under fp16 autocast) and prompt text, in the weights' file.
    A miss encodes all the prompts in one batch, as a run always did, and stores them."""
    keys = [f"{backbone.tokenizer_id}:{backbone.device.type}:{prompt}" for prompt in prompts]
    found = [cache.get_text(key) for key in keys] if cache is not None else [None]
    if all(feature is not None for feature in found) and found:
        return torch.from_numpy(np.stack(found))
    features = backbone.encode_prompts(prompts).float().cpu()
    if cache is not None:
        for key, feature in zip(keys, features.numpy()):
            cache.put_text(key, feature)
        cache.save()
    return features


def load_pixels(source: ImageSource, refs: list[ImageRef], preprocess: Callable) -> torch.Tensor:
    """Preprocessed images, for adapter kinds that run the image encoder in the training loop."""
    return torch.stack([preprocess(source.load(ref)) for ref in refs])
