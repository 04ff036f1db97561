"""Tests of exit statuses: bad input, Ctrl-C, and what a failed run leaves behind."""

from __future__ import annotations

import builtins
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result

from probecvx.__main__ import run
from probecvx.atomic import TEMP_PREFIX
from probecvx.cli import Terminated, main
from probecvx.fit import read_unit_file
from tests.test_fit import SOLVER, write_series
from tests.tinymodels import TINY_MODEL_SPEC, dyadic_inputs

REPO_ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}


def invoke(*args: object) -> Result:
    return CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)


def extract_args(checkpoint_dir: Path, data: Path, out: Path) -> list[object]:
    return [
        "extract",
        checkpoint_dir,
        "--data",
        data,
        "--out",
        out,
        "--model",
        TINY_MODEL_SPEC,
        "--device",
        "cpu",
        "--quiet",
    ]


def leftovers(folder: Path) -> list[str]:
    """Return the temporary and claim files anywhere under ``folder``."""
    return sorted(
        path.name
        for path in folder.rglob("*")
        if path.name.startswith(TEMP_PREFIX) or path.name.endswith(".claim")
    )


def wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


# --- Bad datasets exit 2 --------------------------------------------------------------


def save_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


X = dyadic_inputs(12, seed=1)
Y = np.arange(12) % 3
BAD_DATASETS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "missing y": (
        lambda folder: save_npz(folder / "d.npz", x=X, labels=Y),
        "has no array named y or Y",
    ),
    "label count": (
        lambda folder: save_npz(folder / "d.npz", x=X, y=Y[:10]),
        "x has 12 samples but y has 10",
    ),
    "nan input": (
        lambda folder: save_npz(folder / "d.npz", x=np.full_like(X, np.nan), y=Y),
        "x has NaN or infinite values",
    ),
    "one class": (
        lambda folder: save_npz(folder / "d.npz", x=X, y=np.zeros(12)),
        "has only one class",
    ),
    "continuous labels": (
        lambda folder: save_npz(folder / "d.npz", x=X, y=Y + 0.5),
        "must be integer class ids or strings",
    ),
    "split values": (
        lambda folder: save_npz(folder / "d.npz", x=X, y=Y, split=np.full(12, 7)),
        "split has unknown values",
    ),
    "not an npz": (
        lambda folder: (
            (folder / "d.npz").write_bytes(b"not a zip") and folder / "d.npz"
        ),
        "is not an .npz archive",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_DATASETS))
def test_bad_dataset_exits_2(checkpoint_dir: Path, tmp_path: Path, case: str) -> None:
    make, message = BAD_DATASETS[case]
    data = make(tmp_path)
    out = tmp_path / "acts"

    result = invoke(*extract_args(checkpoint_dir, data, out))

    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert result.stderr.startswith("Error: ")
    assert not out.exists()


# --- Failed runs remove the folder they created ---------------------------------------


