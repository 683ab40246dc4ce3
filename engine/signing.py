"""Ed25519 keys and signed folders for rounds carried by files (``engine.file_rounds``).

A *signed folder* is a few plain files plus two that vouch for them:

    manifest.json   what the folder is (kind, round, who signed it, ...) and the SHA-256 and size of
                    every other file in it
    manifest.sig    one line: the base64 Ed25519 signature of ``DOMAIN + kind + "\\n" + manifest.json``

Checking a folder (``verify_folder``) reads manifest.sig and manifest.json (both small, size-limited,
JSON only), finds which trusted public key made the signature, then hashes every listed file. Only after
that does a caller open a file, and then only as safetensors or JSON: nothing received is unpickled.
The ``kind`` inside the signed bytes keeps a server's package signature from passing as an update and
the other way round.

Keys: ``NAME.key`` is the private key (PKCS#8 PEM, unencrypted, mode 0600; it never travels);
``NAME.pub`` is one line ``fedtui-ed25519 <base64 of the 32 raw bytes> NAME``. A key's fingerprint is
``sha256:`` and the first 16 hex digits of SHA-256 over the raw public key.

What this protects and what it does not: see docs/file-rounds.md. In short, a verified folder was written
by the holder of that private key and not changed since; it is not secret (nothing is encrypted) and a
holder of a valid key can still sign a bad update.

Needs the ``cryptography`` package (``pip install 'fedtui[files]'``); importing this module does not.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DOMAIN = b"fedtui-file-rounds/1\n"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
PUBLIC_PREFIX = "fedtui-ed25519"
MAX_MANIFEST_BYTES = 1 << 20
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


class SigningUnavailable(RuntimeError):
    """The ``cryptography`` package is missing."""


class KeyFileError(ValueError):
    """A key file that cannot be used; the message names the file and why."""


class Refused(ValueError):
    """A folder that does not verify. ``reason`` is one word (unsigned, unknown-key, tampered, malformed,
    wrong-signer, ...) and ``str()`` is one line naming the folder and why."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
    except ImportError:
        raise SigningUnavailable(
            "signing needs the cryptography package: pip install 'fedtui[files]' (or: pip install cryptography)"
        ) from None
    return InvalidSignature, serialization, Ed25519PrivateKey, Ed25519PublicKey


def check_name(name: str, what: str = "name") -> str:
    if not NAME_PATTERN.match(name):
        raise ValueError(f"{what} {name!r}: letters, digits, '_', '.' and '-' only, starting with a letter or digit")
    return name


def fingerprint(raw_public: bytes) -> str:
    return "sha256:" + hashlib.sha256(raw_public).hexdigest()[:16]


@dataclass(frozen=True)
class PublicKey:
    name: str
    raw: bytes  # the 32 raw Ed25519 bytes
    path: str = ""

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.raw)

    def line(self) -> str:
        return f"{PUBLIC_PREFIX} {base64.b64encode(self.raw).decode()} {self.name}\n"

    def verifies(self, signature: bytes, message: bytes) -> bool:
        InvalidSignature, _, _, Ed25519PublicKey = _crypto()
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, message)
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True)
class PrivateKey:
    key: Any  # cryptography's Ed25519PrivateKey
    path: str = ""

    @property
    def public_raw(self) -> bytes:
        _, serialization, _, _ = _crypto()
        return self.key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_raw)

    def sign(self, message: bytes) -> bytes:
        return self.key.sign(message)


# --- key files ---------------------------------------------------------------------------------------


