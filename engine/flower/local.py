"""``fedtui flower local``: one SuperLink and K SuperNodes on loopback, in Flower's deployment runtime.

Separate processes, as on separate machines (docs/deploy.md): ``flower-superlink``, one ``flower-supernode``
per client (its node config names the client and its state folder), then ``flwr run`` of the app folder
written here (``engine.flower.apps``), the ServerApp's output followed with ``flwr log``. Not the
simulation engine. Everything the deployment needs is made for the run, inside its run directory:

    <run>/flower/preset.toml        the resolved preset the ServerApp runs
    <run>/flower/app/pyproject.toml the Flower app (FAB) that ``flwr run`` sends to the SuperLink
    <run>/flower/tls/               a CA made for this run and the SuperLink's certificate for 127.0.0.1 and
                                    localhost (ECDSA P-384, 7 days); the CA's private key is never written
    <run>/flower/keys/              each SuperNode's key pair (NIST P-384; private keys 0600), registered with
                                    the SuperLink before the SuperNodes start (``flwr supernode register``)
    <run>/flower/home/              FLWR_HOME of each process (installed FABs, the CLI's connection)
    <run>/flower/state/<client>/    what a preset keeps at a site between rounds (never sent)
    <run>/flower/logs/              every process's output; serverapp.log is the ServerApp's (``flwr log``)

With ``tls=False`` everything runs with ``--insecure`` (plain HTTP on loopback) and without node
authentication, which Flower only allows over TLS.

Every process is started in its own session and stopped in ``stop()`` (SIGTERM, then SIGKILL after a grace
period), also on Ctrl-C or a failure (``with LocalDeployment(...)``). Flower's SuperLink and SuperNodes
start further processes in sessions of their own (SuperExec, flwr-serverapp, flwr-clientapp), so
``stop()`` also ends every descendant it has seen (``/proc``; they would otherwise wait on a parent that
init has not reaped yet).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from engine import events as ev
from engine.flower import (
    NODE_CLIENT, NODE_STATE_DIR, RUN_DIR, RUN_PRESET, RUN_RESUME, RUN_TIMEOUT, RUN_WAIT, FlowerError,
)

Log = Callable[[str, str], None]
CONNECTION = "fedtui-local"  # the flwr CLI's name for this run's SuperLink
STOP_GRACE_SECONDS = 8.0
START_TIMEOUT_SECONDS = 90.0


def _quiet(level: str, text: str) -> None:
    pass


# --- keys and certificates -----------------------------------------------------------------------------------


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def make_tls(folder: Path, hosts: list[str] | tuple[str, ...] = ("127.0.0.1", "localhost"), days: int = 7) -> dict[str, Path]:
    """A CA and a server certificate for ``hosts`` (IP addresses or DNS names) signed by it, ECDSA P-384.

    Writes ca.pem (give it to every SuperNode and to the flwr CLI), server.pem and server.key (0600; they stay
    on the SuperLink's machine). The CA's private key is used once, here, and never written: nobody can sign
    another certificate this CA vouches for."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("ca.pem", "server.pem", "server.key"):
        if (folder / name).exists():
            raise FileExistsError(f"{folder / name} exists; a certificate is never overwritten")
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedtui Flower CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(hosts[0]))]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    files = _tls_files(folder)
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(files["key"], key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    return files


def _tls_files(folder: Path) -> dict[str, Path]:
    return {"ca": folder / "ca.pem", "cert": folder / "server.pem", "key": folder / "server.key"}


def _node_key_files(folder: Path, name: str) -> tuple[Path, Path]:
    return folder / f"{name}.key", folder / f"{name}.pub"


def _existing_tls(folder: Path) -> dict[str, Path] | None:
    """A resumed run's certificates, when all three are still there (a resume uses them, not new ones)."""
    files = _tls_files(folder)
    return files if all(path.is_file() for path in files.values()) else None


def _existing_node_key(folder: Path, name: str) -> tuple[Path, Path] | None:
    """A resumed run's SuperNode key pair, registered again with the new SuperLink."""
    files = _node_key_files(folder, name)
    return files if all(path.is_file() for path in files) else None


def make_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's authentication key pair, NIST P-384: NAME.key (OpenSSH private key, 0600, stays at the
    site: ``flower-supernode --auth-supernode-private-key``) and NAME.pub (OpenSSH public key, registered with
    the SuperLink: ``flwr supernode register NAME.pub``)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = Path(folder)
    private, public = _node_key_files(folder, name)
    if private.exists() or public.exists():
        raise FileExistsError(f"{private} or {public} exists; a key is never overwritten")
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                              serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH) + f" {name}\n".encode())
    return private, public


