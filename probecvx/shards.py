"""The HDF5 shard layout: one file of activations per checkpoint.

A shard contains, for one checkpoint, the activations of every selected probe site
over every sample of one dataset, with the labels, the train/val/test split,
the sample ids and the hashes that decide whether it is stale. The layout is
described in ``docs/internals.md`` (for contributors) and ``docs/shards.md``
(for users).

:class:`ShardWriter` writes a shard under a temporary name and moves it to its
final name only when every site is complete, so a final name never contains a
partial shard. Finished shards are never modified: readers open them read-only,
without HDF5 file locking where the installed HDF5 allows it, and close them
before returning.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

import h5py
import numpy as np

from probecvx import __version__
from probecvx.atomic import TEMP_PREFIX, atomic_path
from probecvx.cluster import h5py_locking_kwargs
from probecvx.errors import (
    ExtractionError,
    InvalidInputError,
    ShardError,
    SiteError,
)

logger = logging.getLogger(__name__)

SHARD_FORMAT = "probecvx-shard"
SHARD_SCHEMA_VERSION = 1
SHARD_SUFFIX = ".h5"

# Root attributes that every shard carries; the writer adds `format`,
# `schema_version`, `sites_json` and, unless given, `probecvx_version` and
# `created`. The caller supplies the rest.
REQUIRED_ATTRS = (
    "checkpoint_name",
    "checkpoint_path",
    "checkpoint_kind",
    "step",
    "checkpoint_sha256",
    "dataset_name",
    "dataset_fingerprint",
    "settings_json",
    "settings_hash",
    "shard_id",
    "storage_dtype",
    "pooling",
)
TARGET_DATASETS = ("labels", "class_names", "split", "sample_ids")
SITES_GROUP = "sites"
STORAGE_DTYPES = ("float32", "float16")

CHUNK_BYTES = 1 << 20  # target size of one HDF5 chunk of a site dataset
READ_BLOCK_BYTES = 32 << 20  # target size of one block read by read_site


@dataclass(frozen=True)
class ShardInfo:
    """The root attributes and site list of one shard, read without its arrays.

    ``site_attrs`` maps each site to its dataset attributes (``site``,
    ``module_type``, ``original_shape``, ``call_index``, ``pooling``,
    ``overflow_count``) plus ``n_features``, the width of the stored array.
    ``step`` is None when the checkpoint's training step is unknown.
    """

    path: Path
    checkpoint_name: str
    checkpoint_path: str
    checkpoint_kind: str
    step: int | None
    checkpoint_sha256: str
    dataset_name: str
    dataset_fingerprint: str
    settings_hash: str
    shard_id: str
    sites: list[str]
    site_attrs: dict[str, dict[str, Any]]
    n_samples: int
    class_names: list[str]
    storage_dtype: str
    pooling: str
    attrs: dict[str, Any]


class ShardWriter:
    """Write one shard under a temporary name and commit it on a clean exit.

    Use it as a context manager. On entry the temporary file is created beside
    ``final_path`` with the root attributes and the targets (labels, split,
    sample ids, class names). Call :meth:`create_site` once per site in
    forward order, then :meth:`write_rows` with consecutive row blocks. On a
    clean exit every site must hold all ``n_samples`` rows; the file is then
    flushed, closed, fsynced and renamed to ``final_path``. On an exception,
    or when a site is incomplete, the temporary file is removed and nothing
    appears under ``final_path``.

    Parameters
    ----------
    final_path : Path
        Where the finished shard goes, normally ``<checkpoint name>.h5``.
    attrs : mapping of str to str or int
        Root attributes; must contain every name in :data:`REQUIRED_ATTRS`.
    labels : ndarray of shape (n_samples,)
        Class codes ``0..K-1``, stored as int64.
    class_names : sequence of str
        The name of each class code.
    split : ndarray of shape (n_samples,)
        Split codes (0 train, 1 val, 2 test), stored as uint8.
    sample_ids : ndarray of shape (n_samples,)
        Row index of each sample in the source dataset, stored as int64.

    Raises
    ------
    ExtractionError
        When the disk is full or a write fails; the message names the file
        and the free space left.
    """

    def __init__(
        self,
        final_path: Path,
        *,
        attrs: Mapping[str, str | int],
        labels: np.ndarray,
        class_names: Sequence[str],
        split: np.ndarray,
        sample_ids: np.ndarray,
    ) -> None:
        missing = [name for name in REQUIRED_ATTRS if name not in attrs]
        if missing:
            raise ValueError(f"shard attrs are missing {', '.join(missing)}")
        labels = np.asarray(labels)
        n_samples = labels.shape[0] if labels.ndim == 1 else -1
        if n_samples < 1:
            raise ValueError(
                f"labels must be a non-empty 1-d array, got shape {labels.shape}"
            )
        for name, values in (("split", split), ("sample_ids", sample_ids)):
            if np.shape(values) != (n_samples,):
                raise ValueError(
                    f"{name} must have shape ({n_samples},) like labels, "
                    f"got {np.shape(values)}"
                )
        self.final_path = Path(final_path)
        self.n_samples = int(n_samples)
        self._attrs = dict(attrs)
        self._labels = labels.astype(np.int64, copy=False)
        self._class_names = [str(name) for name in class_names]
        self._split = np.asarray(split).astype(np.uint8, copy=False)
        self._sample_ids = np.asarray(sample_ids).astype(np.int64, copy=False)
        self._commit: contextlib.AbstractContextManager[Path] | None = None
        self._temp: Path | None = None
        self._file: h5py.File | None = None
        self._rows_written: dict[str, int] = {}

    def __enter__(self) -> ShardWriter:
        self._commit = atomic_path(self.final_path)
        self._temp = self._commit.__enter__()
        try:
            self._file = h5py.File(self._temp, "w", **h5py_locking_kwargs(writing=True))
            self._write_root()
        except BaseException as err:
            self._abort(type(err), err, err.__traceback__)
            if isinstance(err, OSError):
                raise self._write_error(err) from err
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self._abort(exc_type, exc, tb)
            return

        try:
            self._check_complete()
            assert self._file is not None
            self._file.flush()
            self._file.close()
            self._file = None
        except BaseException as err:
            self._abort(type(err), err, err.__traceback__)
            if isinstance(err, OSError):
                raise self._write_error(err) from err
            raise

        # atomic_path removes the temporary file itself if the commit fails.
        assert self._commit is not None
        commit, self._commit = self._commit, None
        try:
            commit.__exit__(None, None, None)
        except OSError as err:
            raise self._write_error(err) from err
        logger.debug("committed shard %s", self.final_path)

    def create_site(
        self,
        name: str,
        n_features: int,
        dtype: str,
        attrs: Mapping[str, Any],
    ) -> None:
        """Create the ``/sites/<name>`` dataset of shape (n_samples, n_features).

        Sites are listed in ``sites_json`` in the order they are created, which
        should be the forward order. Rows are chunked so that one chunk contains
        about 1 MiB.
        """
        if self._file is None:
            raise RuntimeError("create_site called outside the ShardWriter block")
        if name in self._rows_written:
            raise ValueError(f"site {name!r} was already created in this shard")
        if not name or "/" in name or name in (".", ".."):
            raise ExtractionError(
                f"probe site name {name!r} cannot be an HDF5 dataset name; "
                "rename the module so that its path has no '/'"
            )
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype must be one of {STORAGE_DTYPES}, got {dtype!r}")

        itemsize = np.dtype(dtype).itemsize
        chunks: tuple[int, int] | None = None
        if n_features > 0:
            rows_per_chunk = max(1, CHUNK_BYTES // (n_features * itemsize))
            chunks = (min(self.n_samples, rows_per_chunk), n_features)
        try:
            dataset = self._file.create_dataset(
                f"{SITES_GROUP}/{name}",
                shape=(self.n_samples, n_features),
                dtype=dtype,
                chunks=chunks,
            )
            for key, value in attrs.items():
                dataset.attrs[key] = _attr_value(value)
            self._rows_written[name] = 0
            self._file.attrs["sites_json"] = json.dumps(list(self._rows_written))
        except OSError as err:
            raise self._write_error(err) from err

    def write_rows(self, name: str, start: int, array: np.ndarray) -> None:
        """Write ``array`` (rows, n_features) to site ``name`` from row ``start``.

        Blocks must arrive in order: ``start`` is the number of rows already
        written to that site.
        """
        if self._file is None:
            raise RuntimeError("write_rows called outside the ShardWriter block")
        if name not in self._rows_written:
            raise KeyError(f"site {name!r} was not created in this shard")
        expected = self._rows_written[name]
        if start != expected:
            raise ValueError(
                f"rows of site {name!r} must be written in order: "
                f"next row is {expected}, got start={start}"
            )
        stop = start + array.shape[0]
        if stop > self.n_samples:
            raise ValueError(
                f"site {name!r} has {self.n_samples} rows; "
                f"cannot write rows {start}:{stop}"
            )
        try:
            self._file[f"{SITES_GROUP}/{name}"][start:stop] = array
        except OSError as err:
            raise self._write_error(err) from err
        self._rows_written[name] = stop

    def set_site_attrs(self, name: str, attrs: Mapping[str, Any]) -> None:
        """Set or replace attributes of site ``name``, such as ``overflow_count``."""
        if self._file is None:
            raise RuntimeError("set_site_attrs called outside the ShardWriter block")
        if name not in self._rows_written:
            raise KeyError(f"site {name!r} was not created in this shard")
        try:
            dataset = self._file[f"{SITES_GROUP}/{name}"]
            for key, value in attrs.items():
                dataset.attrs[key] = _attr_value(value)
        except OSError as err:
            raise self._write_error(err) from err

    def _write_root(self) -> None:
        assert self._file is not None
        root = self._file.attrs
        root["format"] = SHARD_FORMAT
        root["schema_version"] = SHARD_SCHEMA_VERSION
        root["probecvx_version"] = __version__
        root["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        for key, value in self._attrs.items():
            root[key] = _attr_value(value)
        root["sites_json"] = "[]"

        self._file.create_dataset("labels", data=self._labels)
        self._file.create_dataset(
            "class_names",
            data=np.array(self._class_names, dtype=object),
            dtype=h5py.string_dtype("utf-8"),
        )
        self._file.create_dataset("split", data=self._split)
        self._file.create_dataset("sample_ids", data=self._sample_ids)
        self._file.create_group(SITES_GROUP)

    def _check_complete(self) -> None:
        for name, written in self._rows_written.items():
            if written != self.n_samples:
                raise ExtractionError(
                    f"shard {self.final_path} is incomplete: site {name!r} has "
                    f"{written} of {self.n_samples} rows; nothing was written "
                    "under that name"
                )

    def _abort(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the file and remove the temporary name, ignoring close errors."""
        if self._file is not None:
            with contextlib.suppress(Exception):
                self._file.close()
            self._file = None
        if self._commit is not None:
            commit, self._commit = self._commit, None
            # atomic_path removes the temporary file and re-raises the
            # exception it is given; the caller re-raises it instead.
            with contextlib.suppress(BaseException):
                commit.__exit__(exc_type, exc, tb)

    def _write_error(self, err: OSError) -> ExtractionError:
        folder = self.final_path.parent
        try:
            free = f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB free"
        except OSError:
            free = "free space unknown"
        if err.errno == errno.ENOSPC:
            reason = "the disk is full"
        else:
            reason = f"the write failed ({err})"
        return ExtractionError(
            f"could not write shard {self.final_path}: {reason}, {free} in "
            f"{folder}; free space or choose another --out folder, then re-run; "
            "nothing was written under that name"
        )


