"""Per-epoch training logs with dvclive, shared by the DML and the cross-modal training loops."""

from __future__ import annotations

import shutil
from pathlib import Path

from stages.core.io import replace_directory

# Logged values that differ between identical runs: kept out of DVC's metrics, plots and checkpoints.
TIMINGS = frozenset({"images_per_s", "step_s", "evaluate_s"})


class LiveLog:
    """dvclive per-epoch metrics, restarted and replayed from the checkpoint's history on every run,
    so the TSVs always hold exactly one row per finished epoch. They are written into a hidden sibling
    folder and swapped in by :meth:`end`, so a failed or interrupted run leaves the previous logs whole.
    Timings (``images_per_s``) stay out: they differ between identical runs, and DVC would then report
    the metrics (and dvc.lock) changed although the model is the same."""

    NOT_LOGGED = frozenset({"epoch", *TIMINGS})

    def __init__(self, log_dir: Path, history: list[dict[str, float]]) -> None:
        from dvclive import Live

        self.final = log_dir
        self.partial = log_dir.with_name(f".{log_dir.name}.partial")
        shutil.rmtree(self.partial, ignore_errors=True)

        class FilesOnlyLive(Live):
            """Plain TSV/JSON files that dvc.yaml declares as plots. dvclive's repo probing is skipped:
            it is not needed without experiment saving, fails in a git repo with no commits, and
            would ``dvc init`` a plain git repository."""

            def _init_dvc(self) -> None:
                return None

        self.live = FilesOnlyLive(dir=str(self.partial), dvcyaml=None, save_dvc_exp=False, resume=False)
        for row in history:
            self.log(row)

    def log(self, row: dict[str, float]) -> None:
        for name, value in row.items():
            if name not in self.NOT_LOGGED:
                self.live.log_metric(name, value)
        self.live.next_step()

    def end(self) -> None:
        self.live.end()
        replace_directory(self.partial, self.final)
