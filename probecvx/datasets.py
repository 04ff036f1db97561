"""Input datasets and their train/val/test split.

:func:`load_dataset` turns a dataset spec into a :class:`ProbeDataset`: the
inputs fed to the model, integer class codes, a split code per row and a
fingerprint that changes whenever any of them does. The accepted specs are

- ``toy``: linearly separable Gaussian data, ``x ~ N(0, I)`` in R^128 and
  ``y = sign(w @ x)`` with ``w`` drawn from the seed (``n_samples`` rows,
  2000 by default);
- ``digits``: scikit-learn's 8x8 digits (``load_digits``), divided by 16 so
  that pixels lie in [0, 1], shape ``(n, 1, 8, 8)``;
- a ``.npz`` file or a ``.h5``/``.hdf5`` file with arrays ``x`` (or ``X``),
  ``y`` and an optional ``split``;
- a folder of MNIST-style IDX files, ``<prefix>-images-idx3-ubyte[.gz]`` with
  ``<prefix>-labels-idx1-ubyte[.gz]``;
- ``PKG.MODULE:CALLABLE`` or ``path/file.py:CALLABLE``, a function called with
  no arguments that returns ``(x, y)``, ``(x, y, split)``, a dict with those
  keys, or a torch ``Dataset`` of ``(x, y)`` items.

Array inputs are converted the same way for every spec. A 3-D array
``(n, H, W)`` is read as single-channel images and gets a channel axis,
``(n, 1, H, W)``. Values of dtype uint8 are divided by 255 so that they lie in
[0, 1], and every other numeric type is cast to float32 unscaled. Items of a
torch ``Dataset`` are cast to float32 and otherwise passed on unchanged.

A split column in the data (``split`` in a file, ``train``/``t10k`` IDX
pairs) is kept. When that split has no val rows, a stratified val part is
carved out of the train rows, a fraction ``val / (train + val)`` of the
requested split fractions. Data without a split column is split with
:func:`stratified_split`.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import importlib.util
import json
import logging
import math
import re
import sys
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, BinaryIO

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from probecvx.errors import DatasetError, InvalidInputError

logger = logging.getLogger(__name__)

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
SPLIT_NAMES = {code: name for name, code in SPLIT_CODES.items()}

BUILTIN_DATASETS = ("toy", "digits")
TOY_DIMENSION = 128
TOY_DEFAULT_SAMPLES = 2000
# Fewer val or test rows than this draw a warning from small_split_warning.
MIN_EVAL_ROWS = 10

ACCEPTED_SPECS = (
    "'toy', 'digits', a .npz file, a .h5/.hdf5 file, a folder of MNIST IDX files, "
    "PKG.MODULE:CALLABLE or path/file.py:CALLABLE"
)

_FINGERPRINT_VERSION = 1
_FINITE_CHECK_ROWS = 4096

# IDX type codes (third byte of the magic number) and their big-endian dtypes.
_IDX_DTYPES = {
    0x08: ">u1",
    0x09: ">i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}
_IDX_NAME = re.compile(
    r"^(?P<prefix>.+)-(?P<kind>images|labels)[-.]idx(?P<ndim>[13])-ubyte"
    r"(?P<gz>\.gz)?$"
)


@dataclass(frozen=True, eq=False)
class ProbeDataset:
    """Inputs, labels and split of the samples that a model is probed on.

    Attributes
    ----------
    name : str
        Short name of the source: the file or folder name, the built-in name or
        the callable spec.
    inputs : ndarray of shape (n_samples, *sample_shape), float32, or Dataset
        The model inputs. A torch ``Dataset`` yields ``(x, y)`` items or bare
        ``x`` items; only ``x`` is read from it.
    labels : ndarray of shape (n_samples,), int64
        Class codes ``0..n_classes-1``.
    class_names : list of str
        The original label value of each class code, in code order.
    split : ndarray of shape (n_samples,), uint8
        Split code of each row, see ``SPLIT_CODES``.
    sample_ids : ndarray of shape (n_samples,), int64
        Row index of each sample in the source data.
    fingerprint : str
        Hex sha256 over the input values, labels, class names, split and sample
        ids; equal fingerprints mean equal data.
    """

    name: str
    inputs: np.ndarray | Dataset[Any]
    labels: np.ndarray
    class_names: list[str]
    split: np.ndarray
    sample_ids: np.ndarray
    fingerprint: str

    def __post_init__(self) -> None:
        n_samples = len(self.labels)
        lengths = {
            "inputs": _dataset_length(self.inputs, self.name),
            "split": len(self.split),
            "sample_ids": len(self.sample_ids),
        }
        for field_name, length in lengths.items():
            if length != n_samples:
                raise DatasetError(
                    f"dataset {self.name!r}: {field_name} has {length} rows but "
                    f"labels has {n_samples}; build every array from the same rows"
                )

    @property
    def n_samples(self) -> int:
        """Number of rows."""
        return len(self.labels)

    @property
    def n_classes(self) -> int:
        """Number of classes, including any absent after ``limit``."""
        return len(self.class_names)

    @cached_property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one input sample, without the batch axis."""
        if isinstance(self.inputs, np.ndarray):
            return tuple(self.inputs.shape[1:])
        if self.n_samples == 0:
            return ()
        return tuple(_item_input(self.inputs[0], 0, self.name).shape)

    def iter_batches(
        self, batch_size: int
    ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Yield ``(row indices, inputs)`` batches in row order.

        Parameters
        ----------
        batch_size : int
            Rows per batch; the last batch may be shorter.

        Yields
        ------
        rows : ndarray of shape (b,), int64
            Positions of the batch's rows in this dataset.
        inputs : Tensor of shape (b, *sample_shape), float32
            A copy of the inputs, so that a model that changes its input in
            place does not change the stored data.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int):
            raise InvalidInputError(
                f"invalid batch size {batch_size!r}; give a positive integer"
            )
        if batch_size < 1:
            raise InvalidInputError(
                f"invalid batch size {batch_size}; give a positive integer"
            )

        for start in range(0, self.n_samples, batch_size):
            stop = min(start + batch_size, self.n_samples)
            rows = np.arange(start, stop, dtype=np.int64)
            if isinstance(self.inputs, np.ndarray):
                batch = np.array(self.inputs[start:stop], dtype=np.float32, copy=True)
            else:
                batch = self._stack_items(start, stop)
            yield rows, torch.from_numpy(batch)

    def _stack_items(self, start: int, stop: int) -> np.ndarray:
        assert not isinstance(self.inputs, np.ndarray)
        items = [_item_input(self.inputs[i], i, self.name) for i in range(start, stop)]
        shapes = {item.shape for item in items}
        if len(shapes) > 1:
            raise DatasetError(
                f"dataset {self.name!r}: rows {start}..{stop - 1} have different "
                f"input shapes {sorted(shapes)}; every item must have the same shape"
            )
        return np.stack(items)


