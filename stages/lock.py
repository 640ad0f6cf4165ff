"""One writer per stage, and no orphans: what the CLI wraps around every stage.

``stage_lock`` takes an exclusive ``flock`` on ``data/.<stage>.lock`` (released by the kernel when the
process ends, however it ends), so a second ``langdml train`` beside a running one stops at once with
one line naming the holder. ``exit_with_parent`` asks Linux to SIGTERM this process when the process
that launched it (``dvc repro``) dies, so killing dvc never leaves a trainer writing on its own.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

from stages.core.errors import LangdmlError

LOCK_DIR = Path("data")
PR_SET_PDEATHSIG = 1


@contextlib.contextmanager
def stage_lock(stage: str, directory: Path = LOCK_DIR) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f".{stage}.lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise LangdmlError(
                f"another `langdml {stage}` (pid {holder}) is writing these outputs; wait for it or stop it"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()


def exit_with_parent() -> None:
    """SIGTERM this process when its parent dies (Linux ``prctl``; elsewhere nothing happens)."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)
