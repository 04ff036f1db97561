"""``probecvx demo``: train a small convnet and probe every layer of it."""

from __future__ import annotations

from pathlib import Path

import click

from probecvx import demo
from probecvx.cli import check_jobs, check_tol, main, verbose_option
from probecvx.fit import DEFAULT_MAX_ITER


@main.command("demo")
@verbose_option
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=demo.DEFAULT_OUT_DIR,
    show_default=True,
    help="Demo folder. A folder from an earlier demo is reused; any other "
    "folder must be empty.",
)
@click.option(
    "--data",
    default=demo.DIGITS,
    show_default=True,
    help="Dataset of square images: 'digits' (scikit-learn's 8x8 digits) or "
    "a folder of MNIST IDX files for the paper's 28x28 setting.",
)
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=None,
    help=f"Training steps.  [default: {demo.DEFAULT_STEPS}; "
    f"{demo.QUICK_STEPS} with --quick]",
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=None,
    help="Rows of the dataset to use.  [default: all of digits, "
    f"{demo.DEFAULT_OTHER_LIMIT} of other data, {demo.QUICK_LIMIT} with --quick]",
)
@click.option(
    "--jobs",
    "n_jobs",
    type=int,
    default=-1,
    show_default=True,
    callback=check_jobs,
    help="Probe fits run in parallel; -1 uses every core.",
)
@click.option(
    "--max-iter",
    type=click.IntRange(min=1),
    default=None,
    help="Iteration cap per probe, as in `probecvx fit --max-iter`.  "
    f"[default: {DEFAULT_MAX_ITER}]",
)
@click.option(
    "--tol",
    type=float,
    default=None,
    callback=check_tol,
    help="Probe solver tolerance, as in `probecvx fit --tol`.  "
    "[default: the solver's own]",
)
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Seed of the data split, the initial weights and the training order.",
)
@click.option(
    "--quick",
    is_flag=True,
    help="Train briefly on a few hundred rows and keep 3 checkpoints: seconds, "
    "for a smoke test.",
)
@click.option("--no-progress", is_flag=True, help="Hide the progress bars.")
def demo_command(
    out_dir: Path,
    data: str,
    steps: int | None,
    limit: int | None,
    n_jobs: int,
    max_iter: int | None,
    tol: float | None,
    seed: int,
    quick: bool,
    no_progress: bool,
) -> None:
    """Train a small convnet, save checkpoints, and probe every layer of each.

    The network has two blocks of 5x5 convolution, ReLU and 2x2 max-pooling, a
    hidden fully-connected layer and a linear classifier, the layers of
    TensorFlow's MNIST example convolutional.py. The demo saves checkpoints
    from step 0 (untrained) on, then runs `probecvx extract`, `probecvx fit`
    and `probecvx report` over them, writing everything under --out.
    """
    result = demo.run_demo(
        out_dir,
        data=data,
        steps=steps,
        limit=limit,
        n_jobs=n_jobs,
        quick=quick,
        seed=seed,
        progress=not no_progress,
        max_iter=max_iter,
        tol=tol,
    )
    click.echo(demo.format_demo_summary(result), nl=False)