def load_dataset(
    spec: str,
    *,
    split: tuple[float, float, float] = (0.6, 0.2, 0.2),
    seed: int = 0,
    x_key: str | None = None,
    y_key: str | None = None,
    split_key: str | None = None,
    limit: int | None = None,
    n_samples: int | None = None,
) -> ProbeDataset:
    """Load the dataset named by ``spec`` and split it into train/val/test.

    Parameters
    ----------
    spec : str
        ``toy``, ``digits``, a ``.npz`` or ``.h5``/``.hdf5`` file, a folder of
        MNIST IDX files, ``PKG.MODULE:CALLABLE`` or ``path/file.py:CALLABLE``.
        The built-in names win over a file or folder of the same name; write
        ``./digits`` for the folder.
    split : tuple of 3 floats, default=(0.6, 0.2, 0.2)
        Train, val and test fractions for data without its own split. For data
        with its own split but no val rows, only ``val / (train + val)`` is
        used, as the fraction of train rows moved to val.
    seed : int, default=0
        Seed of the split and of the ``toy`` data.
    x_key, y_key, split_key : str, optional
        Array names in a ``.npz``/``.h5`` file or keys of a dict returned by a
        callable, when they are not ``x``/``X``, ``y`` and ``split``.
    limit : int, optional
        Keep at most this many rows, a subsample stratified by split and class
        that takes the first rows of each (split, class) cell in source order.
    n_samples : int, optional
        Number of rows of the ``toy`` data, default 2000.

    Returns
    -------
    ProbeDataset

    Raises
    ------
    InvalidInputError
        For a missing path, an unknown spec, missing array names or an invalid
        option value.
    DatasetError
        When the data cannot be read or is unusable: mismatched row counts,
        NaN or infinite inputs, fewer than 2 classes, unknown split values,
        corrupt IDX files, or a callable that fails.
    """
    fractions = _check_fractions(split, "split")
    _check_options(spec, seed=seed, limit=limit, n_samples=n_samples)
    keys = {"x_key": x_key, "y_key": y_key, "split_key": split_key}

    source = _read_source(spec, seed, keys, n_samples)
    dataset = _build_dataset(source, fractions, seed, limit)

    counts = np.bincount(dataset.split, minlength=3)
    logger.info(
        "loaded dataset %s: %s rows of shape %s, %s classes, "
        "train/val/test %s/%s/%s, fingerprint %s",
        dataset.name,
        dataset.n_samples,
        dataset.sample_shape,
        dataset.n_classes,
        counts[0],
        counts[1],
        counts[2],
        dataset.fingerprint[:12],
    )
    return dataset


def small_split_warning(dataset: ProbeDataset) -> str | None:
    """Return a warning when the val or test split is too small to measure on.

    A split is too small when it has rows but fewer than
    :data:`MIN_EVAL_ROWS`, or fewer rows than the dataset has classes. Its
    error rate then moves in steps of one row, such as 0% or 50% on 2 rows.
    An empty split is not reported here, because the reports of ``fit`` warn
    of it. Returns None when neither split is too small.
    """
    counts = np.bincount(dataset.split, minlength=len(SPLIT_CODES))
    small = []
    for split_name in ("val", "test"):
        n_rows = int(counts[SPLIT_CODES[split_name]])
        if 0 < n_rows < max(MIN_EVAL_ROWS, dataset.n_classes):
            small.append(f"{n_rows} {split_name} rows")
    if not small:
        return None
    sizes = "/".join(str(int(count)) for count in counts)
    return (
        f"dataset {dataset.name!r} has only {' and '.join(small)} (train/val/test "
        f"{sizes} rows, {dataset.n_classes} classes). Error rates measured on "
        f"fewer than {MIN_EVAL_ROWS} rows, or on fewer rows than classes, are "
        "unreliable. Use more data, or give val and test larger fractions with "
        "--split, such as --split 0.5,0.25,0.25"
    )


