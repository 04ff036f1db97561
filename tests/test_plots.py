"""Tests of the text table and the figures drawn from the table of results."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from probecvx import plots
from probecvx.errors import InvalidInputError

SITES = ["input", "conv1", "relu1", "fc"]
STEPS = [0, 50, 200]


def make_record(
    step: int | None,
    site: str,
    order: int,
    test_error: float | None,
    *,
    checkpoint: str | None = None,
    status: str = "ok",
    chance: float = 0.9,
) -> dict[str, Any]:
    """Build one row with every key of ``reports.load_table``."""
    failed = status == "failed"
    return {
        "checkpoint": checkpoint or f"step_{step:06d}",
        "step": step,
        "site": site,
        "site_order": order,
        "module_type": "Identity" if order == 0 else "Conv2d",
        "n_features": 64,
        "status": status,
        "error": "solver diverged" if failed else None,
        "C": None if failed else 1.0,
        "train_error": None if failed else (test_error or 0.0) / 2,
        "val_error": None if failed else test_error,
        "test_error": None if failed else test_error,
        "train_loss": None if failed else 0.3,
        "val_loss": None if failed else 0.4,
        "test_loss": None if failed else 0.4,
        "chance_error": chance,
        "converged": None if failed else True,
        "n_iter": None if failed else 12,
        "solver": "lbfgs",
        "fit_seconds": 0.01,
    }


@pytest.fixture
def records() -> list[dict[str, Any]]:
    """Rows for 4 sites at 3 steps, given out of order, with one failed unit."""
    rows = []
    for step in reversed(STEPS):
        for order, site in reversed(list(enumerate(SITES))):
            error = 0.5 - 0.1 * order * step / 200
            status = "failed" if (step, site) == (50, "relu1") else "ok"
            rows.append(make_record(step, site, order, error, status=status))
    return rows


def test_render_table_exact_text(records: list[dict[str, Any]]) -> None:
    expected = (
        "# probe test error (%); rows: sites in forward order; columns: step\n"
        "site       0      50    200\n"
        "input  50.00   50.00  50.00\n"
        "conv1  50.00   47.50  40.00\n"
        "relu1  50.00  failed  30.00\n"
        "fc     50.00   42.50  20.00\n"
        "# chance level (%): 90.00\n"
    )
    assert plots.render_table(records) == expected


def test_render_table_missing_unit_and_names() -> None:
    rows = [
        make_record(None, "input", 0, 0.25, checkpoint="last"),
        make_record(None, "fc", 1, 0.125, checkpoint="best"),
        make_record(None, "input", 0, 0.5, checkpoint="best"),
    ]
    lines = plots.render_table(rows).splitlines()
    assert lines[1].split() == ["site", "best", "last"]
    assert lines[2].split() == ["input", "50.00", "25.00"]
    assert lines[3].split() == ["fc", "12.50", "-"]


def test_render_table_chance_per_column() -> None:
    rows = [
        make_record(0, "input", 0, 0.1, chance=0.9),
        make_record(10, "input", 0, 0.1, chance=0.5),
    ]
    assert plots.render_table(rows).splitlines()[-1] == (
        "# chance level (%) by column: 90.00 50.00"
    )


def test_render_table_rejects_empty() -> None:
    with pytest.raises(InvalidInputError, match="probecvx fit"):
        plots.render_table([])


def test_render_table_rejects_missing_key() -> None:
    row = make_record(0, "input", 0, 0.1)
    del row["site_order"]
    with pytest.raises(InvalidInputError, match="lacks site_order"):
        plots.render_table([row])


def test_render_csv_rows_in_order(records: list[dict[str, Any]]) -> None:
    lines = plots.render_csv(records).splitlines()
    assert lines[0].split(",")[:4] == ["checkpoint", "step", "site", "site_order"]
    assert len(lines) == 1 + len(STEPS) * len(SITES)
    first_columns = [line.split(",")[:3] for line in lines[1:5]]
    assert first_columns == [["step_000000", "0", site] for site in SITES]


def test_default_curve_sites_spacing() -> None:
    sites = [f"s{i}" for i in range(11)]
    assert plots.default_curve_sites(sites) == ["s0", "s2", "s5", "s8", "s10"]
    assert plots.default_curve_sites(sites[:3]) == ["s0", "s1", "s2"]


def assert_png(path: Path) -> tuple[int, int]:
    assert path.is_file()
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
        return image.size


def test_plot_site_bars_one_png_per_checkpoint(
    records: list[dict[str, Any]], tmp_path: Path
) -> None:
    paths = plots.plot_site_bars(records, tmp_path / "figures")
    assert [p.name for p in paths] == [
        f"site_error_step_{step:06d}.png" for step in STEPS
    ]
    for path in paths:
        width, height = assert_png(path)
        assert 600 <= width <= 3200
        assert 300 <= height <= 600
    assert not list((tmp_path / "figures").glob(".probecvx-tmp-*"))


def test_plot_site_bars_distinct_file_names(tmp_path: Path) -> None:
    rows = [
        make_record(1, "input", 0, 0.1, checkpoint="run/a b"),
        make_record(2, "input", 0, 0.1, checkpoint="run/a_b"),
    ]
    names = [p.name for p in plots.plot_site_bars(rows, tmp_path)]
    assert names == ["site_error_run_a_b.png", "site_error_run_a_b_2.png"]


def test_plot_training_heatmap_png(
    records: list[dict[str, Any]], tmp_path: Path
) -> None:
    path = plots.plot_training_heatmap(records, tmp_path / "heatmap.png")
    width, height = assert_png(path)
    assert width > height


def test_plot_error_curves_png(records: list[dict[str, Any]], tmp_path: Path) -> None:
    path = plots.plot_error_curves(records, tmp_path / "curves.png", ["input", "fc"])
    width, height = assert_png(path)
    assert width > height


def test_plot_error_curves_unknown_site(
    records: list[dict[str, Any]], tmp_path: Path
) -> None:
    with pytest.raises(InvalidInputError, match="unknown probe site 'fc9'"):
        plots.plot_error_curves(records, tmp_path / "curves.png", ["fc9"])
    assert not (tmp_path / "curves.png").exists()


def test_animate_site_bars_frame_per_checkpoint(
    records: list[dict[str, Any]], tmp_path: Path
) -> None:
    path = plots.animate_site_bars(records, tmp_path / "bars.gif")
    with Image.open(path) as image:
        assert image.format == "GIF"
        assert image.n_frames == len(STEPS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bars.gif"]


def test_animate_site_bars_rejects_suffix(
    records: list[dict[str, Any]], tmp_path: Path
) -> None:
    with pytest.raises(InvalidInputError, match=r"\.gif or \.mp4"):
        plots.animate_site_bars(records, tmp_path / "bars.avi")


def test_animate_mp4_without_ffmpeg(
    records: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(InvalidInputError, match="ffmpeg"):
        plots.animate_site_bars(records, tmp_path / "bars.mp4")


def test_write_html_self_contained(
    records: list[dict[str, Any]], tmp_path: Path
) -> None:
    figures = plots.plot_site_bars(records, tmp_path)
    page = plots.write_html(records, figures, tmp_path / "report.html").read_text()
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == len(figures)
    assert all(src.startswith("data:image/png;base64,") for src in sources)
    assert "href=" not in page
    assert "<td>relu1</td>" in page
    assert '<td class="failed">failed</td>' in page


def test_write_report_figures_html_and_gif(
    records: list[dict[str, Any]], tmp_path: Path
) -> None:
    out_dir = tmp_path / "figures"
    written = plots.write_report_figures(
        records, out_dir, fmt="html", sites=["conv1"], animate="gif"
    )
    names = [p.name for p in written]
    assert names[:2] == [plots.HEATMAP_NAME, plots.CURVES_NAME]
    assert names[-2:] == ["site_error_animation.gif", "report.html"]
    assert len(names) == 2 + len(STEPS) + 2
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(names)
    page = (out_dir / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 + len(STEPS)
    assert page.count("data:image/gif;base64,") == 1


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"fmt": "pdf"}, "invalid figure format 'pdf'"),
        ({"animate": "avi"}, "invalid animation format 'avi'"),
        ({"sites": ["nope"]}, "unknown probe site 'nope'"),
    ],
)
def test_write_report_figures_rejects(
    records: list[dict[str, Any]],
    tmp_path: Path,
    options: dict[str, Any],
    message: str,
) -> None:
    with pytest.raises(InvalidInputError, match=message):
        plots.write_report_figures(records, tmp_path / "figures", **options)
    assert not (tmp_path / "figures").exists()


def test_write_report_figures_failure_removes_new_folder(
    records: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: Any) -> Path:
        raise OSError("disk full")

    # The heatmap is the first figure, so this run fails before writing any.
    monkeypatch.setattr(plots, "plot_training_heatmap", fail)
    existing = tmp_path / "existing"
    existing.mkdir()

    with pytest.raises(OSError, match="disk full"):
        plots.write_report_figures(records, tmp_path / "new" / "figures")
    with pytest.raises(OSError, match="disk full"):
        plots.write_report_figures(records, existing)

    assert not (tmp_path / "new").exists()
    assert existing.is_dir()
