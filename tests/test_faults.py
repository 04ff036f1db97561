"""Fault tests: killed runs, overlapping runs and dying workers, in subprocesses.

Each test runs ``python -m probecvx`` in subprocesses and checks the files
they leave. Runs are killed with SIGKILL at random points, after delays drawn
from a seeded generator. A resume then gives the same shards and reports as an
uninterrupted run, and recomputes nothing that was finished.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from probecvx.atomic import TEMP_PREFIX
from probecvx.datasets import load_dataset
from probecvx.extract import extract_checkpoints
from probecvx.fit import UNITS_DIR, fit_shards, read_unit_file, unit_path
from probecvx.reports import INDEX_NAME, read_index, read_report
from probecvx.shards import read_shard_info, read_site, read_targets
from tests.test_fit import toy_activations, write_shard
from tests.tinymodels import TINY_MODEL_SPEC, TinyConvNet, set_dyadic_weights

REPO_ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
N_KILLS = 5  # per test, so 10 kill points between extract and fit
RUN_FIELDS = ("seconds", "fit_seconds", "created", "updated", "provenance")
FIT_ARGS = ("--plugin", "tests.faultplugin", "--solver", "slow")
FIT_ARGS += ("--C", "0.1,1,10", "--quiet")


def start(*args: str, **env: str) -> subprocess.Popen[str]:
    """Start ``python -m probecvx ARGS`` in its own process group."""
    return subprocess.Popen(
        [sys.executable, "-m", "probecvx", *args],
        env={**ENV, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def kill_group(process: subprocess.Popen[str]) -> str:
    """SIGKILL the process and its workers, as a batch scheduler does; return stderr."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    _, stderr = process.communicate(timeout=60)
    return stderr


def file_states(paths: list[Path]) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_ino, p.stat().st_mtime_ns) for p in paths}


def leftovers(folder: Path) -> list[str]:
    """Return temporary and claim files anywhere under ``folder``."""
    return sorted(
        path.name
        for path in folder.rglob("*")
        if path.name.startswith(TEMP_PREFIX) or path.name.endswith(".claim")
    )


def strip_run(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: strip_run(v) for k, v in value.items() if k not in RUN_FIELDS}
    if isinstance(value, list):
        return [strip_run(item) for item in value]
    return value


# --- SIGKILL during extract -----------------------------------------------------------


def test_extract_killed_at_random_points(tiny_data_file: Path, tmp_path: Path) -> None:
    # Six checkpoints of at least 0.55 s each (11 forward passes of 0.05 s),
    # and kills at most 0.9 s into a run: no run finishes more than one, so
    # every run is killed and the resume has work left.
    checkpoint_dir = tmp_path / "ckpt"
    checkpoint_dir.mkdir()
    for index in range(6):
        model = set_dyadic_weights(TinyConvNet(), seed=200 + index)
        torch.save(model.state_dict(), checkpoint_dir / f"step_{index}.pt")
    dataset = load_dataset(str(tiny_data_file))
    reference = tmp_path / "reference"
    extract_checkpoints(
        checkpoint_dir,
        dataset,
        reference,
        model_factory=TinyConvNet,
        device="cpu",
        progress=False,
    )
    out = tmp_path / "acts"
    args = [
        *("extract", str(checkpoint_dir), "--data", str(tiny_data_file)),
        *("--out", str(out), "--model", TINY_MODEL_SPEC, "--device", "cpu"),
        *("--model-kwargs", '{"delay": 0.05}', "--batch-size", "4", "--quiet"),
    ]
    rng = np.random.default_rng(20)
    finished: dict[str, tuple[int, int]] = {}
    kills = 0

    for _ in range(N_KILLS):
        process = start(*args)
        started = wait_for(lambda: bool(list(out.glob(".*.h5.claim"))), timeout=120)
        time.sleep(rng.uniform(0.05, 0.9))
        killed = process.poll() is None
        stderr = kill_group(process)
        assert started or process.returncode == 0, stderr
        kills += killed

        # Every final name holds a complete shard, and finished ones are untouched.
        shards = sorted(out.glob("step_*.h5"))
        for path in shards:
            read_shard_info(path)
        now = file_states(shards)
        assert {key: now[key] for key in finished} == finished
        finished = now

    # The resume runs in this process: it only has to see what the kills left.
    summary = extract_checkpoints(
        checkpoint_dir,
        dataset,
        out,
        model_factory=TinyConvNet,
        device="cpu",
        progress=False,
    )

    assert kills == N_KILLS
    statuses = {str(record.path): record.status for record in summary.records}
    assert {statuses[path] for path in finished} <= {"skipped"}
    now = file_states(sorted(out.glob("step_*.h5")))
    assert {key: now[key] for key in finished} == finished
    names = [f"step_{index}.h5" for index in range(6)]
    assert sorted(p.name for p in out.iterdir()) == names
    for name in names:
        assert_same_shard(out / name, reference / name)