def stratified_split(
    labels: np.ndarray, fractions: tuple[float, float, float], seed: int
) -> np.ndarray:
    """Assign each row to train, val or test, class by class.

    The rows of each class are shuffled and cut into train, val and test parts
    whose sizes are the class size times the fractions, rounded by the largest
    remainder. The rounding error of each class, up to one row per split, is
    carried over to the next class, so that the split sizes stay within about
    one row of the fractions times the number of rows. A class with at least as
    many rows as there are positive fractions has at least one row in every
    split with a positive fraction. Many such small classes can therefore move
    the split sizes further from the fractions.

    Parameters
    ----------
    labels : ndarray of shape (n_samples,)
        Class of each row, any type that ``np.unique`` sorts.
    fractions : tuple of 3 floats
        Train, val and test fractions: non-negative, summing to 1, train > 0.
    seed : int
        Seed of ``np.random.default_rng``.

    Returns
    -------
    ndarray of shape (n_samples,), uint8
        Split codes, see ``SPLIT_CODES``.

    Notes
    -----
    For one NumPy version the result depends only on the inputs. NumPy's
    compatibility policy for ``numpy.random`` promises the same ``Generator``
    stream only on the same NumPy build, so an upgrade may change the split
    (and with it the dataset fingerprint).
    """
    weights = np.asarray(_check_fractions(fractions, "fractions"), dtype=np.float64)
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise InvalidInputError(
            f"labels must be 1-D; got shape {labels.shape}; pass one label per row"
        )
    _check_seed(seed)

    rng = np.random.default_rng(seed)
    split_codes = np.empty(len(labels), dtype=np.uint8)
    _, class_codes = np.unique(labels, return_inverse=True)
    class_codes = class_codes.reshape(-1)
    used = weights > 0
    carry = np.zeros(3)
    for class_code in range(int(class_codes.max(initial=-1)) + 1):
        rows = rng.permutation(np.flatnonzero(class_codes == class_code))
        shares = len(rows) * weights / weights.sum()
        targets = np.clip(shares + carry, 0.0, None) * used
        sizes = _apportion(len(rows), targets, required=used)
        # Bounded, so that rows forced into splits by the at-least-one rule for
        # small classes do not push later classes far from their own share.
        carry = np.clip(carry + shares - sizes, -1.0, 1.0)
        bounds = np.cumsum(sizes)
        split_codes[rows[: bounds[0]]] = SPLIT_CODES["train"]
        split_codes[rows[bounds[0] : bounds[1]]] = SPLIT_CODES["val"]
        split_codes[rows[bounds[1] :]] = SPLIT_CODES["test"]
    return split_codes


def parse_split(text: str) -> tuple[float, float, float]:
    """Parse ``"train,val,test"`` fractions such as ``"0.6,0.2,0.2"``.

    Raises
    ------
    InvalidInputError
        Unless there are three non-negative numbers that sum to 1 within 1e-6
        with a positive train fraction.
    """
    parts = [part.strip() for part in str(text).split(",")]
    try:
        numbers = tuple(float(part) for part in parts)
    except ValueError:
        numbers = ()
    if len(numbers) != 3:
        raise InvalidInputError(
            f"invalid --split {text!r}; give three comma-separated fractions "
            "train,val,test, e.g. 0.6,0.2,0.2"
        )
    return _check_fractions((numbers[0], numbers[1], numbers[2]), "--split")


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file, gzipped when its name ends in ``.gz``.

    An IDX file starts with two zero bytes, a type code, the number of
    dimensions and one big-endian uint32 size per dimension, followed by the
    big-endian values in C order.

    Returns
    -------
    ndarray
        The values in native byte order.

    Raises
    ------
    DatasetError
        When the file cannot be read, has an invalid magic number, or its size
        does not match its header.
    """
    path = Path(path)
    data = _read_idx_bytes(path)

    if len(data) < 4:
        raise DatasetError(
            f"IDX file {path} is truncated: {len(data)} bytes, shorter than "
            "the 4-byte magic number; download it again"
        )
    magic = int.from_bytes(data[:4], "big")
    type_code, ndim = data[2], data[3]
    if data[0] != 0 or data[1] != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise DatasetError(
            f"{path} is not an IDX file: invalid magic number 0x{magic:08X}; an IDX "
            "file starts with 0x0000, a type code 0x08-0x0E and the number of "
            "dimensions (0x00000803 for images, 0x00000801 for labels)"
        )

    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise DatasetError(
            f"IDX file {path} is truncated inside its {header_size}-byte header; "
            "download it again"
        )
    shape = tuple(
        int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)
    )
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = math.prod(shape) * dtype.itemsize
    found = len(data) - header_size
    if found < expected:
        raise DatasetError(
            f"IDX file {path} is truncated: header shape {shape} needs {expected} "
            f"bytes of data but the file has {found}; download it again"
        )
    if found > expected:
        raise DatasetError(
            f"IDX file {path} has {found - expected} bytes after the data of shape "
            f"{shape}; the file is corrupt, download it again"
        )

    values = np.frombuffer(data, dtype=dtype, offset=header_size).reshape(shape)
    return values.astype(dtype.newbyteorder("="))


# --- reading the sources ------------------------------------------------------


@dataclass
class _Source:
    """Data as read from a spec, before encoding, splitting and subsampling."""

    name: str
    inputs: np.ndarray | Dataset[Any]
    labels: np.ndarray
    split: np.ndarray | None = None
    class_names: list[str] | None = None  # set when labels are already codes
    inputs_hasher: Any = None  # sha256 of streamed Dataset inputs, else None
    labels_source: str = "y"  # where the labels were read, for error messages


def _read_source(
    spec: str, seed: int, keys: Mapping[str, str | None], n_samples: int | None
) -> _Source:
    """Dispatch ``spec`` to the reader of its form."""
    if spec in BUILTIN_DATASETS:
        _reject_keys(spec, keys)
        if spec == "toy":
            return _read_toy(n_samples or TOY_DEFAULT_SAMPLES, seed)
        return _read_digits()

    path = Path(spec)
    if path.is_dir():
        _reject_keys(spec, keys)
        return _read_idx_folder(path)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".npz":
            return _read_npz(path, keys)
        if suffix in (".h5", ".hdf5"):
            return _read_hdf5(path, keys)
        raise InvalidInputError(
            f"unknown dataset file type {spec!r}; accepted specs: {ACCEPTED_SPECS}"
        )
    if ":" in spec:
        return _read_callable(spec, keys)
    if path.suffix.lower() in (".npz", ".h5", ".hdf5") or len(path.parts) > 1:
        raise InvalidInputError(
            f"dataset path not found: {spec}; check the path or give one of: "
            f"{ACCEPTED_SPECS}"
        )
    raise InvalidInputError(
        f"unknown dataset {spec!r}; accepted specs: {ACCEPTED_SPECS}"
    )


def _reject_keys(spec: str, keys: Mapping[str, str | None]) -> None:
    given_keys = [name for name, value in keys.items() if value is not None]
    if given_keys:
        options = ", ".join("--" + name.replace("_", "-") for name in given_keys)
        raise InvalidInputError(
            f"{options} only applies to .npz/.h5 files and callables returning a "
            f"dict, not to dataset {spec!r}; drop the option"
        )


def _read_toy(n_samples: int, seed: int) -> _Source:
    """Draw the linearly separable Gaussian data from ``seed``."""
    rng = np.random.default_rng(seed)
    weights = rng.standard_normal(TOY_DIMENSION)
    inputs = rng.standard_normal((n_samples, TOY_DIMENSION)).astype(np.float32)
    positive = inputs.astype(np.float64) @ weights >= 0
    return _Source(
        name="toy",
        inputs=inputs,
        labels=positive.astype(np.int64),
        class_names=["-1", "+1"],
    )


def _read_digits() -> _Source:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.asarray(bunch.data, dtype=np.float32) / np.float32(16.0)
    return _Source(
        name="digits",
        inputs=pixels.reshape(-1, 1, 8, 8),
        labels=np.asarray(bunch.target),
    )


#: The first bytes of a zip archive, as numpy.savez writes it, and of an empty one.
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")


def _read_npz(path: Path, keys: Mapping[str, str | None]) -> _Source:
    # The file is opened here, so that it is closed whatever np.load raises.
    try:
        with open(path, "rb") as handle:
            arrays, chosen = _read_npz_arrays(path, handle, keys)
    except OSError as err:
        raise DatasetError(f"cannot read {path} as .npz: {err}") from err
    return _Source(
        name=path.name,
        inputs=arrays["x"],
        labels=arrays["y"],
        split=arrays.get("split"),
        labels_source=f"array {chosen['y']!r}",
    )


def _read_npz_arrays(
    path: Path, handle: BinaryIO, keys: Mapping[str, str | None]
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Return the arrays of an open .npz file by role, and the names chosen."""
    # np.load reads any file that is neither a zip archive nor an .npy array
    # as a pickle, so another format would fail with a message about
    # pickles. The format is checked first instead.
    if handle.read(4) not in _ZIP_MAGICS:
        raise DatasetError(
            f"{path} is not an .npz archive (a zip file of arrays); save the "
            "arrays with numpy.savez"
        )
    handle.seek(0)
    try:
        archive = np.load(handle, allow_pickle=False)
    except zipfile.BadZipFile as err:
        raise DatasetError(
            f"cannot read {path} as .npz: the archive is truncated or corrupt "
            f"({err}); save it again with numpy.savez"
        ) from err
    except (OSError, ValueError, zlib.error) as err:
        raise DatasetError(f"cannot read {path} as .npz: {err}") from err
    with archive:
        chosen = _choose_keys(str(path), list(archive.files), keys)
        try:
            arrays = {role: archive[name] for role, name in chosen.items()}
        except (zipfile.BadZipFile, zlib.error, EOFError) as err:
            raise DatasetError(
                f"cannot read {path} as .npz: an array in it is truncated or "
                f"corrupt ({err}); save it again with numpy.savez"
            ) from err
        except ValueError as err:
            raise DatasetError(
                f"{path}: {err}; save x, y and split as numeric or string arrays, "
                "not Python objects"
            ) from err
    return arrays, chosen