def read_shard_info(path: Path) -> ShardInfo:
    """Read the attributes and site list of the shard at ``path``.

    Raises
    ------
    ShardError
        When the file is missing, not HDF5, truncated, not a probecvx shard,
        written with another schema version, or missing a dataset.
    """
    path = Path(path)
    with _open_shard(path) as file:
        attrs = {key: _plain(value) for key, value in file.attrs.items()}
        _check_format(path, attrs)

        sites = _parse_sites(path, attrs)
        for name in TARGET_DATASETS:
            if name not in file:
                raise _missing(path, f"dataset /{name}")
        site_attrs: dict[str, dict[str, Any]] = {}
        for site in sites:
            dataset = _site_dataset(file, path, site)
            entry = {key: _plain(value) for key, value in dataset.attrs.items()}
            entry["n_features"] = int(dataset.shape[1])
            site_attrs[site] = entry
        n_samples = int(file["labels"].shape[0])
        class_names = [str(name) for name in file["class_names"].asstr()[()]]

    step = int(attrs["step"])
    return ShardInfo(
        path=path,
        checkpoint_name=str(attrs["checkpoint_name"]),
        checkpoint_path=str(attrs["checkpoint_path"]),
        checkpoint_kind=str(attrs["checkpoint_kind"]),
        step=None if step < 0 else step,
        checkpoint_sha256=str(attrs["checkpoint_sha256"]),
        dataset_name=str(attrs["dataset_name"]),
        dataset_fingerprint=str(attrs["dataset_fingerprint"]),
        settings_hash=str(attrs["settings_hash"]),
        shard_id=str(attrs["shard_id"]),
        sites=sites,
        site_attrs=site_attrs,
        n_samples=n_samples,
        class_names=class_names,
        storage_dtype=str(attrs["storage_dtype"]),
        pooling=str(attrs["pooling"]),
        attrs=attrs,
    )