def test_extract_bad_site_leaves_no_folder(
    checkpoint_dir: Path, tiny_data_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "new" / "acts"
    args = extract_args(checkpoint_dir, tiny_data_file, out)

    result = invoke(*args, "--sites", "fc9")

    assert result.exit_code == 2, result.output
    assert "unknown probe site 'fc9'" in result.stderr
    assert not (tmp_path / "new").exists()


def test_extract_failure_keeps_existing_folder(
    checkpoint_dir: Path, tiny_data_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "acts"
    out.mkdir()

    result = invoke(*extract_args(checkpoint_dir, tiny_data_file, out), "--sites", "x")

    assert result.exit_code == 2, result.output
    assert out.is_dir()


def test_fit_interrupt_removes_plan_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_series(tmp_path / "acts", steps=(0,))
    out = tmp_path / "out"

    def interrupt(*args: object) -> None:
        assert (out / ".units" / ".plan.json").is_file()
        raise KeyboardInterrupt

    monkeypatch.setattr("probecvx.fit._execute", interrupt)
    result = invoke(
        "fit", tmp_path / "acts", "--out", out, "--solver", SOLVER, "--jobs", "1"
    )

    assert result.exit_code == 130, result.output
    assert not out.exists()


# --- Ctrl-C exits 130 -----------------------------------------------------------------


def test_interrupt_exits_130_in_process(
    checkpoint_dir: Path,
    tiny_data_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def interrupt(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("probecvx.cli.extract.extract_checkpoints", interrupt)
    result = invoke(*extract_args(checkpoint_dir, tiny_data_file, tmp_path / "acts"))

    assert result.exit_code == 130
    # The tiny data's small-split warning comes first.
    assert result.stderr.splitlines()[-1].startswith("Interrupted; ")
    assert "Aborted" not in result.stderr
    assert result.stdout == ""


class RaisesWhenCollected:
    """An object whose ``__del__`` raises, where Python cannot propagate it."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __del__(self) -> None:
        raise self.error


@pytest.mark.parametrize(
    ("error", "exit_code", "message"),
    [
        (KeyboardInterrupt(), 130, "Interrupted; "),
        (Terminated(), 143, "Terminated; "),
    ],
)
def test_interrupt_dropped_in_del_stops_command(
    checkpoint_dir: Path,
    tiny_data_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    error: BaseException,
    exit_code: int,
    message: str,
) -> None:
    def drop_interrupt(*args: object, **kwargs: object) -> None:
        RaisesWhenCollected(error)
        time.sleep(10)

    monkeypatch.setattr("probecvx.cli.extract.extract_checkpoints", drop_interrupt)
    started = time.monotonic()
    result = invoke(*extract_args(checkpoint_dir, tiny_data_file, tmp_path / "acts"))

    assert result.exit_code == exit_code, result.output
    assert time.monotonic() - started < 5
    assert result.stderr.splitlines()[-1].startswith(message)
    assert "Exception ignored" not in result.stderr
    assert "Traceback" not in result.stderr


def test_sigint_during_extract(
    checkpoint_dir: Path, tiny_data_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "acts"
    args = [str(arg) for arg in extract_args(checkpoint_dir, tiny_data_file, out)]
    slow = [*args, "--model-kwargs", '{"delay": 0.1}', "--batch-size", "4"]
    process = subprocess.Popen(
        [sys.executable, "-m", "probecvx", *slow],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        second_started = wait_for(
            lambda: any(out.glob(f"{TEMP_PREFIX}step_20.h5.*")), timeout=60
        )
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()

    assert second_started, stderr
    assert process.returncode == 130, stderr
    assert "Interrupted; " in stderr
    assert "Traceback" not in stderr
    assert sorted(path.name for path in out.iterdir()) == ["step_10.h5"]


def test_sigint_during_fit_with_workers(tmp_path: Path) -> None:
    acts, out = tmp_path / "acts", tmp_path / "out"
    process = start_slow_fit(acts, out)
    try:
        started = wait_for(lambda: any(out.glob(".units/*/*.json")), timeout=120)
        # A terminal sends Ctrl-C to the whole foreground process group.
        os.killpg(process.pid, signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    assert started, stderr
    assert process.returncode == 130, stderr
    assert "Interrupted; " in stderr
    assert "Traceback" not in stderr
    assert leftovers(out) == []
    for path in out.glob(".units/*/*.json"):
        assert read_unit_file(path) is not None


def test_interrupt_during_startup_exits_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real_import = builtins.__import__

    def interrupted_import(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "probecvx.cli":
            raise KeyboardInterrupt
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", interrupted_import)
    with pytest.raises(SystemExit) as stopped:
        run()

    assert stopped.value.code == 130
    assert capsys.readouterr().err == "Interrupted before the command started.\n"


# --- SIGTERM exits 143 ----------------------------------------------------------------


def test_sigterm_exits_143_in_process(
    checkpoint_dir: Path,
    tiny_data_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def terminate(*args: object, **kwargs: object) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)

    monkeypatch.setattr("probecvx.cli.extract.extract_checkpoints", terminate)
    handler_before = signal.getsignal(signal.SIGTERM)
    result = invoke(*extract_args(checkpoint_dir, tiny_data_file, tmp_path / "acts"))

    assert result.exit_code == 143
    assert result.stderr.splitlines()[-1].startswith("Terminated; ")
    assert result.stdout == ""
    assert signal.getsignal(signal.SIGTERM) == handler_before


def start_slow_fit(acts: Path, out: Path) -> subprocess.Popen[str]:
    """Start `probecvx fit --jobs 2` with the slow solver in its own session."""
    write_series(acts, steps=(0, 10, 20, 30))
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "probecvx",
            "fit",
            str(acts),
            "--out",
            str(out),
            "--jobs",
            "2",
            "--plugin",
            "tests.faultplugin",
            "--solver",
            "slow",
            "--quiet",
        ],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


@pytest.mark.parametrize("target", ["process", "group"])
def test_sigterm_during_fit_with_workers(tmp_path: Path, target: str) -> None:
    # `kill PID` signals the fit process only; SLURM signals every process of
    # the job step, workers included.
    out = tmp_path / "out"
    process = start_slow_fit(tmp_path / "acts", out)
    try:
        started = wait_for(lambda: any(out.glob(".units/*/*.json")), timeout=120)
        if target == "process":
            process.send_signal(signal.SIGTERM)
        else:
            os.killpg(process.pid, signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    assert started, stderr
    assert process.returncode == 143, stderr
    assert stderr.splitlines()[-1].startswith("Terminated; "), stderr
    assert "Traceback" not in stderr
    assert "leaked" not in stderr
    assert "exits because its fit process" not in stderr
    assert leftovers(out) == []
    for path in out.glob(".units/*/*.json"):
        assert read_unit_file(path) is not None
