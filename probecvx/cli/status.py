"""``probecvx status``: which units of a folder are done, pending, failed or claimed."""

from __future__ import annotations

import json
from pathlib import Path

import click

from probecvx.claims import DEFAULT_CLAIM_TIMEOUT
from probecvx.cli import main, verbose_option
from probecvx.status import STATES, folder_status

COLUMNS = ("checkpoint", "site", "state", "by", "detail")


@main.command("status")
@verbose_option
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object instead of a table."
)
@click.option(
    "--checkpoints",
    "checkpoint_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="For an activations folder: the checkpoint folder that was extracted, "
    "to list pending checkpoints and find shards of changed ones (hashes every "
    "checkpoint).",
)
@click.option("--glob", "pattern", help="The --glob of the extract run.")
@click.option(
    "--claim-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_CLAIM_TIMEOUT,
    show_default=True,
    help="Seconds without a heartbeat after which a claim counts as stale.",
)
def status_command(
    folder: Path,
    as_json: bool,
    checkpoint_dir: Path | None,
    pattern: str | None,
    claim_timeout: float,
) -> None:
    """Show the state of every unit of FOLDER, an extract or fit --out folder.

    States: done, pending, failed (with the error), stale (made from another
    shard or with other settings) and claimed (in progress, with the process
    that holds the claim). stdout
    gets a tab-separated table with a header line, or with --json one JSON
    object; a line of counts and any notes go to stderr.
    """
    status = folder_status(
        folder,
        checkpoint_dir=checkpoint_dir,
        pattern=pattern,
        claim_timeout=claim_timeout,
    )
    if as_json:
        click.echo(json.dumps(status.to_json(), indent=1))
    else:
        click.echo("\t".join(COLUMNS))
        for unit in status.units:
            values = [unit.record()[column] for column in COLUMNS]
            click.echo("\t".join(_cell(value) for value in values))
    counts = status.counts()
    click.echo(
        f"{status.kind} folder {folder}: "
        + ", ".join(f"{counts[state]} {state}" for state in STATES),
        err=True,
    )
    for note in status.notes:
        click.echo(f"note: {note}", err=True)


def _cell(value: object) -> str:
    """Return a table cell: '-' for no value, tabs and newlines as spaces."""
    if value is None:
        return "-"
    return " ".join(str(value).split())
