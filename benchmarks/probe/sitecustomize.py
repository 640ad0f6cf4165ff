"""The benchmarks' probe inside the stage processes that ``dvc repro`` starts (benchmarks/dvc_scratch.py puts this
folder on PYTHONPATH, so Python imports it at start-up; outside a ``langdml`` stage process it does nothing).

- ``LANGDML_PROBE_DIR``: at exit, each stage process (the ``langdml <stage>`` that DVC runs, and the DDP workers
  it starts as ``python -m stages.cli <stage>``) writes one JSON file there: the command, its DDP rank, wall
  seconds from start-up (imports included, as a user waits for them), peak RSS (``ru_maxrss``) and the training
  loop's per-epoch rows (the ``row`` its epoch log line carries, timings included).
- ``LANGDML_PROBE_RANDOM_WEIGHTS=1``: timm and open_clip build every model with random weights of its
  architecture: no model hub is reachable here, and a dry run measures compute, not accuracy. Patched when the
  stage first imports them, so a stage that uses neither pays nothing.
"""

from __future__ import annotations

import atexit
import importlib.abc
import importlib.machinery
import json
import logging
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

START = time.perf_counter()


def _stage_command() -> str | None:
    """The stage this process runs, or None when it is not a ``langdml`` stage process."""
    argv = list(getattr(sys, "orig_argv", sys.argv))
    for i, arg in enumerate(argv[:-1]):
        if Path(arg).name == "langdml" or (arg == "stages.cli" and argv[i - 1] == "-m"):
            return argv[i + 1]
    return None


class _Rows(logging.Handler):
    """The training loop's epoch rows (its epoch log line carries the row as ``extra``)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if hasattr(record, "row"):
            self.rows.append(record.row)


def _record(folder: Path, command: str, rows: _Rows) -> None:
    out = {
        "command": command,
        "rank": int(os.environ.get("RANK", "0")),
        "workers": int(os.environ.get("WORLD_SIZE", "1")),
        "seconds": time.perf_counter() - START,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rows": rows.rows,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{time.time_ns()}-{os.getpid()}.json").write_text(json.dumps(out, default=float))


class _RandomWeights(importlib.abc.MetaPathFinder):
    """Wraps the loaders of ``timm`` and ``open_clip`` so that, once imported, their model constructors drop the
    pretrained weights."""

    PATCHES: ClassVar[dict[str, str]] = {"timm": "_patch_timm", "open_clip": "_patch_open_clip"}

    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name not in self.PATCHES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        loader, patch = spec.loader, getattr(self, self.PATCHES[name])

        class Patched(importlib.abc.Loader):
            def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
                return loader.create_module(spec)

            def exec_module(self, module: Any) -> None:
                loader.exec_module(module)
                patch(module)

        spec.loader = Patched()
        return spec

    @staticmethod
    def _patch_timm(timm: Any) -> None:
        create = timm.create_model

        def random_weights(name: str, *args: Any, **kwargs: Any) -> Any:
            kwargs["pretrained"] = False
            return create(name, *args, **kwargs)

        timm.create_model = random_weights

    @staticmethod
    def _patch_open_clip(open_clip: Any) -> None:
        create = open_clip.create_model

        def random_weights(name: str, *args: Any, **kwargs: Any) -> Any:
            kwargs.pop("pretrained", None)
            kwargs.pop("require_pretrained", None)
            return create(name, *args, **kwargs)

        open_clip.create_model = random_weights


def _install() -> None:
    command = _stage_command()
    if command is None or not os.environ.get("LANGDML_PROBE_DIR"):
        return
    if os.environ.get("LANGDML_PROBE_RANDOM_WEIGHTS") == "1":
        sys.meta_path.insert(0, _RandomWeights())
    rows = _Rows()
    logging.getLogger("stages.core.training.fit").addHandler(rows)
    atexit.register(_record, Path(os.environ["LANGDML_PROBE_DIR"]), command, rows)


_install()
