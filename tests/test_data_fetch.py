"""``fedtui data fetch``: a tiny PACS-like archive served from a loopback HTTP server (with Range) and from
file:// URLs; layout, resume, checksums (given and recorded), offline. Nothing leaves the machine."""

from __future__ import annotations

import io
import json
import re
import socket
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from engine import datasets
from fedtui.cli import cli

runner = CliRunner()
PACS_DOMAINS = ("art_painting", "cartoon", "photo", "sketch")
CLASSES = ("dog", "horse")
IMAGES = 4  # per class and domain: enough for fedclip-pacs's 0.6 train split to give every client two rows


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), ((seed * 37) % 256, (seed * 91) % 256, (seed * 13) % 256)).save(buffer, "PNG")
    return buffer.getvalue()


def pacs_zip(base: str = "kfold", extra: bytes = b"") -> bytes:
    """A few PNGs as <base>/<domain>/<class>/<n>.png (DomainBed's PACS archive has base 'kfold')."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        seed = 0
        for domain in PACS_DOMAINS:
            for cls in CLASSES:
                for n in range(IMAGES):
                    seed += 1
                    archive.writestr(f"{base}/{domain}/{cls}/{n}.png", _png(seed))
        if extra:
            archive.writestr(f"{base}/README.txt", extra)
    return buffer.getvalue()


class _Handler(BaseHTTPRequestHandler):
    """GET with single-range ``bytes=N-`` support; ``server.drops`` makes the next answers stop after N bytes."""

    def do_GET(self):  # noqa: N802 - http.server's name
        server = self.server
        server.requests.append({"path": self.path, "range": self.headers.get("Range")})
        body = server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        wanted = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if wanted:
            start = int(wanted.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Type", "application/zip")
        self.send_header("Content-Length", str(len(body) - start))
        self.send_header("ETag", f'"{hash(body) & 0xFFFFFFFF:x}"')
        self.end_headers()
        payload = body[start:]
        if server.drops:
            cut = server.drops.pop(0)
            self.wfile.write(payload[:cut])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)  # the connection drops mid-body
            return
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.requests, httpd.drops = {}, [], []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.url = lambda path: f"http://127.0.0.1:{httpd.server_address[1]}{path}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def fetch(*args: str, env: dict | None = None):
    return runner.invoke(cli, ["data", "fetch", *args], env={"COLUMNS": "200", **(env or {})})


def laid_out(root: Path) -> dict[str, dict[str, int]]:
    return {d.name: {c.name: len(list(c.glob("*.png"))) for c in sorted(d.iterdir())}
            for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")}


EXPECTED = {d: {c: IMAGES for c in CLASSES} for d in PACS_DOMAINS}


def test_fetch_from_loopback_lays_out_and_the_printed_root_checks(server, tmp_path, monkeypatch):
    server.files["/PACS.zip"] = archive = pacs_zip()
    root = tmp_path / "PACS"
    result = fetch("pacs", "--source", "domainbed", "--root", str(root), "--url", server.url("/PACS.zip"))
    assert result.exit_code == 0, result.output
    assert laid_out(root) == EXPECTED
    assert not (root / ".download").exists() and not (root / ".extract").exists()
    assert "layout" not in result.output  # kfold/ is where the table says (no note)
    recorded = json.loads((root / ".fedtui-checksums.json").read_text())
    assert recorded[server.url("/PACS.zip")]["sha256"] == __import__("hashlib").sha256(archive).hexdigest()
    assert "recorded now" in result.output and "fedclip-pacs.toml" in result.output

    printed = re.search(r'data\.root = (".*")', result.output)
    assert printed, result.output
    data_root = json.loads(printed.group(1))
    assert Path(data_root) == root.resolve()
    # the printed root resolves: with the weights undownloadable, model.pretrained is the only problem left
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("engine.weights._cached", lambda cfg: False)
    check = runner.invoke(cli, ["check", "presets/fedclip-pacs.toml", "--set", f"data.root={data_root}"],
                          env={"COLUMNS": "200"})
    assert check.exit_code == 2, check.output
    keys = re.findall(r"\[([a-z_]+\.[a-z_]+)\]", check.stderr)
    assert keys == ["model.pretrained"], check.stderr

    again = fetch("pacs", "--source", "domainbed", "--root", str(root), "--url", server.url("/PACS.zip"))
    assert again.exit_code == 0 and "already" in again.output
    assert len(server.requests) == 1  # nothing downloaded the second time


def test_fetch_from_a_file_url_and_the_env_override(tmp_path):
    path = tmp_path / "served" / "PACS.zip"
    path.parent.mkdir()
    path.write_bytes(pacs_zip(base="pacs_data"))  # not where the table says: found by search, and said
    root = tmp_path / "data"
    result = fetch("pacs", "--root", str(root), env={datasets.env_var("pacs"): path.as_uri()})
    assert result.exit_code == 0, result.output
    assert laid_out(root) == EXPECTED
    assert "'pacs_data', not 'PACS' as the table says" in result.output
    assert path.as_uri() in json.loads((root / ".fedtui-checksums.json").read_text())


def test_a_file_url_part_resumes_from_its_offset(tmp_path):
    archive = pacs_zip()
    path = tmp_path / "PACS.zip"
    path.write_bytes(archive)
    root = tmp_path / "data"
    (root / ".download").mkdir(parents=True)
    (root / ".download" / "PACS.zip.part").write_bytes(archive[:500])
    (root / ".download" / "PACS.zip.part.json").write_text(json.dumps({"url": path.as_uri()}))
    result = fetch("pacs", "--root", str(root), "--url", str(path))  # a plain path is a file:// URL
    assert result.exit_code == 0, result.output
    assert "resumed at 500 bytes" in result.output and laid_out(root) == EXPECTED


def test_a_dropped_connection_resumes_from_the_part(server, tmp_path):
    server.files["/PACS.zip"] = archive = pacs_zip()
    server.drops = [700]
    root = tmp_path / "PACS"
    result = fetch("pacs", "--root", str(root), "--url", server.url("/PACS.zip"))
    assert result.exit_code == 0, result.output
    assert [r["range"] for r in server.requests] == [None, "bytes=700-"]
    assert "dropped at 700 bytes" in result.output
    assert laid_out(root) == EXPECTED
    assert json.loads((root / ".fedtui-fetched.json").read_text())["archives"][0]["size"] == len(archive)


def test_an_interrupted_download_is_kept_and_the_next_fetch_resumes_it(server, tmp_path):
    server.files["/PACS.zip"] = archive = pacs_zip()
    server.drops = [300] * 4  # the first attempt and its three retries each stop after 300 more bytes
    root = tmp_path / "PACS"
    first = fetch("pacs", "--root", str(root), "--url", server.url("/PACS.zip"))
    assert first.exit_code == 1, first.output
    part = root / ".download" / "PACS.zip.part"
    assert part.read_bytes() == archive[:1200]
    assert "run the same command again to resume" in first.stderr
    assert not any((root / d).exists() for d in PACS_DOMAINS)

    second = fetch("pacs", "--root", str(root), "--url", server.url("/PACS.zip"))
    assert second.exit_code == 0, second.output
    assert server.requests[-1]["range"] == "bytes=1200-"
    assert "resumed at 1,200 bytes" in second.output
    assert laid_out(root) == EXPECTED and not part.exists()


def test_a_wrong_checksum_is_refused_and_the_file_kept_aside(server, tmp_path):
    server.files["/PACS.zip"] = archive = pacs_zip()
    root = tmp_path / "PACS"
    result = fetch("pacs", "--root", str(root), "--url", server.url("/PACS.zip"), "--sha256", "0" * 64)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "refused" in lines[0] and "given checksum" in lines[0], result.stderr
    kept = list((root / ".download").glob("PACS.zip.rejected-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == archive and str(kept[0]) in lines[0]
    assert laid_out(root) == {} and not (root / ".fedtui-checksums.json").exists()


def test_offline_is_one_line_and_exit_2(tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = fetch("pacs", "--root", str(tmp_path / "PACS"), "--url", f"http://127.0.0.1:{port}/PACS.zip")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "connection refused" in lines[0] and "offline?" in lines[0], result.stderr
    assert not any((tmp_path / "PACS" / d).exists() for d in PACS_DOMAINS)


def test_a_recorded_checksum_refuses_a_changed_archive(server, tmp_path):
    server.files["/PACS.zip"] = pacs_zip()
    root = tmp_path / "PACS"
    first = fetch("pacs", "--root", str(root), "--url", server.url("/PACS.zip"))
    assert first.exit_code == 0, first.output
    store = json.loads((root / ".fedtui-checksums.json").read_text())
    assert list(store) == [server.url("/PACS.zip")] and store[server.url("/PACS.zip")]["dataset"] == "pacs"

    server.files["/PACS.zip"] = changed = pacs_zip(extra=b"not the same archive")
    again = fetch("pacs", "--root", str(root), "--url", server.url("/PACS.zip"), "--force")
    assert again.exit_code == 2
    assert "recorded checksum" in again.stderr and "refused" in again.stderr
    assert [p.read_bytes() for p in (root / ".download").glob("PACS.zip.rejected-*")] == [changed]
    assert laid_out(root) == EXPECTED  # what the first fetch laid out is untouched
    assert json.loads((root / ".fedtui-checksums.json").read_text()) == store


def test_vlcs_tar_gz_and_office_home_renames(tmp_path):
    """A tar.gz in DomainBed's VLCS layout, and Office-Home's 'Real World' laid out as Real_World."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for domain in ("Caltech101", "LabelMe", "SUN09", "VOC2007"):
            data = _png(len(domain))
            info = tarfile.TarInfo(f"VLCS/{domain}/bird/0.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "VLCS.tar.gz").write_bytes(buffer.getvalue())
    result = fetch("vlcs", "--root", str(tmp_path / "vlcs"), "--url", str(tmp_path / "VLCS.tar.gz"))
    assert result.exit_code == 0, result.output
    assert laid_out(tmp_path / "vlcs") == {d: {"bird": 1} for d in ("Caltech101", "LabelMe", "SUN09", "VOC2007")}
    assert "fedclip-vlcs.toml" in result.output

    with zipfile.ZipFile(tmp_path / "oh.zip", "w") as archive:
        for domain in ("Art", "Clipart", "Product", "Real World"):
            archive.writestr(f"OfficeHomeDataset_10072016/{domain}/Mug/0.png", _png(3))
    result = fetch("office-home", "--root", str(tmp_path / "oh"), "--url", str(tmp_path / "oh.zip"))
    assert result.exit_code == 0, result.output
    assert sorted(laid_out(tmp_path / "oh")) == ["Art", "Clipart", "Product", "Real_World"]


def test_domainnet_takes_one_url_per_archive_by_name(tmp_path):
    urls = []
    for domain in ("clipart", "infograph", "painting", "quickdraw", "real", "sketch"):
        with zipfile.ZipFile(tmp_path / f"{domain}.zip", "w") as archive:
            archive.writestr(f"{domain}/zebra/0.png", _png(1))
        urls += ["--url", f"{domain}.zip={(tmp_path / f'{domain}.zip').as_uri()}"]
    result = fetch("domainnet", "--root", str(tmp_path / "dn"), *urls)
    assert result.exit_code == 0, result.output
    assert len(laid_out(tmp_path / "dn")) == 6 and "no DomainNet preset ships" in result.output
    bad = fetch("domainnet", "--root", str(tmp_path / "dn2"), "--url", "x.zip=file:///nowhere")
    assert bad.exit_code == 2 and "no archive 'x.zip'" in bad.stderr


def test_an_archive_member_outside_the_folder_is_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as archive:
        archive.writestr("../escaped.png", b"x")
    with pytest.raises(datasets.FetchError) as caught:
        datasets.extract(tmp_path / "evil.zip", tmp_path / "out")
    assert caught.value.exit_code == 2 and not (tmp_path / "escaped.png").exists()


def test_the_table_says_where_each_url_came_from_and_which_checksums_are_published():
    for dataset in datasets.DATASETS.values():
        assert dataset.sources
        for source in dataset.sources:
            assert source.origin and "commit" in source.origin
            for archive in source.archives:
                assert archive.checksum_kind in ("published", "recorded")
                assert archive.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", archive.sha256)
    assert {d.preset for d in datasets.DATASETS.values()} >= {
        "fedclip-pacs.toml", "fedclip-vlcs.toml", "fedclip-office-home.toml"}


def test_engine_datasets_imports_no_ui():
    import subprocess
    import sys

    code = ("import sys, engine.datasets\n"
            "print([m for m in sys.modules if m.split('.')[0] in ('textual', 'rich', 'typer', 'torch')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
