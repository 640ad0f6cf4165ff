"""Download, check and unpack a dataset's official archives (``langdml fetch-data --download``).

A download goes to ``<root's parent>/.downloads/<file>.partial`` and resumes from there (an HTTP Range request)
when it was interrupted; the finished file is checked against the digest its publisher gives (``sha256:`` or,
where only that is published, ``md5:``) before anything is unpacked, and a wrong one is one line that deletes
the file. Archives unpack into a hidden sibling of the dataset folder, every member checked to stay inside it,
and the folder is renamed into place whole: an interrupted unpack leaves no half dataset at ``dataset.root``.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from stages.core.errors import LangdmlError

log = logging.getLogger(__name__)

CHUNK = 1 << 20


@dataclass(frozen=True)
class Archive:
    """One file to download: where from, its published digest, and what of it to unpack (``members``: the
    archive paths to keep, all when empty; ``strip``: leading path parts dropped, e.g. the archive's own top
    folder when the dataset folder is named by ``dataset.root``)."""

    url: str
    digest: str | None  # "sha256:<hex>" | "md5:<hex>" (the publisher's); None: none is published
    size: str  # for the messages, e.g. "1.1 GB"
    members: tuple[str, ...] = ()
    strip: int = 0

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1].split("?", 1)[0]


@dataclass(frozen=True)
class Source:
    """A dataset's official source: its archives (none: it must be fetched by hand, ``manual`` says how), the
    file that proves a folder holds it, and its licence terms."""

    name: str
    marker: str  # a file every copy has at dataset.root (images.txt, Ebay_train.txt, ...)
    homepage: str
    licence: str
    archives: tuple[Archive, ...] = ()
    manual: str = ""

    @property
    def size(self) -> str:
        return " + ".join(a.size for a in self.archives)


def holds(source: Source, root: Path) -> bool:
    return (root / source.marker).is_file()


def fetch_source(source: Source, root: Path, progress: bool = True) -> Path:
    """``root`` holding ``source``'s dataset: already there, or downloaded, checked and unpacked into it."""
    if holds(source, root):
        log.info("%s is already in %s (%s found)", source.name, root, source.marker)
        return root
    if not source.archives:
        raise LangdmlError(f"{source.name}: cannot be downloaded by langdml: {source.manual}")
    if root.exists() and any(root.iterdir()):
        raise LangdmlError(
            f"{source.name}: {root} exists but holds no {source.marker}; move it away or set dataset.root to an "
            "empty or new folder, then run `langdml fetch-data --download` again"
        )
    downloads = root.parent / ".downloads"
    files = [download(a.url, downloads / a.filename, a.digest, progress) for a in source.archives]
    staging = root.parent / f".{root.name}.unpacking"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for archive, path in zip(source.archives, files, strict=True):
        log.info("unpacking %s", path.name)
        unpack(path, staging, archive.members, archive.strip)
    if not holds(source, staging):
        shutil.rmtree(staging, ignore_errors=True)
        raise LangdmlError(f"{source.name}: the archives unpacked without {source.marker}; nothing was kept")
    if root.exists():
        root.rmdir()  # empty (checked above)
    staging.rename(root)
    for path in files:
        path.unlink()
    log.info("%s ready in %s", source.name, root)
    return root


def download(url: str, target: Path, digest: str | None, progress: bool = True) -> Path:
    """``url`` into ``target`` (resuming ``target.partial``), checked against ``digest``."""
    if target.is_file():
        check_digest(target, digest)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    have = partial.stat().st_size if partial.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # the partial file is already whole
            partial.rename(target)
            check_digest(target, digest)
            return target
        raise LangdmlError(f"download {url}: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError) as err:
        raise LangdmlError(
            f"download {url}: {getattr(err, 'reason', err)} (offline? the partial file is kept)"
        ) from None
    with response:
        resumed = have and response.status == 206
        if have and not resumed:
            log.info("%s: the server does not resume; downloading it whole", url)
        length = response.headers.get("Content-Length")
        total = (int(length) + (have if resumed else 0)) if length else None
        from tqdm.auto import tqdm

        with (
            partial.open("ab" if resumed else "wb") as out,
            tqdm(
                total=total,
                initial=have if resumed else 0,
                unit="B",
                unit_scale=True,
                desc=target.name,
                disable=not progress,
            ) as bar,
        ):
            try:
                while block := response.read(CHUNK):
                    out.write(block)
                    bar.update(len(block))
            except (OSError, http.client.HTTPException) as err:
                raise LangdmlError(
                    f"download {url}: interrupted ({type(err).__name__}); run it again to resume from "
                    f"{out.tell():,} bytes"
                ) from None
            if total is not None and out.tell() < total:  # the server closed early: http.client reads it as EOF
                raise LangdmlError(
                    f"download {url}: interrupted at {out.tell():,} of {total:,} bytes; run it again to resume"
                )
    partial.rename(target)
    check_digest(target, digest)
    return target


def file_hash(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def check_digest(path: Path, digest: str | None) -> None:
    """A wrong digest deletes the file and is one line; none published: logged with the file's SHA-256."""
    if digest is None:
        log.info("%s: no digest is published; its SHA-256 is %s", path.name, file_hash(path, "sha256"))
        return
    algorithm, _, expected = digest.partition(":")
    actual = file_hash(path, algorithm)
    if actual != expected:
        path.unlink()
        raise LangdmlError(
            f"{path.name}: {algorithm} {actual} is not the published {expected}; the file was deleted and "
            "nothing was unpacked (run again to download it anew)"
        )


def _inside(base: Path, name: str) -> bool:
    target = (base / name).resolve()
    return target == base.resolve() or base.resolve() in target.parents


def _stripped(name: str, strip: int) -> str | None:
    parts = Path(name).parts[strip:]
    return str(Path(*parts)) if parts else None


def unpack(archive: Path, into: Path, members: Sequence[str] = (), strip: int = 0) -> None:
    """Extract ``archive`` (tar, tar.gz, zip) into ``into``: only ``members`` (all when empty), ``strip``
    leading path parts dropped; a member that would land outside ``into`` (absolute, ``..``, a link) is an
    error naming it."""
    wanted = set(members)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                name = _stripped(info.filename, strip)
                if name is None or (wanted and info.filename not in wanted):
                    continue
                _check_member(archive, into, name)
                if info.is_dir():
                    (into / name).mkdir(parents=True, exist_ok=True)
                    continue
                (into / name).parent.mkdir(parents=True, exist_ok=True)
                with z.open(info) as src, (into / name).open("wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
        return
    try:
        with tarfile.open(archive) as tar:
            for member in tar:
                name = _stripped(member.name, strip)
                if name is None or (wanted and member.name not in wanted):
                    continue
                if not (member.isfile() or member.isdir()):
                    raise LangdmlError(f"{archive.name}: member {member.name} is a link or device; not unpacked")
                _check_member(archive, into, name)
                if member.isdir():
                    (into / name).mkdir(parents=True, exist_ok=True)
                    continue
                (into / name).parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                if src is None:
                    raise LangdmlError(f"{archive.name}: member {member.name} cannot be read")
                with src, (into / name).open("wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
    except tarfile.TarError as err:
        raise LangdmlError(f"{archive.name}: not a readable tar or zip archive ({err})") from None


def _check_member(archive: Path, into: Path, name: str) -> None:
    if Path(name).is_absolute() or not _inside(into, name):
        raise LangdmlError(f"{archive.name}: member {name} would unpack outside {into}; nothing more was unpacked")
