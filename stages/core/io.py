"""Atomic file operations: every stage output is written to a temporary and renamed (files) or built in a
staging folder and swapped in (folders), so an interrupted or failing stage never leaves a half-written file
where DVC (or the next stage) would take it for a real one; NumPy arrays, JSON and text through them.
Tables (Parquet, embedding columns) are :mod:`stages.core.tables`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from stages.core.errors import LangdmlError, first_line


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as err:  # a read-only, forbidden or full folder: name the file the user asked for
        raise OSError(err.errno, err.strerror, str(target)) from None
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp_path
        # The usual mode of a new file, set after the write: some writers (safetensors) recreate the file
        # with their own mode, and mkstemp's is 0600.
        tmp_path.chmod(0o666 & ~umask)
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def remove_stale_temporaries(directory: str | os.PathLike[str]) -> int:
    """Delete the temporary files :func:`atomic_path` leaves when a process is killed mid-write."""
    removed = 0
    for tmp in Path(directory).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


def replace_directory(new: str | os.PathLike[str], final: str | os.PathLike[str]) -> None:
    """Put the finished directory ``new`` where ``final`` was: the old one is kept until the swap is done."""
    new, final = Path(new), Path(final)
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)


def read_text(path: str | os.PathLike[str]) -> str:
    """A UTF-8 text file's contents; a byte that is not UTF-8 is one line naming the file, line and byte."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise LangdmlError(
            f"{path}: not UTF-8 text: byte 0x{data[err.start]:02x} at line {line} (offset {err.start}); "
            "save the file as UTF-8"
        ) from None


@contextlib.contextmanager
def staging_directory(final: str | os.PathLike[str], tag: str = "partial") -> Iterator[Path]:
    """An empty folder ``.<name>.<tag>`` beside ``final``, with the usual mode (``mkdtemp``'s is 0700), removed
    afterwards whatever happens. Its name is fixed, so what a killed run left there is removed by the next
    run before it starts (one writer per stage: the stage lock)."""
    final = Path(final)
    path = final.parent / f".{final.name}.{tag}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def file_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes: what a cache or checkpoint records of the inputs it was made from."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_npy(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """``np.save`` whose short write is the ``ENOSPC`` it is: numpy reports a full disk as an OSError without an
    errno ("N requested and M written"), which would otherwise escape the one-line handling of full disks."""
    try:
        np.save(path, array)
    except OSError as err:
        if err.errno is None and "requested and" in str(err):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
        raise


def load_npy(path: str | os.PathLike[str], hint: str, mmap_mode: str | None = None) -> np.ndarray:
    """A numeric ``.npy`` array (never pickled objects); a missing, truncated or object array is one line naming
    the file and ``hint`` (what makes it again)."""
    try:
        array = np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except FileNotFoundError:
        raise LangdmlError(f"{path} does not exist; {hint}") from None
    except (OSError, ValueError, EOFError) as err:
        raise LangdmlError(f"{path}: not a readable numeric array ({first_line(err)}); {hint}") from None
    if not np.issubdtype(array.dtype, np.number) and array.dtype != np.bool_:
        raise LangdmlError(f"{path}: an array of {array.dtype}, not numbers; {hint}")
    return array


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
