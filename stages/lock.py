"""One writer per stage, and no orphans: what the CLI wraps around every stage.

``stage_lock`` takes an exclusive POSIX record lock (``fcntl.lockf``) on ``data/.<stage>.lock``, released
by the kernel when the process ends, however it ends, so a second ``langdml train`` beside a running one
stops at once with one line naming the holder. A record lock, not ``flock``: an ``flock`` belongs to the
open file, which forked DataLoader workers share, so workers outliving a killed stage kept it locked; a
record lock belongs to the process and is not inherited by ``fork``. ``exit_with_parent`` asks Linux to
SIGTERM this process when the process that launched it (``dvc repro``) dies, so killing dvc never leaves a
trainer writing on its own.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

from stages.core.errors import LangdmlError

LOCK_DIR = Path("data")
PR_SET_PDEATHSIG = 1
# Record locks do not exclude their own process (and closing any descriptor of the file drops them), so this
# process remembers what it holds and refuses a second lock of the same file itself.
_HELD: set[Path] = set()


@contextlib.contextmanager
def stage_lock(stage: str, directory: Path = LOCK_DIR) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    path = (directory / f".{stage}.lock").resolve()
    if path in _HELD:
        raise LangdmlError(_busy(stage, str(os.getpid())))
    with open(path, "a+") as f:
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            f.seek(0)
            raise LangdmlError(_busy(stage, f.read().strip() or "unknown")) from None
        _HELD.add(path)
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            _HELD.discard(path)
            f.seek(0)
            f.truncate()


def _busy(stage: str, holder: str) -> str:
    return f"another `langdml {stage}` (pid {holder}) is writing these outputs; wait for it or stop it"


def exit_with_parent() -> None:
    """SIGTERM this process when its parent dies (Linux ``prctl``; elsewhere nothing happens)."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)