def generate_keypair(out_dir: str | Path, name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` (mode 0600, created exclusively) and ``NAME.pub`` under ``out_dir``; never overwrites."""
    _, serialization, Ed25519PrivateKey, _ = _crypto()
    check_name(name, "key name")
    out = Path(out_dir)
    key_path, pub_path = out / f"{name}.key", out / f"{name}.pub"
    for path in (key_path, pub_path):
        if path.exists() or path.is_symlink():
            raise FileExistsError(f"{path} exists; keys are never overwritten (move it away first)")
    out.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(pem)
    os.chmod(key_path, 0o600)  # whatever the umask
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    descriptor = os.open(pub_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(descriptor, "w", encoding="ascii") as handle:
        handle.write(PublicKey(name, raw).line())
    return key_path, pub_path


def load_private_key(path: str | Path) -> PrivateKey:
    _, serialization, Ed25519PrivateKey, _ = _crypto()
    path = Path(path)
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"{path}: not a regular file")
        if os.name == "posix" and info.st_mode & 0o077:
            raise KeyFileError(f"{path}: a private key readable by others (mode {stat.S_IMODE(info.st_mode):04o}); "
                            f"chmod 600 {path}")
        data = path.read_bytes()[: 64 * 1024]
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such key file") from None
    except OSError as error:
        raise KeyFileError(f"{path}: cannot be read: {error.strerror or error}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as error:
        raise KeyFileError(f"{path}: not an unencrypted PEM private key ({error})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an Ed25519 key (make one with `fedtui keys`)")
    return PrivateKey(key, str(path))


def parse_public_key(text: str, where: str) -> PublicKey:
    parts = text.strip().split()
    if len(parts) != 3 or parts[0] != PUBLIC_PREFIX:
        raise KeyFileError(f"{where}: not a fedtui public key (one line: {PUBLIC_PREFIX} <base64> <name>)")
    try:
        raw = base64.b64decode(parts[1], validate=True)
    except ValueError:
        raise KeyFileError(f"{where}: the key is not valid base64") from None
    if len(raw) != 32:
        raise KeyFileError(f"{where}: an Ed25519 public key has 32 bytes, this one {len(raw)}")
    try:
        check_name(parts[2], "key name")
    except ValueError as error:
        raise KeyFileError(f"{where}: {error}") from None
    return PublicKey(parts[2], raw, where)


def load_public_key(path: str | Path) -> PublicKey:
    path = Path(path)
    try:
        if path.stat().st_size > 4096:
            raise KeyFileError(f"{path}: too large for a public key")
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such public key file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise KeyFileError(f"{path}: cannot be read: {getattr(error, 'strerror', None) or error}") from None
    key = parse_public_key(text, str(path))
    if path.suffix == ".pub" and path.stem != key.name:
        raise KeyFileError(f"{path}: the file is named {path.stem!r} but the key inside says {key.name!r}")
    return key


def load_public_keys(folder: str | Path) -> dict[str, PublicKey]:
    """Every ``NAME.pub`` in ``folder`` by name; two names sharing one key is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise KeyFileError(f"{folder}: not a folder of public keys")
    keys = {p.stem: load_public_key(p) for p in sorted(folder.glob("*.pub"))}
    if not keys:
        raise KeyFileError(f"{folder}: no *.pub files")
    seen: dict[bytes, str] = {}
    for name, key in keys.items():
        if key.raw in seen:
            raise KeyFileError(f"{folder}: {seen[key.raw]}.pub and {name}.pub are the same key; each site needs its own")
        seen[key.raw] = name
    return keys


# --- signed folders ------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def signed_message(kind: str, manifest_bytes: bytes) -> bytes:
    return DOMAIN + kind.encode() + b"\n" + manifest_bytes


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()


def sign_folder(folder: str | Path, kind: str, manifest: dict[str, Any], key: PrivateKey, signer: str) -> bytes:
    """Hash every file in ``folder`` into ``manifest["files"]``, add the signer, write manifest.json and
    manifest.sig. Returns the manifest bytes (their SHA-256 names the folder's content)."""
    folder = Path(folder)
    files = {}
    for path in sorted(folder.iterdir()):
        if path.name in (MANIFEST, SIGNATURE):
            continue
        if not path.is_file() or path.is_symlink():
            raise ValueError(f"{path}: only plain files go into a signed folder")
        files[path.name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest = {**manifest, "kind": kind, "files": files, "signer": {"name": signer, "key": key.fingerprint}}
    data = manifest_bytes(manifest)
    (folder / MANIFEST).write_bytes(data)
    signature = key.sign(signed_message(kind, data))
    (folder / SIGNATURE).write_text(base64.b64encode(signature).decode() + "\n", encoding="ascii")
    return data


@dataclass
class Verified:
    manifest: dict[str, Any]
    signer: PublicKey
    digest: str  # SHA-256 of manifest.json: names exactly this folder's content


def _read_small(path: Path, limit: int) -> bytes:
    info = path.lstat()
    if not stat.S_ISREG(info.st_mode):
        raise OSError(f"{path.name} is not a regular file")
    if info.st_size > limit:
        raise OSError(f"{path.name} is larger than {limit} bytes")
    return path.read_bytes()


def verify_folder(folder: str | Path, kind: str, trusted: dict[str, PublicKey], label: str = "") -> Verified:
    """The folder's manifest, once its signature verifies with one of ``trusted`` and every listed file
    matches its SHA-256 and size; else ``Refused`` with one line that says which folder and why."""
    folder = Path(folder)
    label = label or str(folder)
    if not folder.is_dir():
        raise Refused("missing", f"{label}: no such folder")
    sig_path, manifest_path = folder / SIGNATURE, folder / MANIFEST
    if not sig_path.exists():
        raise Refused("unsigned", f"{label}: unsigned (no {SIGNATURE})")
    try:
        signature_text = _read_small(sig_path, 4096).decode("ascii").strip()
        signature = base64.b64decode(signature_text, validate=True)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise Refused("malformed", f"{label}: {SIGNATURE} is not a base64 signature ({error})") from None
    if len(signature) != 64:
        raise Refused("malformed", f"{label}: {SIGNATURE} is not an Ed25519 signature (64 bytes)")
    try:
        data = _read_small(manifest_path, MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raise Refused("malformed", f"{label}: signed but {MANIFEST} is missing") from None
    except OSError as error:
        raise Refused("malformed", f"{label}: {MANIFEST}: {error}") from None
    message = signed_message(kind, data)
    signer = next((key for key in trusted.values() if key.verifies(signature, message)), None)
    if signer is None:
        claimed = _claimed_key(data)
        known = {k.fingerprint: k.name for k in trusted.values()}
        if claimed in known:
            raise Refused("tampered", f"{label}: the signature does not verify with {known[claimed]}'s key "
                                      f"({claimed}): {MANIFEST} was changed after signing")
        if claimed is None:
            raise Refused("tampered", f"{label}: the signature verifies with no trusted key and {MANIFEST} "
                                      f"names no signer key (damaged or altered)")
        raise Refused("unknown-key", f"{label}: signed by an unknown key ({claimed}), not one of "
                                     f"{', '.join(sorted(trusted)) or 'no trusted keys'}")
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise Refused("malformed", f"{label}: {MANIFEST} is not JSON although signed") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != kind or not isinstance(manifest.get("files"), dict):
        raise Refused("malformed", f"{label}: not a {kind} (its manifest says {manifest.get('kind')!r})"
                      if isinstance(manifest, dict) else f"{label}: {MANIFEST} is not an object")
    signer_block = manifest.get("signer")
    if not isinstance(signer_block, dict) or signer_block.get("key") != signer.fingerprint:
        raise Refused("malformed", f"{label}: the manifest's signer key is not the key that signed it")
    for name, entry in manifest["files"].items():
        if not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", "..") or not isinstance(entry, dict):
            raise Refused("malformed", f"{label}: the manifest lists a bad file name {name!r}")
        path = folder / name
        try:
            info = path.lstat()
        except FileNotFoundError:
            raise Refused("tampered", f"{label}: {name} is listed in the manifest but missing") from None
        if not stat.S_ISREG(info.st_mode):
            raise Refused("tampered", f"{label}: {name} is not a regular file")
        if info.st_size != entry.get("bytes") or sha256_file(path) != entry.get("sha256"):
            raise Refused("tampered", f"{label}: {name} does not match its SHA-256 in the signed manifest "
                                      f"(changed or damaged after signing)")
    return Verified(manifest, signer, hashlib.sha256(data).hexdigest())


def _claimed_key(data: bytes) -> str | None:
    """The signer key an unverified manifest claims, only to word the refusal (never trusted)."""
    try:
        claimed = json.loads(data.decode("utf-8")).get("signer", {}).get("key")
    except (UnicodeDecodeError, ValueError, AttributeError):
        return None
    return claimed if isinstance(claimed, str) else None