def _read_hdf5(path: Path, keys: Mapping[str, str | None]) -> _Source:
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise DatasetError(f"cannot read {path} as HDF5: {err}") from err
    with handle:
        names: list[str] = []
        handle.visititems(
            lambda name, obj: (
                names.append(name) if isinstance(obj, h5py.Dataset) else None
            )
        )
        chosen = _choose_keys(str(path), names, keys)
        arrays = {role: _read_h5_array(handle[name]) for role, name in chosen.items()}
    return _Source(
        name=path.name,
        inputs=arrays["x"],
        labels=arrays["y"],
        split=arrays.get("split"),
        labels_source=f"dataset {chosen['y']!r}",
    )


def _read_h5_array(dataset: h5py.Dataset) -> np.ndarray:
    if h5py.check_string_dtype(dataset.dtype) is not None:
        return np.asarray(dataset.asstr()[()], dtype=str)
    return np.asarray(dataset[()])


def _choose_keys(
    source: str, names: Sequence[str], keys: Mapping[str, str | None]
) -> dict[str, str]:
    """Map the roles x, y and (when present) split to array names in ``source``."""
    defaults = {"x": ("x", "X"), "y": ("y", "Y"), "split": ("split",)}
    options = {"x": "x_key", "y": "y_key", "split": "split_key"}
    chosen: dict[str, str] = {}
    for role, candidates in defaults.items():
        requested = keys.get(options[role])
        if requested is not None:
            if requested not in names:
                option = "--" + options[role].replace("_", "-")
                raise InvalidInputError(
                    f"{source} has no array {requested!r} (from {option}); "
                    f"its arrays: {', '.join(names) or 'none'}"
                )
            chosen[role] = requested
            continue
        found = next((name for name in candidates if name in names), None)
        if found is not None:
            chosen[role] = found
        elif role != "split":
            raise InvalidInputError(
                f"{source} has no array named {' or '.join(candidates)}; its arrays: "
                f"{', '.join(names) or 'none'}; name the inputs and labels with "
                "--x-key and --y-key"
            )
    return chosen


