"""Tests of dataset loading, label encoding, splitting and fingerprints."""

from __future__ import annotations

import gzip
import struct
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from probecvx.datasets import (
    SPLIT_CODES,
    ProbeDataset,
    load_dataset,
    parse_split,
    read_idx,
    small_split_warning,
    stratified_split,
)
from probecvx.errors import DatasetError, InvalidInputError

TRAIN, VAL, TEST = SPLIT_CODES["train"], SPLIT_CODES["val"], SPLIT_CODES["test"]


# --- helpers ----------------------------------------------------------------


def make_arrays(
    n: int = 60, n_features: int = 5, n_classes: int = 3, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, n_features)).astype(np.float32)
    y = np.arange(n) % n_classes
    return x, y


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim])
    header += b"".join(struct.pack(">I", size) for size in array.shape)
    return header + array.astype(">u1").tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    data = idx_bytes(array)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as handle:
            handle.write(data)
    else:
        path.write_bytes(data)
    return path


def write_idx_pair(
    folder: Path, prefix: str, n: int, seed: int, gz: bool
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 4, 3), dtype=np.uint8)
    labels = (np.arange(n) % 4).astype(np.uint8)
    suffix = ".gz" if gz else ""
    write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    return images, labels


def write_module(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(body))
    return path


def collect_batches(dataset: ProbeDataset, batch_size: int) -> tuple[np.ndarray, ...]:
    rows, inputs = [], []
    for batch_rows, batch_inputs in dataset.iter_batches(batch_size):
        assert batch_inputs.dtype == torch.float32
        assert len(batch_rows) == len(batch_inputs) <= batch_size
        rows.append(batch_rows)
        inputs.append(batch_inputs.numpy())
    return np.concatenate(rows), np.concatenate(inputs)


# --- file formats -------------------------------------------------------------


def test_npz_round_trip(tmp_path: Path) -> None:
    x, y = make_arrays()
    path = write_npz(tmp_path / "data.npz", x=x, y=y)

    dataset = load_dataset(str(path))

    assert dataset.name == "data.npz"
    np.testing.assert_array_equal(dataset.inputs, x)
    assert dataset.inputs.dtype == np.float32
    np.testing.assert_array_equal(dataset.labels, y)
    assert dataset.labels.dtype == np.int64
    assert dataset.class_names == ["0", "1", "2"]
    assert dataset.split.dtype == np.uint8
    np.testing.assert_array_equal(dataset.sample_ids, np.arange(60))
    assert dataset.n_samples == 60
    assert dataset.n_classes == 3
    assert dataset.sample_shape == (5,)
    assert len(dataset.fingerprint) == 64


def test_npz_uppercase_x_and_split_names(tmp_path: Path) -> None:
    x, y = make_arrays(n=6)
    split = np.array(["train", "train", "val", "test", "train", "test"])
    path = write_npz(tmp_path / "data.npz", X=x, y=y, split=split)

    dataset = load_dataset(str(path))

    np.testing.assert_array_equal(dataset.inputs, x)
    np.testing.assert_array_equal(dataset.split, [0, 0, 1, 2, 0, 2])


def test_npz_custom_keys_and_split_codes(tmp_path: Path) -> None:
    x, y = make_arrays(n=6)
    codes = np.array([0, 1, 2, 0, 1, 2])
    path = write_npz(tmp_path / "data.npz", feats=x, target=y, part=codes)

    dataset = load_dataset(str(path), x_key="feats", y_key="target", split_key="part")

    np.testing.assert_array_equal(dataset.inputs, x)
    np.testing.assert_array_equal(dataset.labels, y)
    np.testing.assert_array_equal(dataset.split, codes)


def test_hdf5_round_trip_with_string_split(tmp_path: Path) -> None:
    x, y = make_arrays(n=6)
    split = ["train", "val", "test", "train", "val", "test"]
    path = tmp_path / "data.h5"
    with h5py.File(path, "w") as handle:
        handle["group/inputs"] = x
        handle["y"] = y
        handle.create_dataset("split", data=split, dtype=h5py.string_dtype())

    dataset = load_dataset(str(path), x_key="group/inputs")

    assert dataset.name == "data.h5"
    np.testing.assert_array_equal(dataset.inputs, x)
    np.testing.assert_array_equal(dataset.labels, y)
    np.testing.assert_array_equal(dataset.split, [0, 1, 2, 0, 1, 2])


