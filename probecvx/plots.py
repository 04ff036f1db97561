"""Tables and figures of probe error, drawn from the table of results.

Every function takes the records of :func:`probecvx.reports.load_table`, one
plain dict per (checkpoint, site). The keys used here are ``checkpoint``,
``step``, ``site``, ``site_order``, ``status``, ``train_error``, ``test_error``
and ``chance_error``. Errors are fractions, and figures and tables show them as
percentages. Sites are shown in forward order and checkpoints in training
order.

Figures are drawn on :class:`matplotlib.figure.Figure` objects with the Agg
canvas, never through ``pyplot``, so no window opens and no figure outlives the
call. Every file is written through :func:`probecvx.atomic.atomic_path`, so a
final name only ever holds a complete file.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import logging
import math
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.animation import FFMpegWriter, PillowWriter
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Colormap, PowerNorm
from matplotlib.figure import Figure

from probecvx import __version__
from probecvx.atomic import atomic_path, output_folder, write_text_atomic
from probecvx.errors import InvalidInputError

logger = logging.getLogger(__name__)

Record = Mapping[str, Any]

FIGURE_FORMATS = ("png", "html")
ANIMATION_FORMATS = ("gif", "mp4")
HEATMAP_NAME = "error_heatmap.png"
CURVES_NAME = "error_curves.png"
HTML_NAME = "report.html"
ANIMATION_STEM = "site_error_animation"

_REQUIRED_KEYS = ("checkpoint", "step", "site", "site_order", "status", "test_error")
_DPI = 100
_BAR_COLOR = "#4C72B0"
_TRAIN_COLOR = "#222222"
_CHANCE_COLOR = "#C44E52"
# Above this many cells the heatmap has no room for a number in each cell.
_MAX_ANNOTATED_CELLS = 400
# Up to this many checkpoints, a log-scaled step axis is labelled at every step.
_MAX_LABELLED_STEPS = 12


@dataclass(frozen=True)
class ErrorGrid:
    """Probe errors arranged as sites (rows, forward order) by checkpoints (columns).

    Attributes
    ----------
    sites : list of str
        Probe site names in forward order.
    checkpoints : list of str
        Checkpoint names in training order: by step, then the checkpoints
        without a step, by name.
    steps : list of int or None
        The step of each checkpoint, None when unknown.
    test_error, train_error : ndarray of shape (n_sites, n_checkpoints)
        Errors as fractions; NaN where the unit failed or has no record.
    status : ndarray of shape (n_sites, n_checkpoints), dtype object
        ``"ok"``, ``"failed"`` or ``"missing"`` (no record for that unit).
    chance_error : ndarray of shape (n_checkpoints,)
        Chance-level error of each checkpoint's test split; NaN when unknown.
    """

    sites: list[str]
    checkpoints: list[str]
    steps: list[int | None]
    test_error: np.ndarray
    train_error: np.ndarray
    status: np.ndarray
    chance_error: np.ndarray

    def column_labels(self) -> list[str]:
        """Label each checkpoint by its step, or by its name where steps are unknown
        or repeated."""
        known = [step for step in self.steps if step is not None]
        if len(known) == len(self.steps) and len(set(known)) == len(known):
            return [str(step) for step in known]
        return list(self.checkpoints)

    def step_axis(self) -> tuple[np.ndarray, str]:
        """Return x positions for the checkpoints and the axis label they need.

        The positions are the steps when every checkpoint has one, else the
        checkpoint indices.
        """
        if all(step is not None for step in self.steps):
            return np.array(self.steps, dtype=float), "training step"
        return np.arange(len(self.checkpoints), dtype=float), "checkpoint index"


def build_error_grid(records: Iterable[Record]) -> ErrorGrid:
    """Arrange records into an :class:`ErrorGrid`.

    Parameters
    ----------
    records : iterable of mapping
        Rows of :func:`probecvx.reports.load_table`.

    Returns
    -------
    ErrorGrid

    Raises
    ------
    InvalidInputError
        If there are no records or a record lacks one of the keys used here.
    """
    rows = list(records)
    _validate_records(rows)

    site_order: dict[str, int] = {}
    checkpoint_step: dict[str, int | None] = {}
    for row in rows:
        order = int(row["site_order"])
        site_order[row["site"]] = min(order, site_order.get(row["site"], order))
        checkpoint_step[row["checkpoint"]] = row["step"]
    sites = sorted(site_order, key=lambda site: (site_order[site], site))
    checkpoints = sorted(
        checkpoint_step, key=lambda c: _step_key(checkpoint_step[c], c)
    )
    steps = [checkpoint_step[name] for name in checkpoints]

    shape = (len(sites), len(checkpoints))
    test_error = np.full(shape, np.nan)
    train_error = np.full(shape, np.nan)
    status = np.full(shape, "missing", dtype=object)
    chance_error = np.full(len(checkpoints), np.nan)
    site_index = {site: i for i, site in enumerate(sites)}
    checkpoint_index = {name: j for j, name in enumerate(checkpoints)}
    for row in rows:
        i, j = site_index[row["site"]], checkpoint_index[row["checkpoint"]]
        status[i, j] = "ok" if row["status"] == "ok" else "failed"
        if row["status"] == "ok":
            test_error[i, j] = _as_float(row.get("test_error"))
            train_error[i, j] = _as_float(row.get("train_error"))
        chance = _as_float(row.get("chance_error"))
        if math.isfinite(chance):
            chance_error[j] = chance
    return ErrorGrid(
        sites, checkpoints, steps, test_error, train_error, status, chance_error
    )


def default_curve_sites(sites: Sequence[str], n_sites: int = 5) -> list[str]:
    """Pick the sites whose error curves are drawn when the caller names none.

    The pick is the first site (the input), the last site, and sites evenly
    spaced between them in forward order, ``n_sites`` in all at most.
    """
    if len(sites) <= n_sites:
        return list(sites)
    positions = np.linspace(0, len(sites) - 1, n_sites).round().astype(int)
    return [sites[i] for i in sorted(set(positions.tolist()))]


def render_table(records: Iterable[Record]) -> str:
    """Render probe test error as an aligned text table.

    One row per site in forward order, one column per checkpoint in training
    order, labelled by step (by checkpoint name where steps are unknown or
    repeated). Cells are percentages with two decimals, ``failed`` for a unit
    whose fit failed and ``-`` for a unit without a record. Lines starting
    with ``#`` are comments: a caption first and the chance level last.

    Parameters
    ----------
    records : iterable of mapping
        Rows of :func:`probecvx.reports.load_table`.

    Returns
    -------
    str
        The table, ending with a newline.
    """
    grid = build_error_grid(records)
    header = ["site", *grid.column_labels()]
    body = [
        [site, *(_format_cell(grid, i, j) for j in range(len(grid.checkpoints)))]
        for i, site in enumerate(grid.sites)
    ]
    widths = [max(len(row[k]) for row in [header, *body]) for k in range(len(header))]

    lines = ["# probe test error (%); rows: sites in forward order; columns: step"]
    for row in [header, *body]:
        cells = [row[0].ljust(widths[0])]
        cells += [
            cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    lines.append(f"# {_chance_text(grid)}")
    return "\n".join(lines) + "\n"


def render_csv(records: Iterable[Record]) -> str:
    """Render the records as CSV, one line per (checkpoint, site).

    Columns are the record keys, in the order of the first record; rows are in
    training order, then forward order. Errors stay fractions, as in the
    reports.
    """
    rows = list(records)
    _validate_records(rows)
    grid = build_error_grid(rows)
    checkpoint_rank = {name: j for j, name in enumerate(grid.checkpoints)}
    site_rank = {site: i for i, site in enumerate(grid.sites)}
    rows.sort(key=lambda r: (checkpoint_rank[r["checkpoint"]], site_rank[r["site"]]))

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def plot_site_bars(records: Iterable[Record], out_dir: Path) -> list[Path]:
    """Draw probe error by site as bars, one PNG per checkpoint.

    Sites are on the x axis in forward order. A bar is the test error, a black
    tick the train error, and a dashed line the chance level (named in the
    legend only, when it is far above every error). Every figure has the same y
    axis, so that figures of different checkpoints compare by eye. A unit whose
    fit failed is marked ``failed`` in place of its bar.

    Parameters
    ----------
    records : iterable of mapping
        Rows of :func:`probecvx.reports.load_table`.
    out_dir : Path
        Folder for the figures, created if missing. Each is named
        ``site_error_<checkpoint>.png``.

    Returns
    -------
    list of Path
        The files written, in training order.
    """
    grid = build_error_grid(records)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    y_max = _error_y_max(grid)

    paths = []
    for j, stem in enumerate(_file_stems(grid.checkpoints)):
        figure = Figure(figsize=_bar_figsize(len(grid.sites)), dpi=_DPI)
        FigureCanvasAgg(figure)
        _draw_site_bars(figure.add_subplot(), grid, j, y_max)
        figure.tight_layout()
        path = out_dir / f"site_error_{stem}.png"
        _save_figure(figure, path)
        paths.append(path)
    return paths


def plot_training_heatmap(records: Iterable[Record], path: Path) -> Path:
    """Draw probe test error as a heatmap of site (rows) by step (columns).

    Parameters
    ----------
    records : iterable of mapping
        Rows of :func:`probecvx.reports.load_table`.
    path : Path
        The PNG file to write; its folder must exist.

    Returns
    -------
    Path
        ``path``.
    """
    grid = build_error_grid(records)
    n_sites, n_checkpoints = grid.test_error.shape
    width = min(4.0 + 0.75 * n_checkpoints, 24.0)
    height = min(2.0 + 0.32 * n_sites, 24.0)
    figure = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()

    percent = np.ma.masked_invalid(100 * grid.test_error)
    colormap = _colormap_with_grey_for_missing()
    # A square-root colour scale keeps small errors apart when one unit (often
    # the untrained classifier) is far worse than the rest.
    norm = PowerNorm(gamma=0.5, vmin=0.0, vmax=_heatmap_v_max(grid))
    image = axes.imshow(percent, aspect="auto", cmap=colormap, norm=norm)
    figure.colorbar(image, ax=axes, label="probe test error (%)")
    if n_sites * n_checkpoints <= _MAX_ANNOTATED_CELLS:
        _annotate_heatmap(axes, grid, image)

    axes.set_xticks(range(n_checkpoints), grid.column_labels(), rotation=45, ha="right")
    axes.set_yticks(range(n_sites), grid.sites)
    axes.set_xlabel(_column_axis_label(grid))
    axes.set_ylabel("probe site (forward order)")
    axes.set_title("Probe test error over training")
    figure.tight_layout()
    _save_figure(figure, Path(path))
    return Path(path)


def plot_error_curves(
    records: Iterable[Record], path: Path, sites: Sequence[str] | None = None
) -> Path:
    """Draw probe test error against training step, one line per chosen site.

    Parameters
    ----------
    records : iterable of mapping
        Rows of :func:`probecvx.reports.load_table`.
    path : Path
        The PNG file to write; its folder must exist.
    sites : sequence of str, default=None
        Sites to draw. None picks them with :func:`default_curve_sites`.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    InvalidInputError
        If a site in ``sites`` has no record.
    """
    grid = build_error_grid(records)
    chosen = default_curve_sites(grid.sites) if sites is None else list(sites)
    _validate_sites(chosen, grid.sites)
    x, x_label = grid.step_axis()

    figure = Figure(figsize=(9.5, 4.5), dpi=_DPI)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for site in chosen:
        i = grid.sites.index(site)
        axes.plot(x, 100 * grid.test_error[i], marker="o", markersize=4, label=site)
    y_max = _error_y_max(grid)
    chance = 100 * grid.chance_error
    if np.isfinite(chance).any():
        label = _chance_label(float(np.nanmax(chance)), y_max)
        axes.plot(x, chance, linestyle="--", color=_CHANCE_COLOR, label=label)

    if _wants_symlog(x):
        axes.set_xscale("symlog", linthresh=float(x[x > 0].min()))
        if len(x) <= _MAX_LABELLED_STEPS:
            axes.set_xticks(x, grid.column_labels(), rotation=45, ha="right")
    if x_label == "checkpoint index":
        axes.set_xticks(x, grid.checkpoints, rotation=45, ha="right")
    axes.set_ylim(0, y_max)
    axes.set_xlabel(x_label)
    axes.set_ylabel("probe test error (%)")
    axes.set_title("Probe test error over training")
    axes.grid(alpha=0.3)
    _place_legend_outside(axes)
    figure.tight_layout()
    _save_figure(figure, Path(path))
    return Path(path)


def animate_site_bars(records: Iterable[Record], path: Path, *, fps: int = 1) -> Path:
    """Animate the per-site error bars across checkpoints, one frame per checkpoint.

    Every frame has the same y axis, and its title names the step. A ``.gif`` path
    is written with Pillow, an ``.mp4`` path with ffmpeg.

    Parameters
    ----------
    records : iterable of mapping
        Rows of :func:`probecvx.reports.load_table`.
    path : Path
        Output file ending in ``.gif`` or ``.mp4``; its folder must exist.
    fps : int, default=1
        Frames (checkpoints) per second.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    InvalidInputError
        If the suffix is neither ``.gif`` nor ``.mp4``, or ``.mp4`` is asked
        for and ffmpeg is not on PATH.
    """
    path = Path(path)
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in ANIMATION_FORMATS:
        raise InvalidInputError(
            f"animation path {str(path)!r} must end in .gif or .mp4"
        )
    check_ffmpeg(suffix)
    grid = build_error_grid(records)
    y_max = _error_y_max(grid)

    # h264 needs even frame sizes, so the width is rounded to an even pixel count.
    width, height = _bar_figsize(len(grid.sites))
    width = 2 * math.ceil(width * _DPI / 2) / _DPI
    figure = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    writer: PillowWriter | FFMpegWriter
    # NOTE: the tests cover only the GIF writer; the MP4 branch has not been run
    # because the development machines have no ffmpeg.
    writer = PillowWriter(fps=fps) if suffix == "gif" else FFMpegWriter(fps=fps)

    # The writers pick the file format from the suffix, so the temporary file
    # that atomic_path hands out gets one for the length of the write.
    with atomic_path(path) as temp:
        suffixed = temp.with_name(f"{temp.name}.{suffix}")
        try:
            with writer.saving(figure, str(suffixed), dpi=_DPI):
                for j in range(len(grid.checkpoints)):
                    axes.clear()
                    _draw_site_bars(axes, grid, j, y_max)
                    figure.tight_layout()
                    writer.grab_frame()
            suffixed.replace(temp)
        finally:
            suffixed.unlink(missing_ok=True)
    logger.info("wrote %s (%d frames)", path, len(grid.checkpoints))
    return path


def write_html(records: Iterable[Record], figures: Sequence[Path], path: Path) -> Path:
    """Write one self-contained HTML page: the table and the figures inline.

    Figures are embedded as base64 ``data:`` URIs, so the page loads no other
    file and can be mailed or archived on its own.

    Parameters
    ----------
    records : iterable of mapping
        Rows of :func:`probecvx.reports.load_table`.
    figures : sequence of Path
        PNG or GIF files to embed, in the order given.
    path : Path
        The HTML file to write; its folder must exist.

    Returns
    -------
    Path
        ``path``.
    """
    grid = build_error_grid(records)
    created = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        "<title>probecvx report</title>",
        f"<style>{_HTML_STYLE}</style>",
        "</head>",
        "<body>",
        "<h1>Linear probe error by site and training step</h1>",
        f"<p>Written by probecvx {html.escape(__version__)} on {created}. "
        "Cells are the probe's test error in percent.</p>",
        _html_table(grid),
        "<h2>Figures</h2>",
    ]
    for figure_path in figures:
        parts.append(_html_figure(Path(figure_path)))
    parts += ["</body>", "</html>", ""]
    write_text_atomic(Path(path), "\n".join(parts))
    return Path(path)


def write_report_figures(
    records: Iterable[Record],
    out_dir: Path,
    *,
    fmt: str = "png",
    sites: Sequence[str] | None = None,
    animate: str | None = None,
) -> list[Path]:
    """Write every figure of a report into ``out_dir``.

    The figures are a bar chart per checkpoint (:func:`plot_site_bars`), a
    heatmap over training (:func:`plot_training_heatmap`) and error curves for
    chosen sites (:func:`plot_error_curves`).

    Parameters
    ----------
    records : iterable of mapping
        Rows of :func:`probecvx.reports.load_table`.
    out_dir : Path
        Folder for the figures, created if missing.
    fmt : {"png", "html"}, default="png"
        ``"html"`` also writes ``report.html``, one page with the table and
        every figure embedded.
    sites : sequence of str, default=None
        Sites for the error curves; None picks them with
        :func:`default_curve_sites`.
    animate : {"gif", "mp4"} or None, default=None
        Also write ``site_error_animation.gif`` (or ``.mp4``), see
        :func:`animate_site_bars`.

    Returns
    -------
    list of Path
        The files written: heatmap, curves, bar charts, then the animation and
        the HTML page when asked for.

    Raises
    ------
    InvalidInputError
        If ``fmt``, ``animate`` or a site name is invalid, or ffmpeg is missing
        for an MP4.
    """
    rows = list(records)
    grid = build_error_grid(rows)
    if fmt not in FIGURE_FORMATS:
        raise InvalidInputError(
            f"invalid figure format {fmt!r}; use one of {', '.join(FIGURE_FORMATS)}"
        )
    if animate is not None and animate not in ANIMATION_FORMATS:
        raise InvalidInputError(
            f"invalid animation format {animate!r}; "
            f"use one of {', '.join(ANIMATION_FORMATS)}"
        )
    if animate is not None:
        check_ffmpeg(animate)
    if sites is not None:
        _validate_sites(sites, grid.sites)

    with output_folder(Path(out_dir)) as out_dir:
        written = [
            plot_training_heatmap(rows, out_dir / HEATMAP_NAME),
            plot_error_curves(rows, out_dir / CURVES_NAME, sites),
            *plot_site_bars(rows, out_dir),
        ]
        if animate is not None:
            animation = out_dir / f"{ANIMATION_STEM}.{animate}"
            written.append(animate_site_bars(rows, animation))
        if fmt == "html":
            embeddable = [p for p in written if p.suffix in _HTML_MIME_TYPES]
            written.append(write_html(rows, embeddable, out_dir / HTML_NAME))
    logger.info("wrote %d report files to %s", len(written), out_dir)
    return written


# -- validation -----------------------------------------------------------------


def _validate_records(rows: Sequence[Record]) -> None:
    if not rows:
        raise InvalidInputError(
            "no probe results to show; run `probecvx fit` to write reports first"
        )
    for row in rows:
        missing = [key for key in _REQUIRED_KEYS if key not in row]
        if missing:
            raise InvalidInputError(
                f"record for checkpoint {row.get('checkpoint')!r}, site "
                f"{row.get('site')!r} lacks {', '.join(missing)}; pass the rows "
                "of probecvx.reports.load_table"
            )


def _validate_sites(requested: Sequence[str], known: Sequence[str]) -> None:
    unknown = [site for site in requested if site not in known]
    if unknown:
        raise InvalidInputError(
            f"unknown probe site {unknown[0]!r}; sites in these reports: "
            f"{', '.join(known)}"
        )
    if not requested:
        raise InvalidInputError("no probe sites chosen; name at least one site")


def check_ffmpeg(fmt: str) -> None:
    """Raise InvalidInputError when ``fmt`` is mp4 and ffmpeg is not on PATH."""
    if fmt == "mp4" and shutil.which("ffmpeg") is None:
        raise InvalidInputError(
            "an MP4 animation needs ffmpeg, which is not on PATH; install ffmpeg "
            "or ask for a GIF (--animate gif)"
        )


# -- grid helpers ---------------------------------------------------------------


def _step_key(step: int | None, name: str) -> tuple[bool, int, str]:
    return (step is None, step if step is not None else 0, name)


def _as_float(value: Any) -> float:
    return math.nan if value is None else float(value)


def _format_cell(grid: ErrorGrid, i: int, j: int) -> str:
    status = grid.status[i, j]
    if status == "failed":
        return "failed"
    value = grid.test_error[i, j]
    if status == "missing" or not math.isfinite(value):
        return "-"
    return f"{100 * value:.2f}"


def _chance_text(grid: ErrorGrid) -> str:
    known = grid.chance_error[np.isfinite(grid.chance_error)]
    if known.size == 0:
        return "chance level unknown"
    if np.allclose(known, known[0]) and known.size == grid.chance_error.size:
        return f"chance level (%): {100 * known[0]:.2f}"
    cells = [
        f"{100 * value:.2f}" if math.isfinite(value) else "-"
        for value in grid.chance_error
    ]
    return "chance level (%) by column: " + " ".join(cells)


def _column_axis_label(grid: ErrorGrid) -> str:
    if grid.column_labels() == grid.checkpoints:
        return "checkpoint"
    return "training step"


def _file_stems(checkpoints: Sequence[str]) -> list[str]:
    """Turn checkpoint names into distinct, file-safe name stems."""
    stems: list[str] = []
    for name in checkpoints:
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "checkpoint"
        candidate, n = stem, 2
        while candidate in stems:
            candidate, n = f"{stem}_{n}", n + 1
        stems.append(candidate)
    return stems


# -- drawing --------------------------------------------------------------------


def _bar_figsize(n_sites: int) -> tuple[float, float]:
    return (min(max(8.0, 3.5 + 0.45 * n_sites), 32.0), 4.5)


def _error_y_max(grid: ErrorGrid) -> float:
    """Return the top of the error axis in percent.

    The axis fits the largest probe error with some headroom. It reaches up to
    the chance level only when that is less than 1.5 times the largest error,
    because a chance level far above the errors (90% for ten classes) would
    squash every bar to the bottom of the figure.
    """
    errors = np.concatenate([grid.test_error.ravel(), grid.train_error.ravel()])
    errors = errors[np.isfinite(errors)]
    top = 100 * float(errors.max()) if errors.size else 100.0
    chance = grid.chance_error[np.isfinite(grid.chance_error)]
    if chance.size and 100 * float(chance.max()) <= 1.5 * top:
        top = max(top, 100 * float(chance.max()))
    return min(max(top * 1.12, 1.0), 105.0)


def _chance_label(chance_percent: float, y_max: float) -> str:
    if chance_percent > y_max:
        return f"chance ({chance_percent:.1f}%, above the axis)"
    return f"chance ({chance_percent:.1f}%)"


def _draw_site_bars(axes: Axes, grid: ErrorGrid, j: int, y_max: float) -> None:
    """Draw the bars of checkpoint ``j`` on ``axes``, up to ``y_max`` percent."""
    x = np.arange(len(grid.sites))
    test = 100 * grid.test_error[:, j]
    train = 100 * grid.train_error[:, j]
    axes.bar(x, np.nan_to_num(test), color=_BAR_COLOR, width=0.7, label="test")
    axes.plot(
        x, train, linestyle="none", marker="_", markersize=14, markeredgewidth=2,
        color=_TRAIN_COLOR, label="train",
    )  # fmt: skip
    for i in np.flatnonzero(grid.status[:, j] == "failed"):
        axes.text(
            float(i), 0.02 * y_max, "failed", rotation=90, ha="center", va="bottom",
            color=_CHANCE_COLOR, fontsize="small",
        )  # fmt: skip
    chance = 100 * grid.chance_error[j]
    if math.isfinite(chance):
        axes.axhline(
            chance, linestyle="--", color=_CHANCE_COLOR, linewidth=1.2,
            label=_chance_label(chance, y_max),
        )  # fmt: skip

    axes.set_xticks(x, grid.sites, rotation=45, ha="right")
    axes.set_xlim(-0.6, len(grid.sites) - 0.4)
    axes.set_ylim(0, y_max)
    axes.set_ylabel("probe error (%)")
    axes.set_title(f"Probe error by site, {_checkpoint_title(grid, j)}")
    axes.grid(axis="y", alpha=0.3)
    _place_legend_outside(axes)


def _place_legend_outside(axes: Axes) -> None:
    axes.legend(
        fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False
    )


def _checkpoint_title(grid: ErrorGrid, j: int) -> str:
    step = grid.steps[j]
    if step is None:
        return f"checkpoint {grid.checkpoints[j]}"
    return f"step {step} ({grid.checkpoints[j]})"


def _heatmap_v_max(grid: ErrorGrid) -> float:
    values = grid.test_error[np.isfinite(grid.test_error)]
    return 100 * float(values.max()) if values.size else 100.0


def _colormap_with_grey_for_missing() -> Colormap:
    return colormaps["viridis"].with_extremes(bad="#d9d9d9")


def _annotate_heatmap(axes: Axes, grid: ErrorGrid, image: Any) -> None:
    for i in range(len(grid.sites)):
        for j in range(len(grid.checkpoints)):
            text = _format_cell(grid, i, j)
            if text in ("failed", "-"):
                color = "black"
            else:
                red, green, blue, _ = image.cmap(image.norm(float(text)))
                light = 0.299 * red + 0.587 * green + 0.114 * blue > 0.5
                color = "black" if light else "white"
                text = f"{float(text):.1f}"
            axes.text(j, i, text, ha="center", va="center", color=color, fontsize=8)


def _wants_symlog(x: np.ndarray) -> bool:
    """Return whether the steps span enough range that a log axis reads better."""
    positive = x[x > 0]
    return positive.size >= 3 and positive.max() / positive.min() >= 10


def _save_figure(figure: Figure, path: Path) -> None:
    with atomic_path(path) as temp:
        figure.savefig(temp, format="png", dpi=_DPI)
    logger.debug("wrote %s", path)


# -- HTML -----------------------------------------------------------------------

_HTML_MIME_TYPES = {".png": "image/png", ".gif": "image/gif"}

_HTML_STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:80em}"
    "table{border-collapse:collapse;font-size:0.9em}"
    "th,td{border:1px solid #ccc;padding:0.2em 0.6em;text-align:right}"
    "th:first-child,td:first-child{text-align:left}"
    "td.failed{color:#C44E52}"
    "figure{margin:1.5em 0}img{max-width:100%}"
)


def _html_table(grid: ErrorGrid) -> str:
    header = "".join(
        f"<th>{html.escape(label)}</th>" for label in ["site", *grid.column_labels()]
    )
    rows = [f"<tr>{header}</tr>"]
    for i, site in enumerate(grid.sites):
        cells = [f"<td>{html.escape(site)}</td>"]
        for j in range(len(grid.checkpoints)):
            text = _format_cell(grid, i, j)
            css = ' class="failed"' if text == "failed" else ""
            cells.append(f"<td{css}>{text}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    caption = (
        "<caption>Probe test error (%); rows: sites in forward order; "
        f"columns: training step. {html.escape(_chance_text(grid).capitalize())}."
        "</caption>"
    )
    return "<table>\n" + caption + "\n" + "\n".join(rows) + "\n</table>"


def _html_figure(path: Path) -> str:
    mime = _HTML_MIME_TYPES.get(path.suffix.lower())
    if mime is None:
        raise InvalidInputError(
            f"cannot embed {str(path)!r} in HTML; pass PNG or GIF files"
        )
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    name = html.escape(path.name)
    return (
        f'<figure><img src="data:{mime};base64,{data}" alt="{name}">'
        f"<figcaption>{name}</figcaption></figure>"
    )


__all__ = [
    "ANIMATION_FORMATS",
    "FIGURE_FORMATS",
    "ErrorGrid",
    "animate_site_bars",
    "build_error_grid",
    "default_curve_sites",
    "plot_error_curves",
    "plot_site_bars",
    "plot_training_heatmap",
    "render_csv",
    "render_table",
    "write_html",
    "write_report_figures",
]