def _read_idx_folder(folder: Path) -> _Source:
    """Read the image/label IDX pairs of ``folder`` and their own split."""
    pairs = _find_idx_pairs(folder)
    roles = {_idx_role(prefix): prefix for prefix in pairs}
    if len(pairs) == 2 and set(roles) == {"train", "test"}:
        ordered = [roles["train"], roles["test"]]
    elif len(pairs) == 1:
        ordered = list(pairs)
    else:
        raise DatasetError(
            f"{folder} has IDX pairs {sorted(pairs)}; keep one pair, or one train "
            "and one t10k (or test) pair, in the folder"
        )

    images, labels, split_parts = [], [], []
    for prefix in ordered:
        image_path, label_path = pairs[prefix]
        pair_images, pair_labels = _read_idx_pair(image_path, label_path)
        images.append(pair_images)
        labels.append(pair_labels)
        role = "test" if _idx_role(prefix) == "test" else "train"
        code = SPLIT_CODES[role]
        split_parts.append(np.full(len(pair_labels), code, dtype=np.uint8))

    own_split = np.concatenate(split_parts) if len(ordered) == 2 else None
    return _Source(
        name=folder.name,
        inputs=np.concatenate(images),
        labels=np.concatenate(labels),
        split=own_split,
    )


def _find_idx_pairs(folder: Path) -> dict[str, tuple[Path, Path]]:
    """Group the IDX files of ``folder`` by prefix into (images, labels)."""
    found: dict[str, dict[str, Path]] = {}
    for path in sorted(folder.iterdir()):
        match = _IDX_NAME.match(path.name)
        if match is None or not path.is_file():
            continue
        kind, ndim = match["kind"], match["ndim"]
        if (kind, ndim) not in (("images", "3"), ("labels", "1")):
            continue
        slot = found.setdefault(match["prefix"], {})
        # With both foo and foo.gz present, read the uncompressed file.
        if kind not in slot or slot[kind].suffix == ".gz":
            slot[kind] = path

    if not found:
        raise InvalidInputError(
            f"{folder} has no IDX files named <prefix>-images-idx3-ubyte[.gz] and "
            f"<prefix>-labels-idx1-ubyte[.gz]; accepted specs: {ACCEPTED_SPECS}"
        )
    pairs: dict[str, tuple[Path, Path]] = {}
    for prefix, slot in found.items():
        missing = {"images", "labels"} - set(slot)
        if missing:
            kind = missing.pop()
            ndim = 3 if kind == "images" else 1
            raise DatasetError(
                f"{folder}: {slot[next(iter(slot))].name} has no matching "
                f"{prefix}-{kind}-idx{ndim}-ubyte[.gz]; add it or remove the file"
            )
        pairs[prefix] = (slot["images"], slot["labels"])
    return pairs


def _idx_role(prefix: str) -> str:
    last = prefix.rsplit("-", 1)[-1].lower()
    if last == "train":
        return "train"
    if last in ("t10k", "test"):
        return "test"
    return "other"


