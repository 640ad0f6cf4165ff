"""`langdml fetch-data --download` against a local HTTP server serving a tiny CUB200 archive: an interrupted
download resumes where it stopped, a wrong checksum is one line and nothing is unpacked, an unsafe member is
refused, and the dataset then prepares."""

from __future__ import annotations

import hashlib
import io
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from fixtures_datasets import make_cub
from typer.testing import CliRunner

from stages.cli import app
from stages.core.data.datasets import sources
from stages.core.data.download import Archive, unpack
from stages.core.errors import LangdmlError

REPO = Path(__file__).resolve().parents[1]


class Server:
    """Serves one file; ``cut_first`` closes the first whole-file response halfway; Range requests resume."""

    def __init__(self, payload: bytes) -> None:
        self.payload, self.ranges, self.cut_first = payload, [], False
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                start = 0
                header = self.headers.get("Range")
                server.ranges.append(header)
                if header:
                    start = int(header.removeprefix("bytes=").rstrip("-"))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(server.payload) - 1}/{len(server.payload)}")
                else:
                    self.send_response(200)
                body = server.payload[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.cut_first and not header:
                    server.cut_first = False
                    self.wfile.write(body[: len(body) // 2])
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/CUB_200_2011.tgz"


@pytest.fixture
def cub_archive(tmp_path: Path) -> bytes:
    """CUB_200_2011.tgz as Caltech ships it: CUB_200_2011/<the layout> plus attributes.txt beside it."""
    make_cub(tmp_path / "src" / "CUB_200_2011", per_class=3)
    (tmp_path / "src" / "attributes.txt").write_text("1 has_bill_shape::curved\n")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(tmp_path / "src" / "CUB_200_2011", arcname="CUB_200_2011")
        tar.add(tmp_path / "src" / "attributes.txt", arcname="attributes.txt")
    return buf.getvalue()


@pytest.fixture
def server(cub_archive: bytes) -> Iterator[Server]:
    s = Server(cub_archive)
    thread = threading.Thread(target=s.httpd.serve_forever, daemon=True)
    thread.start()
    yield s
    s.httpd.shutdown()


def _project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str, digest: str) -> Path:
    """A project folder whose params.yaml is the CUB200 recipe's, with the CUB200 source pointed at ``url``."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text((REPO / "params.yaml").read_text())
    monkeypatch.chdir(project)
    result = CliRunner().invoke(app, ["recipe", "roth22/cub200-rn512-ms-plg"])
    assert result.exit_code == 0, result.output
    assert "does not hold it (no images.txt); `langdml fetch-data --download`" in result.output  # said at once
    archive = replace(sources.SOURCES["cub200"].archives[0], url=url, digest=digest)
    monkeypatch.setitem(sources.SOURCES, "cub200", replace(sources.SOURCES["cub200"], archives=(archive,)))
    return project


def test_an_interrupted_download_resumes_and_the_dataset_prepares(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: Server, cub_archive: bytes
) -> None:
    project = _project(tmp_path, monkeypatch, server.url, "sha256:" + hashlib.sha256(cub_archive).hexdigest())
    root = project / yaml.safe_load((project / "params.yaml").read_text())["dataset"]["root"]
    server.cut_first = True
    first = CliRunner().invoke(app, ["fetch-data", "--download"])
    assert first.exit_code == 1 and "interrupted" in first.output and "run it again to resume" in first.output
    partial = root.parent / ".downloads" / "CUB_200_2011.tgz.partial"
    assert 0 < partial.stat().st_size < len(cub_archive) and not root.exists()
    second = CliRunner().invoke(app, ["fetch-data", "--download"])
    assert second.exit_code == 0, second.output
    assert server.ranges == [None, f"bytes={len(cub_archive) // 2}-"]  # the second request resumed
    assert (root / "images.txt").is_file() and not (root / "attributes.txt").exists()  # strip=1: the folder
    assert not list((root.parent / ".downloads").iterdir())  # the archive is gone once unpacked
    assert CliRunner().invoke(app, ["fetch-data"]).exit_code == 0  # the pipeline's stage now finds it
    prepared = CliRunner().invoke(app, ["prepare"])
    assert prepared.exit_code == 0, prepared.output


def test_a_wrong_checksum_is_one_line_and_nothing_is_unpacked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: Server
) -> None:
    project = _project(tmp_path, monkeypatch, server.url, "sha256:" + "0" * 64)
    result = CliRunner().invoke(app, ["fetch-data", "--download"])
    assert result.exit_code == 1
    line = result.output.strip().splitlines()[-1]
    assert "is not the published" in line and "nothing was unpacked" in line
    raw = project / "data" / "raw"
    assert not (raw / "CUB_200_2011").exists() and not list(raw.glob(".*unpacking"))
    assert not list((raw / ".downloads").iterdir())


def test_a_member_outside_the_folder_is_refused(tmp_path: Path) -> None:
    evil = tmp_path / "evil.tgz"
    with tarfile.open(evil, "w:gz") as tar:
        info = tarfile.TarInfo("../outside.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    (tmp_path / "into").mkdir()
    with pytest.raises(LangdmlError, match=r"would unpack outside"):
        unpack(evil, tmp_path / "into")
    assert not (tmp_path / "outside.txt").exists()


def test_every_source_names_its_licence_and_a_way_to_get_it() -> None:
    page = (REPO / "docs" / "datasets.md").read_text()
    for name, source in sources.SOURCES.items():
        assert f"`{name}`" in page and source.homepage in page, name
        assert all(a.url in page for a in source.archives), name
        assert source.licence and source.homepage.startswith("https://"), name
        assert source.archives or source.manual, name
        for archive in source.archives:
            assert isinstance(archive, Archive) and archive.url.startswith(("http://", "https://")), name
