"""``probecvx fit``: fit a probe to every (checkpoint, site) of a folder of shards."""

from __future__ import annotations

import importlib
import math
import warnings
from pathlib import Path

import click

from probecvx.claims import DEFAULT_CLAIM_TIMEOUT
from probecvx.cli import check_jobs, check_tol, main, verbose_option
from probecvx.cluster import (
    BACKENDS,
    HDF5_LOCKING_MODES,
    parallel_backend,
    resolve_shard,
)
from probecvx.errors import ConvergenceWarning, ProbecvxError, SplitWarning
from probecvx.fit import DEFAULT_CS, FitSummary, fit_shards
from probecvx.solvers import available_solvers

SHARD_HELP = (
    "Fit only task I of N (I/N, counting from 0 like SLURM's --array=0-15: "
    "0/16 to 15/16). Inside a SLURM array task it defaults to the task's place "
    "in the array. Every task computes the same split, balanced by rows times "
    "features."
)
HDF5_LOCKING_HELP = (
    "HDF5 file locking of the files being written; finished shards are read "
    "without a lock. HDF5_USE_FILE_LOCKING, when set, takes precedence. Use "
    "false on NFS or Lustre mounts that reject locks."
)
CLAIM_TIMEOUT_HELP = (
    "Seconds without a heartbeat after which another process's claim on a unit "
    "is stale and may be broken."
)


class _CGrid(click.ParamType):
    """A comma-separated list of positive numbers, such as ``0.01,0.1,1,10``."""

    name = "C1,C2,..."

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[float, ...]:
        if isinstance(value, tuple):
            return value
        grid = []
        for part in str(value).split(","):
            try:
                C = float(part)
            except ValueError:
                C = math.nan
            if not (math.isfinite(C) and C > 0):
                self.fail(
                    f"invalid C {part.strip()!r} in {value!r}: give positive "
                    "numbers separated by commas, such as 0.01,0.1,1,10",
                    param,
                    ctx,
                )
            grid.append(C)
        return tuple(grid)


class _SolverChoice(click.Choice):
    """The registered solvers, read when the option is parsed.

    ``--plugin`` modules are imported before (the option is eager), so the
    solvers they register are valid choices.
    """

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> str:
        self.choices = tuple(available_solvers())
        return str(super().convert(value, param, ctx))


def _default_solver() -> str:
    solvers = available_solvers()
    return "auto" if "auto" in solvers else solvers[0]


