"""``probecvx layers``: list the probe sites of a model, with shapes and sizes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import click
import torch

from probecvx.checkpoints import (
    CheckpointRef,
    discover_checkpoints,
    load_model,
    make_checkpoint_ref,
    resolve_model_factory,
)
from probecvx.cli import main, verbose_option
from probecvx.datasets import load_dataset
from probecvx.errors import InvalidInputError
from probecvx.extract import DRY_BATCH_ROWS
from probecvx.sites import POOLINGS, SiteInfo, list_sites, select_sites

HEADER = ("site", "type", "output shape", "features", "bytes/sample", "calls")


@main.command("layers")
@verbose_option
@click.argument("checkpoint", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--model",
    "model_spec",
    help="Model constructor, PKG.MODULE:CALLABLE or FILE.py:CALLABLE. Needed for "
    "checkpoints that hold only weights.",
)
@click.option("--model-kwargs", help="JSON object of keyword arguments for --model.")
@click.option(
    "--data",
    help="Dataset whose first samples are run through the model, as for "
    "`probecvx extract --data`.",
)
@click.option(
    "--input-shape",
    help="Shape of one input sample, such as 1,28,28, used instead of --data; "
    "the model then sees random normal inputs.",
)
@click.option(
    "--pool",
    "pooling",
    type=click.Choice(POOLINGS),
    default="none",
    show_default=True,
    help="Pooling to size the features for, as in `probecvx extract --pool`.",
)
@click.option(
    "--all",
    "show_all",
    is_flag=True,
    help="Also list container modules (Sequential, blocks), which are not "
    "extracted unless named in --sites.",
)
@click.option(
    "--trust-checkpoints",
    "trust",
    is_flag=True,
    help="Allow checkpoints that pickle whole modules. Unpickling runs code from "
    "the file: use only for files from a trusted source.",
)
def layers_command(
    checkpoint: Path,
    model_spec: str | None,
    model_kwargs: str | None,
    data: str | None,
    input_shape: str | None,
    pooling: str,
    show_all: bool,
    trust: bool,
) -> None:
    """List the probe sites of the model in CHECKPOINT.

    CHECKPOINT is a checkpoint file, a Hugging Face checkpoint folder, or a
    folder of checkpoints, of which the first in step order is used. The
    model runs once on 4 samples, taken from --data or drawn at random with
    --input-shape (one of the two is required). Prints a table: site name,
    module type, output shape per sample, stored features and float32 bytes
    per sample under --pool, and how many times the module ran. Without
    --all it lists what `probecvx extract` stores by default.
    """
    if (data is None) == (input_shape is None):
        raise click.UsageError(
            "pass either --data DATA or --input-shape C,H,W to give the model an input"
        )
    if model_kwargs is not None and model_spec is None:
        raise click.UsageError("--model-kwargs needs --model")

    factory = None
    if model_spec is not None:
        factory = resolve_model_factory(model_spec, model_kwargs)
    model = load_model(_checkpoint_ref(checkpoint), factory, trust=trust)
    if data is not None:
        _, batch = next(load_dataset(data).iter_batches(DRY_BATCH_ROWS))
    else:
        shape = _parse_shape(str(input_shape))
        generator = torch.Generator().manual_seed(0)
        batch = torch.randn((DRY_BATCH_ROWS, *shape), generator=generator)

    infos = list_sites(model, batch, pooling=pooling)
    listed = infos if show_all else select_sites(infos, None)
    for line in format_table(listed):
        click.echo(line)


def format_table(infos: Sequence[SiteInfo]) -> list[str]:
    """Return the site table as aligned text lines, header first."""
    rows = [HEADER]
    for info in infos:
        if info.problem:
            rows.append((info.name, info.module_type, info.problem, "-", "-", "-"))
            continue
        rows.append(
            (
                info.name,
                info.module_type,
                str(info.output_shape),
                str(info.n_features),
                f"{info.bytes_per_sample:.0f}",
                str(info.calls),
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(HEADER))]
    return [
        "  ".join(
            cell.ljust(width) for cell, width in zip(row, widths, strict=True)
        ).rstrip()
        for row in rows
    ]


def _checkpoint_ref(path: Path) -> CheckpointRef:
    """Return the checkpoint at ``path``, or the first one in a folder of them."""
    if path.is_dir():
        try:
            return make_checkpoint_ref(path)
        except InvalidInputError:
            return discover_checkpoints(path)[0]
    return make_checkpoint_ref(path)


def _parse_shape(text: str) -> tuple[int, ...]:
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() and int(part) > 0 for part in parts):
        raise InvalidInputError(
            f"invalid --input-shape {text!r}; give positive integers separated "
            "by commas, such as 1,28,28"
        )
    return tuple(int(part) for part in parts)