# --- the app folder and config strings ---------------------------------------------------------------------------


def config_value(value: Any) -> str:
    """A value for Flower's ``--node-config`` / ``--run-config`` (``key=value`` pairs split on spaces)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text and "\\" not in text:
        return f'"{text}"'
    raise FlowerError(f"{text!r} has both kinds of quotes; Flower's config strings cannot carry it")


def config_string(values: dict[str, Any]) -> str:
    return " ".join(f"{key}={config_value(value)}" for key, value in values.items())


def write_app(folder: Path, wait_s: float = 300, timeout_s: float = 3600) -> Path:
    """A Flower app folder whose components are ``engine.flower.apps``'s; ``flwr run FOLDER`` builds its FAB."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(f"""# Written by fedtui (engine/flower/local.py): `flwr run` builds a Flower App Bundle from this folder.
# The apps are fedtui's own (engine.flower.apps); every machine needs `pip install 'fedtui[flower]'`.
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedtui-flower"
version = "1.0.0"
description = "fedtui: federated CLIP adapter rounds over Flower (engine.flower)"
license = "MIT"
dependencies = ["flwr>=1.41,<1.43"]

[tool.flwr.app]
publisher = "fedtui"

[tool.flwr.app.components]
serverapp = "engine.flower.apps:server_app"
clientapp = "engine.flower.apps:client_app"

[tool.flwr.app.config]
{RUN_PRESET} = ""
set = ""
{RUN_DIR} = ""
{RUN_WAIT} = {float(wait_s)!r}
{RUN_TIMEOUT} = {float(timeout_s)!r}
{RUN_RESUME} = false
""", encoding="utf-8")
    return folder


def write_cli_config(home: Path, address: str, ca: Path | None) -> Path:
    """FLWR_HOME/config.toml for the flwr CLI: one connection, ``fedtui-local``, to this run's SuperLink."""
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]", f'address = "{address}"']
    lines.append(f"root-certificates = {json.dumps(str(ca))}" if ca else "insecure = true")
    path = home / "config.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --- processes -------------------------------------------------------------------------------------------------


_TAKEN: set[int] = set()  # ports this process has handed out: each Flower process gets its own


def free_port() -> int:
    """A loopback port to give a Flower process that binds it a few seconds later.

    Not one the kernel picks for ``bind(0)``: those come from the ephemeral range, which outgoing connections
    (every SuperNode polling the SuperLink, every ClientApp talking to its SuperNode) draw their source ports
    from too, so one of them could take the port before the process binds it (a SuperNode then dies with
    "Runtime HTTP API failed to start"). A port below that range, free now, is taken only by a deliberate bind."""
    low, _ = _ephemeral_range()
    candidates = list(range(max(1024, low - 12_000), low))
    random.shuffle(candidates)
    for port in candidates:
        if port in _TAKEN:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _TAKEN.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # every one taken: let the kernel choose
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default; macOS uses 49152-65535, below which this stays too


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time) from /proc; {} where there is no /proc."""
    table = {}
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as handle:
                    fields = handle.read().rsplit(b")", 1)[1].split()
                table[int(entry)] = (int(fields[1]), int(fields[19]))
            except (OSError, IndexError, ValueError):
                continue
    return table


def _start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return int(handle.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _tool(name: str) -> str:
    """Flower's command ``name`` beside this Python (the virtual environment's bin), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise FlowerError(f"{name} is not installed: pip install 'fedtui[flower]'")
    return found


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log: Path