def _import_plugins(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> tuple[str, ...]:
    for name in values:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise click.BadParameter(
                f"cannot import {name!r} ({type(err).__name__}: {err}); give a "
                "PKG.MODULE on PYTHONPATH",
                ctx,
                param,
            ) from err
    return values


def _split_names(values: tuple[str, ...]) -> list[str] | None:
    """Return the names of a repeatable, comma-separated option; None if not given."""
    names = [name.strip() for value in values for name in value.split(",")]
    names = [name for name in names if name]
    return names or None


@main.command("fit")
@verbose_option
@click.argument("acts_dir", type=click.Path(path_type=Path))
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the reports: one <checkpoint>.json each, and index.json.",
)
@click.option(
    "--solver",
    type=_SolverChoice(available_solvers()),
    default=_default_solver(),
    show_default=True,
    help="Probe solver; --plugin modules may register more.",
)
@click.option(
    "--C",
    "Cs",
    type=_CGrid(),
    default=None,
    help="Grid of inverse L2 penalty strengths; the value with the lowest val "
    "error is kept. Default: " + ",".join(f"{C:g}" for C in DEFAULT_CS) + ".",
)
@click.option(
    "--jobs",
    "n_jobs",
    type=int,
    default=-1,
    show_default=True,
    callback=check_jobs,
    help="Probes fitted in parallel; -1 uses every core, or every worker "
    "thread of a Dask cluster. With --backend dask and no scheduler: the number "
    "of local worker processes.",
)
@click.option(
    "--sites",
    multiple=True,
    help="Probe sites to fit: names or globs, comma-separated or repeated. "
    "Default: all.",
)
@click.option(
    "--checkpoints",
    multiple=True,
    help="Checkpoints to fit: names or globs, comma-separated or repeated. "
    "Default: all.",
)
@click.option(
    "--tol",
    type=float,
    default=None,
    callback=check_tol,
    help="Solver tolerance. Default: the solver's own.",
)
@click.option(
    "--max-iter",
    type=click.IntRange(min=1),
    default=None,
    help="Iteration cap per probe; a probe that reaches it is marked not "
    "converged. Default: 1000.",
)
@click.option(
    "--early-stopping",
    is_flag=True,
    help="Stop a probe when its val loss stops improving, for solvers that can.",
)
@click.option(
    "--warm-start/--no-warm-start",
    default=True,
    show_default=True,
    help="Start each probe from the previous checkpoint's solution for its site.",
)
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda"]),
    default="cpu",
    show_default=True,
    help="Device for the matrix products of solvers that run on torch, such as "
    "lbfgs. The auto solver picks a CUDA device by itself when the data fits in "
    "its memory.",
)
@click.option("--force", is_flag=True, help="Refit probes whose report is current.")
@click.option(
    "--retry-failed",
    is_flag=True,
    help="Refit probes that failed in an earlier run; by default they keep their "
    "failed entry.",
)
@click.option("--shard", "shard_text", metavar="I/N", help=SHARD_HELP)
@click.option(
    "--backend",
    type=click.Choice(BACKENDS),
    default=None,
    help="joblib backend: loky (processes, the default), threading, or dask "
    "(a running scheduler, or a local cluster on 127.0.0.1 when none is given).",
)
@click.option(
    "--scheduler",
    metavar="ADDRESS",
    help="Address of a running Dask scheduler, such as tcp://node7:8786.",
)
@click.option(
    "--scheduler-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="JSON file in which a running Dask scheduler wrote its address.",
)
@click.option(
    "--plugin",
    "plugins",
    multiple=True,
    metavar="PKG.MODULE",
    is_eager=True,
    callback=_import_plugins,
    help="Import this module here and in every worker before fitting, such as "
    "one that registers a solver. Repeatable.",
)
@click.option(
    "--hdf5-locking",
    type=click.Choice(HDF5_LOCKING_MODES),
    default=None,
    help=HDF5_LOCKING_HELP,
)
@click.option(
    "--claim-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_CLAIM_TIMEOUT,
    show_default=True,
    help=CLAIM_TIMEOUT_HELP,
)
@click.option("--quiet", is_flag=True, help="Hide the progress bar.")
def fit_command(
    acts_dir: Path,
    out_dir: Path,
    solver: str,
    Cs: tuple[float, ...] | None,
    n_jobs: int,
    sites: tuple[str, ...],
    checkpoints: tuple[str, ...],
    tol: float | None,
    max_iter: int | None,
    early_stopping: bool,
    warm_start: bool,
    device: str,
    force: bool,
    retry_failed: bool,
    shard_text: str | None,
    backend: str | None,
    scheduler: str | None,
    scheduler_file: Path | None,
    plugins: tuple[str, ...],
    hdf5_locking: str | None,
    claim_timeout: float,
    quiet: bool,
) -> None:
    """Fit a linear probe to every probe site of every shard in ACTS_DIR.

    ACTS_DIR is the --out folder of `probecvx extract`. Prints the path of each
    report written, one a line; progress and warnings go to stderr. Probes
    whose result is current are skipped, and so are probes that failed
    before unless --retry-failed, so an interrupted run can simply be run
    again. Several runs may share ACTS_DIR and --out, because each probe is
    claimed by one process at a time. Exits with status 1 when a probe or a
    shard failed, after fitting all the others.
    """
    shard = resolve_shard(shard_text)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        warnings.simplefilter("always", SplitWarning)
        with parallel_backend(
            backend, n_jobs=n_jobs, scheduler=scheduler, scheduler_file=scheduler_file
        ):
            summary = fit_shards(
                acts_dir,
                out_dir,
                solver=solver,
                Cs=Cs,
                sites=_split_names(sites),
                checkpoints=_split_names(checkpoints),
                n_jobs=n_jobs,
                tol=tol,
                max_iter=max_iter,
                early_stopping=early_stopping,
                warm_start=warm_start,
                device=device,
                force=force,
                progress=not quiet,
                shard=shard,
                retry_failed=retry_failed,
                plugins=plugins,
                hdf5_locking=hdf5_locking,
                claim_timeout=claim_timeout,
            )
    # Shown after the progress bar has closed, in the group's one-line form.
    for warning in caught:
        warnings.showwarning(
            warning.message, warning.category, warning.filename, warning.lineno
        )

    for path in summary.reports_written:
        click.echo(str(path))
    if not summary.ok:
        raise ProbecvxError(_failure_line(summary))


def _failure_line(summary: FitSummary) -> str:
    """Return one line that counts the failures and shows the first one."""
    parts = []
    if summary.failed_units and summary.n_failed == summary.n_units:
        parts.append(f"all {summary.n_units} probes failed")
    elif summary.failed_units:
        parts.append(f"{summary.n_failed} of {summary.n_units} probes failed")
    if summary.failed_earlier:
        parts.append(
            f"{len(summary.failed_earlier)} probes failed in an earlier run and were "
            "not refitted (pass --retry-failed to refit them)"
        )
    if summary.failed_checkpoints:
        parts.append(f"{len(summary.failed_checkpoints)} shards could not be read")
    failed_probes = summary.failed_units or summary.failed_earlier
    if failed_probes:
        checkpoint, site, error = failed_probes[0]
        first = f"first: probe {site} at {checkpoint}: {error}"
    else:
        checkpoint, error = summary.failed_checkpoints[0]
        first = f"first: {checkpoint}: {error}"
    # Units left to other processes count as fitted, like current ones.
    n_others = summary.n_units - summary.n_failed - len(summary.failed_earlier)
    others = "the others were fitted" if n_others > 0 else "no probe was fitted"
    return (
        f"{' and '.join(parts)}; {others}. The errors are in "
        f"{summary.index_path} and the reports ({first})"
    )
