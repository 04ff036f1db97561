"""``probecvx report``: print the table of probe errors and draw the figures."""

from __future__ import annotations

from pathlib import Path

import click

from probecvx import plots
from probecvx.cli import main, verbose_option
from probecvx.errors import ReportError
from probecvx.reports import INDEX_NAME, load_table, read_index


def _split_sites(value: str | None) -> list[str] | None:
    if value is None:
        return None
    sites = [site.strip() for site in value.split(",") if site.strip()]
    if not sites:
        raise click.BadParameter(
            "give site names separated by commas, such as relu1,fc2"
        )
    return sites


@main.command("report")
@verbose_option
@click.argument("reports_dir", type=click.Path(path_type=Path))
@click.option(
    "--out",
    "fig_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for the figures.  [default: REPORTS_DIR/figures]",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(plots.FIGURE_FORMATS),
    default="png",
    show_default=True,
    help="png: one PNG per figure; html: also report.html, one page with the "
    "table and every figure embedded.",
)
@click.option(
    "--sites",
    default=None,
    metavar="SITE1,SITE2,...",
    help="Sites drawn in the error-over-training curves.  "
    "[default: the input, the last site and three between]",
)
@click.option(
    "--animate",
    type=click.Choice(plots.ANIMATION_FORMATS),
    is_flag=False,
    flag_value="gif",
    default=None,
    help="Also animate the per-site bars over checkpoints, as a GIF (--animate) "
    "or an MP4 (--animate mp4, needs ffmpeg on PATH).",
)
@click.option(
    "--table",
    "table_format",
    type=click.Choice(["text", "csv"]),
    default="text",
    show_default=True,
    help="Table printed on stdout: text, an aligned table of test error (%) by "
    "site and step; csv, every record of every report.",
)
@click.option(
    "--no-figures", is_flag=True, help="Print the table only; draw no figures."
)
def report_command(
    reports_dir: Path,
    fig_dir: Path | None,
    fmt: str,
    sites: str | None,
    animate: str | None,
    table_format: str,
    no_figures: bool,
) -> None:
    """Print probe test error by site and step, and draw figures.

    REPORTS_DIR is the --out folder of `probecvx fit`. The table goes to
    stdout. The figures (a bar chart per checkpoint, a heatmap over training,
    error curves) go to --out, and stderr gets one line with their number.
    Put --animate after REPORTS_DIR, because a bare --animate takes the next
    word as its value.
    """
    site_list = _split_sites(sites)
    if animate is not None and not no_figures:
        # Checked before the table is printed, so that a run that fails prints
        # nothing on stdout.
        plots.check_ffmpeg(animate)
    records = load_table(reports_dir)
    known = {record["site"] for record in records}
    for site in site_list or []:
        if site not in known:
            listing = ", ".join(plots.build_error_grid(records).sites)
            raise click.BadParameter(
                f"unknown probe site {site!r}; sites in {reports_dir}: {listing}",
                param_hint="--sites",
            )
    _warn_failed_checkpoints(reports_dir)
    if table_format == "csv":
        click.echo(plots.render_csv(records), nl=False)
    else:
        click.echo(plots.render_table(records), nl=False)
    if no_figures:
        return

    out_dir = reports_dir / "figures" if fig_dir is None else fig_dir
    written = plots.write_report_figures(
        records, out_dir, fmt=fmt, sites=site_list, animate=animate
    )
    click.echo(f"wrote {len(written)} files to {out_dir}", err=True)
    if fmt == "html":
        click.echo(f"open {written[-1]} in a browser", err=True)


def _warn_failed_checkpoints(reports_dir: Path) -> None:
    """Name on stderr the checkpoints that the index lists without a report."""
    index_path = reports_dir / INDEX_NAME
    if not index_path.exists():
        return
    try:
        index = read_index(index_path)
    except ReportError as err:
        click.echo(f"Warning: {err}", err=True)
        return
    for entry in index["checkpoints"]:
        if entry["report"] is None:
            click.echo(
                f"Warning: checkpoint {entry['checkpoint']} has no report and is "
                f"left out: {entry['error']}",
                err=True,
            )