def _read_idx_pair(image_path: Path, label_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(image_path)
    labels = read_idx(label_path)
    if images.ndim != 3:
        raise DatasetError(
            f"IDX images file {image_path} has {images.ndim} dimensions, expected "
            "3 (count, rows, columns)"
        )
    if labels.ndim != 1:
        raise DatasetError(
            f"IDX labels file {label_path} has {labels.ndim} dimensions, expected 1"
        )
    if len(images) != len(labels):
        raise DatasetError(
            f"{image_path} has {len(images)} images but {label_path} has "
            f"{len(labels)} labels; use files from the same release"
        )
    return images, labels


def _read_idx_bytes(path: Path) -> bytes:
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except FileNotFoundError as err:
        raise InvalidInputError(f"IDX file not found: {path}; check the path") from err
    except (OSError, EOFError, zlib.error) as err:
        raise DatasetError(
            f"cannot read IDX file {path}: {err}; download it again"
        ) from err


def _read_callable(spec: str, keys: Mapping[str, str | None]) -> _Source:
    """Call the user's dataset function and read what it returns."""
    factory = _import_callable(spec)
    try:
        result = factory()
    except Exception as err:  # user code may raise anything
        raise DatasetError(
            f"dataset callable {spec!r} raised {type(err).__name__}: {err}"
        ) from err

    if isinstance(result, Dataset):
        return _read_torch_dataset(spec, result)
    if isinstance(result, Mapping):
        names = [str(name) for name in result]
        chosen = _choose_keys(f"the dict returned by {spec}", names, keys)
        arrays = {role: result[name] for role, name in chosen.items()}
        return _Source(
            name=spec,
            inputs=arrays["x"],
            labels=arrays["y"],
            split=arrays.get("split"),
            labels_source=f"key {chosen['y']!r}",
        )
    _reject_keys(spec, keys)
    if isinstance(result, tuple) and len(result) in (2, 3):
        return _Source(
            name=spec,
            inputs=result[0],
            labels=result[1],
            split=result[2] if len(result) == 3 else None,
            labels_source="y, the second item of the returned tuple",
        )
    raise DatasetError(
        f"dataset callable {spec!r} returned {type(result).__name__}; return "
        "(x, y), (x, y, split), a dict with x and y, or a torch Dataset of (x, y) "
        "items"
    )


def _import_callable(spec: str) -> Any:
    module_part, _, attribute = spec.rpartition(":")
    if not module_part or not attribute:
        raise InvalidInputError(
            f"invalid dataset callable {spec!r}; write PKG.MODULE:CALLABLE or "
            "path/file.py:CALLABLE"
        )

    if module_part.endswith(".py"):
        module = _import_file(Path(module_part), spec)
    else:
        try:
            module = importlib.import_module(module_part)
        except ImportError as err:
            raise InvalidInputError(
                f"cannot import module {module_part!r} of dataset {spec!r}: {err}; "
                "install it, add its folder to PYTHONPATH, or give "
                "path/file.py:CALLABLE"
            ) from err
        except Exception as err:  # module code may raise anything
            raise DatasetError(
                f"importing module {module_part!r} of dataset {spec!r} raised "
                f"{type(err).__name__}: {err}"
            ) from err

    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise InvalidInputError(
            f"module {module_part!r} has no callable {attribute!r}; "
            f"check the name after ':' in {spec!r}"
        )
    return factory


def _import_file(path: Path, spec: str) -> Any:
    if not path.is_file():
        raise InvalidInputError(f"dataset path not found: {path} (from {spec!r})")
    module_name = f"_probecvx_dataset_{path.stem}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise InvalidInputError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:  # module code may raise anything
        sys.modules.pop(module_name, None)
        raise DatasetError(
            f"importing {path} for dataset {spec!r} raised {type(err).__name__}: {err}"
        ) from err
    return module


def _read_torch_dataset(spec: str, dataset: Dataset[Any]) -> _Source:
    """Read the labels of a torch Dataset and hash its inputs in one pass."""
    n_items = _dataset_length(dataset, spec)
    hasher = hashlib.sha256()
    labels: list[Any] = []
    for index in range(n_items):
        item = dataset[index]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise DatasetError(
                f"dataset callable {spec!r}: item {index} is "
                f"{type(item).__name__}, not an (x, y) pair; make the Dataset "
                "return (x, y)"
            )
        values = _item_input(item, index, spec)
        if not np.isfinite(values).all():
            raise DatasetError(
                f"dataset {spec!r}: item {index} has NaN or infinite inputs; "
                "clean or drop it"
            )
        hasher.update(json.dumps(values.shape).encode())
        hasher.update(values.astype("<f4").tobytes())
        labels.append(_python_scalar(item[1], index, spec))
    return _Source(
        name=spec,
        inputs=dataset,
        labels=np.asarray(labels),
        inputs_hasher=hasher,
        labels_source="y, the second item of each Dataset item",
    )


def _python_scalar(value: Any, index: int, spec: str) -> Any:
    """Return a label given as a scalar tensor or array as a Python scalar."""
    if isinstance(value, torch.Tensor | np.ndarray):
        if math.prod(value.shape) != 1:
            raise DatasetError(
                f"dataset {spec!r}: label of item {index} has shape "
                f"{tuple(value.shape)}; return one class label per item"
            )
        return value.reshape(()).item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _item_input(item: Any, index: int, name: str) -> np.ndarray:
    """Return the ``x`` of one Dataset item as a float32 array."""
    value = item[0] if isinstance(item, (tuple, list)) else item
    try:
        if isinstance(value, torch.Tensor):
            return value.detach().cpu().to(torch.float32).numpy()
        return np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError, RuntimeError) as err:
        raise DatasetError(
            f"dataset {name!r}: input of item {index} is {type(value).__name__}, "
            f"not numeric ({err}); return arrays or tensors"
        ) from err


def _dataset_length(inputs: np.ndarray | Dataset[Any], name: str) -> int:
    try:
        return len(inputs)  # type: ignore[arg-type]
    except TypeError as err:
        raise DatasetError(
            f"dataset {name!r} has no length; give the torch Dataset a __len__"
        ) from err


# --- encoding, splitting and subsampling -----------------------------------


def _build_dataset(
    source: _Source,
    fractions: tuple[float, float, float],
    seed: int,
    limit: int | None,
) -> ProbeDataset:
    """Validate, encode, split and subsample a source into a ProbeDataset."""
    inputs = source.inputs
    if source.inputs_hasher is None:  # not a torch Dataset, already checked
        inputs = _prepare_inputs(inputs, source.name)
    n_rows = _dataset_length(inputs, source.name)
    raw_labels = _as_array(source.labels, source.name, "labels")
    if raw_labels.ndim == 2 and raw_labels.shape[1] == 1:
        raw_labels = raw_labels[:, 0]
    if raw_labels.ndim != 1:
        raise DatasetError(
            f"dataset {source.name!r}: y has shape {raw_labels.shape}; give one "
            "class label per sample, shape (n_samples,)"
        )
    if len(raw_labels) != n_rows:
        raise DatasetError(
            f"dataset {source.name!r}: x has {n_rows} samples but y has "
            f"{len(raw_labels)}; give one label per sample"
        )
    if n_rows == 0:
        raise DatasetError(f"dataset {source.name!r} has no samples")

    if source.class_names is not None:
        labels, class_names = raw_labels.astype(np.int64), source.class_names
    else:
        labels, class_names = _encode_labels(
            raw_labels, source.name, source.labels_source
        )
    if np.unique(labels).size < 2:
        raise DatasetError(
            f"dataset {source.name!r} has only one class "
            f"({class_names[labels[0]]}); a probe needs at least 2 classes"
        )

    split = _resolve_split(source, labels, fractions, seed)
    rows = np.arange(n_rows, dtype=np.int64)
    if limit is not None and limit < n_rows:
        rows = _limit_rows(labels, split, limit)
        if len(np.unique(labels[rows])) < 2:
            raise DatasetError(
                f"--limit {limit} keeps only one class of dataset "
                f"{source.name!r}; raise the limit"
            )
        inputs = (
            inputs[rows]
            if isinstance(inputs, np.ndarray)
            else Subset(inputs, rows.tolist())
        )

    labels, split = labels[rows], split[rows]
    fingerprint = _fingerprint(
        inputs, source.inputs_hasher, labels, class_names, split, rows
    )
    return ProbeDataset(
        name=source.name,
        inputs=inputs,
        labels=labels,
        class_names=class_names,
        split=split,
        sample_ids=rows,
        fingerprint=fingerprint,
    )


