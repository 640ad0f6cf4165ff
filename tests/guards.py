"""Hang guards for tests that start processes: a limit that only a hang reaches, never a verdict on speed.

Every wait in the suite uses :data:`HANG_GUARD` (an hour; the slowest test needs a few minutes even beside
another job), and a guard that trips names what hung: for a DVC command, the last stage it started.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

HANG_GUARD = 3600.0


def _text(data: bytes | str | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def hung_stage(output: str) -> str:
    """The last DVC stage the output shows starting, or a note that none started."""
    stages = re.findall(r"Running stage '([^']+)'", output)
    return f"stage '{stages[-1]}'" if stages else "before any stage started"


def run(cmd: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` under the hang guard; a hang fails the test
    naming the command, the stage it was in and the end of its output."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_GUARD, **kwargs)
    except subprocess.TimeoutExpired as hang:
        out = _text(hang.stdout) + _text(hang.stderr)
        pytest.fail(
            f"hang guard ({HANG_GUARD:.0f} s): {' '.join(map(str, cmd))} hung in {hung_stage(out)}:\n{out[-3000:]}"
        )


def communicate(proc: subprocess.Popen, what: str) -> tuple[str, str]:
    """``proc.communicate()`` under the hang guard (the process is killed if it trips)."""
    try:
        return proc.communicate(timeout=HANG_GUARD)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"hang guard ({HANG_GUARD:.0f} s): {what} hung:\n{(_text(out) + _text(err))[-3000:]}")


def wait_until(condition: Callable[[], bool], what: str, poll: float = 0.1) -> None:
    """Poll ``condition`` until it holds; only the hang guard ends the wait."""
    deadline = time.monotonic() + HANG_GUARD
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"hang guard ({HANG_GUARD:.0f} s): {what}")
        time.sleep(poll)


def process_gone(pid: int) -> bool:
    """The process has exited (no such pid, or a zombie waiting to be reaped)."""
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().split()[2] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True
