"""The offline plot-page template: the chart libraries inlined from their npm tarballs (pinned digests), and
dvc-render's page from it loading nothing from a CDN."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest
from fixtures_datasets import fake_npm

import stages.core.offline_plots as op
from stages.core.errors import LangdmlError
from stages.core.npm import Package, integrity


def _tarball(folder: Path, package: Package, code: str) -> Path:
    path = folder / package.tarball
    with tarfile.open(path, "w:gz") as tar:
        data = code.encode()
        info = tarfile.TarInfo(f"package/build/{package.name}.min.js")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def libraries(tmp_path, monkeypatch) -> dict[str, str]:
    """Tiny stand-ins for vega, vega-lite and vega-embed, served by a fake npm with their digests pinned."""
    registry = tmp_path / "registry"
    registry.mkdir()
    codes, pinned = {}, []
    for p in op.LIBRARIES:
        codes[p.name] = f'window["{p.name}"] = {{version: "{p.version}"}};'
        tarball = _tarball(registry, p, codes[p.name])
        pinned.append(Package(p.name, p.version, integrity(tarball)))
    monkeypatch.setattr(op, "LIBRARIES", tuple(pinned))
    fake_npm(tmp_path / "bin", registry)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    return codes


def test_the_template_inlines_the_libraries_and_the_page_loads_nothing_from_a_cdn(tmp_path, libraries) -> None:
    from dvc_render import render_html
    from dvc_render.vega import VegaRenderer

    template = op.write_template(tmp_path / "offline.html")
    text = template.read_text()
    assert all(code in text for code in libraries.values())
    assert "{plot_divs}" in text and "{scripts}" not in text  # dvc-render adds its CDN scripts only there
    chart = VegaRenderer([{"step": 0, "loss": 1.0}, {"step": 1, "loss": 0.5}], "loss.tsv", x="step", y="loss")
    assert "cdn.jsdelivr.net" in VegaRenderer.SCRIPTS  # what the default page would load
    page = Path(render_html([chart], tmp_path / "out" / "index.html", html_template=template)).read_text()
    assert "cdn.jsdelivr.net" not in page and "vegaEmbed" in page and libraries["vega-lite"] in page


def test_a_tampered_library_or_one_that_cannot_be_inlined_is_one_line(tmp_path, libraries, monkeypatch) -> None:
    registry = tmp_path / "registry"
    vega = op.LIBRARIES[0]
    _tarball(registry, vega, "tampered")
    with pytest.raises(LangdmlError, match=r"does not match the published SHA-512 of vega@5.20.2.*plots-offline"):
        op.write_template(tmp_path / "offline.html")
    closing = Package(vega.name, vega.version, integrity(_tarball(registry, vega, 'x = "</script>";')))
    monkeypatch.setattr(op, "LIBRARIES", (closing,))
    with pytest.raises(LangdmlError, match="cannot be inlined in a page template"):
        op.write_template(tmp_path / "offline.html")
    assert not (tmp_path / "offline.html").exists()  # nothing half-written
