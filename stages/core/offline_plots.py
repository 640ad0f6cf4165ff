"""DVC's plot pages, offline. ``dvc plots show`` / ``dvc plots diff`` write an HTML page whose charts load
vega, vega-lite and vega-embed from a CDN (dvc-render's ``VegaRenderer.SCRIPTS``): without internet the page is
blank. :func:`write_template` writes a page template with the same three libraries, at the versions dvc-render
asks for, inlined from their npm tarballs (pinned SHA-512s); DVC's ``plots.html_template`` setting then makes
every ``dvc plots show`` / ``diff`` page render offline, its pictures (gallery, similarity) beside the charts."""

from __future__ import annotations

import html
import tarfile
import tempfile
from pathlib import Path

from stages.core.errors import LangdmlError
from stages.core.io import write_text
from stages.core.npm import Package, npm_pack

LIBRARIES = (  # the versions dvc_render.vega.VegaRenderer.SCRIPTS loads from the CDN
    Package(
        "vega",
        "5.20.2",
        "sha512-qmH7aD9GGPpssVdxL1xgcdxTbQzyRUeRR16Os385ymvQhiwCYQNA6+eXUPAZDTVLfk0RXu6Jzj6kUE5jQ80EVw==",
    ),
    Package(
        "vega-lite",
        "5.2.0",
        "sha512-Yxcg8MvYfxHcG6BbkaKT0oVCIMIcE19UvqIsEwBmyd/7h2nzW7oRnID81T8UrY7hpDrIr6wa2JADOT2dhGNErw==",
    ),
    Package(
        "vega-embed",
        "6.18.2",
        "sha512-wcDyQPE4J5aiCDc3/suH5RQDvrKkjuLkhzUcbOLwEkNF8/+pp17tS0JghzEvAPNRg+5aG1/N2ydixq8Lk3dOlg==",
    ),
)
TEMPLATE = ".dvc/plots/offline.html"  # ignored by git (.dvc/.gitignore); DVC reads it relative to .dvc/
AGAIN = "run `langdml plots-offline` again"
PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")  # what dvc-render substitutes in a template
PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot (offline: @VERSIONS@ inlined by langdml plots-offline)</title>
@LIBRARIES@
    <style>
        table { border-spacing: 15px; }
        img { max-width: 100%; }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def library_script(tarball: Path, package: Package) -> str:
    """The minified browser build of a library from its npm tarball, checked to be safe inside a <script>
    element of a template (no ``</script``, none of dvc-render's placeholders)."""
    member = f"package/build/{package.name}.min.js"
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            f = tar.extractfile(member)
            if f is None:
                raise KeyError(member)
            code = f.read().decode("utf-8")
    except (KeyError, tarfile.TarError, OSError, UnicodeDecodeError) as err:
        raise LangdmlError(f"plots-offline: {tarball.name} has no readable {member} ({err}); {AGAIN}") from None
    if "</script" in code.lower() or any(p in code for p in PLACEHOLDERS):
        raise LangdmlError(f"plots-offline: {member} of {package.spec} cannot be inlined in a page template")
    return code


def write_template(path: Path, npm: str | None = None) -> Path:
    """Fetch the three libraries with ``npm pack`` and write the offline page template to ``path``
    (atomically): dvc-render fills ``{plot_divs}`` and ``{refresh_tag}``; there is no ``{scripts}``, so the
    CDN's scripts are never added."""
    with tempfile.TemporaryDirectory(prefix="langdml-npm-") as tmp:
        scripts = []
        for package in LIBRARIES:
            code = library_script(npm_pack(package, Path(tmp), "plots-offline", AGAIN, npm=npm), package)
            scripts.append(f'    <script type="text/javascript">/* {package.spec} */\n{code}\n    </script>')
    versions = ", ".join(p.spec for p in LIBRARIES)
    write_text(path, PAGE.replace("@VERSIONS@", html.escape(versions)).replace("@LIBRARIES@", "\n".join(scripts)))
    return path
