"""Fetching the real data sets: download (resumable), verify, extract, lay out as ``<root>/<domain>/<class>/<image>``.

``fedtui data fetch pacs`` is the command; this module is its engine part (no UI imports: progress goes to a
callback). The one table of what can be fetched is ``DATASETS`` below: each archive's URL, where that URL
was found, its checksum (published, or recorded on the first download) and the archive's layout as data.

Steps of ``fetch``:

1. download each archive into ``<root>/.download/<file>.part``; an interrupted download resumes from the
   ``.part`` (HTTP ``Range``, guarded by ``If-Range`` with the server's validator; a ``file://`` source is
   read from the same offset), and a connection dropped mid-body is retried from where it stopped;
2. verify SHA-256 against the published checksum, else against the one recorded for that URL in
   ``<root>/.fedtui-checksums.json`` (a mismatch is refused and the file kept aside, nothing extracted);
3. extract (zip, or tar / tar.gz; members that would land outside the folder are refused);
4. move each domain folder found at the archive's ``base`` (renamed as the table says) to ``<root>/<domain>``;
5. record the checksum of a first download, and write ``<root>/.fedtui-fetched.json``.

Dot-named files and folders in ``<root>`` are invisible to the image-folder loader (``engine.data``), so
the bookkeeping lives beside the domains.
"""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import tarfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Mapping
from urllib.error import HTTPError, URLError
from urllib.parse import unquote, urlparse
from urllib.request import Request, url2pathname, urlopen

ProgressFn = Callable[[str, int, "int | None"], None]  # (stage, done, total or None); stage: "download X", ...
NoteFn = Callable[[str], None]

CHECKSUMS_FILE = ".fedtui-checksums.json"
FETCHED_FILE = ".fedtui-fetched.json"
DOWNLOAD_DIR = ".download"
EXTRACT_DIR = ".extract"
CHUNK = 1 << 16

# ---------------------------------------------------------------------------------------------------------
# The table. Every URL says where it was found. No archive below has a published SHA-256 (neither DomainBed's
# script nor the FedCLIP reference's README gives one), so each is "recorded": learned on the first download
# and checked on every later one. An entry that gets a published checksum sets ``sha256`` and is checked
# against it from the first download on.
# ---------------------------------------------------------------------------------------------------------

DOMAINBED = ("facebookresearch/DomainBed domainbed/scripts/download.py "
             "(commit 050aa5c866cb8010229ce1ebd2a6a34ea8103056)")
FEDCLIP = ("microsoft/PersonalizedFL README.md, section 'Dataset' (commit 314e10c36d2b0bd3bf31c16992c6326b7bc2d12c); "
           "the FedCLIP reference code lives in that repository's fedclip/")


def _gdrive(file_id: str) -> str:
    """Google Drive's direct-download form of a file id (DomainBed fetches ``https://drive.google.com/uc?id=ID``
    with gdown, which answers Drive's confirmation page; this form asks for the file itself)."""
    return f"https://drive.usercontent.google.com/download?id={file_id}&export=download&confirm=t"


@dataclass(frozen=True)
class Archive:
    url: str
    filename: str  # the name it is saved under in <root>/.download/
    base: str  # folder inside the archive that holds the domain folders ("" = the archive's top)
    sha256: str | None = None  # published checksum; None = recorded on the first download
    format: str = "zip"  # "zip" | "tar.gz" (documentation; the file's content decides how it is opened)
    note: str = ""  # what is not verified about this entry

    @property
    def checksum_kind(self) -> str:
        return "published" if self.sha256 else "recorded"


@dataclass(frozen=True)
class Source:
    name: str  # --source NAME
    origin: str  # where the URLs were found
    archives: tuple[Archive, ...]


@dataclass(frozen=True)
class DataSet:
    key: str  # the command's argument: pacs, vlcs, office-home, domainnet
    title: str
    folder: str  # default root: data/<folder>
    domains: Mapping[str, str]  # folder name in an archive -> normalised domain folder (several may map to one)
    sources: tuple[Source, ...]  # the first is the default
    preset: str | None = None  # the shipped preset that reads it (file name in presets/)
    note: str = ""

    @property
    def domain_names(self) -> list[str]:
        return list(dict.fromkeys(self.domains.values()))

    def source(self, name: str | None = None) -> Source:
        if name is None:
            return self.sources[0]
        for source in self.sources:
            if source.name == name:
                return source
        raise FetchError(f"{self.key}: no source {name!r}; sources: {', '.join(s.name for s in self.sources)}", 2)


