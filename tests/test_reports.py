"""Tests of probecvx.reports: schema validation, readers and the table of results."""

from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from probecvx.atomic import TEMP_PREFIX
from probecvx.errors import InvalidInputError, ReportError
from probecvx.reports import (
    INDEX_NAME,
    TABLE_KEYS,
    list_reports,
    load_dataframe,
    load_table,
    read_index,
    read_report,
    validate_report,
    write_report,
)
from tests.test_fit import fit, toy_activations, toy_targets, write_series, write_shard


@pytest.fixture(scope="module")
def reports_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A reports folder of three checkpoints; site ``fc`` fails at step 10."""
    root = tmp_path_factory.mktemp("reports")
    acts = root / "acts"
    write_series(acts, steps=(20, 0))
    labels, _ = toy_targets()
    broken = toy_activations(labels, 4, seed=2)
    broken[0, 0] = np.nan
    sites = {"input": toy_activations(labels, 5, seed=1), "fc": broken}
    write_shard(acts, "step_10", 10, sites)
    fit(acts, root / "out", Cs=[0.1, 1.0])
    return root / "out"


@pytest.fixture
def report(reports_dir: Path) -> dict[str, Any]:
    return read_report(reports_dir / "step_0.json")


def test_written_reports_validate(reports_dir: Path) -> None:
    paths = list_reports(reports_dir)
    assert [path.name for path in paths] == [
        "step_0.json",
        "step_10.json",
        "step_20.json",
    ]
    index = read_index(reports_dir / INDEX_NAME)
    assert [entry["checkpoint"] for entry in index["checkpoints"]] == [
        "step_0",
        "step_10",
        "step_20",
    ]
    assert [entry["status"] for entry in index["checkpoints"]] == [
        "ok",
        "partial",
        "ok",
    ]


def test_report_provenance(report: dict[str, Any]) -> None:
    assert report["checkpoint"] == {
        "name": "step_0",
        "path": "/runs/ckpt/step_0.pt",
        "kind": "state_dict",
        "step": 0,
        "sha256": "ab" * 32,
    }
    assert report["dataset"]["split_sizes"] == {"train": 90, "val": 30, "test": 30}
    assert report["shard"]["shard_id"] == "shard-step_0"
    assert report["fit"]["Cs"] == [0.1, 1.0]
    assert report["fit"]["solver"] == "lbfgs"
    assert report["versions"]["numpy"] == np.__version__


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda doc: doc.pop("sites"), r"'sites' is a required property"),
        (lambda doc: doc["sites"][0].update(C=-1.0), r"at 'sites/0/C'"),
        (lambda doc: doc["sites"][0]["test"].update(error=1.5), r"sites/0/test/error"),
        (lambda doc: doc["sites"][0].update(status="done"), r"sites/0/status"),
        (lambda doc: doc["sites"][0].update(extra=1), r"'extra' was unexpected"),
        (lambda doc: doc["sites"][0].update(error="boom"), r"at 'sites/0/error'"),
        (lambda doc: doc["checkpoint"].update(step="ten"), r"checkpoint/step"),
        (lambda doc: doc.update(format="other"), r"not a probecvx report"),
    ],
)
def test_schema_rejects_broken_report(
    report: dict[str, Any], change: Any, match: str
) -> None:
    broken = copy.deepcopy(report)
    change(broken)
    with pytest.raises(ReportError, match=match):
        validate_report(broken, "broken.json")


def test_write_rejects_nan_and_writes_nothing(
    report: dict[str, Any], tmp_path: Path
) -> None:
    broken = copy.deepcopy(report)
    broken["sites"][0]["train"]["loss"] = float("nan")
    path = tmp_path / "step_0.json"
    with pytest.raises(ReportError, match=r"NaN or infinite number at 'sites/0/train"):
        write_report(path, broken)
    assert list(tmp_path.iterdir()) == []


def test_read_rejects_bad_files(report: dict[str, Any], tmp_path: Path) -> None:
    not_json = tmp_path / "a.json"
    not_json.write_text('{"format": ')
    with pytest.raises(ReportError, match=r"a\.json is not valid JSON"):
        read_report(not_json)

    with_nan = tmp_path / "b.json"
    with_nan.write_text(json.dumps(report).replace("0.1,", "NaN,", 1))
    with pytest.raises(ReportError, match=r"b\.json is not valid JSON"):
        read_report(with_nan)

    newer = tmp_path / "c.json"
    newer.write_text(json.dumps({**report, "schema_version": 2}))
    with pytest.raises(
        ReportError, match=r"c\.json has schema_version 2.*probecvx fit"
    ):
        read_report(newer)

    with pytest.raises(ReportError, match=r"d\.json not found"):
        read_report(tmp_path / "d.json")


def test_no_nan_in_json(tmp_path: Path) -> None:
    # No test rows: the test metrics and chance error cannot be measured.
    labels, split = toy_targets()
    split = np.where(split == 2, 0, split).astype(np.uint8)
    sites = {"input": toy_activations(labels, 4, seed=3)}
    write_shard(tmp_path / "acts", "step_0", 0, sites, split=split)
    fit(tmp_path / "acts", tmp_path / "out", solver="sklearn-lbfgs", Cs=[1.0])

    text = (tmp_path / "out" / "step_0.json").read_text()
    entry = read_report(tmp_path / "out" / "step_0.json")["sites"][0]
    assert "NaN" not in text
    assert "Infinity" not in text
    assert entry["test"] == {"error": None, "loss": None}
    assert entry["chance_error"] is None
    assert entry["solver"]["grad_norm"] is None  # scikit-learn does not report it


def test_load_table_keys_and_order(reports_dir: Path) -> None:
    table = load_table(reports_dir)

    assert all(tuple(record) == TABLE_KEYS for record in table)
    assert [(r["step"], r["site"]) for r in table] == [
        (0, "input"),
        (0, "fc"),
        (10, "input"),
        (10, "fc"),
        (20, "input"),
        (20, "fc"),
    ]
    assert [r["site_order"] for r in table[:2]] == [0, 1]
    failed = table[3]
    assert failed["status"] == "failed"
    assert "NaN" in failed["error"]
    assert failed["C"] is None
    assert failed["converged"] is None
    assert failed["solver"] == "lbfgs"
    ok = table[0]
    assert ok["status"] == "ok"
    assert ok["C"] in (0.1, 1.0)
    assert ok["converged"] is True
    assert 0.0 <= ok["test_error"] <= 1.0
    assert ok["chance_error"] == pytest.approx(2 / 3)


def test_list_reports_skips_index_and_temp_files(reports_dir: Path) -> None:
    (reports_dir / f"{TEMP_PREFIX}step_5.json.x").write_text("{}")
    try:
        names = [path.name for path in list_reports(reports_dir)]
    finally:
        (reports_dir / f"{TEMP_PREFIX}step_5.json.x").unlink()
    assert INDEX_NAME not in names
    assert len(names) == 3


def test_load_table_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"does not exist"):
        load_table(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInputError, match=r"contains no report.*probecvx fit"):
        load_table(tmp_path / "empty")


def copy_reports(reports_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "reports"
    shutil.copytree(reports_dir, copy)
    return copy


def test_load_table_skips_other_json(reports_dir: Path, tmp_path: Path) -> None:
    copy = copy_reports(reports_dir, tmp_path)
    (copy / "config.json").write_text('{"lr": 0.1}')
    (copy / "list.json").write_text("[1, 2]")
    (copy / "notes.json").write_text("not json")

    with pytest.warns(UserWarning) as caught:
        table = load_table(copy)
    messages = sorted(str(warning.message) for warning in caught)

    assert table == load_table(reports_dir)
    assert len(messages) == 3
    assert "config.json: it is not a probecvx report" in messages[0]
    assert "its format is None, not 'probecvx-report'" in messages[0]
    assert "list.json: it is not a probecvx report" in messages[1]
    assert "a JSON list, not an object" in messages[1]
    assert "notes.json: it is not a probecvx report" in messages[2]
    assert f"not valid JSON and {INDEX_NAME} does not list it" in messages[2]


def test_load_table_skips_corrupt_report(reports_dir: Path, tmp_path: Path) -> None:
    copy = copy_reports(reports_dir, tmp_path)
    (copy / "step_10.json").write_text('{"format": "probecvx-rep')

    with pytest.warns(UserWarning) as caught:
        table = load_table(copy)
    message = str(caught[0].message)

    assert len(caught) == 1
    assert {record["checkpoint"] for record in table} == {"step_0", "step_20"}
    assert f"skipped {copy / 'step_10.json'}" in message
    assert "left out of the table" in message
    assert "is not valid JSON" in message
    assert f"Re-run `probecvx fit ACTS_DIR --out {copy}`" in message
    assert "delete it" not in message


def test_load_table_corrupt_without_index(reports_dir: Path, tmp_path: Path) -> None:
    copy = copy_reports(reports_dir, tmp_path)
    (copy / INDEX_NAME).unlink()
    broken = json.loads((copy / "step_0.json").read_text())
    broken["schema_version"] = 2
    (copy / "step_0.json").write_text(json.dumps(broken))
    (copy / "step_10.json").write_text("{")

    with pytest.warns(UserWarning) as caught:
        table = load_table(copy)
    messages = sorted(str(warning.message) for warning in caught)

    assert {record["checkpoint"] for record in table} == {"step_20"}
    assert len(messages) == 2
    assert "step_0.json, so its checkpoint is left out" in messages[0]
    assert "schema_version 2" in messages[0]
    assert "step_10.json, so its checkpoint is left out" in messages[1]
    assert all("Re-run `probecvx fit" in message for message in messages)


def test_load_table_fails_when_all_skipped(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "step_1.json").write_text("{")

    with (
        pytest.warns(UserWarning),
        pytest.raises(
            InvalidInputError,
            match=r"no readable report: all 2 \.json files were skipped "
            r"\(config\.json, step_1\.json\); run `probecvx fit",
        ),
    ):
        load_table(tmp_path)


def test_load_dataframe_without_pandas(
    reports_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match=r"pip install pandas"):
        load_dataframe(reports_dir)
