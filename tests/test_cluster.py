"""Tests of cluster runs: task shards, claims, Dask, temp files, status, locking."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import h5py
import joblib
import numpy as np
import pytest
from click.testing import CliRunner
from distributed import Client, LocalCluster

from probecvx import cluster
from probecvx.atomic import (
    TEMP_PREFIX,
    atomic_path,
    host_name,
    remove_stale_temp_files,
    temp_owner,
)
from probecvx.claims import (
    Claim,
    ClaimRecord,
    Owner,
    claim_path,
    read_claim,
    try_claim,
)
from probecvx.cli import main
from probecvx.datasets import load_dataset
from probecvx.errors import InvalidInputError
from probecvx.extract import extract_checkpoints
from probecvx.fit import UNITS_DIR, fit_shards, read_unit_file, unit_path
from probecvx.reports import INDEX_NAME, read_index, read_report
from probecvx.shards import list_shards
from probecvx.status import folder_status
from tests.test_fit import (
    SOLVER,
    toy_activations,
    toy_targets,
    write_series,
    write_shard,
)
from tests.tinymodels import TinyConvNet

REPO_ROOT = Path(__file__).resolve().parent.parent
# Fields that differ between identical fits: times and who ran them.
RUN_FIELDS = ("seconds", "fit_seconds", "created", "updated", "provenance")
QUIET = ("--C", "1", "--quiet")


def dead_pid() -> int:
    """Return the pid of a process that has exited."""
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout)


def strip_run(value: Any) -> Any:
    """Drop times and provenance, which differ between identical fits."""
    if isinstance(value, dict):
        return {k: strip_run(v) for k, v in value.items() if k not in RUN_FIELDS}
    if isinstance(value, list):
        return [strip_run(item) for item in value]
    return value


def reports_of(folder: Path) -> dict[str, Any]:
    return {
        path.name: strip_run(json.loads(path.read_text()))
        for path in sorted(folder.glob("step_*.json"))
    }


def fit(acts: Path, out: Path, **kwargs: Any) -> Any:
    kwargs.setdefault("solver", SOLVER)
    kwargs.setdefault("n_jobs", 1)
    kwargs.setdefault("progress", False)
    kwargs.setdefault("Cs", [1.0])
    return fit_shards(acts, out, **kwargs)


def write_wide_series(folder: Path, n_checkpoints: int = 4) -> None:
    """Write shards with 3 sites of different widths, 4, 6 and 12 features."""
    labels, _ = toy_targets()
    for index in range(n_checkpoints):
        sites = {
            f"s{width}": toy_activations(labels, width, seed=width, shift=0.02 * index)
            for width in (4, 6, 12)
        }
        write_shard(folder, f"step_{index}", index, sites)


# --- Task shards ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"), [("0/1", (0, 1)), ("3/16", (3, 16)), (" 15/16 ", (15, 16))]
)
def test_parse_shard_valid(text: str, expected: tuple[int, int]) -> None:
    assert cluster.parse_shard(text) == expected


@pytest.mark.parametrize("text", ["16/16", "-1/4", "1/0", "1", "a/b", "1/2/3", "2-4"])
def test_parse_shard_invalid(text: str) -> None:
    with pytest.raises(InvalidInputError, match=r"write I/N with 0 <= I < N.*from 0"):
        cluster.parse_shard(text)


def test_partition_covers_each_item_once() -> None:
    rng = np.random.default_rng(0)
    costs = list(rng.integers(1, 100, size=57).astype(float))
    for n_tasks in (1, 2, 5, 16):
        shares = [cluster.items_of_shard(costs, (i, n_tasks)) for i in range(n_tasks)]
        flat = sorted(item for share in shares for item in share)
        assert flat == list(range(len(costs)))
        assert shares == [
            cluster.items_of_shard(list(costs), (i, n_tasks)) for i in range(n_tasks)
        ]


def test_partition_is_balanced() -> None:
    rng = np.random.default_rng(1)
    costs = list(rng.uniform(1, 10, size=200))
    n_tasks = 8
    assignment = cluster.partition(costs, n_tasks)
    loads = np.zeros(n_tasks)
    for item, task in enumerate(assignment):
        loads[task] += costs[item]
    # LPT: no task exceeds the mean by more than the largest item.
    assert loads.max() <= sum(costs) / n_tasks + max(costs)
    assert loads.max() / loads.min() < 1.1


def test_shard_from_slurm_variables() -> None:
    env = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "16"}
    assert cluster.shard_from_slurm(env) == (7, 16)
    assert cluster.shard_from_slurm({**env, "SLURM_ARRAY_TASK_MIN": "1"}) == (6, 16)
    stepped = {
        "SLURM_ARRAY_TASK_ID": "30",
        "SLURM_ARRAY_TASK_COUNT": "16",
        "SLURM_ARRAY_TASK_MIN": "0",
        "SLURM_ARRAY_TASK_STEP": "2",
    }
    assert cluster.shard_from_slurm(stepped) == (15, 16)
    assert cluster.shard_from_slurm({"SLURM_JOB_ID": "5"}) is None


def test_shard_from_slurm_array_with_gaps() -> None:
    env = {
        "SLURM_ARRAY_TASK_ID": "9",
        "SLURM_ARRAY_TASK_COUNT": "3",
        "SLURM_ARRAY_TASK_MIN": "1",
    }
    with pytest.raises(InvalidInputError, match=r"pass --shard I/3"):
        cluster.shard_from_slurm(env)


def test_resolve_shard_flag_beats_slurm(caplog: pytest.LogCaptureFixture) -> None:
    env = {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}
    with caplog.at_level(logging.INFO, logger="probecvx.cluster"):
        assert cluster.resolve_shard(None, env) == (2, 4)
    assert "task shard 2/4, from SLURM_ARRAY_TASK_ID=2" in caplog.text
    assert cluster.resolve_shard("0/1", env) == (0, 1)
    assert cluster.resolve_shard(None, {}) is None


def test_fit_shards_split_tasks(tmp_path: Path) -> None:
    acts, out = tmp_path / "acts", tmp_path / "out"
    write_wide_series(acts)
    fit(acts, tmp_path / "whole")

    n_tasks = 3
    summaries = [fit(acts, out, shard=(i, n_tasks)) for i in range(n_tasks)]

    fitted = {
        (d["checkpoint"], d["site"]): d["provenance"]["task"]
        for d in map(read_unit_file, (out / UNITS_DIR).glob("*/*.json"))
        if d is not None
    }
    assert len(fitted) == 12
    assert sorted(set(fitted.values())) == ["0/3", "1/3", "2/3"]
    assert sum(s.n_fitted for s in summaries) == 12
    assert [s.n_units for s in summaries] == [s.n_fitted for s in summaries]
    # The last task to finish a checkpoint wrote its report; earlier ones waited.
    assert summaries[0].n_waiting > 0
    assert summaries[-1].n_waiting == 0
    index = read_index(out / INDEX_NAME)
    assert [e["status"] for e in index["checkpoints"]] == ["ok"] * 4
    for report in reports_of(out).values():
        assert [e["site"] for e in report["sites"]] == ["s4", "s6", "s12"]


def test_fit_shard_keeps_site_chains_whole(tmp_path: Path) -> None:
    acts = tmp_path / "acts"
    write_wide_series(acts)
    # Three sites over two tasks: each site's chain stays within one task.
    for i in range(2):
        fit(acts, tmp_path / "out", shard=(i, 2))
    tasks_by_site: dict[str, set[str]] = {}
    for path in (tmp_path / "out" / UNITS_DIR).glob("*/*.json"):
        doc = read_unit_file(path)
        assert doc is not None
        tasks_by_site.setdefault(doc["site"], set()).add(doc["provenance"]["task"])
    assert all(len(tasks) == 1 for tasks in tasks_by_site.values())
    assert len(set().union(*tasks_by_site.values())) == 2


def test_fit_cli_takes_shard_from_slurm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    acts, out = tmp_path / "acts", tmp_path / "out"
    write_wide_series(acts, n_checkpoints=2)
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "0")

    result = CliRunner().invoke(
        main,
        [
            "fit",
            str(acts),
            "--out",
            str(out),
            "--solver",
            SOLVER,
            "--jobs",
            "1",
            *QUIET,
        ],
        catch_exceptions=False,
    )

    assert result.exit_code == 0, result.stderr
    docs = [read_unit_file(p) for p in (out / UNITS_DIR).glob("*/*.json")]
    tasks = {doc["provenance"]["task"] for doc in docs if doc is not None}
    assert tasks == {"4242_1"}
    mine = fit(acts, tmp_path / "lib", shard=(1, 2))
    assert len(docs) == mine.n_units


def test_extract_shard_split(
    checkpoint_dir: Path, tiny_data_file: Path, tmp_path: Path
) -> None:
    dataset = load_dataset(str(tiny_data_file))
    out = tmp_path / "acts"
    written = []
    for i in range(2):
        summary = extract_checkpoints(
            checkpoint_dir,
            dataset,
            out,
            model_factory=TinyConvNet,
            sites=["features.0", "classifier"],
            device="cpu",
            progress=False,
            shard=(i, 2),
        )
        written.append([record.checkpoint for record in summary.written])
    assert sorted(written[0] + written[1]) == ["step_10", "step_20", "step_30"]
    assert written[0]
    assert written[1]
    assert len(list_shards(out)) == 3
    attrs = json.loads(h5py.File(out / "step_10.h5", "r").attrs["provenance_json"])
    assert attrs["host"] == host_name()
    assert attrs["task"] in ("0/2", "1/2")


# --- Claims ---------------------------------------------------------------------------


def test_claim_is_exclusive(tmp_path: Path) -> None:
    path = tmp_path / "unit.json.claim"
    first = try_claim(path, Owner.new_run("a"), timeout=60)
    second = try_claim(path, Owner.new_run("b"), timeout=60)
    assert isinstance(first, Claim)
    assert isinstance(second, ClaimRecord)
    assert second.owner.task == "a"
    assert second.owner.pid == os.getpid()
    first.release()
    assert not path.exists()
    third = try_claim(path, Owner.new_run("b"), timeout=60)
    assert isinstance(third, Claim)
    third.release()


def test_claim_of_dead_process_is_broken(tmp_path: Path) -> None:
    path = tmp_path / "unit.json.claim"
    doc = {
        "host": host_name(),
        "pid": dead_pid(),
        "task": None,
        "run": "old",
        "started": "2020-01-01T00:00:00+00:00",
        "token": "t",
    }
    path.write_text(json.dumps(doc))
    claim = try_claim(path, Owner.new_run(None), timeout=3600)
    assert isinstance(claim, Claim)
    record = read_claim(path)
    assert record is not None
    assert record.owner.pid == os.getpid()
    claim.release()
    assert list(tmp_path.iterdir()) == []


def test_claim_of_other_host_breaks_after_timeout(tmp_path: Path) -> None:
    path = tmp_path / "unit.json.claim"
    doc = {
        "host": "other-node",
        "pid": 1,
        "task": "9",
        "run": "r",
        "started": "2020-01-01T00:00:00+00:00",
        "token": "t",
    }
    path.write_text(json.dumps(doc))
    held = try_claim(path, Owner.new_run(None), timeout=60)
    assert isinstance(held, ClaimRecord)
    assert held.describe().startswith("other-node:1 (task 9) since 2020")

    old = time.time() - 120
    os.utime(path, (old, old))
    claim = try_claim(path, Owner.new_run(None), timeout=60)
    assert isinstance(claim, Claim)
    claim.release()


def test_claim_of_same_run_elsewhere_is_stale(tmp_path: Path) -> None:
    path = tmp_path / "unit.json.claim"
    owner = Owner.new_run(None)
    doc = {**owner.record(), "pid": 1, "started": "x", "token": "t"}
    doc["host"] = "dead-worker"
    path.write_text(json.dumps(doc))
    claim = try_claim(path, owner, timeout=3600)
    assert isinstance(claim, Claim)
    claim.release()


def test_stale_claim_of_done_unit_removed(tmp_path: Path) -> None:
    acts, out = tmp_path / "acts", tmp_path / "out"
    write_series(acts, steps=(0,))
    fit(acts, out)
    # As if killed after committing the unit but before releasing its claim.
    stale = claim_path(unit_path(out, "step_0", "fc"))
    doc = {
        "host": host_name(),
        "pid": dead_pid(),
        "task": None,
        "run": "old",
        "started": "2020-01-01T00:00:00+00:00",
        "token": "t",
    }
    stale.write_text(json.dumps(doc))
    live = claim_path(unit_path(out, "step_0", "input"))
    held = try_claim(live, Owner.new_run(None), timeout=60)
    assert isinstance(held, Claim)

    summary = fit(acts, out)
    live_kept = live.exists()
    held.release()

    assert summary.n_fitted == 0
    assert not stale.exists()
    assert live_kept


def test_heartbeat_refreshes_held_claim(tmp_path: Path) -> None:
    path = tmp_path / "unit.json.claim"
    claim = try_claim(path, Owner.new_run(None), timeout=0.8)
    assert isinstance(claim, Claim)
    old = time.time() - 100
    os.utime(path, (old, old))
    time.sleep(0.6)
    record = read_claim(path)
    claim.release()
    assert record is not None
    assert record.age < 0.8


def test_release_of_broken_claim_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "unit.json.claim"
    claim = try_claim(path, Owner.new_run(None), timeout=60)
    assert isinstance(claim, Claim)
    path.unlink()
    other = try_claim(path, Owner.new_run("b"), timeout=60)
    assert isinstance(other, Claim)
    with caplog.at_level(logging.WARNING, logger="probecvx.claims"):
        claim.release()
    assert "was broken by another process" in caplog.text
    assert path.exists()
    other.release()


# --- Temporary files ------------------------------------------------------------------


def test_temp_name_records_owner(tmp_path: Path) -> None:
    with atomic_path(tmp_path / "a~b.json") as temp:
        owner = temp_owner(temp.name)
        temp.write_text("{}")
    assert owner is not None
    assert owner.host == host_name()
    assert owner.pid == os.getpid()
    assert (tmp_path / "a~b.json").read_text() == "{}"
    assert temp_owner(f"{TEMP_PREFIX}step_1.h5.abc123") is None


def test_stale_temp_removal_keeps_live_files(tmp_path: Path) -> None:
    host = host_name()
    names = {
        "dead": f"{TEMP_PREFIX}a.h5.~{host}~{dead_pid()}~x1",
        "live": f"{TEMP_PREFIX}b.h5.~{host}~{os.getpid()}~x2",
        "foreign_new": f"{TEMP_PREFIX}c.h5.~elsewhere~123~x3",
        "foreign_old": f"{TEMP_PREFIX}d.h5.~elsewhere~123~x4",
        "legacy_old": f"{TEMP_PREFIX}e.h5.x5",
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"partial")
    old = time.time() - 7 * 3600
    for key in ("foreign_old", "legacy_old"):
        os.utime(tmp_path / names[key], (old, old))

    removed = remove_stale_temp_files(tmp_path)

    assert sorted(path.name for path in removed) == sorted(
        [names["dead"], names["foreign_old"], names["legacy_old"]]
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        [names["live"], names["foreign_new"]]
    )


# --- Dask -----------------------------------------------------------------------------


def test_dask_fit_matches_local(tmp_path: Path) -> None:
    acts = tmp_path / "acts"
    write_series(acts)
    # Two sites on two workers give one chain per site, as one local job does.
    fit(acts, tmp_path / "local", Cs=[0.1, 1.0], n_jobs=1)

    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=False,
            protocol="tcp",
            host="127.0.0.1",
            dashboard_address=None,
        ) as local_cluster,
        Client(local_cluster),
        joblib.parallel_config(backend="dask"),
    ):
        summary = fit(acts, tmp_path / "dask", Cs=[0.1, 1.0], n_jobs=2)

    assert summary.ok
    assert summary.n_fitted == 6
    assert reports_of(tmp_path / "dask") == reports_of(tmp_path / "local")
    index = read_index(tmp_path / "dask" / INDEX_NAME)
    assert [e["status"] for e in index["checkpoints"]] == ["ok"] * 3


def test_cli_dask_scheduler_file(tmp_path: Path) -> None:
    acts = tmp_path / "acts"
    write_series(acts, steps=(0, 10))
    scheduler_file = tmp_path / "scheduler.json"
    with LocalCluster(
        n_workers=1,
        threads_per_worker=2,
        processes=False,
        protocol="tcp",
        host="127.0.0.1",
        dashboard_address=None,
        scheduler_kwargs={"scheduler_file": str(scheduler_file)},
    ):
        result = CliRunner().invoke(
            main,
            [
                *("fit", str(acts), "--out", str(tmp_path / "out"), "--solver"),
                *(SOLVER, *QUIET, "--backend", "dask"),
                *("--scheduler-file", str(scheduler_file)),
            ],
            catch_exceptions=False,
        )
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == [
        str(tmp_path / "out" / "step_0.json"),
        str(tmp_path / "out" / "step_10.json"),
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--scheduler", "tcp://127.0.0.1:1"], "--scheduler and --scheduler-file need"),
        (["--backend", "dask", "--scheduler-file", "none.json"], "none.json not found"),
        (["--shard", "2/2"], "invalid --shard '2/2'"),
    ],
)
def test_fit_cli_cluster_options_exit_2(
    tmp_path: Path, args: list[str], message: str
) -> None:
    write_series(tmp_path / "acts", steps=(0,))
    result = CliRunner().invoke(
        main, ["fit", str(tmp_path / "acts"), "--out", str(tmp_path / "o"), *args]
    )
    assert result.exit_code == 2
    assert message in result.stderr


# --- Failed units are kept ------------------------------------------------------------


def test_failed_unit_kept_until_retry(tmp_path: Path) -> None:
    acts, out = tmp_path / "acts", tmp_path / "out"
    labels, _ = toy_targets()
    broken = toy_activations(labels, 4, seed=10)
    broken[3, 0] = np.nan
    sites = {"input": toy_activations(labels, 4, seed=11), "fc": broken}
    write_shard(acts, "step_0", 0, sites)
    first = fit(acts, out)
    unit_file = unit_path(out, "step_0", "fc")
    before = unit_file.stat()

    second = fit(acts, out)
    after_second = unit_file.stat()
    retried = fit(acts, out, retry_failed=True)

    assert [(c, s) for c, s, _ in first.failed_units] == [("step_0", "fc")]
    assert (second.n_fitted, second.n_skipped) == (0, 2)
    assert [(c, s) for c, s, _ in second.failed_earlier] == [("step_0", "fc")]
    assert not second.ok
    assert after_second.st_mtime_ns == before.st_mtime_ns
    assert after_second.st_ino == before.st_ino
    assert retried.n_fitted == 1
    assert [(c, s) for c, s, _ in retried.failed_units] == [("step_0", "fc")]
    report = read_report(out / "step_0.json")
    assert [e["status"] for e in report["sites"]] == ["ok", "failed"]


# --- Status ---------------------------------------------------------------------------


def status_table(folder: Path, *extra: str) -> tuple[list[list[str]], str]:
    result = CliRunner().invoke(
        main, ["status", str(folder), *extra], catch_exceptions=False
    )
    assert result.exit_code == 0, result.stderr
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    return rows, result.stderr


def test_status_of_reports_folder(tmp_path: Path) -> None:
    acts, out = tmp_path / "acts", tmp_path / "out"
    write_series(acts)
    labels, _ = toy_targets()
    broken = toy_activations(labels, 4, seed=3)
    broken[:, 0] = np.inf
    write_shard(
        acts, "step_30", 30, {"input": toy_activations(labels, 5, 1), "fc": broken}
    )
    fit(acts, out)

    # step_10 is re-extracted (new shard id); step_20's fc unit is lost.
    (acts / "step_10.h5").unlink()
    write_shard(
        acts,
        "step_10",
        10,
        {"input": toy_activations(labels, 5, 7), "fc": toy_activations(labels, 4, 8)},
        shard_id="shard-step_10-v2",
    )
    unit_path(out, "step_20", "fc").unlink()
    (out / "step_20.json").unlink()
    held = try_claim(
        claim_path(unit_path(out, "step_20", "input")), Owner.new_run("7"), timeout=60
    )
    assert isinstance(held, Claim)
    try:
        rows, stderr = status_table(out)
        status = folder_status(out)
    finally:
        held.release()

    assert rows[0] == ["checkpoint", "site", "state", "by", "detail"]
    states = {(row[0], row[1]): row[2] for row in rows[1:]}
    assert states == {
        ("step_0", "input"): "done",
        ("step_0", "fc"): "done",
        ("step_10", "input"): "stale",
        ("step_10", "fc"): "stale",
        ("step_20", "input"): "claimed",
        ("step_20", "fc"): "pending",
        ("step_30", "input"): "done",
        ("step_30", "fc"): "failed",
    }
    by_key = {(row[0], row[1]): row for row in rows[1:]}
    assert "NaN or infinite" in by_key[("step_30", "fc")][4]
    assert by_key[("step_20", "input")][3] == f"{host_name()}:{os.getpid()} (task 7)"
    assert "earlier shard" in by_key[("step_10", "fc")][4]
    assert "3 done, 1 pending, 1 failed, 2 stale, 1 claimed" in stderr
    assert status.counts() == {
        "done": 3,
        "pending": 1,
        "failed": 1,
        "stale": 2,
        "claimed": 1,
    }


def test_status_json(tmp_path: Path) -> None:
    write_series(tmp_path / "acts", steps=(0,))
    fit(tmp_path / "acts", tmp_path / "out")
    result = CliRunner().invoke(
        main, ["status", str(tmp_path / "out"), "--json"], catch_exceptions=False
    )
    doc = json.loads(result.stdout)
    assert doc["kind"] == "reports"
    assert doc["counts"] == {
        "done": 2,
        "pending": 0,
        "failed": 0,
        "stale": 0,
        "claimed": 0,
    }
    assert {unit["site"] for unit in doc["units"]} == {"input", "fc"}
    assert all(unit["by"].startswith(host_name()) for unit in doc["units"])


def test_status_of_activations_folder(
    checkpoint_dir: Path, tiny_data_file: Path, tmp_path: Path
) -> None:
    dataset = load_dataset(str(tiny_data_file))
    out = tmp_path / "acts"
    extract_checkpoints(
        checkpoint_dir,
        dataset,
        out,
        model_factory=TinyConvNet,
        sites=["classifier"],
        device="cpu",
        progress=False,
        pattern="step_[12]0.pt",
    )
    # step_20's checkpoint changes after extraction; step_30 is being written.
    checkpoint = checkpoint_dir / "step_20.pt"
    checkpoint.write_bytes(checkpoint.read_bytes() + b"\0")
    held = try_claim(out / ".step_30.h5.claim", Owner.new_run(None), timeout=60)
    assert isinstance(held, Claim)
    (out / ".step_40.h5.failed.json").write_text(
        json.dumps(
            {
                "format": "probecvx-extract-failure",
                "checkpoint": "step_40",
                "shard_id": "x",
                "error": "probe site log has 3 NaN",
                "provenance": {"host": "n1", "pid": 5, "task": None},
            }
        )
    )
    try:
        rows, _ = status_table(out, "--checkpoints", str(checkpoint_dir))
        plain, notes = status_table(out)
    finally:
        held.release()

    states = {row[0]: row[2] for row in rows[1:]}
    assert states == {
        "step_10": "done",
        "step_20": "stale",
        "step_30": "claimed",
        "step_40": "failed",
    }
    assert {row[0] for row in plain[1:]} == {"step_10", "step_20", "step_30", "step_40"}
    assert "pass --checkpoints" in notes


def test_status_without_plan(tmp_path: Path) -> None:
    (tmp_path / "out" / UNITS_DIR).mkdir(parents=True)
    result = CliRunner().invoke(main, ["status", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "has no fit plan" in result.stderr


# --- HDF5 locking ---------------------------------------------------------------------


def test_hdf5_locking_modes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cluster.HDF5_LOCKING_ENV, raising=False)
    assert cluster.h5py_locking_kwargs(writing=True) == {"locking": False}
    with cluster.hdf5_locking("true"):
        assert cluster.h5py_locking_kwargs(writing=True) == {"locking": True}
        assert cluster.h5py_locking_kwargs(writing=False) == {"locking": False}
    with cluster.hdf5_locking("best-effort"):
        assert cluster.h5py_locking_kwargs(writing=True) == {"locking": "best-effort"}
    assert cluster.current_hdf5_locking() is None
    with pytest.raises(InvalidInputError, match="invalid HDF5 locking mode 'yes'"):
        cluster.check_hdf5_locking("yes")


def test_hdf5_locking_reaches_shard_writer(
    checkpoint_dir: Path,
    tiny_data_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(cluster.HDF5_LOCKING_ENV, raising=False)
    opened: list[tuple[str, object]] = []
    original = h5py.File

    def spy(name: Any, mode: str = "r", **kwargs: Any) -> h5py.File:
        opened.append((mode, kwargs.get("locking")))
        return original(name, mode, **kwargs)

    monkeypatch.setattr(h5py, "File", spy)
    extract_checkpoints(
        checkpoint_dir,
        load_dataset(str(tiny_data_file)),
        tmp_path / "acts",
        model_factory=TinyConvNet,
        sites=["classifier"],
        device="cpu",
        progress=False,
        pattern="step_10.pt",
        hdf5_locking="best-effort",
    )
    assert ("w", "best-effort") in opened
    assert {locking for mode, locking in opened if mode == "r"} <= {False}


def test_env_locking_is_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(cluster.HDF5_LOCKING_ENV, "FALSE")
    with caplog.at_level(logging.INFO, logger="probecvx.cluster"):
        with cluster.hdf5_locking(None):
            pass
        with cluster.hdf5_locking("true"):
            pass
    assert "follows HDF5_USE_FILE_LOCKING=FALSE" in caplog.text
    assert "--hdf5-locking true has no effect" in caplog.text


def test_lock_failure_names_the_fix(tmp_path: Path) -> None:
    acts = tmp_path / "acts"
    write_series(acts, steps=(0, 10))
    # Another process holds a write lock on one shard; HDF5 locking is forced
    # on for the fit, as a site's HDF5 build or environment may do.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import h5py, sys, time; f = h5py.File(sys.argv[1], 'a', locking=True); "
            "print('locked', flush=True); time.sleep(60)",
            str(acts / "step_10.h5"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )

    with holder:
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline().strip() == "locked"
            env = {
                **os.environ,
                "PYTHONPATH": str(REPO_ROOT),
                cluster.HDF5_LOCKING_ENV: "TRUE",
            }
            done = subprocess.run(
                [
                    *(sys.executable, "-m", "probecvx", "fit", str(acts)),
                    *("--out", str(tmp_path / "out"), "--solver", SOLVER),
                    *("--jobs", "1", *QUIET),
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
        finally:
            holder.kill()

    assert done.returncode == 1, done.stderr
    index = read_index(tmp_path / "out" / INDEX_NAME)
    error = {e["checkpoint"]: e["error"] for e in index["checkpoints"]}["step_10"]
    assert "unable to lock file" in error
    assert "--hdf5-locking false" in error
    assert "HDF5_USE_FILE_LOCKING=FALSE" in error
