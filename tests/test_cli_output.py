"""Tests of what every command prints besides its results: warnings and -v."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from probecvx import status
from probecvx.cli import main
from tests.test_fit import SOLVER, write_series


def invoke(*args: object) -> Result:
    return CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)


@pytest.fixture
def root_log_level() -> Iterator[None]:
    """Restore the root logger's level that -v changes."""
    level = logging.getLogger().level
    yield
    logging.getLogger().setLevel(level)


def test_warning_printed_as_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_series(tmp_path / "acts", steps=(0,))
    real_status = status.folder_status

    def warning_status(*args: Any, **kwargs: Any) -> status.FolderStatus:
        # Inside the command, so the group's catch_warnings restores the filters.
        warnings.simplefilter("always")
        warnings.warn("first line\n  second line", UserWarning, stacklevel=1)
        warnings.warn("deprecated here", DeprecationWarning, stacklevel=1)
        return real_status(*args, **kwargs)

    monkeypatch.setattr("probecvx.cli.status.folder_status", warning_status)
    result = invoke("status", tmp_path / "acts")

    assert result.exit_code == 0
    assert "Warning: first line second line\n" in result.stderr
    assert "Warning: DeprecationWarning: deprecated here\n" in result.stderr
    assert ".py:" not in result.stderr


def test_fit_convergence_warning_one_line(tmp_path: Path) -> None:
    write_series(tmp_path / "acts", steps=(0,))
    result = invoke(
        "fit",
        tmp_path / "acts",
        "--out",
        tmp_path / "out",
        "--solver",
        SOLVER,
        "--jobs",
        "1",
        "--C",
        "1",
        "--max-iter",
        "1",
        "--quiet",
    )
    warning_lines = [
        line for line in result.stderr.splitlines() if line.startswith("Warning:")
    ]

    assert result.exit_code == 0
    assert len(warning_lines) == 1
    assert warning_lines[0].startswith(
        "Warning: ConvergenceWarning: 2 of 2 probes did not converge "
        "(input at step_0, fc at step_0)"
    )
    assert "Raise --max-iter or --tol" in warning_lines[0]
    assert ".py:" not in result.stderr


@pytest.mark.parametrize("option", ["-v", "--verbose"])
def test_verbose_after_command(
    tmp_path: Path, root_log_level: None, option: str
) -> None:
    write_series(tmp_path / "acts", steps=(0,))
    result = invoke("status", tmp_path / "acts", option)

    assert result.exit_code == 0
    assert logging.getLogger().level == logging.INFO


def test_verbose_counts_add_up(tmp_path: Path, root_log_level: None) -> None:
    write_series(tmp_path / "acts", steps=(0,))
    result = invoke("-v", "status", tmp_path / "acts", "-v")

    assert result.exit_code == 0
    assert logging.getLogger().level == logging.DEBUG


@pytest.mark.parametrize(
    "command", ["demo", "extract", "fit", "layers", "report", "status"]
)
def test_every_command_takes_verbose(command: str) -> None:
    result = invoke(command, "--help")

    assert result.exit_code == 0
    assert "-v, --verbose" in result.stdout