def test_hdf5_and_npz_give_same_fingerprint(tmp_path: Path) -> None:
    x, y = make_arrays()
    npz = write_npz(tmp_path / "data.npz", x=x, y=y)
    h5 = tmp_path / "data.hdf5"
    with h5py.File(h5, "w") as handle:
        handle["x"] = x
        handle["y"] = y

    from_npz = load_dataset(str(npz))
    from_h5 = load_dataset(str(h5))

    np.testing.assert_array_equal(from_npz.split, from_h5.split)
    assert from_npz.fingerprint == from_h5.fingerprint


# --- IDX ------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = write_idx(tmp_path / ("a-images-idx3-ubyte" + (".gz" if gz else "")), images)

    values = read_idx(path)

    assert values.shape == (2, 3, 4)
    np.testing.assert_array_equal(values, images)


def test_read_idx_big_endian_int32(tmp_path: Path) -> None:
    values = np.array([1, -2, 70000], dtype=np.int32)
    data = (
        bytes([0, 0, 0x0C, 1]) + struct.pack(">I", 3) + values.astype(">i4").tobytes()
    )
    path = tmp_path / "values-idx1-ubyte"
    path.write_bytes(data)

    np.testing.assert_array_equal(read_idx(path), values)


def test_read_idx_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "x-images-idx3-ubyte"
    path.write_bytes(b"\x1f\x8b\x08\x03" + bytes(20))

    with pytest.raises(
        DatasetError, match=r"not an IDX file: invalid magic.*0x1F8B0803"
    ):
        read_idx(path)


def test_read_idx_truncated_data(tmp_path: Path) -> None:
    data = idx_bytes(np.zeros((3, 2, 2), dtype=np.uint8))
    path = tmp_path / "x-images-idx3-ubyte"
    path.write_bytes(data[:-1])

    with pytest.raises(DatasetError, match=r"truncated.*needs 12 bytes.*has 11"):
        read_idx(path)


def test_read_idx_truncated_header(tmp_path: Path) -> None:
    path = tmp_path / "x-images-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 0x08, 3, 0, 0]))

    with pytest.raises(DatasetError, match=r"truncated inside its 16-byte header"):
        read_idx(path)


def test_read_idx_trailing_bytes(tmp_path: Path) -> None:
    path = tmp_path / "x-labels-idx1-ubyte"
    path.write_bytes(idx_bytes(np.zeros(4, dtype=np.uint8)) + b"\x00\x00")

    with pytest.raises(DatasetError, match=r"has 2 bytes after the data"):
        read_idx(path)


def test_read_idx_corrupt_gzip(tmp_path: Path) -> None:
    path = tmp_path / "x-labels-idx1-ubyte.gz"
    path.write_bytes(b"not gzip at all")

    with pytest.raises(DatasetError, match=r"cannot read IDX file .*ubyte\.gz"):
        read_idx(path)


def test_idx_folder_keeps_own_split(tmp_path: Path) -> None:
    train_images, train_labels = write_idx_pair(tmp_path, "train", 40, 0, gz=True)
    test_images, test_labels = write_idx_pair(tmp_path, "t10k", 12, 1, gz=False)

    dataset = load_dataset(str(tmp_path), split=(0.6, 0.2, 0.2), seed=3)

    assert dataset.inputs.shape == (52, 1, 4, 3)
    assert dataset.inputs.dtype == np.float32
    expected = np.concatenate([train_images, test_images])[:, None] / 255.0
    np.testing.assert_allclose(dataset.inputs, expected, rtol=1e-6)
    np.testing.assert_array_equal(
        dataset.labels, np.concatenate([train_labels, test_labels])
    )
    # t10k rows are exactly the test rows; val is a quarter of train, per class.
    np.testing.assert_array_equal(dataset.split[40:], TEST)
    assert set(dataset.split[:40].tolist()) == {TRAIN, VAL}
    assert (dataset.split[:40] == VAL).sum() == 10
    for label in range(4):
        train_part = dataset.split[:40][train_labels == label]
        assert (train_part == VAL).sum() in (2, 3)


def test_idx_folder_single_pair_uses_fractions(tmp_path: Path) -> None:
    _, labels = write_idx_pair(tmp_path, "t10k", 40, 0, gz=True)

    dataset = load_dataset(str(tmp_path), split=(0.5, 0.25, 0.25))

    np.testing.assert_array_equal(dataset.labels, labels)
    assert np.bincount(dataset.split, minlength=3).tolist() == [20, 10, 10]


