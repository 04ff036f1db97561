"""Tests of ``probecvx fit``: output, exit codes and option parsing."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from probecvx.cli import main
from probecvx.reports import INDEX_NAME, read_report
from tests.test_fit import (
    SOLVER,
    toy_activations,
    toy_targets,
    write_series,
    write_shard,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


def run_fit(*args: str) -> tuple[int, str, str]:
    """Run ``probecvx fit`` in-process; return (exit code, stdout, stderr)."""
    result = CliRunner().invoke(
        main, ["fit", "--solver", SOLVER, "--jobs", "1", *args], catch_exceptions=False
    )
    return result.exit_code, result.stdout, result.stderr


def test_fit_prints_each_report(tmp_path: Path) -> None:
    write_series(tmp_path / "acts")
    out = tmp_path / "out"

    code, stdout, stderr = run_fit(
        str(tmp_path / "acts"), "--out", str(out), "--C", "0.1,1", "--quiet"
    )

    assert code == 0, stderr
    assert stdout.splitlines() == [
        str(out / "step_0.json"),
        str(out / "step_10.json"),
        str(out / "step_20.json"),
    ]
    assert stderr == ""
    assert (out / INDEX_NAME).is_file()
    assert read_report(out / "step_0.json")["fit"]["Cs"] == [0.1, 1.0]


def test_fit_rerun_prints_nothing(tmp_path: Path) -> None:
    write_series(tmp_path / "acts", steps=(0,))
    args = (str(tmp_path / "acts"), "--out", str(tmp_path / "out"), "--C", "1")
    assert run_fit(*args, "--quiet")[0] == 0

    code, stdout, _ = run_fit(*args, "--quiet")
    assert code == 0
    assert stdout == ""

    code, stdout, _ = run_fit(*args, "--quiet", "--force", "--sites", "input")
    assert code == 0
    assert stdout.splitlines() == [str(tmp_path / "out" / "step_0.json")]


def test_fit_progress_on_stderr(tmp_path: Path) -> None:
    write_series(tmp_path / "acts", steps=(0,))
    code, stdout, stderr = run_fit(
        str(tmp_path / "acts"), "--out", str(tmp_path / "out"), "--C", "1"
    )
    assert code == 0
    assert "2/2" in stderr
    assert "2/2" not in stdout


def test_fit_failed_unit_exits_1(tmp_path: Path) -> None:
    labels, _ = toy_targets()
    broken = toy_activations(labels, 4, seed=3)
    broken[:, 1] = np.inf
    sites = {"input": toy_activations(labels, 4, seed=4), "fc": broken}
    write_shard(tmp_path / "acts", "step_0", 0, sites)
    write_series(tmp_path / "acts", steps=(10,))
    out = tmp_path / "out"

    code, stdout, stderr = run_fit(str(tmp_path / "acts"), "--out", str(out), "--quiet")

    assert code == 1
    assert stdout.splitlines() == [str(out / "step_0.json"), str(out / "step_10.json")]
    warning, error = stderr.splitlines()
    assert warning.startswith("Warning: probe fc at step_0 failed on ")
    assert error.startswith("Error: 1 of 4 probes failed; the others were fitted.")
    assert "probe fc at step_0" in error


def test_fit_all_failed_says_none_fitted(tmp_path: Path) -> None:
    labels, _ = toy_targets()
    broken = toy_activations(labels, 4, seed=3)
    broken[:, 1] = np.inf
    write_shard(tmp_path / "acts", "step_0", 0, {"input": broken, "fc": broken})
    out = tmp_path / "out"

    code, _, stderr = run_fit(str(tmp_path / "acts"), "--out", str(out), "--quiet")

    assert code == 1
    error = stderr.splitlines()[-1]
    assert error.startswith("Error: all 2 probes failed; no probe was fitted.")
    assert "the others" not in error


def test_fit_warning_log_format(tmp_path: Path) -> None:
    labels, _ = toy_targets()
    broken = toy_activations(labels, 4, seed=3)
    broken[:, 1] = np.inf
    write_shard(tmp_path / "acts", "step_0", 0, {"fc": broken})
    args = (str(tmp_path / "acts"), "--quiet", "--sites", "fc")

    _, _, quiet_stderr = run_fit(*args, "--out", str(tmp_path / "out"))
    _, _, verbose_stderr = run_fit(*args, "--out", str(tmp_path / "out2"), "-v")

    assert quiet_stderr.splitlines()[0].startswith("Warning: probe fc at step_0 ")
    warning = next(line for line in verbose_stderr.splitlines() if " failed " in line)
    assert " WARNING probecvx.fit: probe fc at step_0 failed " in warning
    assert warning[:4].isdigit()


def test_fit_warns_of_classes_without_train_rows(tmp_path: Path) -> None:
    labels, split = toy_targets()
    split = np.where((labels == 2) & (split == 0), 2, split).astype(np.uint8)
    sites = {"input": toy_activations(labels, 5, seed=1)}
    write_shard(tmp_path / "acts", "step_0", 0, sites, split=split)

    code, _, stderr = run_fit(
        str(tmp_path / "acts"), "--out", str(tmp_path / "out"), "--quiet"
    )

    assert code == 0
    lines = [line for line in stderr.splitlines() if "train rows" in line]
    assert len(lines) == 1
    assert lines[0].startswith(
        "Warning: SplitWarning: 1 of 1 probes fitted, at 1 checkpoint, "
    )
    assert "'eel'" in lines[0]


def test_fit_corrupt_shard_exits_1(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "acts", steps=(0, 10))
    paths[0].write_bytes(b"not an HDF5 file")

    code, stdout, stderr = run_fit(
        str(tmp_path / "acts"), "--out", str(tmp_path / "out"), "--quiet"
    )

    assert code == 1
    assert stdout.splitlines() == [str(tmp_path / "out" / "step_10.json")]
    assert "1 shards could not be read" in stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--C", "0.1,abc"], "invalid C 'abc' in '0.1,abc'"),
        (["--C", "0,1"], "invalid C '0' in '0,1'"),
        (["--C", "-1"], "invalid C '-1'"),
        (["--jobs", "0"], "Invalid value for '--jobs': 0 workers cannot fit"),
        (["--max-iter", "0"], "Invalid value for '--max-iter'"),
        (["--tol", "-0.1"], "Invalid value for '--tol': -0.1 is not a positive"),
        (["--tol", "nan"], "Invalid value for '--tol': nan is not a positive"),
        (["--sites", "nope"], "unknown probe site 'nope'"),
    ],
)
def test_fit_bad_values_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    write_series(tmp_path / "acts", steps=(0,))
    code, stdout, stderr = run_fit(
        str(tmp_path / "acts"), "--out", str(tmp_path / "out"), *args
    )
    assert code == 2
    assert message in stderr
    assert stdout == ""


def test_fit_out_into_acts_exits_2(tmp_path: Path) -> None:
    write_series(tmp_path / "acts", steps=(0,))
    acts = str(tmp_path / "acts")

    code, stdout, stderr = run_fit(acts, "--out", acts, "--quiet")

    assert code == 2
    assert stdout == ""
    assert stderr.startswith(f"Error: the reports folder {acts} is the activations")
    assert "such as --out reports" in stderr


def test_fit_missing_folder_exits_2(tmp_path: Path) -> None:
    code, _, stderr = run_fit(str(tmp_path / "nothing"), "--out", str(tmp_path / "o"))
    assert code == 2
    assert f"activations folder {tmp_path / 'nothing'} does not exist" in stderr


def test_fit_unknown_solver_exits_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["fit", str(tmp_path), "--out", str(tmp_path / "o"), "--solver", "sgd"]
    )
    assert result.exit_code == 2
    assert "'sgd' is not one of" in result.stderr


def test_fit_default_solver_is_auto(tmp_path: Path) -> None:
    write_series(tmp_path / "acts", steps=(0,))
    result = CliRunner().invoke(
        main,
        ["fit", str(tmp_path / "acts"), "--out", str(tmp_path / "out"), "--jobs", "1"],
        catch_exceptions=False,
    )
    report = read_report(tmp_path / "out" / "step_0.json")
    assert result.exit_code == 0, result.stderr
    assert report["fit"]["solver"] == "auto"
    assert report["fit"]["Cs"] == [0.001, 0.01, 0.1, 1.0, 10.0, 100.0]


def wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def live_processes_of_group(group: int) -> list[int]:
    """Return the pids of the processes in process group ``group``, zombies excluded."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # the process exited while the folder was listed
        # The command name is in brackets and may contain spaces.
        fields = text[text.rindex(")") + 2 :].split()
        state, process_group = fields[0], int(fields[2])
        if process_group == group and state != "Z":
            pids.append(int(stat.parent.name))
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_exit_when_fit_is_killed(tmp_path: Path) -> None:
    acts, out = tmp_path / "acts", tmp_path / "out"
    write_series(acts, steps=(0, 10, 20, 30))
    command = [sys.executable, "-m", "probecvx", "fit", str(acts), "--out", str(out)]
    options = ["--jobs", "2", "--plugin", "tests.faultplugin", "--solver", "slow"]
    process = subprocess.Popen(
        [*command, *options, "--quiet"],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        started = wait_for(lambda: any(out.glob(".units/*/*.json")), timeout=120)
        workers = live_processes_of_group(process.pid)
        # Only the fit process is killed, as the kernel's OOM killer does.
        process.kill()
        process.wait()
        workers_gone = wait_for(
            lambda: live_processes_of_group(process.pid) == [], timeout=30
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)

    assert started
    assert len(workers) >= 3  # the fit process and its two loky workers at least
    assert workers_gone, live_processes_of_group(process.pid)