def assert_same_shard(path: Path, reference: Path) -> None:
    info, expected = read_shard_info(path), read_shard_info(reference)
    ignored = ("created", "provenance_json", "checkpoint_path")
    attrs = {k: v for k, v in info.attrs.items() if k not in ignored}
    assert attrs == {k: v for k, v in expected.attrs.items() if k not in ignored}
    assert info.sites == expected.sites
    for got, want in zip(read_targets(path), read_targets(reference), strict=True):
        np.testing.assert_array_equal(got, want)
    for site in info.sites:
        np.testing.assert_array_equal(read_site(path, site), read_site(reference, site))


# --- SIGKILL during fit ---------------------------------------------------------------


def write_fit_shards(folder: Path) -> None:
    """Six checkpoints of 600 rows and three sites."""
    rows = np.arange(600)
    labels = rows % 3
    split = np.select([rows % 5 < 3, rows % 5 == 3], [0, 1], default=2)
    for index in range(6):
        sites = {
            f"s{width}": toy_activations(labels, width, seed=width, shift=0.05 * index)
            for width in (8, 16, 32)
        }
        write_shard(folder, f"step_{index}", index, sites, labels=labels, split=split)


def unit_files(out: Path) -> list[Path]:
    return sorted((out / UNITS_DIR).glob("*/*.json"))


def test_fit_killed_at_random_points(tmp_path: Path) -> None:
    acts, out = tmp_path / "acts", tmp_path / "out"
    write_fit_shards(acts)
    # One BLAS thread here too, as in the subprocesses, so that sums run in
    # the same order and the reports can be compared exactly.
    with threadpool_limits(limits=1):
        fit_shards(
            acts,
            tmp_path / "reference",
            solver="slow",
            Cs=[0.1, 1, 10],
            n_jobs=1,
            plugins=["tests.faultplugin"],
            progress=False,
        )
    rng = np.random.default_rng(21)
    finished: dict[str, tuple[int, int]] = {}
    kills = 0

    for attempt in range(N_KILLS):
        # One run uses two worker processes; killing the group kills them too.
        jobs = "2" if attempt == 2 else "1"
        before = len(unit_files(out))
        process = start("fit", str(acts), "--out", str(out), "--jobs", jobs, *FIT_ARGS)
        progressed = wait_for(
            lambda count=before: len(unit_files(out)) > count, timeout=120
        )
        # Each probe sleeps 0.3 s, so a run fits at most two probes per worker
        # and every run is killed with work left.
        time.sleep(rng.uniform(0.0, 0.15))
        killed = process.poll() is None
        stderr = kill_group(process)
        assert progressed or process.returncode == 0, stderr
        kills += killed

        # Every unit file and report is complete; finished units are untouched.
        for path in unit_files(out):
            assert read_unit_file(path) is not None
        for path in out.glob("step_*.json"):
            read_report(path)
        now = file_states(unit_files(out))
        assert {k: now[k] for k in finished} == finished
        finished = now

    with threadpool_limits(limits=1):
        summary = fit_shards(
            acts,
            out,
            solver="slow",
            Cs=[0.1, 1, 10],
            n_jobs=1,
            plugins=["tests.faultplugin"],
            progress=False,
        )

    assert kills == N_KILLS
    assert summary.ok
    assert summary.n_fitted == 18 - len(finished)
    now = file_states(unit_files(out))
    assert {key: now[key] for key in finished} == finished
    assert leftovers(out) == []
    for name in (f"step_{index}.json" for index in range(6)):
        got = strip_run(json.loads((out / name).read_text()))
        want = strip_run(json.loads((tmp_path / "reference" / name).read_text()))
        assert got == want
    index = read_index(out / INDEX_NAME)
    assert [e["status"] for e in index["checkpoints"]] == ["ok"] * 6