def test_idx_folder_prefers_uncompressed(tmp_path: Path) -> None:
    write_idx_pair(tmp_path, "train", 8, 0, gz=True)
    images, _ = write_idx_pair(tmp_path, "train", 8, 1, gz=False)

    dataset = load_dataset(str(tmp_path))

    np.testing.assert_allclose(dataset.inputs[:, 0], images / 255.0, rtol=1e-6)


def test_idx_folder_dotted_names(tmp_path: Path) -> None:
    images = np.zeros((6, 2, 2), np.uint8)
    write_idx(tmp_path / "train-images.idx3-ubyte", images)
    write_idx(tmp_path / "train-labels.idx1-ubyte", np.arange(6, dtype=np.uint8) % 2)

    dataset = load_dataset(str(tmp_path))

    assert dataset.inputs.shape == (6, 1, 2, 2)


def test_idx_folder_count_mismatch(tmp_path: Path) -> None:
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((5, 2, 2), np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(4, np.uint8))

    with pytest.raises(DatasetError, match=r"has 5 images but .* has 4 labels"):
        load_dataset(str(tmp_path))


def test_idx_folder_missing_labels(tmp_path: Path) -> None:
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((5, 2, 2), np.uint8))

    with pytest.raises(DatasetError, match=r"no matching train-labels-idx1-ubyte"):
        load_dataset(str(tmp_path))


def test_idx_folder_without_idx_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("nothing here")

    with pytest.raises(InvalidInputError, match=r"has no IDX files named"):
        load_dataset(str(tmp_path))


# --- built-in datasets ----------------------------------------------------------


def test_toy_is_linearly_separable() -> None:
    dataset = load_dataset("toy", n_samples=300, seed=5)

    assert dataset.inputs.shape == (300, 128)
    assert dataset.class_names == ["-1", "+1"]
    rng = np.random.default_rng(5)
    weights = rng.standard_normal(128)
    expected = (dataset.inputs.astype(np.float64) @ weights >= 0).astype(np.int64)
    np.testing.assert_array_equal(dataset.labels, expected)


def test_toy_depends_on_seed() -> None:
    first = load_dataset("toy", n_samples=100, seed=1)
    again = load_dataset("toy", n_samples=100, seed=1)
    other = load_dataset("toy", n_samples=100, seed=2)

    assert load_dataset("toy").n_samples == 2000
    np.testing.assert_array_equal(first.inputs, again.inputs)
    assert first.fingerprint == again.fingerprint
    assert not np.array_equal(first.inputs, other.inputs)
    assert first.fingerprint != other.fingerprint


def test_digits_shape_and_scale() -> None:
    dataset = load_dataset("digits")

    assert dataset.inputs.shape == (1797, 1, 8, 8)
    assert dataset.inputs.min() == 0.0
    assert dataset.inputs.max() == 1.0
    assert dataset.class_names == [str(digit) for digit in range(10)]


# --- callables --------------------------------------------------------------------


def test_callable_file_returning_tuple(tmp_path: Path) -> None:
    path = write_module(
        tmp_path / "mydata.py",
        """
        import numpy as np

        def load():
            x = np.arange(24, dtype=np.float64).reshape(6, 4)
            return x, ["b", "a", "b", "a", "b", "a"], [0, 0, 0, 1, 2, 2]
        """,
    )

    dataset = load_dataset(f"{path}:load")

    np.testing.assert_array_equal(dataset.inputs[:, 0], [0, 4, 8, 12, 16, 20])
    assert dataset.class_names == ["a", "b"]
    np.testing.assert_array_equal(dataset.labels, [1, 0, 1, 0, 1, 0])
    np.testing.assert_array_equal(dataset.split, [0, 0, 0, 1, 2, 2])


