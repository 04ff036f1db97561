"""``probecvx extract``: write one shard of activations per checkpoint."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from probecvx.checkpoints import resolve_model_factory
from probecvx.claims import DEFAULT_CLAIM_TIMEOUT
from probecvx.cli import main, verbose_option
from probecvx.cluster import HDF5_LOCKING_MODES, resolve_shard
from probecvx.datasets import (
    SPLIT_CODES,
    ProbeDataset,
    load_dataset,
    parse_split,
    small_split_warning,
)
from probecvx.errors import ProbecvxError
from probecvx.extract import ExtractSummary, ShardRecord, extract_checkpoints
from probecvx.shards import STORAGE_DTYPES
from probecvx.sites import POOLINGS


def split_site_requests(values: tuple[str, ...]) -> list[str] | None:
    """Return the entries of a repeatable, comma-separated --sites; None if absent."""
    names = [name.strip() for value in values for name in value.split(",")]
    names = [name for name in names if name]
    return names or None


@main.command("extract")
@verbose_option
@click.argument("checkpoint_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--data",
    required=True,
    help="Dataset: toy, digits, a .npz or .h5 file, a folder of MNIST IDX "
    "files, or PKG.MODULE:CALLABLE.",
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the shards, one <checkpoint name>.h5 each; created if missing.",
)
@click.option(
    "--model",
    "model_spec",
    help="Model constructor, PKG.MODULE:CALLABLE or FILE.py:CALLABLE. Needed for "
    "checkpoints that hold only weights.",
)
@click.option("--model-kwargs", help="JSON object of keyword arguments for --model.")
@click.option(
    "--glob", "pattern", help="Glob, relative to CHECKPOINT_DIR, of the checkpoints."
)
@click.option(
    "--sites",
    multiple=True,
    help="Probe sites: names, globs (features.*) and type filters (type:ReLU), "
    "comma-separated or repeated. Default: the input and every leaf module.",
)
@click.option(
    "--pool",
    "pooling",
    type=click.Choice(POOLINGS),
    default="none",
    show_default=True,
    help="Average or max over the spatial dimensions of module outputs with 3 "
    "or more dimensions per sample, such as (C, H, W), leaving C features. "
    "The input site and outputs with fewer dimensions are stored flattened.",
)
@click.option(
    "--dtype",
    type=click.Choice(STORAGE_DTYPES),
    default="float32",
    show_default=True,
    help="Storage dtype; float16 clips values beyond ±65504 and counts them.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Samples per forward pass.",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="auto, cpu, cuda, cuda:N or mps; auto picks CUDA, then MPS, then the CPU.",
)
@click.option(
    "--split",
    "split_text",
    default="0.6,0.2,0.2",
    show_default=True,
    help="Train,val,test fractions for data without its own split.",
)
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Seed of the split.",
)
@click.option("--x-key", help="Name of the input array in a .npz/.h5 file.")
@click.option("--y-key", help="Name of the label array in a .npz/.h5 file.")
@click.option("--split-key", help="Name of the split array in a .npz/.h5 file.")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    help="Use at most this many samples, stratified by split and class.",
)
@click.option(
    "--trust-checkpoints",
    "trust",
    is_flag=True,
    help="Allow checkpoints that pickle whole modules. Unpickling runs code from "
    "the file: use only for files from a trusted source.",
)
@click.option("--force", is_flag=True, help="Rewrite shards that are current.")
@click.option(
    "--shard",
    "shard_text",
    metavar="I/N",
    help="Extract only task I of N (I/N, counting from 0 like SLURM's "
    "--array=0-15: 0/16 to 15/16). Inside a SLURM array task it defaults to the "
    "task's place in the array. Every task computes the same split, balanced "
    "by checkpoint size.",
)
@click.option(
    "--keep-going",
    is_flag=True,
    help="When a checkpoint fails, record the error beside its shard's name and "
    "go on with the others; exit 1 at the end.",
)
@click.option(
    "--retry-failed",
    is_flag=True,
    help="Extract checkpoints that failed in an earlier --keep-going run; by "
    "default they are skipped.",
)
@click.option(
    "--hdf5-locking",
    type=click.Choice(HDF5_LOCKING_MODES),
    default=None,
    help="HDF5 file locking of the shards being written; finished shards are "
    "read without a lock. HDF5_USE_FILE_LOCKING, when set, takes precedence. "
    "Use false on NFS or Lustre mounts that reject locks.",
)
@click.option(
    "--claim-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_CLAIM_TIMEOUT,
    show_default=True,
    help="Seconds without a heartbeat after which another process's claim on a "
    "checkpoint is stale and may be broken.",
)
@click.option("--quiet", is_flag=True, help="Hide the progress bar.")
def extract_command(
    checkpoint_dir: Path,
    data: str,
    out_dir: Path,
    model_spec: str | None,
    model_kwargs: str | None,
    pattern: str | None,
    sites: tuple[str, ...],
    pooling: str,
    dtype: str,
    batch_size: int,
    device: str,
    split_text: str,
    seed: int,
    x_key: str | None,
    y_key: str | None,
    split_key: str | None,
    limit: int | None,
    trust: bool,
    force: bool,
    shard_text: str | None,
    keep_going: bool,
    retry_failed: bool,
    hdf5_locking: str | None,
    claim_timeout: float,
    quiet: bool,
) -> None:
    """Write the activations of every checkpoint in CHECKPOINT_DIR to shards.

    Runs the --data samples through each checkpoint, in training-step order,
    and writes one HDF5 shard per checkpoint to --out. Prints one line per
    shard, its path and `written`, `skipped`, `failed` or `claimed` (left to
    another process), separated by a tab. A shard whose checkpoint, data and
    settings are unchanged is skipped, so a killed run can simply be run
    again. Several runs may share --out, because each checkpoint is claimed
    by one process at a time. Progress goes to stderr.
    """
    shard = resolve_shard(shard_text)
    if model_kwargs is not None and model_spec is None:
        raise click.UsageError("--model-kwargs needs --model")
    factory = None
    if model_spec is not None:
        factory = resolve_model_factory(model_spec, model_kwargs)
    dataset = load_dataset(
        data,
        split=parse_split(split_text),
        seed=seed,
        x_key=x_key,
        y_key=y_key,
        split_key=split_key,
        limit=limit,
    )
    split_warning = small_split_warning(dataset)
    if split_warning is not None:
        click.echo(f"Warning: {split_warning}", err=True)
    train_warning = missing_train_classes_warning(dataset)
    if train_warning is not None:
        click.echo(f"Warning: {train_warning}", err=True)

    summary = extract_checkpoints(
        checkpoint_dir,
        dataset,
        out_dir,
        model_factory=factory,
        pattern=pattern,
        sites=split_site_requests(sites),
        pooling=pooling,
        dtype=dtype,
        batch_size=batch_size,
        device=device,
        trust=trust,
        force=force,
        progress=not quiet,
        on_shard=_echo_record,
        shard=shard,
        keep_going=keep_going,
        retry_failed=retry_failed,
        hdf5_locking=hdf5_locking,
        claim_timeout=claim_timeout,
    )
    if summary.failed:
        raise ProbecvxError(_failure_line(summary))


#: Classes named in the warning about classes without train rows.
LISTED_CLASSES = 10


def missing_train_classes_warning(dataset: ProbeDataset) -> str | None:
    """Return a warning naming the classes without train rows, or None."""
    train_labels = dataset.labels[dataset.split == SPLIT_CODES["train"]]
    counts = np.bincount(train_labels, minlength=len(dataset.class_names))
    missing = [dataset.class_names[int(i)] for i in np.flatnonzero(counts == 0)]
    if not missing:
        return None
    names = ", ".join(map(repr, missing[:LISTED_CLASSES]))
    if len(missing) > LISTED_CLASSES:
        names += f" and {len(missing) - LISTED_CLASSES} more"
    return (
        f"dataset {dataset.name!r} has {len(missing)} of "
        f"{len(dataset.class_names)} classes without train rows ({names}), so "
        "probes fitted on these shards never predict them. Fix the split: give "
        "train a larger fraction with --split, use more rows with --limit, or "
        "put rows of every class in train in the data's own split"
    )


def _echo_record(record: ShardRecord) -> None:
    click.echo(f"{record.path}\t{record.status}")


def _failure_line(summary: ExtractSummary) -> str:
    """Return one line that counts the failed checkpoints and shows the first."""
    first = summary.failed[0]
    return (
        f"{len(summary.failed)} of {len(summary.records)} checkpoints failed; the "
        "others were extracted. Fix the cause and re-run: a run with another "
        "--model, --trust-checkpoints, --batch-size or --device retries them, and "
        f"--retry-failed retries them with the same options "
        f"(first: {first.checkpoint}: {first.error})"
    )