# --- Two runs over one folder ---------------------------------------------------------


FITTED_LINE = re.compile(r"fitted probe (\S+) at (\S+) on ")


def test_concurrent_fits_do_each_unit_once(tmp_path: Path) -> None:
    acts, out = tmp_path / "acts", tmp_path / "out"
    write_fit_shards(acts)
    gate = tmp_path / "gate"
    common = ["-v", "fit", str(acts), "--out", str(out), "--jobs", "1"]
    common += ["--plugin", "tests.faultplugin", "--solver", "gated"]
    common += ["--C", "1", "--quiet"]
    first = start(*common, PROBECVX_TEST_GATE=str(gate))
    second = start(*common, "--shard", "0/2", PROBECVX_TEST_GATE=str(gate))
    try:
        # Each run holds one claim and waits at the gate, so they overlap.
        both_claimed = wait_for(
            lambda: len(list((out / UNITS_DIR).rglob("*.claim"))) == 2, timeout=120
        )
        gate.touch()
        outputs = [process.communicate(timeout=300)[1] for process in (first, second)]
    finally:
        for process in (first, second):
            if process.poll() is None:
                kill_group(process)

    assert both_claimed, outputs
    assert [first.returncode, second.returncode] == [0, 0], outputs
    fitted = [
        match.groups() for text in outputs for match in FITTED_LINE.finditer(text)
    ]
    assert len(fitted) == 18
    assert len(set(fitted)) == 18
    per_run = [len(FITTED_LINE.findall(text)) for text in outputs]
    assert min(per_run) > 0
    assert leftovers(out) == []

    runs = set()
    for checkpoint in (f"step_{index}" for index in range(6)):
        report = read_report(out / f"{checkpoint}.json")
        assert [e["site"] for e in report["sites"]] == ["s8", "s16", "s32"]
        assert report["status"] == "ok"
        for entry in report["sites"]:
            doc = read_unit_file(unit_path(out, checkpoint, entry["site"]))
            assert doc is not None
            assert doc["entry"] == entry
            runs.add(doc["provenance"]["run"])
    assert len(runs) == 2
    index = read_index(out / INDEX_NAME)
    assert [e["status"] for e in index["checkpoints"]] == ["ok"] * 6


# --- A worker that dies ---------------------------------------------------------------


def test_dead_worker_fails_only_its_unit(tmp_path: Path) -> None:
    acts, out = tmp_path / "acts", tmp_path / "out"
    labels = np.arange(150) % 3
    # tests.faultplugin's solver calls os._exit on the 7-wide site "bad".
    write_shard(
        acts,
        "step_0",
        0,
        {
            "input": toy_activations(labels, 5, seed=1),
            "bad": toy_activations(labels, 7, seed=2),
        },
    )
    write_shard(acts, "step_1", 1, {"input": toy_activations(labels, 5, seed=3)})
    args = ["-v", "fit", str(acts), "--out", str(out), "--C", "1", "--quiet"]
    args += ["--plugin", "tests.faultplugin", "--solver", "exit-on-marker"]

    first = subprocess.run(
        [sys.executable, "-m", "probecvx", *args, "--jobs", "2"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    bad_unit = unit_path(out, "step_0", "bad")
    state = bad_unit.stat()
    rerun = subprocess.run(
        [sys.executable, "-m", "probecvx", *args, "--jobs", "1"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert first.returncode == 1, first.stderr
    assert "Error: 1 of 3 probes failed; the others were fitted." in first.stderr
    step_0 = {e["site"]: e for e in read_report(out / "step_0.json")["sites"]}
    assert step_0["input"]["status"] == "ok"
    assert step_0["bad"]["status"] == "failed"
    assert "worker process died" in step_0["bad"]["error"]
    assert "EXIT(86)" in step_0["bad"]["error"]
    assert read_report(out / "step_1.json")["status"] == "ok"
    assert leftovers(out) == []
    # The re-run keeps the failure instead of fitting, and dying, again.
    assert rerun.returncode == 1, rerun.stderr
    assert "failed in an earlier run and were not refitted" in rerun.stderr
    assert (bad_unit.stat().st_ino, bad_unit.stat().st_mtime_ns) == (
        state.st_ino,
        state.st_mtime_ns,
    )