def test_callable_module_returning_dict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_module(
        tmp_path / "probecvx_test_dictdata.py",
        """
        import numpy as np

        def make():
            return {"inputs": np.ones((9, 2)), "y": np.arange(9) % 3}
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))

    dataset = load_dataset("probecvx_test_dictdata:make", x_key="inputs")

    assert dataset.name == "probecvx_test_dictdata:make"
    assert dataset.inputs.shape == (9, 2)
    assert dataset.n_classes == 3


TORCH_DATASET_MODULE = """
import torch
from torch.utils.data import Dataset

class Pairs(Dataset):
    def __init__(self, n, scale):
        self.n = n
        self.scale = scale

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        x = torch.full((2, 3), float(index) * self.scale)
        return x, torch.tensor(index % 2)

def small():
    return Pairs(10, 1.0)

def scaled():
    return Pairs(10, 2.0)
"""


def test_callable_returning_torch_dataset(tmp_path: Path) -> None:
    path = write_module(tmp_path / "pairs.py", TORCH_DATASET_MODULE)

    dataset = load_dataset(f"{path}:small")
    scaled = load_dataset(f"{path}:scaled")

    assert isinstance(dataset.inputs, torch.utils.data.Dataset)
    assert dataset.sample_shape == (2, 3)
    np.testing.assert_array_equal(dataset.labels, np.arange(10) % 2)
    rows, inputs = collect_batches(dataset, 3)
    np.testing.assert_array_equal(rows, np.arange(10))
    np.testing.assert_array_equal(inputs[:, 0, 0], np.arange(10))
    assert dataset.fingerprint != scaled.fingerprint


def test_torch_dataset_limit_uses_subset(tmp_path: Path) -> None:
    path = write_module(tmp_path / "pairs.py", TORCH_DATASET_MODULE)

    dataset = load_dataset(f"{path}:small", limit=6)

    assert dataset.n_samples == 6
    _, inputs = collect_batches(dataset, 4)
    np.testing.assert_array_equal(inputs[:, 0, 0], dataset.sample_ids)


def test_callable_dict_without_labels(tmp_path: Path) -> None:
    path = write_module(
        tmp_path / "nolabels.py",
        "import numpy as np\n\ndef load():\n    return {'x': np.ones((4, 2))}\n",
    )

    with pytest.raises(
        InvalidInputError, match=r"the dict returned by .*has no array named y or Y"
    ):
        load_dataset(f"{path}:load")


def test_toy_with_one_class() -> None:
    with pytest.raises(DatasetError, match=r"dataset 'toy' has only one class"):
        load_dataset("toy", n_samples=2, seed=3)


def test_callable_import_failure() -> None:
    with pytest.raises(InvalidInputError, match=r"cannot import module 'no_such_mod"):
        load_dataset("no_such_mod_xyz.data:load")


def test_callable_missing_attribute(tmp_path: Path) -> None:
    path = write_module(tmp_path / "empty.py", "VALUE = 1\n")

    with pytest.raises(InvalidInputError, match=r"has no callable 'load'"):
        load_dataset(f"{path}:load")


def test_callable_that_raises(tmp_path: Path) -> None:
    path = write_module(
        tmp_path / "broken.py", "def load():\n    raise RuntimeError('no disk')\n"
    )

    with pytest.raises(DatasetError, match=r"raised RuntimeError: no disk"):
        load_dataset(f"{path}:load")


def test_callable_returning_unusable_value(tmp_path: Path) -> None:
    path = write_module(tmp_path / "odd.py", "def load():\n    return 42\n")

    with pytest.raises(DatasetError, match=r"returned int; return \(x, y\)"):
        load_dataset(f"{path}:load")


def test_callable_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"dataset path not found: .*gone\.py"):
        load_dataset(f"{tmp_path / 'gone.py'}:load")


# --- input conversion and label encoding ----------------------------------------


def test_uint8_images_get_channel_axis_and_scale(tmp_path: Path) -> None:
    images = np.array([[[0, 255], [51, 102]]] * 4, dtype=np.uint8)
    path = write_npz(tmp_path / "img.npz", x=images, y=np.array([0, 1, 0, 1]))

    dataset = load_dataset(str(path))

    assert dataset.inputs.shape == (4, 1, 2, 2)
    np.testing.assert_allclose(dataset.inputs[0, 0], [[0.0, 1.0], [0.2, 0.4]])


def test_integer_inputs_are_not_scaled(tmp_path: Path) -> None:
    x = np.array([[0, 300], [2, -7], [5, 5], [1, 1]], dtype=np.int32)
    path = write_npz(tmp_path / "ints.npz", x=x, y=np.array([0, 1, 0, 1]))

    dataset = load_dataset(str(path))

    assert dataset.inputs.dtype == np.float32
    np.testing.assert_array_equal(dataset.inputs, x)


@pytest.mark.parametrize(
    ("labels", "names", "codes"),
    [
        (np.array([10, 3, 7, 3]), ["3", "7", "10"], [2, 0, 1, 0]),
        (np.array(["dog", "cat", "dog", "ant"]), ["ant", "cat", "dog"], [2, 1, 2, 0]),
        (np.array([1.0, -1.0, -1.0, 1.0]), ["-1.0", "1.0"], [1, 0, 0, 1]),
        (np.array([True, False, True, True]), ["False", "True"], [1, 0, 1, 1]),
    ],
)
def test_label_encoding(
    tmp_path: Path, labels: np.ndarray, names: list[str], codes: list[int]
) -> None:
    path = write_npz(tmp_path / "labels.npz", x=np.zeros((4, 2)), y=labels)

    dataset = load_dataset(str(path), split=(1.0, 0.0, 0.0))

    assert dataset.class_names == names
    np.testing.assert_array_equal(dataset.labels, codes)


@pytest.mark.parametrize(
    ("y_key", "source"), [("y", "array 'y'"), ("target", "array 'target'")]
)
def test_continuous_labels_rejected(tmp_path: Path, y_key: str, source: str) -> None:
    labels = np.random.default_rng(0).normal(size=600)
    path = write_npz(tmp_path / "reg.npz", x=np.zeros((600, 2)), **{y_key: labels})

    with pytest.raises(DatasetError) as caught:
        load_dataset(str(path), y_key=y_key)
    message = str(caught.value)

    assert isinstance(caught.value, InvalidInputError)
    assert f"dataset 'reg.npz': the labels ({source}) are floats" in message
    assert "in 600 of 600 rows" in message
    assert f"(first: {float(labels[0])!r} in row 0)" in message
    assert "must be integer class ids or strings" in message


def test_continuous_labels_from_callable(tmp_path: Path) -> None:
    module = tmp_path / "regression_data.py"
    module.write_text(
        "import numpy as np\n"
        "def load():\n"
        "    return np.zeros((4, 2)), np.array([0.0, 1.0, 0.5, 1.0])\n"
    )

    with pytest.raises(
        DatasetError,
        match=r"the labels \(y, the second item of the returned tuple\) are "
        r"floats with a fractional part in 1 of 4 rows \(first: 0\.5 in row 2\)",
    ):
        load_dataset(f"{module}:load")


def test_whole_float_labels_accepted(tmp_path: Path) -> None:
    labels = np.array([2.0, 0.0, 1.0, 2.0, 0.0, 1.0])
    path = write_npz(tmp_path / "ids.npz", x=np.zeros((6, 2)), y=labels)

    dataset = load_dataset(str(path), split=(1.0, 0.0, 0.0))

    assert dataset.class_names == ["0.0", "1.0", "2.0"]
    np.testing.assert_array_equal(dataset.labels, [2, 0, 1, 2, 0, 1])


# --- split --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_rows", "n_classes", "split", "small"),
    [
        (7, 2, (0.6, 0.2, 0.2), "2 val rows and 2 test rows (train/val/test 3/2/2"),
        (60, 2, (0.8, 0.1, 0.1), "6 val rows and 6 test rows (train/val/test 48/6/6"),
    ],
)
def test_small_split_warning(
    tmp_path: Path,
    n_rows: int,
    n_classes: int,
    split: tuple[float, float, float],
    small: str,
) -> None:
    x, y = make_arrays(n=n_rows, n_classes=n_classes)
    path = write_npz(tmp_path / "small.npz", x=x, y=y)

    warning = small_split_warning(load_dataset(str(path), split=split))

    assert warning is not None
    assert warning.startswith(f"dataset 'small.npz' has only {small}")
    assert "unreliable" in warning
    assert "--split" in warning


def test_small_split_fewer_rows_than_classes(tmp_path: Path) -> None:
    x, y = make_arrays(n=200, n_classes=20)
    split = np.repeat(["train", "val", "test"], [150, 35, 15])
    path = write_npz(tmp_path / "own.npz", x=x, y=y, split=split)

    warning = small_split_warning(load_dataset(str(path)))

    assert warning is not None
    assert warning.startswith(
        "dataset 'own.npz' has only 15 test rows (train/val/test 150/35/15 rows, "
        "20 classes)"
    )


@pytest.mark.parametrize(
    ("n_rows", "split"), [(50, (0.6, 0.2, 0.2)), (20, (1.0, 0.0, 0.0))]
)
def test_no_small_split_warning(
    tmp_path: Path, n_rows: int, split: tuple[float, float, float]
) -> None:
    x, y = make_arrays(n=n_rows, n_classes=2)
    path = write_npz(tmp_path / "data.npz", x=x, y=y)

    assert small_split_warning(load_dataset(str(path), split=split)) is None


def test_stratified_split_is_deterministic() -> None:
    labels = np.repeat(np.arange(5), 30)

    first = stratified_split(labels, (0.6, 0.2, 0.2), seed=7)
    again = stratified_split(labels, (0.6, 0.2, 0.2), seed=7)
    other = stratified_split(labels, (0.6, 0.2, 0.2), seed=8)

    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert first.dtype == np.uint8


def test_stratified_split_per_class_counts() -> None:
    labels = np.array(["a"] * 50 + ["b"] * 20 + ["c"] * 3 + ["d"] * 2 + ["e"])

    split = stratified_split(labels, (0.6, 0.2, 0.2), seed=0)

    def counts(name: str) -> list[int]:
        return np.bincount(split[labels == name], minlength=3).tolist()

    assert counts("a") == [30, 10, 10]
    assert counts("b") == [12, 4, 4]
    assert counts("c") == [1, 1, 1]
    assert sum(counts("d")) == 2
    assert sum(counts("e")) == 1
    totals = np.bincount(split, minlength=3)
    np.testing.assert_allclose(totals, [45.6, 15.2, 15.2], atol=1.0)


def test_stratified_split_random_label_sets() -> None:
    rng = np.random.default_rng(0)
    for trial in range(200):
        sizes = rng.integers(3, 40, size=int(rng.integers(2, 12)))
        labels = np.repeat(np.arange(len(sizes)), sizes)
        train = float(rng.uniform(0.3, 0.8))
        val = float(rng.uniform(0.0, 1.0 - train))
        fractions = (train, val, 1.0 - train - val)

        split = stratified_split(labels, fractions, seed=trial)

        for label, size in enumerate(sizes):
            counts = np.bincount(split[labels == label], minlength=3)
            assert counts.sum() == size
            assert counts.min() >= 1, (trial, size, fractions, counts)
            shares = size * np.array(fractions)
            if shares.min() >= 1:
                assert np.abs(counts - shares).max() < 2.5, (trial, counts, shares)


def test_stratified_split_zero_fraction_is_empty() -> None:
    labels = np.repeat(np.arange(3), 10)

    split = stratified_split(labels, (0.7, 0.0, 0.3), seed=0)

    assert not (split == VAL).any()
    assert np.bincount(split, minlength=3).tolist() == [21, 0, 9]


def test_own_split_without_val_gets_val_from_train(tmp_path: Path) -> None:
    x, y = make_arrays(n=40, n_classes=2)
    split = np.array(["train"] * 30 + ["test"] * 10)
    path = write_npz(tmp_path / "data.npz", x=x, y=y, split=split)

    dataset = load_dataset(str(path), split=(0.6, 0.2, 0.2))
    no_val = load_dataset(str(path), split=(0.8, 0.0, 0.2))

    np.testing.assert_array_equal(dataset.split[30:], TEST)
    assert (dataset.split[:30] == VAL).sum() in (7, 8)
    assert (dataset.split[:30] == TRAIN).sum() + (dataset.split[:30] == VAL).sum() == 30
    np.testing.assert_array_equal(no_val.split, [TRAIN] * 30 + [TEST] * 10)


def test_parse_split_valid() -> None:
    assert parse_split("0.6,0.2,0.2") == (0.6, 0.2, 0.2)
    assert parse_split(" 1, 0, 0 ") == (1.0, 0.0, 0.0)


@pytest.mark.parametrize(
    "text", ["0.6,0.2", "0.6,0.3,0.2", "0,0.5,0.5", "0.8,-0.1,0.3", "a,b,c", "nan,0,1"]
)
def test_parse_split_invalid(text: str) -> None:
    with pytest.raises(InvalidInputError, match=r"invalid --split"):
        parse_split(text)


def test_limit_is_stratified_and_deterministic(tmp_path: Path) -> None:
    x, y = make_arrays(n=200, n_classes=4)
    path = write_npz(tmp_path / "data.npz", x=x, y=y)

    full = load_dataset(str(path))
    limited = load_dataset(str(path), limit=50)
    again = load_dataset(str(path), limit=50)

    assert limited.n_samples == 50
    np.testing.assert_array_equal(limited.sample_ids, again.sample_ids)
    np.testing.assert_array_equal(limited.inputs, x[limited.sample_ids])
    np.testing.assert_array_equal(limited.split, full.split[limited.sample_ids])
    assert np.bincount(limited.split, minlength=3).tolist() == [30, 10, 10]
    assert np.bincount(limited.labels, minlength=4).tolist() == [13, 13, 12, 12]
    assert limited.fingerprint != full.fingerprint
    # Each (split, class) cell keeps its first rows in source order.
    for split_code in range(3):
        for label in range(4):
            cell = np.flatnonzero((full.split == split_code) & (full.labels == label))
            kept_ids = limited.sample_ids[
                (limited.split == split_code) & (limited.labels == label)
            ]
            np.testing.assert_array_equal(kept_ids, cell[: len(kept_ids)])


@pytest.mark.parametrize("limit", [2, 59, 61, 119])
def test_limit_keeps_exactly_limit_rows(tmp_path: Path, limit: int) -> None:
    x, y = make_arrays(n=120, n_classes=7)
    path = write_npz(tmp_path / "data.npz", x=x, y=y)

    dataset = load_dataset(str(path), limit=limit)

    assert dataset.n_samples == limit
    assert len(np.unique(dataset.sample_ids)) == limit


# --- fingerprint and batches --------------------------------------------------


def test_fingerprint_tracks_data_and_split(tmp_path: Path) -> None:
    x, y = make_arrays()
    base = load_dataset(str(write_npz(tmp_path / "a.npz", x=x, y=y)))
    same = load_dataset(str(write_npz(tmp_path / "b.npz", x=x.copy(), y=y)))
    changed_x = x.copy()
    changed_x[17, 2] += 1e-3
    other_x = load_dataset(str(write_npz(tmp_path / "c.npz", x=changed_x, y=y)))
    other_y = load_dataset(str(write_npz(tmp_path / "d.npz", x=x, y=y[::-1])))
    other_seed = load_dataset(str(tmp_path / "a.npz"), seed=1)
    other_fractions = load_dataset(str(tmp_path / "a.npz"), split=(0.5, 0.3, 0.2))

    assert base.fingerprint == same.fingerprint
    assert base.fingerprint != other_x.fingerprint
    assert base.fingerprint != other_y.fingerprint
    assert base.fingerprint != other_seed.fingerprint
    assert base.fingerprint != other_fractions.fingerprint


@pytest.mark.parametrize("batch_size", [1, 7, 60, 1000])
def test_iter_batches_covers_rows_in_order(tmp_path: Path, batch_size: int) -> None:
    x, y = make_arrays(n=60)
    dataset = load_dataset(str(write_npz(tmp_path / "data.npz", x=x, y=y)))

    rows, inputs = collect_batches(dataset, batch_size)

    np.testing.assert_array_equal(rows, np.arange(60))
    np.testing.assert_array_equal(inputs, x)


def test_iter_batches_returns_copies(tmp_path: Path) -> None:
    x, y = make_arrays(n=10)
    dataset = load_dataset(str(write_npz(tmp_path / "data.npz", x=x, y=y)))

    for _, batch in dataset.iter_batches(4):
        batch.zero_()

    np.testing.assert_array_equal(dataset.inputs, x)


@pytest.mark.parametrize("batch_size", [0, -3])
def test_iter_batches_rejects_bad_size(tmp_path: Path, batch_size: int) -> None:
    x, y = make_arrays(n=10)
    dataset = load_dataset(str(write_npz(tmp_path / "data.npz", x=x, y=y)))

    with pytest.raises(InvalidInputError, match=rf"invalid batch size {batch_size}"):
        next(dataset.iter_batches(batch_size))


class BareInputs(torch.utils.data.Dataset[torch.Tensor]):
    """A Dataset whose items are inputs only, without labels."""

    def __len__(self) -> int:
        return 5

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.full((3,), float(index))


def test_dataset_of_bare_inputs_batches() -> None:
    dataset = ProbeDataset(
        name="bare",
        inputs=BareInputs(),
        labels=np.array([0, 1, 0, 1, 0]),
        class_names=["a", "b"],
        split=np.zeros(5, dtype=np.uint8),
        sample_ids=np.arange(5),
        fingerprint="0" * 64,
    )

    rows, inputs = collect_batches(dataset, 2)

    assert dataset.sample_shape == (3,)
    np.testing.assert_array_equal(rows, np.arange(5))
    np.testing.assert_array_equal(inputs[:, 0], np.arange(5))


def test_probe_dataset_rejects_length_mismatch() -> None:
    with pytest.raises(DatasetError, match=r"split has 4 rows but labels has 5"):
        ProbeDataset(
            name="bad",
            inputs=np.zeros((5, 2), dtype=np.float32),
            labels=np.zeros(5, dtype=np.int64),
            class_names=["a", "b"],
            split=np.zeros(4, dtype=np.uint8),
            sample_ids=np.arange(5),
            fingerprint="0" * 64,
        )


# --- errors -------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"dataset path not found: .*nope\.npz"):
        load_dataset(str(tmp_path / "nope.npz"))


def test_unknown_spec() -> None:
    with pytest.raises(InvalidInputError, match=r"unknown dataset 'cifar'.*'toy'"):
        load_dataset("cifar")


def test_unknown_file_type(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("1,2\n")

    with pytest.raises(InvalidInputError, match=r"unknown dataset file type"):
        load_dataset(str(path))


def test_npz_without_labels_lists_arrays(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "data.npz", x=np.zeros((3, 2)), target=np.arange(3))

    with pytest.raises(
        InvalidInputError,
        match=r"no array named y or Y; its arrays: x, target.*--y-key",
    ):
        load_dataset(str(path))


def test_npz_of_another_format_names_file(tmp_path: Path) -> None:
    path = tmp_path / "data.npz"
    path.write_text("x,y\n1,0\n")

    with pytest.raises(DatasetError, match=r"data\.npz is not an \.npz archive"):
        load_dataset(str(path))


def test_truncated_npz_names_file(tmp_path: Path) -> None:
    x, y = make_arrays(n=300)
    full = write_npz(tmp_path / "full.npz", x=x, y=y).read_bytes()
    path = tmp_path / "data.npz"
    path.write_bytes(full[: len(full) // 2])

    with pytest.raises(DatasetError, match=r"data\.npz .*truncated or corrupt"):
        load_dataset(str(path))


def test_npz_with_corrupt_array_names_file(tmp_path: Path) -> None:
    x, y = make_arrays(n=300)
    damaged = bytearray(write_npz(tmp_path / "full.npz", x=x, y=y).read_bytes())
    damaged[200:260] = bytes(60)
    path = tmp_path / "data.npz"
    path.write_bytes(bytes(damaged))

    with pytest.raises(DatasetError, match=r"data\.npz .*truncated or corrupt"):
        load_dataset(str(path))


def test_npz_missing_requested_key(tmp_path: Path) -> None:
    x, y = make_arrays(n=6)
    path = write_npz(tmp_path / "data.npz", x=x, y=y)

    with pytest.raises(InvalidInputError, match=r"no array 'feats' \(from --x-key\)"):
        load_dataset(str(path), x_key="feats")


def test_sample_count_mismatch(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "data.npz", x=np.zeros((5, 2)), y=np.arange(4))

    with pytest.raises(DatasetError, match=r"x has 5 samples but y has 4"):
        load_dataset(str(path))


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, 1e39])
def test_non_finite_inputs(tmp_path: Path, bad_value: float) -> None:
    x = np.zeros((6, 3))
    x[4, 1] = bad_value
    path = write_npz(tmp_path / "data.npz", x=x, y=np.arange(6) % 2)

    with pytest.raises(DatasetError, match=r"NaN or infinite values, first in row 4"):
        load_dataset(str(path))


def test_single_class(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "data.npz", x=np.zeros((5, 2)), y=np.full(5, 3))

    with pytest.raises(DatasetError, match=r"only one class \(3\).*at least 2"):
        load_dataset(str(path))


@pytest.mark.parametrize(
    ("split", "shown"),
    [
        (np.array(["train", "dev", "test", "train"]), "'dev'"),
        (np.array([0, 1, 5, 0]), "'5'"),
    ],
)
def test_unknown_split_values(tmp_path: Path, split: np.ndarray, shown: str) -> None:
    path = write_npz(
        tmp_path / "data.npz", x=np.zeros((4, 2)), y=np.array([0, 1, 0, 1]), split=split
    )

    with pytest.raises(DatasetError, match=rf"split has unknown values \[{shown}\]"):
        load_dataset(str(path))


def test_limit_leaving_one_class(tmp_path: Path) -> None:
    x, y = make_arrays(n=20)
    path = write_npz(tmp_path / "data.npz", x=x, y=y)

    with pytest.raises(DatasetError, match=r"--limit 1 keeps only one class"):
        load_dataset(str(path), limit=1)


def test_split_without_train_rows(tmp_path: Path) -> None:
    split = np.array(["val", "test", "test", "val"])
    path = write_npz(
        tmp_path / "data.npz", x=np.zeros((4, 2)), y=np.array([0, 1, 0, 1]), split=split
    )

    with pytest.raises(DatasetError, match=r"split column has no train rows"):
        load_dataset(str(path))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"split": (0.5, 0.5, 0.5)}, r"invalid split 0.5,0.5,0.5"),
        ({"seed": -1}, r"invalid seed -1"),
        ({"limit": 0}, r"invalid --limit 0"),
        ({"n_samples": 10}, r"n_samples applies only to the toy dataset"),
        ({"x_key": "a"}, r"--x-key only applies to .npz/.h5 files"),
    ],
)
def test_invalid_options(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        load_dataset("digits", **kwargs)  # type: ignore[arg-type]
