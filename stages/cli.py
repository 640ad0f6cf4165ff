"""The ``langdml`` command line: one command per DVC stage, each reading ``params.yaml``.

Heavy libraries (torch, timm, open_clip) are imported inside the stage modules, which are
imported inside the commands, so ``langdml --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from stages.core.errors import LangdmlError, one_line

# libgomp (torch's OpenMP on Linux) lets a waiting thread spin 300,000 times before it sleeps. Two torch processes
# on the same cores (the tests beside a `dvc repro`, `dvc queue start -j 2`) then spin through each other's time
# slices; 1,000 spins cost nothing alone and end that (benchmarks/openmp_spin.py). Set before any stage imports
# torch; a value the user sets wins.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

app = typer.Typer(
    name="langdml",
    help="Language-guided deep metric learning as a DVC pipeline. Each command is one stage of dvc.yaml.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: flags shown as flags (`--json`), values with their type (`--k INTEGER`)
)


def _version(show: bool) -> None:
    if show:
        from importlib.metadata import version

        typer.echo(f"langdml {version('langdml')}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """Language-guided deep metric learning as a DVC pipeline. Each stage command is one stage of dvc.yaml."""


# OS errors that say something about the machine (a full disk, a read-only or forbidden folder), not about
# langdml: one line naming the file and the cause. Outputs are written to temporaries and renamed, so none
# is left half-written.
ENVIRONMENT_ERRORS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EROFS,
        errno.EACCES,
        errno.EPERM,
        errno.EMFILE,
        errno.ENFILE,
        errno.EIO,
        errno.EISDIR,  # a folder where a file is to be written
        errno.ENOTDIR,  # a file where a folder is expected
    }
)


def environment_message(err: OSError) -> str:
    where = " -> ".join(str(f) for f in (err.filename, err.filename2) if f) or "a file"
    name = errno.errorcode.get(err.errno or 0, "?")
    return f"cannot write or lock {where}: {err.strerror} [{name}]; nothing half-written was kept"


ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="Parameter file to read.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="log progress on stderr")]
log = logging.getLogger("langdml")


@contextlib.contextmanager
def user_errors(command: str) -> Iterator[None]:
    """The one error path of every command, stages and serving alike: what a user can fix (a
    :class:`LangdmlError`; a full disk, a read-only or forbidden folder, a folder where a file goes) is one line
    on stderr and exit 1; Ctrl-C is one line and exit 130; anything else is a bug and keeps its traceback."""
    try:
        yield
    except LangdmlError as err:
        _fail(command, err)
    except OSError as err:
        if err.errno not in ENVIRONMENT_ERRORS:
            raise
        _fail(command, LangdmlError(environment_message(err)))
    except KeyboardInterrupt:
        typer.echo(
            f"langdml {command}: interrupted; finished outputs are kept and nothing half-written is left "
            "(train: the last finished epoch is checkpointed and a rerun resumes from it)",
            err=True,
        )
        sys.exit(130)


def _run_stage(module: str, params_path: Path, **options: Any) -> None:
    """Load params, run ``stages.<module>.run`` (with the command's ``options``); user errors become one line on
    stderr and exit 1."""
    _setup_logging()
    from stages.core.config import load_params
    from stages.core.runtime import launched_by_torchrun
    from stages.lock import exit_with_parent, stage_lock

    command = module.replace("_", "-")
    exit_with_parent()
    with user_errors(command):
        params = load_params(params_path)
        stage = importlib.import_module(f"stages.{module}")
        if launched_by_torchrun():  # one of the worker processes: the launcher holds the lock
            stage.run(params, **options)
            return
        with stage_lock(command):
            nproc = stage.processes(params) if hasattr(stage, "processes") else 1
            if nproc > 1:
                sys.exit(_torchrun(command, params_path, nproc))
            stage.run(params, **options)


def _torchrun(command: str, params_path: Path, nproc: int) -> int:
    """Run this command again as ``nproc`` DDP workers on this machine (torchrun, standalone rendezvous);
    their exit status. Many nodes: run ``torchrun --nnodes ... -m stages.cli <command>`` on each."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += ["-m", "stages.cli", command, "--params", str(params_path)]
    log.info("launching %d processes: %s", nproc, " ".join(cmd))
    return subprocess.run(cmd, check=False).returncode


def _setup_logging(verbose: bool = True) -> None:
    """Stages log their progress; the serving commands (search, embed, export) print only their results unless
    ``-v``: no INFO lines, no model-hub progress bars. DDP workers other than rank 0 only report problems."""
    level = logging.INFO if verbose and os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not verbose:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TQDM_DISABLE", "1")


def _fail(command: str, err: BaseException) -> None:
    typer.echo(f"langdml {command}: error: {one_line(err)}", err=True)
    sys.exit(1)


# The stage commands, in pipeline order (dvc.yaml's DAG), each ``langdml <stage>`` running ``stages.<module>``,
# with the params dvc.yaml tracks for it (tests/test_cli.py checks they are the same).
STAGES: list[tuple[str, str, tuple[str, ...]]] = [
    (
        "fetch_data",
        "Obtain the dataset into dataset.root when langdml can (emoji: npm; fashion-mnist), else check it.",
        ("dataset.name", "dataset.root"),
    ),
    ("prepare", "Read the dataset root and write the train/test/classes manifests (data/prepared/).", ("dataset",)),
    ("embed_text", 'Embed "a photo of a {class}" with the frozen text encoder (ELG cache, data/language/).', ("text",)),
    (
        "pseudo_labels",
        "Top-k ImageNet pseudo-labels per training class, embedded (PLG cache, data/pseudolabels/).",
        ("pseudo_labels", "text.encoder", "text.pooling"),
    ),
    (
        "evaluate_pretrained",
        "Retrieval metrics of the untrained backbone's pooled features: the control.",
        ("seed", "model.backbone", "model.pretrained", "model.pooling", "model.image_size", "evaluate"),
    ),
    (
        "cache_images",
        "Decode the training images once into a memory-mapped uint8 array (train.image_cache).",
        ("train.image_cache", "model.image_size"),
    ),
    (
        "train",
        "Train the image encoder with the DML loss plus omega times language matching (data/model/).",
        ("seed", "omega", "model", "language", "train", "losses"),
    ),
    (
        "evaluate",
        "Embed the test split with the trained model; metrics JSON, embeddings and pictures (data/eval/).",
        ("seed", "evaluate"),
    ),
    (
        "index",
        "Embed the gallery (index.gallery) once with the trained model, for `langdml search` (data/index/).",
        ("evaluate.batch_size", "evaluate.device", "index.gallery"),
    ),
    ("imagetext_prepare", "Image-text task: the images and captions manifests of imagetext.data.", ("imagetext.data",)),
    (
        "imagetext_features",
        "Image-text task: frozen image tokens and what the text tower needs of every caption.",
        ("imagetext.features",),
    ),
    (
        "imagetext_train",
        "Image-text task: train the image set head and the text tower (data/imagetext/model/).",
        ("seed", "imagetext.model", "imagetext.train"),
    ),
    (
        "imagetext_evaluate",
        "Image-text task: i2t / t2i recall and RSUM of the test split (data/imagetext/eval/).",
        ("seed", "imagetext.evaluate", "imagetext.train.device"),
    ),
    (
        "imagetext_index",
        "Image-text task: embed the test images once, for `langdml search --text`.",
        ("imagetext.train.device",),
    ),
]


def _stage_command(module: str, summary: str, params_read: tuple[str, ...]) -> None:
    def command(params: ParamsOpt = Path("params.yaml")) -> None:
        _run_stage(module, params)

    command.__doc__ = (
        f"{summary}\n\nReads these params (DVC re-runs the stage when one changes): {', '.join(params_read)}."
    )
    app.command(module.replace("_", "-"))(command)


@app.command("fetch-data")
def fetch_data(
    download: Annotated[
        bool, typer.Option("--download", help="download, check and unpack it from its official source")
    ] = False,
    imagetext: Annotated[
        bool, typer.Option("--imagetext", help="the image-text task's imagetext.data (with --download)")
    ] = False,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    _run_stage("fetch_data", params, download=download, imagetext=imagetext)


fetch_data.__doc__ = (
    f"{STAGES[0][1]} --download gets CUB200, SOP or COCO from their official sources (docs/datasets.md)."
    f"\n\nReads these params (DVC re-runs the stage when one changes): {', '.join(STAGES[0][2])}."
)


for _module, _summary, _params in STAGES:
    if _module != "fetch_data":  # its own command below: it takes the user's --download
        _stage_command(_module, _summary, _params)


@app.command()
def recipe(
    name: Annotated[str | None, typer.Argument(help="e.g. roth22/cub200-rn512-ms-plg; none: list them")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", "-S", help="key=value on top of the recipe")] = None,
    docs: Annotated[bool, typer.Option("--docs", help="print docs/recipes.md")] = False,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Write a paper's official run (a named recipe, docs/recipes.md) into params.yaml; then `dvc exp run`."""
    import yaml

    from stages.core.recipe import apply_recipe, recipe_names, recipes_markdown

    if docs:
        typer.echo(recipes_markdown(), nl=False)
        return
    if name is None:
        for known in recipe_names():
            typer.echo(known)
        return
    with user_errors("recipe"):
        overrides = {}
        for item in set_ or []:
            key, sep, value = item.partition("=")
            if not sep:
                raise LangdmlError(f"--set {item!r}: expected key=value")
            try:
                overrides[key] = yaml.safe_load(value)
            except yaml.YAMLError as err:
                raise LangdmlError(f"--set {item!r}: not a YAML value ({one_line(err)})") from None
        changed = apply_recipe(params, name, overrides)
    for line in changed:
        typer.echo(line)
    typer.echo(f"{params}: {len(changed)} value(s) set by {name}; run `dvc exp run` (DVC tracks every one of them)")
    with user_errors("recipe"):
        note = _dataset_note(params, imagetext=name.startswith("dive/"))
    if note:
        typer.echo(f"note: {note}", err=True)


def _dataset_note(params_path: Path, imagetext: bool) -> str | None:
    """Whether the root the recipe's task reads holds its dataset, said when the recipe is written (not stages
    later): None when it does, else how to get it."""
    from stages.core.config import load_params
    from stages.core.data.datasets.registry import missing

    p = load_params(params_path)
    if imagetext:
        return missing(p.imagetext.data.name, Path(p.imagetext.data.root).expanduser(), "imagetext.data.root")
    return missing(p.dataset.name, Path(p.dataset.root).expanduser(), "dataset.root")


@app.command()
def study(
    name: Annotated[
        str | None, typer.Argument(help="e.g. emoji/language-controls, or a study file; none: list them")
    ] = None,
    rows: Annotated[
        list[str] | None, typer.Option("--row", help="queue only this row (repeatable): a re-run, a row added later")
    ] = None,
    seeds: Annotated[list[int] | None, typer.Option("--seed", help="queue only this seed (repeatable)")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the dvc commands; queue nothing")] = False,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Queue a study's grid (rows x seeds) as named DVC experiments; then `dvc queue start -j N` and
    `langdml table NAME`. A finished run is re-run after `dvc exp remove NAME`."""
    import shlex
    import subprocess

    from stages.core.study import check_params, load_study, queue_commands, study_names

    if name is None:
        for known in study_names():
            typer.echo(known)
        return
    with user_errors("study"):
        grid = load_study(name)
        check_params(grid, params)
        commands = queue_commands(grid, _untracked("data/raw", "data/local"), rows, seeds)
        if dry_run:
            for cmd in commands:
                typer.echo(shlex.join(cmd))
            return
        existing = set(_experiment_names())
        taken = [cmd[cmd.index("--name") + 1] for cmd in commands if cmd[cmd.index("--name") + 1] in existing]
        if taken:
            raise LangdmlError(f"experiment {taken[0]} exists already: `dvc exp remove {' '.join(taken)}` first")
        for done, cmd in enumerate(commands):
            dvc = [sys.executable, "-m", "dvc", *cmd[1:]]  # this environment's DVC, activated or not
            result = subprocess.run(dvc, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                why = one_line(RuntimeError(result.stderr.strip() or result.stdout.strip()))
                raise LangdmlError(f"queued {done} of {len(commands)}; `{shlex.join(cmd[:6])}` failed: {why}")
    n_rows, n_seeds = len(rows or grid.rows), len(seeds or grid.seeds)
    typer.echo(
        f"queued {len(commands)} experiments ({n_rows} rows x {n_seeds} seeds): run them with `dvc queue start -j N` "
        f"(`dvc queue status` to follow), then `langdml table {name}`"
    )


def _untracked(*folders: str) -> tuple[str, ...]:
    """What of ``folders`` git does not track (a queued run starts from the last commit, so these go along with
    ``-C``): the dataset folder, word-vector files kept in data/local."""
    import subprocess

    cmd = ["git", "ls-files", "--others", "--ignored", "--exclude-standard", "--directory", *folders]
    listed = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.split("\n")
    return tuple(p.rstrip("/") for p in listed if p.strip())


def _experiments(commits: int = 1, tries: int = 3) -> list[dict[str, Any]]:
    """``dvc.api.exp_show`` of the last ``commits`` commits. While the queue runs, DVC can list a run whose
    temporary copy is being made or removed and fail on it (NotDvcRepoError on .dvc/tmp/exps/...): that is
    retried; a lasting failure is one line."""
    import time

    from dvc.api import exp_show
    from dvc.exceptions import DvcException

    for attempt in range(tries):
        try:
            return exp_show(repo=".", num=commits)
        except DvcException as err:
            if attempt == tries - 1:
                raise LangdmlError(f"`dvc exp show` failed ({one_line(err)}); run this again") from None
            time.sleep(2.0)
    return []


def _short_rev(rev: str) -> str:
    """A commit as the table names it: DVC names this commit's baseline by its branch (``main``), which the
    next commit makes wrong; git's short hash stays true. ``rev`` itself where git cannot resolve it."""
    import subprocess

    done = subprocess.run(["git", "rev-parse", "--short=7", rev], capture_output=True, text=True, check=False)
    short = done.stdout.strip() if done.returncode == 0 else ""
    return short or rev


def _experiment_names() -> list[str]:
    return [row["Experiment"] for row in _experiments() if row.get("Experiment")]


@app.command()
def table(
    name: Annotated[str, typer.Argument(help="the study (a name or a study file)")],
    out: Annotated[Path, typer.Option("--out", help="folder for <study>.md, .csv and .png")] = Path("data/studies"),
    commits: Annotated[
        int,
        typer.Option(
            "--commits", min=1, help="look for runs among the experiments of the last N commits (1: this one's)"
        ),
    ] = 1,
) -> None:
    """A study's table from its experiments: mean ± std over seeds, the paired difference to the baseline,
    missing or failed runs named; Markdown (printed), CSV and a PNG. Runs queued before a commit belong to
    the commit before it: `--commits 2` finds them (the table names the commits when they are several)."""
    from stages.core.io import write_text
    from stages.core.study import collect, csv_text, load_study, markdown, plot, summarize

    with user_errors("table"):
        grid = load_study(name)
        collected = collect(grid, _experiments(commits))
        if not collected.values:
            among = "this commit's experiments" if commits == 1 else f"the experiments of the last {commits} commits"
            raise LangdmlError(
                f"no finished run of study {name} among {among} (`dvc queue status`; runs queued before the "
                f"last commit: --commits 2); first: {collected.problems[0]}"
            )
        summary = summarize(grid, collected)
        commits: dict[str, int] = {}
        for rev, n in collected.commits.items():
            commits[_short_rev(rev)] = commits.get(_short_rev(rev), 0) + n
        text = markdown(grid, summary, collected.problems, commits)
        write_text(out / f"{grid.stem}.md", text)
        write_text(out / f"{grid.stem}.csv", csv_text(grid, summary))
        plot(grid, summary, out / f"{grid.stem}.png")
    typer.echo(text, nl=False)
    typer.echo(f"-> {out / grid.stem}.md, .csv, .png")


@app.command("exp")
def exp_view(
    metric: Annotated[
        list[str] | None, typer.Option("--metric", "-m", help="a metric to show (repeatable); default: headline")
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """`dvc exp show`, readable: each experiment with the params that differ between them and the headline
    metrics (recall@1, map@r, rsum), as Markdown."""
    import yaml

    from stages.core.io import read_text
    from stages.core.recipe import flatten
    from stages.core.study import HEADLINE, experiment_view, markdown_rows

    with user_errors("exp"):
        keys = list(flatten(yaml.safe_load(read_text(params)) or {}))
        rows = experiment_view(_experiments(), keys, tuple(metric) if metric else HEADLINE)
    typer.echo(markdown_rows(rows), nl=False)


@app.command("plots-offline")
def plots_offline() -> None:
    """Make `dvc plots show` / `dvc plots diff` pages render offline: a page template with vega, vega-lite and
    vega-embed inlined (npm pack, pinned SHA-512s), set as this clone's plots.html_template (.dvc/config.local)."""
    import subprocess

    from stages.core.offline_plots import TEMPLATE, write_template

    with user_errors("plots-offline"):
        path = write_template(Path(TEMPLATE))
        setting = Path(TEMPLATE).relative_to(".dvc").as_posix()  # DVC reads it relative to .dvc/
        cmd = [sys.executable, "-m", "dvc", "config", "--local", "plots.html_template", setting]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise LangdmlError(f"`dvc config --local plots.html_template {setting}` failed: {done.stderr.strip()}")
    typer.echo(f"{path} ({path.stat().st_size // 1024} KiB): `dvc plots show` and `dvc plots diff` now render offline")


@app.command()
def embed(
    images: Annotated[list[Path], typer.Argument(help="images: files or folders")],
    out: Annotated[Path, typer.Option("--out", help="the Parquet file to write")],
    verbose: VerboseOpt = False,
) -> None:
    """Embed image files or folders with the trained model into a Parquet file (N x D, or N x K x D sets)."""
    _setup_logging(verbose)
    from stages.core.serving.api import Retriever

    with user_errors("embed"):
        n = Retriever.load().embed_to_parquet(images, out)
    typer.echo(f"{n} image(s) -> {out}")


@app.command()
def export(
    images: Annotated[
        list[Path] | None, typer.Argument(help="images to check the export on (default: 8 test images)")
    ] = None,
    format_: Annotated[str, typer.Option("--format", help="onnx")] = "onnx",
    out: Annotated[Path, typer.Option("--out", help="the file to write")] = Path("data/export/model.onnx"),
    verbose: VerboseOpt = False,
) -> None:
    """Export the trained image encoder (backbone + head) to ONNX, checked against PyTorch with onnxruntime."""
    _setup_logging(verbose)
    from stages import paths
    from stages.core.model.encoder import load_model
    from stages.core.serving.export import TOLERANCE, check_batch, export_onnx
    from stages.core.serving.queries import image_files

    with user_errors("export"):
        if format_ != "onnx":
            raise LangdmlError(f"--format {format_!r}: only onnx is supported")
        model, model_params = load_model(paths.MODEL, "cpu")
        if images:
            files = image_files(images)
        else:
            from stages.core.artifacts import load_manifest

            table, root = load_manifest(paths.TEST_MANIFEST)
            files = [root / p for p in table.column("path").to_pylist()[:8]]
        diff = export_onnx(model, model_params.image_size, out, check_batch(model, model_params.image_size, files))
    typer.echo(
        f"{out}: ONNX, dynamic batch; onnxruntime vs PyTorch on {len(files)} images: max |diff| {diff:.2e} "
        f"(<= {TOLERANCE:g})"
    )


@app.command()
def search(
    queries: Annotated[list[Path] | None, typer.Argument(help="query images: files or folders")] = None,
    text: Annotated[list[str] | None, typer.Option("--text", help="a caption to find images for")] = None,
    k: Annotated[int, typer.Option("--k", help="neighbours per query")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON list of results per query")] = False,
    picture: Annotated[Path | None, typer.Option("--picture", help="draw the queries and results (PNG)")] = None,
    verify: Annotated[
        bool, typer.Option("--verify", help="check the index files' content hashes too (sizes are always checked)")
    ] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Rank images for query images (the DML model's index) or captions (--text: the image-text model's):
    rank, score, class or caption, path."""
    import json

    _setup_logging(verbose)
    from stages import paths
    from stages.core.serving.api import Retriever, search_picture
    from stages.core.serving.text import TextRetriever

    with user_errors("search"):
        if bool(queries) == bool(text):
            raise LangdmlError("give query images or --text captions (one kind per call)")
        if k < 1:
            raise LangdmlError(f"--k {k}: ask for at least 1 neighbour")
        if text:
            retriever = TextRetriever.load(paths.IMAGETEXT_MODEL, paths.IMAGETEXT_INDEX, verify=verify)
            results = retriever.search_texts(text, k)
        else:
            results = Retriever.load(verify=verify).search_files(queries, k)
        if picture is not None:
            search_picture(results, picture, text_queries=bool(text))
    if as_json:
        typer.echo(json.dumps([{"query": str(q), "results": r} for q, r in results], indent=1))
        return
    for query, rows in results:
        typer.echo(f"{query}")
        for row in rows:
            typer.echo(f"  {row['rank']:>3}  {row['score']:.4f}  {row['class_name']:<30}  {row['path']}")


@app.command("list")
def list_registries() -> None:
    """List every registry: datasets, text encoders, classifiers, backbones, losses, guidances, ..."""
    from stages.core.catalog import registries

    for kind, names in registries().items():
        typer.echo(f"{kind}: {', '.join(names)}")


if __name__ == "__main__":
    app()