@dataclass
class LocalDeployment:
    """The processes of one loopback deployment; ``stop()`` ends every one of them and their descendants."""

    folder: Path  # <run>/flower
    log: Log = _quiet
    processes: list[Process] = field(default_factory=list)
    seen: dict[int, int] = field(default_factory=dict)  # descendant pid -> its start time

    def env(self, home: Path) -> dict[str, str]:
        env = dict(os.environ)
        env["FLWR_HOME"] = str(home)
        env["FLWR_TELEMETRY_ENABLED"] = "0"  # nothing leaves this machine
        env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        source = str(Path(__file__).resolve().parent.parent.parent)  # fedtui's source tree, installed or not
        env["PYTHONPATH"] = os.pathsep.join(p for p in [source, env.get("PYTHONPATH", "")] if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def start(self, name: str, argv: list[str], home: Path) -> Process:
        home.mkdir(parents=True, exist_ok=True)
        log_path = self.folder / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as out:
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                     env=self.env(home), start_new_session=True)
        process = Process(name, popen, log_path)
        self.processes.append(process)
        return process

    def run_cli(self, argv: list[str], home: Path, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """A flwr CLI command, to completion (its output also goes to logs/cli.log)."""
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=self.env(home),
                              timeout=timeout, start_new_session=True)
        log_path = self.folder / "logs" / "cli.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a", encoding="utf-8") as out:
            out.write(f"$ {' '.join(argv)}\n{done.stdout}{done.stderr}(exit {done.returncode})\n")
        return done

    def watch(self) -> None:
        """Remember every descendant of the processes started here (they may outlive their parents)."""
        table = _proc_table()
        children: dict[int, list[int]] = {}
        for pid, (parent, _) in table.items():
            children.setdefault(parent, []).append(pid)
        todo = [p.popen.pid for p in self.processes]
        while todo:
            pid = todo.pop()
            for child in children.get(pid, []):
                if child not in self.seen:
                    self.seen[child] = table[child][1]
                todo.append(child)

    def dead(self) -> list[Process]:
        return [p for p in self.processes if p.popen.poll() is not None]

    def stop(self) -> None:
        """SIGTERM to every process group started here and every descendant seen, SIGKILL after a grace period.
        A second Ctrl-C (or SIGTERM) meanwhile does not cut it short, which would leave processes behind."""
        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, signal.SIG_IGN)
            except ValueError:  # not the main thread: signals are not ours to set
                pass
        try:
            self._stop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _stop(self) -> None:
        self.watch()

        def signal_all(sig: int) -> None:
            for process in self.processes:
                if process.popen.poll() is None:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(process.popen.pid, sig)
            for pid, started in list(self.seen.items()):
                if _start_time(pid) == started:  # still the process seen, not a new one with its pid
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, sig)

        signal_all(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while time.monotonic() < deadline:
            alive = [p for p in self.processes if p.popen.poll() is None]
            alive_seen = [pid for pid, started in self.seen.items() if _start_time(pid) == started and not _zombie(pid)]
            if not alive and not alive_seen:
                break
            time.sleep(0.1)
        signal_all(signal.SIGKILL)
        for process in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.popen.wait(timeout=5)

    def __enter__(self) -> "LocalDeployment":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return True


def wait_for_port(port: int, process: Process, timeout: float = START_TIMEOUT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            raise FlowerError(f"{process.name} exited ({process.popen.returncode}) before it listened on port {port}: "
                              f"{_tail(process.log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.2)
    raise FlowerError(f"{process.name} did not listen on port {port} within {timeout:.0f} s; see {process.log}")


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])


# --- following a run directory ---------------------------------------------------------------------------------


class MetricsTail:
    """New whole lines of a run directory's metrics.jsonl as events (the file another process is writing)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.offset = 0
        self.partial = b""

    def read(self) -> list[ev.Event]:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except OSError:
            return []
        self.offset += len(data)
        data = self.partial + data
        *lines, self.partial = data.split(b"\n")
        events = []
        for line in lines:
            with contextlib.suppress(ValueError, TypeError, KeyError):
                events.append(ev.event_from_dict(json.loads(line)))
        return events


# --- the whole run --------------------------------------------------------------------------------------------


@dataclass
class LocalResult:
    run_dir: Path
    status: str  # completed | stopped | diverged | failed | interrupted
    summary: dict[str, Any]
    flower_run_id: str = ""
    timings: dict[str, float] = field(default_factory=dict)


def roster_of(preset) -> list[str]:
    """The run's client names, from the preset alone (as ``engine.file_rounds.build_side`` without data)."""
    from engine.data import build_source
    from engine.resolve import client_names

    source = build_source(preset)
    domains = list(preset.data.domains or source.domains)
    not_training = set(preset.data.holdout) | {getattr(preset.data, "eval_domain", "")}
    return client_names(preset, [d for d in domains if d not in not_training])


def plan_preset(preset_path: Path, overrides: list[str], clients: int | None):
    """(resolved preset, roster) for ``clients`` SuperNodes: ``data.clients`` for iid and dirichlet partitions;
    with ``partition = "domain"`` the count must be the training domains'. PresetError / FlowerError."""
    from engine.presets import load_preset
    from engine.strategies import build_strategy

    overrides = list(overrides)
    preset = load_preset(preset_path, overrides)
    if clients is not None:
        if clients < 1:
            raise FlowerError(f"--clients {clients}: at least one")
        if preset.data.partition == "domain":
            roster = roster_of(preset)
            if clients != len(roster):
                raise FlowerError(f"--clients {clients}: with data.partition = 'domain' the clients are the training "
                                  f"domains ({', '.join(roster)}): {len(roster)} SuperNodes; or choose "
                                  "data.partition = 'iid' / 'dirichlet' with data.clients")
        elif clients != preset.data.clients:
            overrides.append(f"data.clients={clients}")
    if preset.run.cache_dir and not Path(preset.run.cache_dir).expanduser().is_absolute():
        # The ServerApp and ClientApps run in other folders: the cache the user means is relative to here.
        overrides.append(f"run.cache_dir={Path(preset.run.cache_dir).expanduser().resolve()}")
    preset = load_preset(preset_path, overrides)
    from engine.flower.server import check_supported

    check_supported(preset, build_strategy(preset.federation.aggregation, preset.federation.aggregation_options))
    return preset, roster_of(preset)


def run_local(preset_path: Path, overrides: list[str] | None = None, clients: int | None = None,
              run_dir: Path | None = None, tls: bool = True, auth: bool = True, wait_s: float = 300.0,
              timeout_s: float = 3600.0, sink: Callable[[ev.Event], None] | None = None, log: Log = _quiet,
              fleet_address: Callable[[int], str] | None = None, on_started: Callable[[LocalDeployment], None] | None = None,
              resume: bool = False) -> LocalResult:
    """Run the preset over a SuperLink and one SuperNode per client on loopback; every event of the run
    directory goes to ``sink`` as it is written. Raises PresetError / FlowerError for bad input (nothing
    started); a run that fails reports it in its status. ``fleet_address(port)`` lets a benchmark put
    something between the SuperNodes and the SuperLink (a byte-counting relay).

    ``resume``: continue ``run_dir`` (a run this function started, stopped, killed or failed) from its last
    kept round, with the preset it ran (``preset_path``, ``overrides`` and ``clients`` are not used), its
    SuperNodes' keys and state folders, and fresh Flower processes; ``sink`` first sees the rounds it had."""
    from engine.presets import to_toml
    from engine.runstore import RunStore, new_run_dir, read_summary
    from engine.summary import RunSummary

    if auth and not tls:
        raise FlowerError("SuperNode authentication needs TLS (Flower refuses it over plain HTTP)")
    if resume:
        if run_dir is None or not (Path(run_dir) / "flower" / "preset.toml").is_file():
            raise FlowerError(f"{run_dir}: not a run directory `fedtui flower local` made (no flower/preset.toml)")
        preset_path, overrides, clients = Path(run_dir) / "flower" / "preset.toml", [], None
    preset, roster = plan_preset(Path(preset_path), list(overrides or []), clients)
    for tool in ("flower-superlink", "flower-supernode", "flwr"):
        _tool(tool)
    run_dir = Path(run_dir) if run_dir else new_run_dir(preset.run.out_dir, preset.run.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    folder = run_dir / "flower"
    folder.mkdir(exist_ok=True)
    if resume:
        from engine.run_state import ResumeError
        from engine.runner import reopen

        try:  # metrics.jsonl back to the last kept round before anything reads it; the ServerApp does it again
            reopen(run_dir)
        except ResumeError as error:
            raise FlowerError(str(error)) from None
    else:
        (folder / "preset.toml").write_text(to_toml(preset), encoding="utf-8")
    app = write_app(folder / "app", wait_s, timeout_s)
    home = folder / "home"
    timings: dict[str, float] = {}
    began = time.perf_counter()
    tls_files = (_existing_tls(folder / "tls") or make_tls(folder / "tls")) if tls else None
    port = free_port()
    address = f"127.0.0.1:{port}"
    write_cli_config(home / "cli", address, tls_files["ca"] if tls_files else None)
    security = (["--ssl-ca-certfile", str(tls_files["ca"]), "--ssl-certfile", str(tls_files["cert"]),
                 "--ssl-keyfile", str(tls_files["key"])] if tls_files else ["--insecure"])
    node_security = ["--root-certificates", str(tls_files["ca"])] if tls_files else ["--insecure"]
    status, error, flower_run = "failed", "", ""
    tail = MetricsTail(run_dir)
    seen_end = False
    deployment = LocalDeployment(folder, log)
    try:
        with deployment:
            link = deployment.start("superlink", [
                _tool("flower-superlink"), "--host", "127.0.0.1", "--port", str(port),
                "--disable-runtime-dependency-installation", *security,
                *(["--enable-supernode-auth"] if auth else []),
            ], home / "superlink")
            wait_for_port(port, link)
            timings["superlink_ready"] = time.perf_counter() - began
            log("info", f"SuperLink on {address} ({'TLS' if tls else 'plain HTTP'}"
                        f"{', SuperNode authentication' if auth else ''}); logs in {folder / 'logs'}")
            keys = {}
            if auth:
                for name in roster:
                    keys[name] = _existing_node_key(folder / "keys", name) or make_node_key(folder / "keys", name)
                    done = deployment.run_cli([_tool("flwr"), "supernode", "register", str(keys[name][1]), CONNECTION,
                                               "--name", name], home / "cli")
                    if done.returncode != 0:
                        raise FlowerError(f"could not register {name}'s key with the SuperLink: "
                                          f"{(done.stderr or done.stdout).strip().splitlines()[-1:]}")
                timings["registered"] = time.perf_counter() - began
            superlink_for_nodes = fleet_address(port) if fleet_address else address
            for name in roster:
                node_config = {NODE_CLIENT: name, NODE_STATE_DIR: str(folder / "state" / name)}
                deployment.start(f"supernode-{name}", [
                    _tool("flower-supernode"), "--superlink", superlink_for_nodes, "--port", str(free_port()),
                    *node_security, *(["--auth-supernode-private-key", str(keys[name][0])] if auth else []),
                    "--node-config", config_string(node_config),
                ], home / f"node-{name}")
            if on_started:
                on_started(deployment)
            run_config = {RUN_PRESET: str(folder / "preset.toml"), RUN_DIR: str(run_dir), RUN_WAIT: float(wait_s),
                          RUN_TIMEOUT: float(timeout_s), RUN_RESUME: resume}
            done = deployment.run_cli([_tool("flwr"), "run", str(app), CONNECTION, "--run-config",
                                       config_string(run_config), "--format", "json"], home / "cli")
            try:
                flower_run = str(json.loads(done.stdout[done.stdout.index("{"):])["run-id"])
            except (ValueError, IndexError, KeyError, TypeError):
                raise FlowerError(f"flwr run did not start the run: {(done.stderr or done.stdout).strip()[-400:]}") from None
            timings["run_submitted"] = time.perf_counter() - began
            log("info", f"Flower run {flower_run}: {len(roster)} SuperNode(s) ({', '.join(roster)}); "
                        f"run directory {run_dir}")
            follower = deployment.start("serverapp", [_tool("flwr"), "log", flower_run, CONNECTION, "--stream"],
                                        home / "cli")
            reported_dead: set[str] = set()
            last_watch, log_ended = 0.0, None
            while True:
                for event in tail.read():
                    if sink:
                        sink(event)
                    if isinstance(event, (ev.RunFinished, ev.RunFailed)):
                        seen_end = True
                if seen_end and read_summary(run_dir):
                    break
                now = time.monotonic()
                if now - last_watch > 2.0:
                    deployment.watch()
                    last_watch = now
                for process in deployment.dead():
                    if process.name in reported_dead:
                        continue
                    reported_dead.add(process.name)
                    if process is link:
                        raise FlowerError(f"the SuperLink exited ({link.popen.returncode}): {_tail(link.log)}")
                    if process is follower:
                        log_ended = now
                    else:
                        log("warning", f"{process.name} exited ({process.popen.returncode}): {_tail(process.log, 1)}")
                if log_ended is not None and now - log_ended > 10.0 and not read_summary(run_dir):
                    raise FlowerError(f"the ServerApp ended without finishing the run: {_tail(follower.log, 4)}")
                time.sleep(0.25)
            timings["finished"] = time.perf_counter() - began
        summary = read_summary(run_dir)
        status = summary.get("status", "failed")
    except KeyboardInterrupt:
        status, error = "interrupted", "interrupted (Ctrl-C); every Flower process was stopped"
        raise
    except FlowerError as failure:
        status, error = "failed", str(failure)
        raise
    except BaseException as failure:
        status, error = "failed", f"{type(failure).__name__}: {failure}"
        raise
    finally:
        for event in tail.read():  # what the ServerApp wrote before it was stopped
            if sink:
                sink(event)
        if not read_summary(run_dir):  # the ServerApp never finished: say how the run ended, as fedtui run would
            with contextlib.suppress(OSError, ValueError):
                events = ev.read_events(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
                fold = RunSummary.of(events, run_id=run_dir.name, preset_name=preset.run.name,
                                     rounds_planned=preset.run.rounds, selection=preset.eval.selection)
                store = RunStore(run_dir)
                try:
                    if status == "failed":
                        store.append_event(ev.RunFailed(error=error, traceback="", run_dir=str(run_dir)))
                    store.write_json("summary.json", fold.as_dict(status, time.perf_counter() - began, error or None))
                finally:
                    store.close()
    return LocalResult(run_dir, status, read_summary(run_dir), flower_run, timings)
