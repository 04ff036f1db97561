"""Tests of `probecvx report` over reports written by the real pipeline."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from probecvx import demo, plots
from probecvx.cli import main
from probecvx.datasets import load_dataset
from probecvx.extract import extract_checkpoints
from probecvx.fit import fit_shards
from probecvx.reports import ReportIndex, load_table

STEPS = [0, 4]


@pytest.fixture(scope="module")
def reports_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Reports of a tiny demo network at 2 checkpoints, on 150 rows of digits."""
    root = tmp_path_factory.mktemp("pipeline")
    dataset = load_dataset("digits", limit=150)
    kwargs = {**demo.model_kwargs_for(dataset), "conv1_channels": 4}
    kwargs.update(conv2_channels=4, hidden=16)
    config = demo.TrainingConfig(steps=STEPS, batch_size=32)
    demo.train_demo_model(dataset, kwargs, config, root / "ckpt", progress=False)
    extract_checkpoints(
        root / "ckpt",
        dataset,
        root / "acts",
        model_factory=functools.partial(demo.DemoConvNet, **kwargs),
        device="cpu",
        progress=False,
    )
    fit_shards(root / "acts", root / "reports", Cs=[1.0], n_jobs=1, progress=False)
    return root / "reports"


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def test_report_prints_table_and_writes_figures(
    reports_dir: Path, tmp_path: Path
) -> None:
    code, stdout, stderr = invoke("report", str(reports_dir), "--out", str(tmp_path))
    assert code == 0
    assert stdout == plots.render_table(load_table(reports_dir))
    assert stdout.splitlines()[1].split() == ["site", *map(str, STEPS)]
    assert f"to {tmp_path}" in stderr
    names = sorted(p.name for p in tmp_path.iterdir())
    expected = [plots.CURVES_NAME, plots.HEATMAP_NAME]
    expected += [f"site_error_step_{step:06d}.png" for step in STEPS]
    assert names == sorted(expected)
    for name in names:
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG"


def test_report_default_figure_folder(reports_dir: Path) -> None:
    code, _, _ = invoke("report", str(reports_dir), "--sites", "input,fc2")
    assert code == 0
    assert (reports_dir / "figures" / plots.HEATMAP_NAME).is_file()


def test_report_csv_without_figures(reports_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "figures"
    code, stdout, _ = invoke(
        "report", str(reports_dir), "--table", "csv", "--no-figures", "--out", str(out)
    )
    assert code == 0
    lines = stdout.splitlines()
    assert lines[0].startswith("checkpoint,step,site,site_order,")
    assert len(lines) == 1 + len(load_table(reports_dir))
    assert not out.exists()


def test_report_html_and_animation(reports_dir: Path, tmp_path: Path) -> None:
    code, _, stderr = invoke(
        "report", str(reports_dir), "--out", str(tmp_path), "--format", "html",
        "--animate",
    )  # fmt: skip
    assert code == 0
    assert "report.html" in stderr
    assert "<table>" in (tmp_path / plots.HTML_NAME).read_text()
    with Image.open(tmp_path / "site_error_animation.gif") as image:
        assert image.n_frames == len(STEPS)


def test_report_mp4_without_ffmpeg_prints_nothing(
    reports_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    code, stdout, stderr = invoke(
        "report", str(reports_dir), "--out", str(tmp_path / "fig"), "--animate", "mp4"
    )

    assert code == 2
    assert stdout == ""
    assert "needs ffmpeg, which is not on PATH" in stderr
    assert not (tmp_path / "fig").exists()


def test_report_unknown_site(reports_dir: Path, tmp_path: Path) -> None:
    code, _, stderr = invoke(
        "report", str(reports_dir), "--sites", "relu9", "--out", str(tmp_path)
    )
    assert code == 2
    assert "--sites" in stderr
    assert "unknown probe site 'relu9'" in stderr
    assert list(tmp_path.iterdir()) == []


def test_report_missing_folder(tmp_path: Path) -> None:
    code, stdout, stderr = invoke("report", str(tmp_path / "nowhere"))
    assert code == 2
    assert stdout == ""
    assert "nowhere does not exist" in stderr


def test_report_folder_without_reports(tmp_path: Path) -> None:
    code, _, stderr = invoke("report", str(tmp_path))
    assert code == 2
    assert str(tmp_path) in stderr
    assert "probecvx fit" in stderr


def test_report_names_failed_checkpoint(reports_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "reports"
    shutil.copytree(reports_dir, copy)
    index = ReportIndex.load(copy)
    index.set_failed("step_000009", "acts/step_000009.h5", "cannot read shard")
    index.write(copy)

    code, stdout, stderr = invoke("report", str(copy), "--no-figures")

    assert code == 0
    assert "step_000009 has no report" in stderr
    assert "cannot read shard" in stderr
    assert stdout == plots.render_table(load_table(reports_dir))


# pyproject.toml turns warnings into errors, so let them through as a user sees them.
@pytest.mark.filterwarnings("default::UserWarning")
def test_report_skips_stray_and_corrupt_files(
    reports_dir: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "reports"
    shutil.copytree(reports_dir, copy)
    last_report = sorted(copy.glob("step_*.json"))[-1]
    (copy / "config.json").write_text("{}")
    last_report.write_text("{")

    code, stdout, stderr = invoke("report", str(copy), "--no-figures")
    warnings = [line for line in stderr.splitlines() if line.startswith("Warning:")]

    assert code == 0
    assert stdout.splitlines()[1].split() == ["site", "0"]
    assert len(warnings) == 2
    assert f"skipped {copy / 'config.json'}: it is not a probecvx report" in stderr
    assert f"skipped {last_report}, so its checkpoint is left out" in stderr
    assert ".py:" not in stderr
