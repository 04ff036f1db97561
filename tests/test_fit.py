"""Tests of probecvx.fit: units, standardisation, choice of C, warm starts, resume."""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from probecvx.errors import ConvergenceWarning, InvalidInputError, SplitWarning
from probecvx.fit import UNITS_DIR, fit_shards
from probecvx.probe import standardise
from probecvx.reports import INDEX_NAME, read_index, read_report
from probecvx.shards import ShardWriter, read_site
from probecvx.solvers import objective

CLASS_NAMES = ("cat", "dog", "eel")
N_SAMPLES = 150
SOLVER = "lbfgs"


def toy_targets(n_samples: int = N_SAMPLES) -> tuple[np.ndarray, np.ndarray]:
    """Return balanced labels of 3 classes and a 60/20/20 split, both by row."""
    rows = np.arange(n_samples)
    labels = rows % 3
    split = np.select([rows % 5 < 3, rows % 5 == 3], [0, 1], default=2)
    return labels, split.astype(np.uint8)


def toy_activations(
    labels: np.ndarray, n_features: int, seed: int, shift: float = 0.0
) -> np.ndarray:
    """Return overlapping Gaussian classes; ``shift`` moves the class means a little.

    The classes overlap, so the probe's optimum is finite at every C.
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, n_features))
    drift = np.random.default_rng(seed + 1000).normal(size=(3, n_features))
    noise = np.random.default_rng(seed + 2000).normal(size=(len(labels), n_features))
    values = centres[labels] + shift * drift[labels] + 1.5 * noise
    return values.astype(np.float32)


def write_shard(
    folder: Path,
    name: str,
    step: int,
    sites: Mapping[str, np.ndarray],
    *,
    labels: np.ndarray | None = None,
    split: np.ndarray | None = None,
    class_names: Sequence[str] = CLASS_NAMES,
    shard_id: str | None = None,
) -> Path:
    """Write a shard of ``sites`` (name to (n, d) array) with ShardWriter."""
    folder.mkdir(parents=True, exist_ok=True)
    default_labels, default_split = toy_targets()
    labels = default_labels if labels is None else labels
    split = default_split if split is None else split
    attrs: dict[str, str | int] = {
        "checkpoint_name": name,
        "checkpoint_path": f"/runs/ckpt/{name}.pt",
        "checkpoint_kind": "state_dict",
        "step": step,
        "checkpoint_sha256": "ab" * 32,
        "dataset_name": "toy",
        "dataset_fingerprint": "cd" * 32,
        "settings_json": "{}",
        "settings_hash": "ef" * 32,
        "shard_id": shard_id or f"shard-{name}",
        "storage_dtype": "float32",
        "pooling": "none",
    }
    path = folder / f"{name}.h5"
    with ShardWriter(
        path,
        attrs=attrs,
        labels=labels,
        class_names=list(class_names),
        split=split,
        sample_ids=np.arange(len(labels)),
    ) as writer:
        for site, values in sites.items():
            writer.create_site(
                site,
                values.shape[1],
                "float32",
                {
                    "site": site,
                    "module_type": "Linear",
                    "original_shape": [values.shape[1]],
                    "call_index": 1,
                    "pooling": "none",
                    "overflow_count": 0,
                },
            )
            writer.write_rows(site, 0, values.astype(np.float32))
    return path


def write_series(folder: Path, steps: Sequence[int] = (0, 10, 20)) -> list[Path]:
    """Write one shard per step with sites ``input`` (5 wide) and ``fc`` (4 wide)."""
    labels, _ = toy_targets()
    paths = []
    for index, step in enumerate(steps):
        sites = {
            "input": toy_activations(labels, 5, seed=1, shift=0.05 * index),
            "fc": toy_activations(labels, 4, seed=2, shift=0.05 * index),
        }
        paths.append(write_shard(folder, f"step_{step}", step, sites))
    return paths


def site_entry(report: Mapping[str, Any], site: str) -> dict[str, Any]:
    return next(entry for entry in report["sites"] if entry["site"] == site)


def fit(acts: Path, out: Path, **kwargs: Any) -> Any:
    """Run fit_shards with the test defaults: one job, no progress bar."""
    kwargs.setdefault("solver", SOLVER)
    kwargs.setdefault("n_jobs", 1)
    kwargs.setdefault("progress", False)
    return fit_shards(acts, out, **kwargs)


def strip_times(value: Any) -> Any:
    """Drop wall times and dates, which differ between identical runs."""
    if isinstance(value, dict):
        return {
            key: strip_times(item)
            for key, item in value.items()
            if key not in ("seconds", "fit_seconds", "created", "updated")
        }
    if isinstance(value, list):
        return [strip_times(item) for item in value]
    return value


@pytest.mark.parametrize("solver", ["lbfgs", "auto", "sklearn-lbfgs"])
def test_objective_matches_sklearn(tmp_path: Path, solver: str) -> None:
    labels, split = toy_targets()
    values = toy_activations(labels, 6, seed=3)
    shard = write_shard(tmp_path / "acts", "step_0", 0, {"input": values})
    C = 0.5

    fit(
        tmp_path / "acts",
        tmp_path / "out",
        solver=solver,
        Cs=[C],
        tol=1e-7,
        max_iter=5000,
    )
    entry = site_entry(read_report(tmp_path / "out" / "step_0.json"), "input")

    X = read_site(shard, "input").astype(np.float64)
    train = split == 0
    mean = X[train].mean(axis=0)
    std = X[train].std(axis=0)
    X_train = (X[train] - mean) / std
    y_train = labels[train]
    reference = LogisticRegression(C=C, tol=1e-12, max_iter=100_000).fit(
        X_train, y_train
    )
    best = objective(X_train, y_train, reference.coef_, reference.intercept_, C)

    assert entry["status"] == "ok"
    assert entry["C"] == C
    assert entry["solver"]["converged"] is True
    assert entry["solver"]["objective"] == pytest.approx(best, rel=1e-5)
    assert entry["solver"]["objective"] >= best - 1e-6


def test_standardise_zero_variance_column() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(loc=3.0, scale=2.0, size=(40, 3)).astype(np.float32)
    X[:, 1] = 7.0  # a dead unit: constant on every row
    X[30:, 2] += 100.0  # rows past the train rows must not move the statistics

    n_constant = standardise(X, n_train=30)

    assert n_constant == 1
    assert np.isfinite(X).all()
    np.testing.assert_allclose(X[:30, [0, 2]].mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(X[:30, [0, 2]].std(axis=0), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(X[:, 1], 0.0)
    assert X[30:, 2].min() > 10.0


def test_dead_unit_site_fits(tmp_path: Path) -> None:
    labels, _ = toy_targets()
    values = toy_activations(labels, 5, seed=4)
    values[:, 2] = 0.0
    write_shard(tmp_path / "acts", "step_0", 0, {"relu": values})

    fit(tmp_path / "acts", tmp_path / "out", Cs=[1.0])
    entry = site_entry(read_report(tmp_path / "out" / "step_0.json"), "relu")

    assert entry["status"] == "ok"
    assert entry["constant_features"] == 1
    assert entry["test"]["error"] is not None


def test_class_missing_from_train(tmp_path: Path) -> None:
    labels, split = toy_targets()
    split = split.copy()
    split[(labels == 2) & (split == 0)] = 2  # every 'eel' train row goes to test
    values = toy_activations(labels, 5, seed=5)
    write_shard(tmp_path / "acts", "step_0", 0, {"input": values}, split=split)

    with pytest.warns(SplitWarning, match="1 checkpoint, have classes without train"):
        summary = fit(tmp_path / "acts", tmp_path / "out", Cs=[1.0])
    report = read_report(tmp_path / "out" / "step_0.json")
    entry = site_entry(report, "input")

    assert summary.ok
    assert entry["status"] == "ok"
    assert report["dataset"]["class_names"] == list(CLASS_NAMES)
    assert any("'eel'" in note for note in entry["warnings"])
    # The probe never predicts 'eel', so every 'eel' test row is an error.
    test_rows = split == 2
    eel_share = np.mean(labels[test_rows] == 2)
    assert entry["test"]["error"] >= eel_share


def test_single_class_train_fails(tmp_path: Path) -> None:
    labels, split = toy_targets()
    labels = labels.copy()
    labels[split == 0] = 1
    values = toy_activations(labels, 4, seed=6)
    write_shard(tmp_path / "acts", "step_0", 0, {"input": values}, labels=labels)

    summary = fit(tmp_path / "acts", tmp_path / "out", Cs=[1.0])
    entry = site_entry(read_report(tmp_path / "out" / "step_0.json"), "input")

    assert entry["status"] == "failed"
    assert "single class" in entry["error"]
    assert summary.failed_units == [("step_0", "input", entry["error"])]


def test_C_chosen_by_val(tmp_path: Path) -> None:
    # Few train rows and many noise features: a weak penalty overfits.
    rng = np.random.default_rng(7)
    labels, _ = toy_targets()
    values = rng.normal(size=(N_SAMPLES, 40)).astype(np.float32)
    values[:, 0] += 1.5 * labels
    write_shard(tmp_path / "acts", "step_0", 0, {"input": values})
    grid = [1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0]

    fit(tmp_path / "acts", tmp_path / "out", Cs=grid)
    entry = site_entry(read_report(tmp_path / "out" / "step_0.json"), "input")

    errors = entry["val_error_by_C"]
    losses = entry["val_loss_by_C"]
    best = min(range(len(grid)), key=lambda i: (errors[i], losses[i], grid[i]))
    assert entry["C_grid"] == grid
    assert entry["C_selection"] == "val_error"
    assert entry["C"] == grid[best]
    assert entry["val"]["error"] == errors[best]
    assert entry["C"] < grid[-1]
    assert min(errors) < errors[-1]


def test_no_val_rows_uses_default_C(tmp_path: Path) -> None:
    labels, split = toy_targets()
    split = np.where(split == 1, 0, split).astype(np.uint8)
    values = toy_activations(labels, 4, seed=8)
    write_shard(tmp_path / "acts", "step_0", 0, {"input": values}, split=split)

    fit(tmp_path / "acts", tmp_path / "out", Cs=[0.01, 0.5, 5.0])
    report = read_report(tmp_path / "out" / "step_0.json")
    entry = site_entry(report, "input")

    assert entry["C_selection"] == "no_val_default"
    assert entry["C"] == 0.5  # nearest to 1 on a log scale
    assert entry["C_grid"] == [0.5]
    assert entry["val"] == {"error": None, "loss": None}
    assert any("val split has no rows" in note for note in entry["warnings"])
    assert report["dataset"]["split_sizes"]["val"] == 0


def test_warm_start_recorded_and_saves_iterations(tmp_path: Path) -> None:
    labels, _ = toy_targets()
    for index in range(4):
        values = toy_activations(labels, 8, seed=9, shift=0.01 * index)
        write_shard(tmp_path / "acts", f"step_{index}", index, {"fc": values})
    settings = {"Cs": [1.0, 10.0], "tol": 1e-7}

    fit(tmp_path / "acts", tmp_path / "warm", warm_start=True, **settings)
    fit(tmp_path / "acts", tmp_path / "cold", warm_start=False, **settings)

    def solver_records(folder: Path) -> list[dict[str, Any]]:
        return [
            site_entry(read_report(folder / f"step_{i}.json"), "fc")["solver"]
            for i in range(4)
        ]

    warm = solver_records(tmp_path / "warm")
    cold = solver_records(tmp_path / "cold")
    assert [record["warm_started"] for record in warm] == [False, True, True, True]
    assert [record["warm_started"] for record in cold] == [False] * 4
    assert warm[0]["n_iter"] == cold[0]["n_iter"]
    assert sum(r["n_iter"] for r in warm[1:]) < sum(r["n_iter"] for r in cold[1:])
    for warm_record, cold_record in zip(warm, cold, strict=True):
        assert warm_record["objective"] == pytest.approx(
            cold_record["objective"], rel=1e-5
        )


def test_nan_site_fails_others_succeed(tmp_path: Path) -> None:
    labels, _ = toy_targets()
    broken = toy_activations(labels, 4, seed=10)
    broken[5, 1] = np.nan
    broken[7, 0] = np.inf
    sites = {"input": toy_activations(labels, 4, seed=11), "fc": broken}
    write_shard(tmp_path / "acts", "step_0", 0, sites)

    summary = fit(tmp_path / "acts", tmp_path / "out", Cs=[1.0])
    report = read_report(tmp_path / "out" / "step_0.json")
    index = read_index(tmp_path / "out" / INDEX_NAME)

    assert site_entry(report, "input")["status"] == "ok"
    failed = site_entry(report, "fc")
    assert failed["status"] == "failed"
    assert "2 NaN or infinite values" in failed["error"]
    assert failed["C"] is None
    assert failed["chance_error"] is not None
    assert report["status"] == "partial"
    assert [(c, s) for c, s, _ in summary.failed_units] == [("step_0", "fc")]
    assert index["checkpoints"][0]["n_failed"] == 1


def test_corrupt_shard_recorded_in_index(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "acts")
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) // 3])

    summary = fit(tmp_path / "acts", tmp_path / "out", Cs=[1.0])
    index = read_index(tmp_path / "out" / INDEX_NAME)
    entries = {entry["checkpoint"]: entry for entry in index["checkpoints"]}

    assert [name for name, _ in summary.failed_checkpoints] == ["step_10"]
    assert entries["step_10"]["status"] == "failed"
    assert entries["step_10"]["report"] is None
    assert "probecvx extract" in entries["step_10"]["error"]
    assert entries["step_0"]["status"] == "ok"
    assert entries["step_20"]["status"] == "ok"
    assert sorted(path.name for path in summary.reports_written) == [
        "step_0.json",
        "step_20.json",
    ]


def test_old_schema_shard_says_reextract(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "acts", steps=(0, 10))
    with h5py.File(paths[0], "a") as file:
        file.attrs["schema_version"] = 0

    summary = fit(tmp_path / "acts", tmp_path / "out", Cs=[1.0])
    index = read_index(tmp_path / "out" / INDEX_NAME)

    assert summary.failed_checkpoints[0][0] == "step_0"
    error = index["checkpoints"][-1]["error"]
    assert str(paths[0]) in error
    assert "re-run `probecvx extract`" in error


def test_skip_current_and_refit_on_change(tmp_path: Path) -> None:
    acts, out = tmp_path / "acts", tmp_path / "out"
    write_series(acts)

    first = fit(acts, out, Cs=[1.0])
    second = fit(acts, out, Cs=[1.0])
    assert (first.n_units, first.n_fitted, first.n_skipped) == (6, 6, 0)
    assert (second.n_fitted, second.n_skipped) == (0, 6)
    assert second.reports_written == []

    # A re-extracted checkpoint has a new shard id: only its units are refitted.
    labels, _ = toy_targets()
    sites = {
        "input": toy_activations(labels, 5, seed=21),
        "fc": toy_activations(labels, 4, seed=22),
    }
    (acts / "step_10.h5").unlink()
    write_shard(acts, "step_10", 10, sites, shard_id="shard-step_10-v2")
    third = fit(acts, out, Cs=[1.0])
    assert (third.n_fitted, third.n_skipped) == (2, 4)
    assert [path.name for path in third.reports_written] == ["step_10.json"]
    report = read_report(out / "step_10.json")
    assert report["shard"]["shard_id"] == "shard-step_10-v2"

    # A changed fit setting refits every unit, and so does force.
    fourth = fit(acts, out, Cs=[0.5])
    assert fourth.n_fitted == 6
    assert read_report(out / "step_0.json")["fit"]["Cs"] == [0.5]
    fifth = fit(acts, out, Cs=[0.5], force=True)
    assert fifth.n_fitted == 6


def test_killed_run_resumes_from_unit_files(tmp_path: Path) -> None:
    acts, out = tmp_path / "acts", tmp_path / "out"
    write_series(acts)
    fit(acts, out, Cs=[1.0])
    unit_files = sorted((out / UNITS_DIR).glob("*/*.json"))
    assert len(unit_files) == 6

    # Lose the reports and one unit, as if killed before they were written.
    for path in out.glob("*.json"):
        path.unlink()
    unit_files[0].unlink()
    summary = fit(acts, out, Cs=[1.0])

    assert (summary.n_fitted, summary.n_skipped) == (1, 5)
    assert sorted(path.name for path in out.glob("*.json")) == [
        INDEX_NAME,
        "step_0.json",
        "step_10.json",
        "step_20.json",
    ]


def test_site_filter_keeps_other_sites_in_report(tmp_path: Path) -> None:
    acts, out = tmp_path / "acts", tmp_path / "out"
    write_series(acts, steps=(0, 10))
    fit(acts, out, Cs=[1.0])

    summary = fit(
        acts, out, Cs=[1.0], sites=["f*"], checkpoints=["step_1?"], force=True
    )
    report = read_report(out / "step_10.json")

    assert (summary.n_units, summary.n_fitted) == (1, 1)
    assert [entry["site"] for entry in report["sites"]] == ["input", "fc"]


def test_unknown_filter_lists_valid_names(tmp_path: Path) -> None:
    write_series(tmp_path / "acts", steps=(0,))
    with pytest.raises(InvalidInputError, match=r"unknown probe site 'fc3'.*input, fc"):
        fit(tmp_path / "acts", tmp_path / "out", sites=["fc3"])
    with pytest.raises(InvalidInputError, match=r"unknown checkpoint 'step_9'"):
        fit(tmp_path / "acts", tmp_path / "out", checkpoints=["step_9"])


def test_folder_without_shards(tmp_path: Path) -> None:
    (tmp_path / "acts").mkdir()
    with pytest.raises(InvalidInputError, match=r"no shards .*probecvx extract"):
        fit(tmp_path / "acts", tmp_path / "out")


def test_reports_folder_as_acts_dir(tmp_path: Path) -> None:
    write_series(tmp_path / "acts", steps=(0,))
    fit(tmp_path / "acts", tmp_path / "reports")

    with pytest.raises(InvalidInputError) as raised:
        fit(tmp_path / "reports", tmp_path / "rr")

    message = str(raised.value)
    assert "contains index.json" in message
    assert "looks like a reports folder of `probecvx fit`" in message
    assert "--out folder of `probecvx extract`" in message
    assert "--out reports" not in message
    assert not (tmp_path / "rr").exists()


@pytest.mark.parametrize("spelling", ["same", "dot"])
def test_out_dir_equal_to_acts_dir(tmp_path: Path, spelling: str) -> None:
    acts = tmp_path / "acts"
    write_series(acts, steps=(0,))
    out = acts if spelling == "same" else acts / "."
    shards_before = sorted(path.name for path in acts.iterdir())

    with pytest.raises(InvalidInputError, match=r"is the activations folder"):
        fit(acts, out)

    assert sorted(path.name for path in acts.iterdir()) == shards_before


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"Cs": [1.0, 0.0]}, r"invalid C 0\.0"),
        ({"Cs": [float("nan")]}, r"invalid C nan"),
        ({"Cs": []}, r"invalid grid of C"),
        ({"tol": -1.0}, r"invalid tol -1\.0"),
        ({"max_iter": 0}, r"invalid max_iter 0"),
        ({"n_jobs": 0}, r"invalid n_jobs 0"),
        ({"solver": "newton"}, r"unknown solver 'newton'; valid solvers: .*lbfgs"),
        ({"device": "tpu"}, r"invalid device 'tpu'"),
    ],
)
def test_invalid_settings(tmp_path: Path, kwargs: dict[str, Any], match: str) -> None:
    write_series(tmp_path / "acts", steps=(0,))
    with pytest.raises(InvalidInputError, match=match):
        fit(tmp_path / "acts", tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_not_converged_is_marked_and_warned(tmp_path: Path) -> None:
    write_series(tmp_path / "acts", steps=(0,))

    with pytest.warns(
        ConvergenceWarning, match=r"2 of 2 probes did not converge.*max_iter=1"
    ):
        summary = fit(tmp_path / "acts", tmp_path / "out", Cs=[1.0, 10.0], max_iter=1)
    entry = site_entry(read_report(tmp_path / "out" / "step_0.json"), "fc")

    assert summary.n_not_converged == 2
    assert entry["solver"]["converged"] is False
    assert entry["converged_by_C"] == [False, False]
    assert entry["convergence_warnings"] == 2
    assert any("ConvergenceWarning" in note for note in entry["warnings"])


def test_not_converged_warning_names_probes(tmp_path: Path) -> None:
    write_series(tmp_path / "acts", steps=(0, 10, 20))

    with pytest.warns(ConvergenceWarning) as caught:
        summary = fit(
            tmp_path / "acts",
            tmp_path / "out",
            Cs=[1.0],
            max_iter=1,
            warm_start=False,
        )
    message = str(caught[0].message)

    assert summary.not_converged == [
        ("step_0", "input"),
        ("step_0", "fc"),
        ("step_10", "input"),
        ("step_10", "fc"),
        ("step_20", "input"),
        ("step_20", "fc"),
    ]
    assert "6 of 6 probes did not converge (input at step_0, fc at step_0," in message
    assert "input at step_20, and 1 more)" in message


def test_auto_records_pick_and_reason(tmp_path: Path) -> None:
    write_series(tmp_path / "acts", steps=(0,))
    fit(tmp_path / "acts", tmp_path / "out", solver="auto", Cs=[1.0])
    report = read_report(tmp_path / "out" / "step_0.json")
    record = site_entry(report, "fc")["solver"]

    assert report["fit"]["solver"] == "auto"
    assert record["name"] == "lbfgs"
    assert "in memory" in record["picked_because"]
    assert record["stop_reason"] == "converged"


def test_n_jobs_1_and_2_identical(tmp_path: Path) -> None:
    write_series(tmp_path / "acts")
    one = fit(tmp_path / "acts", tmp_path / "one", Cs=[0.1, 1.0], n_jobs=1)
    two = fit(tmp_path / "acts", tmp_path / "two", Cs=[0.1, 1.0], n_jobs=2)

    assert one.ok
    assert two.ok
    for name in ("step_0.json", "step_10.json", "step_20.json"):
        first = strip_times(json.loads((tmp_path / "one" / name).read_text()))
        second = strip_times(json.loads((tmp_path / "two" / name).read_text()))
        assert first == second


def test_early_stopping_passed_through(tmp_path: Path) -> None:
    labels, split = toy_targets()
    values = toy_activations(labels, 5, seed=12)
    write_shard(tmp_path / "acts", "step_0", 0, {"input": values})
    no_val = np.where(split == 1, 0, split).astype(np.uint8)
    write_shard(tmp_path / "acts", "step_1", 1, {"input": values}, split=no_val)

    # A probe that early stopping returned reports converged: false and its
    # stop reason, and is counted apart, without a ConvergenceWarning.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        summary = fit(
            tmp_path / "acts", tmp_path / "out", Cs=[1.0], early_stopping=True
        )
    with_val = read_report(tmp_path / "out" / "step_0.json")
    without_val = read_report(tmp_path / "out" / "step_1.json")
    entries = [site_entry(report, "input") for report in (with_val, without_val)]
    reasons = [entry["solver"]["stop_reason"] for entry in entries]

    assert summary.ok
    assert reasons == ["early_stopped", "converged"]
    assert entries[0]["solver"]["converged"] is False
    assert summary.n_stopped_early == 1
    assert summary.n_not_converged == 0
    assert caught == []
    assert with_val["fit"]["early_stopping"] is True
    assert site_entry(with_val, "input")["status"] == "ok"
    assert site_entry(without_val, "input")["status"] == "ok"
    assert "early stopping was off" in " ".join(
        site_entry(without_val, "input")["warnings"]
    )


def test_class_note_lists_ten_missing_classes() -> None:
    from probecvx.probe import _class_notes

    names = [f"c{code}" for code in range(30)]
    y_train = np.array([0, 1, 2, 3, 4, 5, 6, 7])

    (note,) = _class_notes(y_train, names)

    assert note.startswith("22 of 30 classes have no train rows ('c8', 'c9', ")
    assert "'c17' and 12 more); the probe never predicts them" in note
    assert "'c18'" not in note


def test_class_without_train_rows_warns_once(tmp_path: Path) -> None:
    labels, split = toy_targets()
    # Every eel row of train moves to test, so no probe trains on an eel.
    split = np.where((labels == 2) & (split == 0), 2, split).astype(np.uint8)
    for index, step in enumerate((0, 10)):
        sites = {
            "input": toy_activations(labels, 5, seed=1, shift=0.05 * index),
            "fc": toy_activations(labels, 4, seed=2, shift=0.05 * index),
        }
        write_shard(tmp_path / "acts", f"step_{step}", step, sites, split=split)

    with pytest.warns(SplitWarning, match="classes without train rows") as caught:
        summary = fit(tmp_path / "acts", tmp_path / "out")

    assert summary.ok
    assert sorted(summary.no_train_rows) == [
        ("step_0", "fc"),
        ("step_0", "input"),
        ("step_10", "fc"),
        ("step_10", "input"),
    ]
    messages = [str(w.message) for w in caught if "train rows" in str(w.message)]
    assert len(messages) == 1
    assert messages[0].startswith(
        "4 of 4 probes fitted, at 2 checkpoints, have classes without train rows"
    )
    assert "1 of 3 classes at step_0: 'eel'" in messages[0]
    assert "--split" in messages[0]


def test_all_classes_in_train_no_warning(tmp_path: Path) -> None:
    write_series(tmp_path / "acts", steps=(0,))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = fit(tmp_path / "acts", tmp_path / "out")

    assert summary.no_train_rows == []