def read_site(path: Path, site: str, *, rows: np.ndarray | None = None) -> np.ndarray:
    """Read the activations of ``site`` from the shard at ``path``.

    Parameters
    ----------
    path : Path
        The shard file.
    site : str
        A site name listed in the shard's ``sites_json``.
    rows : ndarray of int, optional
        Row indices to read, in any order, repeats allowed. Default: all rows.

    Returns
    -------
    ndarray of shape (n_rows, n_features)
        In the stored dtype (float32 or float16), rows in the requested order.
    """
    path = Path(path)
    with _open_shard(path) as file:
        dataset = _site_dataset(file, path, site)
        n_samples, n_features = dataset.shape
        block = _read_block_rows(dataset)
        if rows is None:
            out = np.empty(dataset.shape, dtype=dataset.dtype)
            if n_features == 0:
                return out
            for start in range(0, n_samples, block):
                stop = min(start + block, n_samples)
                dataset.read_direct(out, np.s_[start:stop], np.s_[start:stop])
            return out
        return _read_selected_rows(dataset, path, site, np.asarray(rows), block)


def read_targets(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read ``(labels, split, sample_ids)`` from the shard at ``path``.

    Returns int64 labels, uint8 split codes and int64 sample ids, each of
    shape (n_samples,).
    """
    path = Path(path)
    with _open_shard(path) as file:
        for name in TARGET_DATASETS:
            if name not in file:
                raise _missing(path, f"dataset /{name}")
        labels = np.asarray(file["labels"][()], dtype=np.int64)
        split = np.asarray(file["split"][()], dtype=np.uint8)
        sample_ids = np.asarray(file["sample_ids"][()], dtype=np.int64)
    return labels, split, sample_ids


def list_shards(folder: Path) -> list[Path]:
    """List the shards in ``folder``, sorted by training step, then by name.

    Shards whose step is unknown come after those with a step. Names are
    compared in natural order (``a2`` before ``a10``). Temporary
    files left by a killed run are ignored. An empty list is returned when
    the folder contains no shard.

    Raises
    ------
    InvalidInputError
        When ``folder`` does not exist or is not a folder.
    ShardError
        When a ``.h5`` file in the folder cannot be read as a shard.
    """
    folder = Path(folder)
    if not folder.is_dir():
        problem = "is not a folder" if folder.exists() else "does not exist"
        raise InvalidInputError(
            f"activations folder {folder} {problem}; pass the --out folder "
            "of `probecvx extract`"
        )
    paths = [
        path
        for path in folder.iterdir()
        if path.suffix == SHARD_SUFFIX
        and not path.name.startswith(TEMP_PREFIX)
        and path.is_file()
    ]
    keyed = []
    for path in paths:
        with _open_shard(path) as file:
            if "step" not in file.attrs:
                raise _missing(path, "root attribute 'step'")
            step = int(file.attrs["step"])
        known = step >= 0
        keyed.append(((not known, step if known else 0, _natural_key(path.name)), path))
    keyed.sort(key=lambda item: item[0])
    return [path for _, path in keyed]


@contextlib.contextmanager
def _open_shard(path: Path) -> Iterator[h5py.File]:
    """Open a finished shard read-only, turning open failures into ShardError."""
    if not path.is_file():
        raise ShardError(f"shard {path} not found; run `probecvx extract` to write it")
    try:
        file = h5py.File(path, "r", **h5py_locking_kwargs(writing=False))
    except OSError as err:
        raise ShardError(
            f"cannot read shard {path}: not an HDF5 file or truncated ({err}); "
            "delete it and re-run `probecvx extract`"
        ) from err
    with file:
        yield file


def _check_format(path: Path, attrs: Mapping[str, Any]) -> None:
    if attrs.get("format") != SHARD_FORMAT:
        raise ShardError(
            f"{path} is not a probecvx shard (format attribute is "
            f"{attrs.get('format')!r}, expected {SHARD_FORMAT!r}); "
            "point probecvx at the --out folder of `probecvx extract`"
        )
    version = attrs.get("schema_version")
    if version != SHARD_SCHEMA_VERSION:
        raise ShardError(
            f"shard {path} has schema_version {version!r}, but this probecvx "
            f"reads version {SHARD_SCHEMA_VERSION}; re-run `probecvx extract` "
            "to rewrite it"
        )
    for name in (*REQUIRED_ATTRS, "sites_json"):
        if name not in attrs:
            raise _missing(path, f"root attribute {name!r}")


def _parse_sites(path: Path, attrs: Mapping[str, Any]) -> list[str]:
    try:
        sites = json.loads(str(attrs["sites_json"]))
    except json.JSONDecodeError as err:
        raise ShardError(
            f"shard {path} has an unreadable sites_json attribute ({err}); "
            "re-run `probecvx extract --force`"
        ) from err
    if not isinstance(sites, list) or not all(isinstance(s, str) for s in sites):
        raise ShardError(
            f"shard {path} has a sites_json attribute that is not a list of "
            "names; re-run `probecvx extract --force`"
        )
    return sites


def _site_dataset(file: h5py.File, path: Path, site: str) -> h5py.Dataset:
    sites = _parse_sites(path, file.attrs)
    if site not in sites:
        listed = ", ".join(sites[:20]) + (", …" if len(sites) > 20 else "")
        raise SiteError(
            f"probe site {site!r} is not in shard {path}; its sites are: {listed}"
        )
    key = f"{SITES_GROUP}/{site}"
    if key not in file:
        raise _missing(path, f"dataset /{key}")
    dataset = file[key]
    if not isinstance(dataset, h5py.Dataset) or dataset.ndim != 2:
        raise ShardError(
            f"shard {path}: /{key} is not a 2-d dataset; "
            "re-run `probecvx extract --force`"
        )
    return dataset


def _missing(path: Path, missing_part: str) -> ShardError:
    return ShardError(
        f"shard {path} has no {missing_part}; it was not written by a complete "
        "`probecvx extract` run, so delete it and re-run `probecvx extract`"
    )


def _read_block_rows(dataset: h5py.Dataset) -> int:
    """Return a row count per read: whole chunks, about READ_BLOCK_BYTES."""
    n_features = int(dataset.shape[1])
    row_bytes = max(1, n_features * dataset.dtype.itemsize)
    chunk_rows = dataset.chunks[0] if dataset.chunks else 1
    chunks_per_block = max(1, READ_BLOCK_BYTES // (row_bytes * chunk_rows))
    return int(chunk_rows * chunks_per_block)


def _read_selected_rows(
    dataset: h5py.Dataset, path: Path, site: str, rows: np.ndarray, block: int
) -> np.ndarray:
    n_samples, n_features = dataset.shape
    if rows.ndim != 1 or (rows.size and not np.issubdtype(rows.dtype, np.integer)):
        raise InvalidInputError(
            f"rows must be a 1-d array of integer indices, got dtype {rows.dtype} "
            f"and shape {rows.shape}"
        )
    rows = rows.astype(np.int64, copy=False)
    if rows.size and (rows.min() < 0 or rows.max() >= n_samples):
        raise InvalidInputError(
            f"row indices must lie in [0, {n_samples}) for site {site!r} of "
            f"shard {path}; got min {rows.min()}, max {rows.max()}"
        )

    out = np.empty((rows.size, n_features), dtype=dataset.dtype)
    if rows.size == 0 or n_features == 0:
        return out
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    # Read each block that contains a requested row once, then pick the rows.
    first = int(sorted_rows[0]) // block * block
    for start in range(first, int(sorted_rows[-1]) + 1, block):
        lo = np.searchsorted(sorted_rows, start, side="left")
        hi = np.searchsorted(sorted_rows, start + block, side="left")
        if lo == hi:
            continue
        stop = min(start + block, n_samples)
        values = dataset[start:stop]
        out[order[lo:hi]] = values[sorted_rows[lo:hi] - start]
    return out


def _attr_value(value: Any) -> Any:
    """Convert NumPy strings to ``str``, which h5py stores as UTF-8 text."""
    if isinstance(value, (str, np.str_)):
        return str(value)
    return value


def _natural_key(name: str) -> tuple[tuple[int, int, str], ...]:
    """Sort key that orders digit runs by value: ``a2`` before ``a10``."""
    parts = re.findall(r"\d+|\D+", name)
    return tuple(
        (0, int(part), part) if part.isdigit() else (1, 0, part) for part in parts
    )


def _plain(value: Any) -> Any:
    """Convert an HDF5 attribute value to a plain Python value."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return [_plain(item) for item in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value