_PACS_DOMAINS = {d: d for d in ("art_painting", "cartoon", "photo", "sketch")}
_VLCS_DOMAINS = {d: d for d in ("Caltech101", "LabelMe", "SUN09", "VOC2007")}
_OFFICE_HOME_DOMAINS = {"Art": "Art", "Clipart": "Clipart", "Product": "Product",
                        "Real World": "Real_World", "Real_World": "Real_World"}
_DOMAINNET = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
_DOMAINNET_URLS = {  # DomainBed's list, as written there (three under groundtruth/, three not)
    "clipart": "http://csr.bu.edu/ftp/visda/2019/multi-source/groundtruth/clipart.zip",
    "infograph": "http://csr.bu.edu/ftp/visda/2019/multi-source/infograph.zip",
    "painting": "http://csr.bu.edu/ftp/visda/2019/multi-source/groundtruth/painting.zip",
    "quickdraw": "http://csr.bu.edu/ftp/visda/2019/multi-source/quickdraw.zip",
    "real": "http://csr.bu.edu/ftp/visda/2019/multi-source/real.zip",
    "sketch": "http://csr.bu.edu/ftp/visda/2019/multi-source/sketch.zip",
}
_LAYOUT_UNVERIFIED = ("layout unverified (the archive was not opened when this entry was written): "
                      "the domain folders are looked for under base, else searched for in the archive")
_GDRIVE_NOTE = ("direct-download form of DomainBed's Drive id, unverified; Drive may answer with a web page "
                "(quota, confirmation), which is refused with a message")

DATASETS: dict[str, DataSet] = {
    "pacs": DataSet(
        key="pacs", title="PACS", folder="PACS", domains=_PACS_DOMAINS, preset="fedclip-pacs.toml",
        sources=(
            Source("fedclip", FEDCLIP, (Archive(
                "https://transferlearningdrive.blob.core.windows.net/teamdrive/dataset/PACS.zip",
                "PACS.zip", base="PACS", note=_LAYOUT_UNVERIFIED),)),
            Source("domainbed", DOMAINBED, (Archive(
                _gdrive("1JFr8f805nMUelQWWmfnJR3y4_SYoN5Pd"), "PACS.zip", base="kfold", note=_GDRIVE_NOTE),)),
        ),
    ),
    "vlcs": DataSet(
        key="vlcs", title="VLCS", folder="VLCS", domains=_VLCS_DOMAINS, preset="fedclip-vlcs.toml",
        sources=(
            Source("domainbed", DOMAINBED, (Archive(
                _gdrive("1skwblH1_okBwxWxmRsp9_qi15hyPpxg8"), "VLCS.tar.gz", base="VLCS", format="tar.gz",
                note=_GDRIVE_NOTE),)),
            Source("fedclip", FEDCLIP, (Archive(
                "https://transferlearningdrive.blob.core.windows.net/teamdrive/dataset/VLCS/VLCS.zip",
                "VLCS.zip", base="VLCS", note=_LAYOUT_UNVERIFIED),)),
        ),
    ),
    "office-home": DataSet(
        key="office-home", title="Office-Home", folder="OfficeHome", domains=_OFFICE_HOME_DOMAINS,
        preset="fedclip-office-home.toml",
        sources=(
            Source("domainbed", DOMAINBED, (Archive(
                _gdrive("1uY0pj7oFsjMxRwaD3Sxy0jgel0fsYXLC"), "office_home.zip", base="OfficeHomeDataset_10072016",
                note=_GDRIVE_NOTE),)),
            Source("fedclip", FEDCLIP, (Archive(
                "https://transferlearningdrive.blob.core.windows.net/teamdrive/dataset/OfficeHome.zip",
                "OfficeHome.zip", base="OfficeHome", note=_LAYOUT_UNVERIFIED),)),
        ),
        note="'Real World' is renamed Real_World, the name the shipped preset (and DeepDG) uses",
    ),
    "domainnet": DataSet(
        key="domainnet", title="DomainNet", folder="DomainNet", domains={d: d for d in _DOMAINNET},
        sources=(
            Source("domainbed", DOMAINBED, tuple(
                Archive(url, f"{domain}.zip", base="") for domain, url in _DOMAINNET_URLS.items())),
        ),
        note=("one zip per domain, each <domain>/<class>/<image>; DomainBed also deletes the duplicates its "
              "misc/domain_net_duplicates.txt lists, which this fetch does not; no DomainNet preset ships"),
    ),
}


