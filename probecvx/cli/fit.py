"""``probecvx fit``: fit a probe to every (checkpoint, site) of a folder of shards."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import click

from probecvx.cli import main
from probecvx.errors import ConvergenceWarning, ProbecvxError
from probecvx.fit import DEFAULT_CS, FitSummary, fit_shards
from probecvx.solvers import available_solvers


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


def _default_solver() -> str:
    solvers = available_solvers()
    return "auto" if "auto" in solvers else solvers[0]


def _split_names(values: tuple[str, ...]) -> list[str] | None:
    """Return the names of a repeatable, comma-separated option; None if not given."""
    names = [name.strip() for value in values for name in value.split(",")]
    names = [name for name in names if name]
    return names or None


@main.command("fit")
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
    type=click.Choice(available_solvers()),
    default=_default_solver(),
    show_default=True,
    help="Probe solver.",
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
    help="Probes fitted in parallel; -1 uses every core.",
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
    quiet: bool,
) -> None:
    """Fit a linear probe to every probe site of every shard in ACTS_DIR.

    ACTS_DIR is the --out folder of `probecvx extract`. Prints the path of each
    report written, one a line; progress and warnings go to stderr. Probes
    whose report is current are skipped, so an interrupted run can simply be
    run again. Exits with status 1 when a probe or a shard failed, after
    fitting all the others.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
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
        )
    for warning in caught:
        if issubclass(warning.category, ConvergenceWarning):
            click.echo(f"Warning: {warning.message}", err=True)
        else:
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
    if summary.failed_units:
        parts.append(f"{summary.n_failed} of {summary.n_units} probes failed")
    if summary.failed_checkpoints:
        parts.append(f"{len(summary.failed_checkpoints)} shards could not be read")
    if summary.failed_units:
        checkpoint, site, error = summary.failed_units[0]
        first = f"first: probe {site} at {checkpoint}: {error}"
    else:
        checkpoint, error = summary.failed_checkpoints[0]
        first = f"first: {checkpoint}: {error}"
    return (
        f"{' and '.join(parts)}; the others were fitted. The errors are in "
        f"{summary.index_path} and the reports ({first})"
    )
