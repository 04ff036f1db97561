"""Tests of the HDF5 shard layout: writer, readers, errors and listing."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from probecvx.atomic import TEMP_PREFIX
from probecvx.errors import (
    ExtractionError,
    InvalidInputError,
    ShardError,
    SiteError,
)
from probecvx.shards import (
    CHUNK_BYTES,
    SHARD_FORMAT,
    SHARD_SCHEMA_VERSION,
    ShardWriter,
    list_shards,
    read_shard_info,
    read_site,
    read_targets,
)

N_SAMPLES = 11


def shard_attrs(name: str = "step_5", step: int = 5) -> dict[str, str | int]:
    return {
        "checkpoint_name": name,
        "checkpoint_path": f"/runs/{name}.pt",
        "checkpoint_kind": "state_dict",
        "step": step,
        "checkpoint_sha256": "c" * 64,
        "dataset_name": "tiny.npz",
        "dataset_fingerprint": "f" * 64,
        "settings_json": json.dumps({"pooling": "none"}),
        "settings_hash": "s" * 64,
        "shard_id": f"id-{name}",
        "storage_dtype": "float32",
        "pooling": "none",
    }


def write_shard(
    path: Path,
    sites: dict[str, np.ndarray],
    *,
    step: int = 5,
    dtype: str = "float32",
    block: int = 4,
) -> None:
    n = next(iter(sites.values())).shape[0] if sites else N_SAMPLES
    with ShardWriter(
        path,
        attrs=shard_attrs(path.stem, step),
        labels=np.arange(n) % 3,
        class_names=["cat", "dog", "émeu"],
        split=np.arange(n) % 3,
        sample_ids=np.arange(n) + 100,
    ) as writer:
        for name, values in sites.items():
            writer.create_site(
                name,
                values.shape[1],
                dtype,
                {"site": name, "module_type": "Linear", "original_shape": [2, 3]},
            )
        for name, values in sites.items():
            for start in range(0, n, block):
                writer.write_rows(name, start, values[start : start + block])


def leftover_files(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


@pytest.fixture
def site_values() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "input": rng.standard_normal((N_SAMPLES, 6)).astype(np.float32),
        "features.0:2": rng.standard_normal((N_SAMPLES, 3)).astype(np.float32),
    }


def test_round_trip_attributes(tmp_path: Path, site_values) -> None:
    path = tmp_path / "step_5.h5"
    write_shard(path, site_values)

    info = read_shard_info(path)
    assert info.path == path
    assert info.checkpoint_name == "step_5"
    assert info.checkpoint_kind == "state_dict"
    assert info.step == 5
    assert info.shard_id == "id-step_5"
    assert info.sites == ["input", "features.0:2"]
    assert info.n_samples == N_SAMPLES
    assert info.class_names == ["cat", "dog", "émeu"]
    assert info.storage_dtype == "float32"
    assert info.attrs["format"] == SHARD_FORMAT
    assert info.attrs["schema_version"] == SHARD_SCHEMA_VERSION
    assert json.loads(info.attrs["sites_json"]) == ["input", "features.0:2"]
    assert info.site_attrs["features.0:2"]["n_features"] == 3
    assert info.site_attrs["input"]["original_shape"] == [2, 3]
    assert info.site_attrs["input"]["module_type"] == "Linear"


def test_round_trip_values(tmp_path: Path, site_values) -> None:
    path = tmp_path / "step_5.h5"
    write_shard(path, site_values)

    for name, values in site_values.items():
        stored = read_site(path, name)
        assert stored.dtype == np.float32
        np.testing.assert_array_equal(stored, values)
    labels, split, sample_ids = read_targets(path)
    assert labels.dtype == np.int64
    assert split.dtype == np.uint8
    np.testing.assert_array_equal(labels, np.arange(N_SAMPLES) % 3)
    np.testing.assert_array_equal(split, np.arange(N_SAMPLES) % 3)
    np.testing.assert_array_equal(sample_ids, np.arange(N_SAMPLES) + 100)


def test_read_site_selected_rows(tmp_path: Path, site_values, monkeypatch) -> None:
    path = tmp_path / "step_5.h5"
    write_shard(path, site_values)
    # Small read blocks so that the selection spans several blocks.
    monkeypatch.setattr("probecvx.shards.READ_BLOCK_BYTES", 1)

    rows = np.array([9, 0, 4, 4, 10, 1])
    stored = read_site(path, "input", rows=rows)
    np.testing.assert_array_equal(stored, site_values["input"][rows])
    assert read_site(path, "input", rows=np.array([], dtype=int)).shape == (0, 6)
    np.testing.assert_array_equal(read_site(path, "input"), site_values["input"])


def test_read_site_rejects_bad_rows(tmp_path: Path, site_values) -> None:
    path = tmp_path / "step_5.h5"
    write_shard(path, site_values)

    with pytest.raises(InvalidInputError, match=r"row indices must lie in \[0, 11\)"):
        read_site(path, "input", rows=np.array([0, 11]))
    with pytest.raises(InvalidInputError, match="integer indices"):
        read_site(path, "input", rows=np.array([0.5]))


def test_read_site_unknown_site(tmp_path: Path, site_values) -> None:
    path = tmp_path / "step_5.h5"
    write_shard(path, site_values)

    with pytest.raises(SiteError, match=r"'fc3' is not in shard .*features\.0:2"):
        read_site(path, "fc3")


def test_float16_storage(tmp_path: Path) -> None:
    path = tmp_path / "half.h5"
    values = np.linspace(-3, 3, N_SAMPLES * 2, dtype=np.float32).reshape(-1, 2)
    write_shard(path, {"input": values}, dtype="float16")

    stored = read_site(path, "input")
    assert stored.dtype == np.float16
    np.testing.assert_array_equal(stored, values.astype(np.float16))


def test_chunks_hold_about_one_mebibyte(tmp_path: Path) -> None:
    path = tmp_path / "wide.h5"
    values = np.zeros((600, 1000), dtype=np.float32)
    write_shard(path, {"wide": values}, block=600)

    with h5py.File(path, "r") as file:
        chunks = file["sites/wide"].chunks
    assert chunks == (CHUNK_BYTES // 4000, 1000)


def test_incomplete_site_commits_nothing(tmp_path: Path) -> None:
    path = tmp_path / "step_5.h5"
    with (
        pytest.raises(ExtractionError, match="site 'input' has 4 of 11 rows"),
        ShardWriter(
            path,
            attrs=shard_attrs(),
            labels=np.zeros(N_SAMPLES),
            class_names=["a", "b"],
            split=np.zeros(N_SAMPLES),
            sample_ids=np.arange(N_SAMPLES),
        ) as writer,
    ):
        writer.create_site("input", 2, "float32", {})
        writer.write_rows("input", 0, np.zeros((4, 2), dtype=np.float32))
    assert leftover_files(tmp_path) == []


def test_rows_must_arrive_in_order(tmp_path: Path) -> None:
    path = tmp_path / "step_5.h5"
    with (
        pytest.raises(ValueError, match="next row is 0, got start=4"),
        ShardWriter(
            path,
            attrs=shard_attrs(),
            labels=np.zeros(N_SAMPLES),
            class_names=["a", "b"],
            split=np.zeros(N_SAMPLES),
            sample_ids=np.arange(N_SAMPLES),
        ) as writer,
    ):
        writer.create_site("input", 2, "float32", {})
        writer.write_rows("input", 4, np.zeros((4, 2), dtype=np.float32))
    assert leftover_files(tmp_path) == []


def test_exception_keeps_previous_shard(tmp_path: Path, site_values) -> None:
    path = tmp_path / "step_5.h5"
    write_shard(path, site_values)
    before = path.read_bytes()

    with (
        pytest.raises(RuntimeError, match="killed"),
        ShardWriter(
            path,
            attrs=shard_attrs(),
            labels=np.zeros(N_SAMPLES),
            class_names=["a", "b"],
            split=np.zeros(N_SAMPLES),
            sample_ids=np.arange(N_SAMPLES),
        ) as writer,
    ):
        writer.create_site("input", 2, "float32", {})
        raise RuntimeError("killed")
    assert path.read_bytes() == before
    assert leftover_files(tmp_path) == ["step_5.h5"]


def test_disk_full_leaves_no_file(tmp_path: Path, site_values, monkeypatch) -> None:
    def no_space(self, key, value) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(h5py.Dataset, "__setitem__", no_space)
    path = tmp_path / "step_5.h5"
    with pytest.raises(ExtractionError) as excinfo:
        write_shard(path, site_values)

    message = str(excinfo.value)
    assert f"could not write shard {path}" in message
    assert "the disk is full" in message
    assert "MiB free" in message
    assert leftover_files(tmp_path) == []


def test_missing_required_attrs() -> None:
    attrs = shard_attrs()
    del attrs["shard_id"]
    with pytest.raises(ValueError, match="missing shard_id"):
        ShardWriter(
            Path("unused.h5"),
            attrs=attrs,
            labels=np.zeros(3),
            class_names=["a"],
            split=np.zeros(3),
            sample_ids=np.arange(3),
        )


def test_not_hdf5_is_shard_error(tmp_path: Path) -> None:
    path = tmp_path / "junk.h5"
    path.write_bytes(b"this is not an HDF5 file")
    with pytest.raises(ShardError, match=r"junk.h5: not an HDF5 file or truncated"):
        read_shard_info(path)


def test_truncated_shard_is_shard_error(tmp_path: Path, site_values) -> None:
    path = tmp_path / "step_5.h5"
    write_shard(path, site_values)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(ShardError, match=r"step_5\.h5"):
        read_shard_info(path)


def test_missing_shard_is_shard_error(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match="not found; run `probecvx extract`"):
        read_shard_info(tmp_path / "absent.h5")


def test_foreign_hdf5_is_shard_error(tmp_path: Path) -> None:
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as file:
        file["x"] = np.zeros(3)
    with pytest.raises(ShardError, match="not a probecvx shard"):
        read_shard_info(path)


def test_other_schema_version(tmp_path: Path, site_values) -> None:
    path = tmp_path / "step_5.h5"
    write_shard(path, site_values)
    with h5py.File(path, "a") as file:
        file.attrs["schema_version"] = 0

    with pytest.raises(
        ShardError, match=r"schema_version 0.*re-run `probecvx extract`"
    ):
        read_shard_info(path)


@pytest.mark.parametrize("dataset", ["labels", "sample_ids", "sites/input"])
def test_missing_dataset(tmp_path: Path, site_values, dataset: str) -> None:
    path = tmp_path / "step_5.h5"
    write_shard(path, site_values)
    with h5py.File(path, "a") as file:
        del file[dataset]

    with pytest.raises(ShardError, match=f"has no dataset /{dataset}"):
        read_shard_info(path)


def test_unknown_step_reads_as_none(tmp_path: Path, site_values) -> None:
    path = tmp_path / "final.h5"
    write_shard(path, site_values, step=-1)
    assert read_shard_info(path).step is None


def test_list_shards_order(tmp_path: Path, site_values) -> None:
    for name, step in [("b", 20), ("final", -1), ("a10", 5), ("a2", 5), ("best", -1)]:
        write_shard(tmp_path / f"{name}.h5", site_values, step=step)
    (tmp_path / f"{TEMP_PREFIX}c.h5.x1y2").write_bytes(b"partial")
    (tmp_path / f"{TEMP_PREFIX}d.h5").write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("not a shard")

    names = [path.name for path in list_shards(tmp_path)]
    assert names == ["a2.h5", "a10.h5", "b.h5", "best.h5", "final.h5"]


def test_list_shards_empty_and_missing(tmp_path: Path) -> None:
    assert list_shards(tmp_path) == []
    with pytest.raises(InvalidInputError, match="absent does not exist"):
        list_shards(tmp_path / "absent")
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidInputError, match="is not a folder"):
        list_shards(tmp_path / "file")


def test_readers_close_the_file(tmp_path: Path, site_values) -> None:
    path = tmp_path / "step_5.h5"
    write_shard(path, site_values)

    read_shard_info(path)
    read_site(path, "input")
    read_site(path, "input", rows=np.array([1]))
    read_targets(path)
    list_shards(tmp_path)
    # HDF5 refuses to truncate a file that this process still has open.
    with h5py.File(path, "w"):
        pass