def _as_array(value: Any, name: str, role: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as err:
        raise DatasetError(
            f"dataset {name!r}: {role} is not an array ({err}); give a numpy array"
        ) from err


def _prepare_inputs(value: Any, name: str) -> np.ndarray:
    """Convert inputs to C-ordered float32 images or feature rows."""
    array = _as_array(value, name, "x")
    if array.ndim < 2:
        raise DatasetError(
            f"dataset {name!r}: x has shape {array.shape}; give x as "
            "(n_samples, n_features) or (n_samples, ...) with a sample axis first"
        )
    if array.dtype == np.uint8:
        array = array.astype(np.float32)
        array /= np.float32(255.0)
    elif array.dtype.kind in "biuf":
        # Values beyond the float32 range become inf, which _check_finite reports.
        with np.errstate(over="ignore"):
            array = array.astype(np.float32)
    else:
        raise DatasetError(
            f"dataset {name!r}: x has dtype {array.dtype}; give numeric inputs"
        )
    if array.ndim == 3:
        array = array[:, np.newaxis]
    array = np.ascontiguousarray(array)
    _check_finite(array, name)
    return array


def _check_finite(array: np.ndarray, name: str) -> None:
    for start in range(0, len(array), _FINITE_CHECK_ROWS):
        block = array[start : start + _FINITE_CHECK_ROWS]
        finite = np.isfinite(block.reshape(len(block), -1)).all(axis=1)
        if not finite.all():
            row = start + int(np.argmin(finite))
            raise DatasetError(
                f"dataset {name!r}: x has NaN or infinite values, first in row "
                f"{row}; clean or drop those rows (values beyond float32 range "
                "become infinite)"
            )


def _encode_labels(
    values: np.ndarray, name: str, labels_source: str = "y"
) -> tuple[np.ndarray, list[str]]:
    """Encode labels to codes ``0..K-1`` in sorted order of the values.

    Float labels must be whole numbers, such as class ids saved as 1.0.
    Values with a fractional part are rejected as a continuous target, which
    would give almost one class per row.
    """
    if values.dtype.kind == "S":
        values = np.char.decode(values, "utf-8")
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise DatasetError(
            f"dataset {name!r}: y has NaN or infinite labels; drop those samples"
        )
    if values.dtype.kind == "f":
        fractional = np.flatnonzero(values != np.round(values))
        if fractional.size:
            row = int(fractional[0])
            raise DatasetError(
                f"dataset {name!r}: the labels ({labels_source}) are floats with "
                f"a fractional part in {fractional.size} of {values.size} rows "
                f"(first: {values[row].item()!r} in row {row}), which looks like a "
                "continuous target. Labels must be integer class ids or strings; "
                "bin a continuous target into classes first, for example with "
                "numpy.digitize"
            )
    if values.dtype.kind not in "biufUO":
        raise DatasetError(
            f"dataset {name!r}: y has dtype {values.dtype}; give integer, "
            "float, boolean or string labels"
        )
    try:
        uniques, codes = np.unique(values, return_inverse=True)
    except TypeError as err:
        raise DatasetError(
            f"dataset {name!r}: labels cannot be sorted ({err}); give labels of "
            "one type"
        ) from err
    class_names = [
        str(value.item() if hasattr(value, "item") else value) for value in uniques
    ]
    return codes.reshape(-1).astype(np.int64), class_names


def _resolve_split(
    source: _Source,
    labels: np.ndarray,
    fractions: tuple[float, float, float],
    seed: int,
) -> np.ndarray:
    """Return the data's own split, or a stratified split when it has none."""
    if source.split is None:
        return stratified_split(labels, fractions, seed)

    split = _decode_split(_as_array(source.split, source.name, "split"), source.name)
    if len(split) != len(labels):
        raise DatasetError(
            f"dataset {source.name!r}: split has {len(split)} values but y has "
            f"{len(labels)}; give one split value per sample"
        )
    if not (split == SPLIT_CODES["train"]).any():
        raise DatasetError(
            f"dataset {source.name!r}: the split column has no train rows; "
            "mark some rows train"
        )
    if fractions[1] > 0 and not (split == SPLIT_CODES["val"]).any():
        split = _carve_val(labels, split, fractions, seed)
        logger.info(
            "dataset %s has no val rows; moved %s train rows to val",
            source.name,
            int((split == SPLIT_CODES["val"]).sum()),
        )
    return split


def _decode_split(values: np.ndarray, name: str) -> np.ndarray:
    """Turn split names (train/val/test) or codes (0/1/2) into uint8 codes."""
    values = values.reshape(-1)
    if values.dtype.kind == "S":
        values = np.char.decode(values, "utf-8")
    if values.dtype.kind in "UO":
        names = values.astype(str)
        unknown = sorted({str(value) for value in np.unique(names)} - set(SPLIT_CODES))
        if unknown:
            raise DatasetError(
                f"dataset {name!r}: split has unknown values {unknown[:5]}; use "
                "train, val, test or the codes 0, 1, 2"
            )
        codes = np.empty(len(names), dtype=np.uint8)
        for split_name, code in SPLIT_CODES.items():
            codes[names == split_name] = code
        return codes
    if values.dtype.kind in "iuf":
        unknown_mask = ~np.isin(values, list(SPLIT_NAMES))
        if unknown_mask.any():
            unknown = sorted({str(v) for v in np.unique(values[unknown_mask])})
            raise DatasetError(
                f"dataset {name!r}: split has unknown values {unknown[:5]}; use "
                "train, val, test or the codes 0, 1, 2"
            )
        return values.astype(np.uint8)
    raise DatasetError(
        f"dataset {name!r}: split has dtype {values.dtype}; use the strings "
        "train, val, test or the codes 0, 1, 2"
    )


def _carve_val(
    labels: np.ndarray,
    split: np.ndarray,
    fractions: tuple[float, float, float],
    seed: int,
) -> np.ndarray:
    """Move a stratified ``val / (train + val)`` part of the train rows to val."""
    val_fraction = fractions[1] / (fractions[0] + fractions[1])
    train_rows = np.flatnonzero(split == SPLIT_CODES["train"])
    sub_split = stratified_split(
        labels[train_rows], (1.0 - val_fraction, val_fraction, 0.0), seed
    )
    carved = split.copy()
    carved[train_rows[sub_split == SPLIT_CODES["val"]]] = SPLIT_CODES["val"]
    return carved


def _limit_rows(labels: np.ndarray, split: np.ndarray, limit: int) -> np.ndarray:
    """Choose ``limit`` rows stratified by split, then by class within each split.

    Each (split, class) cell keeps its first rows in source order. The rounding
    error of each class is carried from one split to the next, so that the
    class totals stay balanced.
    """
    n_classes = int(labels.max()) + 1
    split_sizes = np.bincount(split, minlength=3).astype(np.float64)
    split_quotas = _apportion(limit, split_sizes)

    keep = np.zeros(len(labels), dtype=bool)
    carry = np.zeros(n_classes)
    for split_code, split_quota in enumerate(split_quotas):
        split_rows = np.flatnonzero(split == split_code)
        if split_quota == 0:
            continue
        split_labels = labels[split_rows]
        class_sizes = np.bincount(split_labels, minlength=n_classes)
        shares = split_quota * class_sizes / class_sizes.sum()
        targets = np.clip(shares + carry, 0.0, class_sizes)
        counts = np.minimum(
            _apportion(int(split_quota), targets, required=class_sizes > 0),
            class_sizes,
        )
        while counts.sum() < split_quota:  # give rows cut by the minimum back
            counts[int(np.argmax(class_sizes - counts))] += 1
        carry += shares - counts
        for label, count in enumerate(counts):
            keep[split_rows[split_labels == label][:count]] = True
    return np.flatnonzero(keep).astype(np.int64)


def _apportion(
    total: int, weights: np.ndarray, required: np.ndarray | None = None
) -> np.ndarray:
    """Split ``total`` into integer parts proportional to ``weights``.

    Uses the largest remainder, ties to the lower index. When ``total`` is at
    least the number of ``required`` parts (by default those with a positive
    weight), each of them gets at least 1, taken from the largest part.
    """
    quotas = total * weights / weights.sum()
    counts = np.floor(quotas).astype(np.int64)
    remainder = total - int(counts.sum())
    order = np.argsort(-(quotas - counts), kind="stable")
    counts[order[:remainder]] += 1

    if required is None:
        required = weights > 0
    if total >= int(required.sum()):
        for index in np.flatnonzero(required & (counts == 0)):
            counts[int(np.argmax(counts))] -= 1
            counts[index] += 1
    return counts


def _fingerprint(
    inputs: np.ndarray | Dataset[Any],
    inputs_hasher: Any,
    labels: np.ndarray,
    class_names: list[str],
    split: np.ndarray,
    sample_ids: np.ndarray,
) -> str:
    """Hash the model inputs, labels, class names, split and sample ids.

    Array inputs are hashed as they are stored (little-endian float32). A
    torch Dataset is hashed item by item, over all of its items, while its
    labels are read. The hashed ``sample_ids`` then record which rows were kept.
    """
    header = {"fingerprint_version": _FINGERPRINT_VERSION, "class_names": class_names}
    digest = inputs_hasher.copy() if inputs_hasher is not None else hashlib.sha256()
    if isinstance(inputs, np.ndarray):
        header["shape"] = list(inputs.shape)
        digest.update(json.dumps(header, sort_keys=True).encode())
        digest.update(np.ascontiguousarray(inputs, dtype="<f4").data)
    else:
        digest.update(json.dumps(header, sort_keys=True).encode())
    digest.update(labels.astype("<i8").tobytes())
    digest.update(split.astype(np.uint8).tobytes())
    digest.update(sample_ids.astype("<i8").tobytes())
    return str(digest.hexdigest())


# --- option checks ------------------------------------------------------------


def _check_fractions(
    fractions: Sequence[float], option: str
) -> tuple[float, float, float]:
    try:
        values = tuple(float(value) for value in fractions)
    except (TypeError, ValueError):
        values = ()
    text = ",".join(str(value) for value in fractions) if values else repr(fractions)
    if (
        len(values) != 3
        or not all(math.isfinite(value) and value >= 0 for value in values)
        or abs(sum(values) - 1.0) > 1e-6
        or values[0] <= 0
    ):
        raise InvalidInputError(
            f"invalid {option} {text}; give three non-negative fractions "
            "train,val,test that sum to 1 with train > 0, e.g. 0.6,0.2,0.2"
        )
    return values[0], values[1], values[2]


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise InvalidInputError(f"invalid seed {seed!r}; give a non-negative integer")


def _check_options(
    spec: str, *, seed: int, limit: int | None, n_samples: int | None
) -> None:
    _check_seed(seed)
    if limit is not None and (
        isinstance(limit, bool) or not isinstance(limit, int) or limit < 1
    ):
        raise InvalidInputError(f"invalid --limit {limit!r}; give a positive integer")
    if n_samples is None:
        return
    if spec != "toy":
        raise InvalidInputError(
            f"n_samples applies only to the toy dataset, not to {spec!r}; "
            "drop the option"
        )
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 2:
        raise InvalidInputError(
            f"invalid n_samples {n_samples!r} for the toy dataset; give an "
            "integer of at least 2"
        )