# ---------------------------------------------------------------------------------------------------------
# errors: each carries the exit code the CLI uses
# ---------------------------------------------------------------------------------------------------------


class FetchError(Exception):
    """A fetch that cannot go on; ``str()`` is one line, ``exit_code`` 2 for bad input, offline or a refused
    archive, 1 for a failure on the way (an interrupted download, an archive that is not what the table says)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class Offline(FetchError):
    def __init__(self, message: str):
        super().__init__(message, 2)


class ChecksumMismatch(FetchError):
    def __init__(self, message: str, kept: Path):
        super().__init__(message, 2)
        self.kept = kept


class _Dropped(Exception):
    """The connection ended before the body did: resume from the .part."""


class _Restart(Exception):
    """The .part cannot be continued (the server's answer does not line up with it): start over."""


# ---------------------------------------------------------------------------------------------------------
# downloading
# ---------------------------------------------------------------------------------------------------------

_OFFLINE_ERRNOS = {errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ETIMEDOUT, errno.EADDRNOTAVAIL,
                   errno.ENETDOWN}


def _is_offline(reason: object) -> bool:
    if isinstance(reason, (socket.gaierror, socket.timeout, TimeoutError, ConnectionRefusedError)):
        return True
    return isinstance(reason, OSError) and reason.errno in _OFFLINE_ERRNOS


def _why(reason: object) -> str:
    if isinstance(reason, socket.gaierror):
        return "the host name does not resolve"
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return "no answer (timed out)"
    if isinstance(reason, ConnectionRefusedError) or getattr(reason, "errno", None) == errno.ECONNREFUSED:
        return "connection refused"
    return getattr(reason, "strerror", None) or str(reason)


def _part_paths(dest: Path) -> tuple[Path, Path]:
    return dest.with_name(dest.name + ".part"), dest.with_name(dest.name + ".part.json")


def download(url: str, dest: Path, *, progress: ProgressFn | None = None, note: NoteFn | None = None,
             timeout: float = 30.0, retries: int = 3) -> int:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming what a ``.part`` already holds; returns the
    bytes taken from an earlier ``.part`` (0 for a fresh download). A dropped connection is resumed up to
    ``retries`` times; past that, ``FetchError`` (exit 1) and the ``.part`` stays for the next attempt."""
    progress = progress or (lambda stage, done, total: None)
    note = note or (lambda text: None)
    part, meta_path = _part_paths(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    meta = _read_json(meta_path)
    if part.exists() and meta.get("url") != url:
        part.unlink()  # a .part of another URL is not ours to continue
        meta = {}
    if not part.exists():
        meta = {"url": url}
    _write_json(meta_path, meta)
    resumed_from = part.stat().st_size if part.exists() else 0
    if resumed_from:
        note(f"{dest.name}: resuming the partial download at {resumed_from:,} bytes")
    drops = 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        try:
            _download_once(url, part, meta, meta_path, have, dest.name, progress, note, timeout)
            break
        except _Restart:
            part.unlink(missing_ok=True)
            resumed_from = 0
        except _Dropped as dropped:
            drops += 1
            got = part.stat().st_size if part.exists() else 0
            if drops > retries:
                raise FetchError(f"{dest.name}: the connection dropped {drops} times ({dropped}); {got:,} bytes "
                                 f"are kept in {part}: run the same command again to resume") from None
            note(f"{dest.name}: the connection dropped at {got:,} bytes ({dropped}); resuming")
            time.sleep(min(2.0, 0.2 * drops))
    os.replace(part, dest)
    meta_path.unlink(missing_ok=True)
    return resumed_from


def _download_once(url, part: Path, meta: dict, meta_path: Path, have: int, name: str, progress, note,
                   timeout: float) -> None:
    stage = f"download {name}"
    if urlparse(url).scheme == "file":
        _copy_file(url, part, have, stage, progress)
        return
    headers = {"User-Agent": "fedtui-data-fetch", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
        if meta.get("validator"):
            headers["If-Range"] = meta["validator"]
    try:
        response = urlopen(Request(url, headers=headers), timeout=timeout)
    except HTTPError as error:
        if error.code == 416 and have:  # the .part may already hold everything
            total = _content_range_total(error.headers.get("Content-Range", ""))
            if total == have:
                return
            raise _Restart() from None
        raise FetchError(f"{url}: the server answered HTTP {error.code} {error.reason}", 1) from None
    except URLError as error:
        reason = error.reason
        if _is_offline(reason):
            kept = f" ({have:,} bytes kept in {part}; the same command resumes them)" if have else ""
            raise Offline(f"cannot reach {_host(url)}: {_why(reason)}; offline? nothing more was downloaded "
                          f"from {url}{kept}") from None
        raise FetchError(f"{url}: {reason}", 1) from None
    except (http.client.HTTPException, OSError) as error:
        if _is_offline(error):  # a timeout waiting for the answer
            raise Offline(f"cannot reach {_host(url)}: {_why(error)}; offline? nothing more was downloaded "
                          f"from {url}") from None
        raise _Dropped(f"{type(error).__name__}: {error}") from None
    with response:
        kind = response.headers.get("Content-Type", "")
        if kind.split(";")[0].strip().lower() in ("text/html", "application/xhtml+xml"):
            raise FetchError(f"{url}: the server sent a web page, not the archive (a login, quota or confirmation "
                             f"page?); download it in a browser and give it with --url file:///path/to/{name}", 1)
        length = response.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        if response.status == 206:
            start, total = _content_range(response.headers.get("Content-Range", ""))
            if start != have:
                raise _Restart()
            mode = "ab"
        else:
            if have:
                note(f"{name}: the server sends the whole file again (no Range support, or it changed); starting over")
            have, total, mode = 0, length, "wb"
        validator = response.headers.get("ETag") or response.headers.get("Last-Modified")
        if mode == "wb" or (validator and not meta.get("validator")):
            meta["validator"] = validator
            _write_json(meta_path, meta)
        if total is None and length is not None:
            total = have + length
        done = have
        progress(stage, done, total)
        with open(part, mode) as out:
            while True:
                try:
                    chunk = response.read(CHUNK)
                except (http.client.IncompleteRead, http.client.HTTPException, OSError) as error:
                    out.flush()
                    raise _Dropped(type(error).__name__) from None
                if not chunk:
                    break
                out.write(chunk)
                done += len(chunk)
                progress(stage, done, total)
        if total is not None and done < total:
            raise _Dropped(f"the body ended at {done:,} of {total:,} bytes")


def _copy_file(url: str, part: Path, have: int, stage: str, progress) -> None:
    path = Path(url2pathname(unquote(urlparse(url).path)))
    try:
        source = open(path, "rb")
    except OSError as error:
        raise FetchError(f"{url}: cannot read {path}: {error.strerror or error}", 2) from None
    with source:
        total = os.fstat(source.fileno()).st_size
        if have > total:
            raise _Restart()
        source.seek(have)
        done = have
        progress(stage, done, total)
        with open(part, "ab" if have else "wb") as out:
            while chunk := source.read(CHUNK):
                out.write(chunk)
                done += len(chunk)
                progress(stage, done, total)


def _content_range(text: str) -> tuple[int, int | None]:
    match = re.match(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)", text)
    if not match:
        return -1, None
    return int(match.group(1)), (int(match.group(3)) if match.group(3) != "*" else None)


def _content_range_total(text: str) -> int | None:
    match = re.match(r"\s*bytes\s+\*/(\d+)", text)
    return int(match.group(1)) if match else None


def _host(url: str) -> str:
    parsed = urlparse(url)
    return parsed.netloc or parsed.scheme


def sha256_of(path: Path, progress: ProgressFn | None = None, stage: str = "verify") -> str:
    digest = hashlib.sha256()
    total = path.stat().st_size
    done = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
            done += len(chunk)
            if progress:
                progress(stage, done, total)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# extracting and laying out
# ---------------------------------------------------------------------------------------------------------


def extract(archive: Path, into: Path, progress: ProgressFn | None = None, stage: str = "extract") -> None:
    """Unpack a zip or a tar (plain, gz, bz2, xz) into ``into``; a member that would land outside it is refused."""
    progress = progress or (lambda stage, done, total: None)
    into.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zipped:
            members = zipped.infolist()
            for number, member in enumerate(members, 1):
                name = PurePosixPath(member.filename.replace("\\", "/"))
                if name.is_absolute() or ".." in name.parts or re.match(r"^[A-Za-z]:", member.filename):
                    raise FetchError(f"{archive.name}: member {member.filename!r} would land outside the folder; "
                                     "refused, nothing was laid out", 2)
                zipped.extract(member, into)
                progress(stage, number, len(members))
        return
    try:
        opened = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError):
        raise FetchError(f"{archive.name}: neither a zip nor a tar archive; nothing was laid out", 1) from None
    with opened as tar:
        members = tar.getmembers()
        for number, member in enumerate(members, 1):
            try:
                tar.extract(member, into, filter="data")
            except tarfile.FilterError as error:
                raise FetchError(f"{archive.name}: member {member.name!r} refused ({error}); nothing was laid out", 2) from None
            progress(stage, number, len(members))


def find_domains(extracted: Path, base: str, domains: Mapping[str, str]) -> tuple[Path, dict[str, Path], bool]:
    """Where the domain folders are: ``extracted/base`` as the table says, else the shallowest folder (up to
    four levels down) holding any of them. Names match case-insensitively. Returns (folder, {normalised
    domain: its folder in the archive}, whether the table's base was right)."""
    wanted = {name.lower(): normal for name, normal in domains.items()}

    def matches(folder: Path) -> dict[str, Path]:
        found: dict[str, Path] = {}
        try:
            children = sorted(folder.iterdir())
        except OSError:
            return found
        for child in children:
            normal = wanted.get(child.name.lower())
            if normal and child.is_dir() and normal not in found:
                found[normal] = child
        return found

    stated = extracted / base if base else extracted
    if stated.is_dir() and (found := matches(stated)):
        return stated, found, True
    level = [extracted]
    for _ in range(5):
        following = []
        for folder in level:
            if (found := matches(folder)):
                return folder, found, False
            following.extend(sorted(p for p in folder.iterdir() if p.is_dir() and p.name != "__MACOSX"))
        level = following
    shown = sorted(p.name for p in extracted.iterdir())[:8]
    raise FetchError(f"the archive's layout is not what the table says: no domain folder "
                     f"({', '.join(sorted(set(domains)))}) under {base or 'its top'!r} or anywhere below; "
                     f"its top holds {', '.join(shown) or 'nothing'}", 1)


def count_images(root: Path, domains: list[str]) -> dict[str, tuple[int, int]]:
    """{domain: (class folders, images)} as the image-folder loader would see them."""
    from engine.data import IMAGE_SUFFIXES

    counts = {}
    for domain in domains:
        folder = root / domain
        classes = [c for c in sorted(folder.iterdir()) if c.is_dir()] if folder.is_dir() else []
        images = sum(1 for c in classes for f in c.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        counts[domain] = (len(classes), images)
    return counts


# ---------------------------------------------------------------------------------------------------------
# the whole fetch
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ArchiveResult:
    filename: str
    url: str
    sha256: str
    size: int
    checksum: str  # "published" | "given" | "recorded now" | "matched the recorded"
    resumed_from: int = 0


@dataclass
class FetchResult:
    dataset: DataSet
    root: Path
    source: str
    domains: dict[str, tuple[int, int]]  # domain -> (classes, images)
    archives: list[ArchiveResult] = field(default_factory=list)
    already: bool = False  # it was there (.fedtui-fetched.json): nothing downloaded
    notes: list[str] = field(default_factory=list)

    @property
    def preset_path(self) -> Path | None:
        if not self.dataset.preset:
            return None
        from engine.presets import PRESETS_DIR

        return PRESETS_DIR / self.dataset.preset


def env_var(key: str) -> str:
    """The variable that overrides a data set's URL(s): FEDTUI_DATA_URL_PACS, FEDTUI_DATA_URL_OFFICE_HOME, ..."""
    return "FEDTUI_DATA_URL_" + re.sub(r"[^A-Z0-9]", "_", key.upper())


def archives_for(dataset: DataSet, source: str | None = None, urls: list[str] | None = None,
                 environ: Mapping[str, str] | None = None) -> tuple[Source, list[Archive]]:
    """The archives to fetch: the table's, with URLs replaced by ``urls`` (``--url``), else by the environment
    variable ``env_var(key)`` (space-separated). Either gives one URL per archive in the table's order, or
    ``FILENAME=URL`` pairs that replace the named archives only."""
    chosen = dataset.source(source)
    archives = list(chosen.archives)
    environ = os.environ if environ is None else environ
    given = list(urls or [])
    where = "--url"
    if not given and environ.get(env_var(dataset.key), "").strip():
        given, where = environ[env_var(dataset.key)].split(), env_var(dataset.key)
    if not given:
        return chosen, archives
    names = {a.filename: i for i, a in enumerate(archives)}
    named = [_named_url(text) for text in given]
    if all(name is not None for name, _ in named):
        for name, url in named:
            if name not in names:
                raise FetchError(f"{where} {name}=...: {dataset.key} has no archive {name!r}; "
                                 f"archives: {', '.join(names)}", 2)
            archives[names[name]] = _with_url(archives[names[name]], url)
        return chosen, archives
    if len(given) != len(archives):
        raise FetchError(f"{where}: {dataset.key} has {len(archives)} archive(s) ({', '.join(names)}); give one URL "
                         f"each, in that order, or FILENAME=URL", 2)
    return chosen, [_with_url(a, url) for a, url in zip(archives, given)]


def _named_url(text: str) -> tuple[str | None, str]:
    name, sep, rest = text.partition("=")
    if sep and name and "/" not in name and ":" not in name:
        return name, rest
    return None, text


def _with_url(archive: Archive, url: str) -> Archive:
    if not urlparse(url).scheme:
        url = Path(url).resolve().as_uri()  # a plain path reads as a file:// URL
    return Archive(url, archive.filename, archive.base, archive.sha256, archive.format, archive.note)


def fetch(key: str, root: str | Path | None = None, *, source: str | None = None, urls: list[str] | None = None,
          sha256: str | None = None, force: bool = False, keep_archive: bool = False,
          progress: ProgressFn | None = None, note: NoteFn | None = None, timeout: float = 30.0,
          retries: int = 3, environ: Mapping[str, str] | None = None) -> FetchResult:
    """Fetch data set ``key`` (a key of ``DATASETS``) into ``root`` (default ``data/<folder>``); see the module
    docstring. ``sha256`` is an expected checksum given by the caller (one archive only). Raises ``FetchError``."""
    if key not in DATASETS:
        raise FetchError(f"unknown data set {key!r}; one of: {', '.join(DATASETS)}", 2)
    dataset = DATASETS[key]
    notes: list[str] = []

    def say(text: str) -> None:
        notes.append(text)
        if note:
            note(text)

    chosen, archives = archives_for(dataset, source, urls, environ)
    if sha256 is not None:
        sha256 = sha256.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise FetchError("--sha256 must be 64 hexadecimal digits", 2)
        if len(archives) != 1:
            raise FetchError(f"--sha256 names one archive's checksum; {key} has {len(archives)}", 2)
    root = Path(root if root is not None else Path("data") / dataset.folder).expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise FetchError(f"--root {root} is a file, not a folder", 2)
    marker = _read_json(root / FETCHED_FILE)
    present = [d for d in dataset.domain_names if (root / d).is_dir()]
    if not force and marker.get("dataset") == key and len(present) == len(dataset.domain_names):
        return FetchResult(dataset, root, marker.get("source", chosen.name), count_images(root, present),
                           already=True, notes=notes)
    if present and not force and marker.get("dataset") != key:
        raise FetchError(f"{root} already has domain folders ({', '.join(present)}) that fedtui did not fetch; "
                         "use --force to replace them, or another --root", 2)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise FetchError(f"cannot create --root {root}: {error.strerror or error}", 2) from None
    downloads = root / DOWNLOAD_DIR
    store_path = root / CHECKSUMS_FILE
    store = _read_json(store_path)
    results: list[ArchiveResult] = []
    verified: list[tuple[Archive, Path, ArchiveResult]] = []
    for archive in archives:  # download and verify every archive before anything is laid out
        dest = downloads / archive.filename
        if force and dest.exists():
            dest.unlink()
        resumed = 0
        if not dest.exists():
            resumed = download(archive.url, dest, progress=progress, note=say, timeout=timeout, retries=retries)
        else:
            say(f"{archive.filename}: using the complete download in {downloads}")
        actual = sha256_of(dest, progress, f"verify {archive.filename}")
        expected, kind, recorded = sha256 or archive.sha256, ("given" if sha256 else "published"), None
        if expected is None and archive.url in store:
            recorded = store[archive.url]
            expected, kind = recorded.get("sha256"), "recorded"
        if expected is not None and actual != expected:
            kept = dest.with_name(f"{dest.name}.rejected-{actual[:12]}")
            os.replace(dest, kept)
            when = f" on {recorded.get('recorded', '?')}" if recorded else ""
            raise ChecksumMismatch(
                f"{archive.filename}: SHA-256 {actual} is not the {kind} checksum{when} {expected} of {archive.url}; "
                f"refused, nothing was extracted; the file is kept aside as {kept}", kept)
        status = {"given": "given", "published": "published", "recorded": "matched the recorded"}[kind] if expected \
            else "recorded now"
        result = ArchiveResult(archive.filename, archive.url, actual, dest.stat().st_size, status, resumed)
        verified.append((archive, dest, result))
        results.append(result)
    work = root / EXTRACT_DIR
    shutil.rmtree(work, ignore_errors=True)
    laid_out: dict[str, Path] = {}
    try:
        for number, (archive, dest, _) in enumerate(verified):
            into = work / str(number)
            extract(dest, into, progress, f"extract {archive.filename}")
            base, found, as_stated = find_domains(into, archive.base, dataset.domains)
            if not as_stated:
                inside = base.relative_to(into).as_posix() or "the archive's top"
                say(f"{archive.filename}: the domain folders are under {inside!r}, not {archive.base!r} as the "
                    f"table says")
            for normal, folder in found.items():
                if normal in laid_out:
                    raise FetchError(f"{archive.filename}: domain {normal!r} comes twice", 1)
                laid_out[normal] = folder
        for normal, folder in laid_out.items():
            target = root / normal
            if target.exists():
                shutil.rmtree(target)
            shutil.move(str(folder), str(target))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    missing = [d for d in dataset.domain_names if d not in laid_out]
    if missing:
        say(f"the archive(s) had no folder for {', '.join(missing)}")
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    recorded_now = [r for r in results if r.checksum == "recorded now"]
    if recorded_now:
        store = _read_json(store_path)
        for r in recorded_now:
            store[r.url] = {"sha256": r.sha256, "size": r.size, "file": r.filename, "dataset": key, "recorded": now}
        _write_json(store_path, store)
    if not keep_archive:
        for _, dest, _ in verified:
            dest.unlink(missing_ok=True)
        try:
            downloads.rmdir()
        except OSError:
            pass
    counts = count_images(root, [d for d in dataset.domain_names if d in laid_out])
    for domain, (classes, images) in counts.items():
        if not images:
            say(f"domain {domain!r} has no images in class folders")
    _write_json(root / FETCHED_FILE, {
        "dataset": key, "source": chosen.name, "time": now,
        "archives": [{"file": r.filename, "url": r.url, "sha256": r.sha256, "size": r.size} for r in results],
        "domains": {d: {"classes": c, "images": n} for d, (c, n) in counts.items()},
    })
    return FetchResult(dataset, root, chosen.name, counts, results, notes=notes)


def preset_keys(result: FetchResult) -> list[str]:
    """What to put in a preset for this data: the ``data.root`` line, and how to check and run the matching
    shipped preset with it."""
    import shlex

    root = str(result.root)
    lines = [f"data.root = {json.dumps(root)}"]
    preset = result.preset_path
    if preset is not None:
        shown = os.path.relpath(preset) if _inside(preset, Path.cwd()) else str(preset)
        override = shlex.quote(f"data.root={root}")
        lines.append(f"fedtui check {shlex.quote(shown)} --set {override}")
        lines.append(f"fedtui run {shlex.quote(shown)} --set {override}")
    elif result.dataset.key == "domainnet":
        lines.append("no DomainNet preset ships: copy presets/fedclip-pacs.toml, set data.root as above and "
                     "data.holdout to one of " + ", ".join(result.dataset.domain_names))
    return lines


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(temporary, path)


__all__ = [
    "DATASETS", "Archive", "ArchiveResult", "ChecksumMismatch", "DataSet", "FetchError", "FetchResult", "Offline",
    "Source", "archives_for", "download", "env_var", "extract", "fetch", "find_domains", "preset_keys", "sha256_of",
]
