"""Probe reports: the JSON files that ``probecvx fit`` writes, and their readers.

A reports folder contains one report per checkpoint, ``<checkpoint name>.json``,
and an ``index.json`` that lists every checkpoint with its status. Both are
validated against the JSON schemas shipped in ``probecvx/schemas/`` when they
are written and when they are read, so a reader never sees a partial or
malformed report. Numbers that are not finite are never written: the writer
raises instead, and the fitting code stores ``null`` with a warning. The
format is described for users in ``docs/reports.md``.

:func:`load_table` flattens a reports folder into one record per
(checkpoint, site), the input of ``probecvx report`` and of the figures.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from importlib import metadata, resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jsonschema

from probecvx import __version__
from probecvx.atomic import TEMP_PREFIX, write_text_atomic
from probecvx.errors import InvalidInputError, ReportError

if TYPE_CHECKING:
    import pandas

    from probecvx.shards import ShardInfo

logger = logging.getLogger(__name__)

REPORT_FORMAT = "probecvx-report"
INDEX_FORMAT = "probecvx-index"
REPORT_SCHEMA_VERSION = 1
REPORT_SUFFIX = ".json"
INDEX_NAME = "index.json"

# The keys of every record returned by load_table, in column order.
TABLE_KEYS = (
    "checkpoint",
    "step",
    "site",
    "site_order",
    "module_type",
    "n_features",
    "status",
    "error",
    "C",
    "train_error",
    "val_error",
    "test_error",
    "train_loss",
    "val_loss",
    "test_loss",
    "chance_error",
    "converged",
    "n_iter",
    "solver",
    "fit_seconds",
)

_SCHEMA_FILES = {REPORT_FORMAT: "report.schema.json", INDEX_FORMAT: "index.schema.json"}


def report_path(reports_dir: Path, checkpoint_name: str) -> Path:
    """Return the path of the report of ``checkpoint_name`` in ``reports_dir``."""
    return Path(reports_dir) / f"{checkpoint_name}{REPORT_SUFFIX}"


def software_versions() -> dict[str, str | None]:
    """Return the versions of probecvx and of the libraries that shape a fit.

    torch is looked up without importing it; its version is None when it is
    not installed.
    """
    versions: dict[str, str | None] = {"probecvx": __version__}
    for name in ("numpy", "scikit-learn", "torch"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def validate_report(doc: Mapping[str, Any], source: Path | str) -> None:
    """Check ``doc`` against the report schema; raise ReportError naming ``source``.

    Raises
    ------
    ReportError
        When ``doc`` is not a report of :data:`REPORT_SCHEMA_VERSION`, contains
        a non-finite number, or does not match the schema.
    """
    _validate(doc, REPORT_FORMAT, source)


def validate_index(doc: Mapping[str, Any], source: Path | str) -> None:
    """Check ``doc`` against the index schema; raise ReportError naming ``source``."""
    _validate(doc, INDEX_FORMAT, source)


def write_report(path: Path, doc: Mapping[str, Any]) -> None:
    """Validate ``doc`` and write it to ``path`` atomically.

    Raises
    ------
    ReportError
        When ``doc`` does not match the report schema; nothing is written.
    """
    _validate(doc, REPORT_FORMAT, path, writing=True)
    write_text_atomic(Path(path), _dumps(doc))


def write_index(path: Path, doc: Mapping[str, Any]) -> None:
    """Validate the index ``doc`` and write it to ``path`` atomically."""
    _validate(doc, INDEX_FORMAT, path, writing=True)
    write_text_atomic(Path(path), _dumps(doc))


def read_report(path: Path) -> dict[str, Any]:
    """Read and validate the report at ``path``.

    Raises
    ------
    ReportError
        When the file is missing, is not JSON, is not a probecvx report, was
        written by another report schema version, or does not match the
        schema. The message names the file and how to rewrite it.
    """
    return _read(Path(path), REPORT_FORMAT)


def read_index(path: Path) -> dict[str, Any]:
    """Read and validate the ``index.json`` at ``path``, as :func:`read_report` does."""
    return _read(Path(path), INDEX_FORMAT)


def list_reports(reports_dir: Path) -> list[Path]:
    """List the checkpoint reports in ``reports_dir``, sorted by file name.

    ``index.json``, hidden files and temporary files of a killed run are left
    out. An empty list is returned when the folder contains no report.

    Raises
    ------
    InvalidInputError
        When ``reports_dir`` does not exist or is not a folder.
    """
    folder = Path(reports_dir)
    if not folder.is_dir():
        problem = "is not a folder" if folder.exists() else "does not exist"
        raise InvalidInputError(
            f"reports folder {folder} {problem}; pass the --out folder of "
            "`probecvx fit`"
        )
    return sorted(
        path
        for path in folder.iterdir()
        if path.suffix == REPORT_SUFFIX
        and path.name != INDEX_NAME
        and not path.name.startswith((".", TEMP_PREFIX))
        and path.is_file()
    )


def load_table(reports_dir: Path) -> list[dict[str, Any]]:
    """Flatten every report in ``reports_dir`` into one record per (checkpoint, site).

    Parameters
    ----------
    reports_dir : Path
        The ``--out`` folder of ``probecvx fit``.

    Returns
    -------
    list of dict
        Records with exactly the keys in :data:`TABLE_KEYS`, sorted by
        training step (unknown steps last), then checkpoint name, then the
        site's forward order. Values of failed sites that were not measured
        are None.

    Raises
    ------
    InvalidInputError
        When the folder does not exist or contains no readable report.

    Warns
    -----
    UserWarning
        For each ``.json`` file that is skipped: one that is not a probecvx
        report (another program's file, such as ``config.json``), or a
        report that cannot be read. The message names the file, and for a
        report, how to rewrite it.
    """
    paths = list_reports(reports_dir)
    if not paths:
        raise InvalidInputError(
            f"reports folder {reports_dir} contains no report; run "
            f"`probecvx fit ACTS_DIR --out {reports_dir}` first"
        )
    listed = _report_names_in_index(Path(reports_dir))
    records = []
    skipped = []
    for path in paths:
        try:
            report = read_report(path)
        except ReportError as err:
            warnings.warn(_skip_message(path, err, listed), UserWarning, stacklevel=2)
            skipped.append(path.name)
            continue
        records.extend(table_records(report))
    if len(skipped) == len(paths):
        raise InvalidInputError(
            f"reports folder {reports_dir} contains no readable report: all "
            f"{len(paths)} .json files were skipped ({', '.join(skipped)}); run "
            f"`probecvx fit ACTS_DIR --out {reports_dir}` to write the reports"
        )
    records.sort(key=_table_sort_key)
    return records


def _report_names_in_index(reports_dir: Path) -> set[str] | None:
    """Return the report file names that ``index.json`` lists; None without one."""
    index_path = reports_dir / INDEX_NAME
    if not index_path.is_file():
        return None
    try:
        index = read_index(index_path)
    except ReportError:
        return None
    return {entry["report"] for entry in index["checkpoints"] if entry["report"]}


def _skip_message(path: Path, err: ReportError, listed: set[str] | None) -> str:
    """Return the warning for a ``.json`` file that load_table skips.

    A file is taken for a report when its ``format`` is the report format, or
    when ``index.json`` lists it. Without a readable index, a file that is not
    valid JSON is taken for a report too. Any other file belongs to something
    else and is only named.
    """
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        doc = None
    is_report_format = isinstance(doc, Mapping) and doc.get("format") == REPORT_FORMAT
    if listed is not None:
        is_report = path.name in listed or is_report_format
    else:
        is_report = doc is None or is_report_format
    if not is_report:
        if isinstance(doc, Mapping):
            reason = f"its format is {doc.get('format')!r}, not {REPORT_FORMAT!r}"
        elif doc is None:
            reason = f"it is not valid JSON and {INDEX_NAME} does not list it"
        else:
            reason = f"it contains a JSON {type(doc).__name__}, not an object"
        return (
            f"skipped {path}: it is not a probecvx report ({reason}); move it out "
            "of the reports folder to silence this warning"
        )
    # The reader's advice ("delete it", "--force") is replaced by one fix that
    # works for every corrupt report: fit rewrites a report it cannot read.
    problem, separator, advice = str(err).rpartition("; ")
    if not (separator and "probecvx fit" in advice):
        problem = str(err)
    return (
        f"skipped {path}, so its checkpoint is left out of the table: {problem}. "
        f"Re-run `probecvx fit ACTS_DIR --out {path.parent}` with the same options "
        "to regenerate it"
    )


def load_dataframe(reports_dir: Path) -> pandas.DataFrame:
    """Return :func:`load_table` as a pandas DataFrame with columns :data:`TABLE_KEYS`.

    Raises
    ------
    ImportError
        When pandas is not installed.
    """
    try:
        import pandas
    except ImportError as err:
        raise ImportError(
            "load_dataframe needs pandas, which is not installed; run "
            "`pip install pandas`, or use load_table for plain records"
        ) from err
    return pandas.DataFrame(load_table(reports_dir), columns=list(TABLE_KEYS))


def table_records(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Flatten one validated report into records with the keys in :data:`TABLE_KEYS`."""
    checkpoint = report["checkpoint"]
    records = []
    for entry in report["sites"]:
        solver = entry["solver"]
        records.append(
            {
                "checkpoint": checkpoint["name"],
                "step": checkpoint["step"],
                "site": entry["site"],
                "site_order": entry["order"],
                "module_type": entry["module_type"],
                "n_features": entry["n_features"],
                "status": entry["status"],
                "error": entry["error"],
                "C": entry["C"],
                "train_error": entry["train"]["error"],
                "val_error": entry["val"]["error"],
                "test_error": entry["test"]["error"],
                "train_loss": entry["train"]["loss"],
                "val_loss": entry["val"]["loss"],
                "test_loss": entry["test"]["loss"],
                "chance_error": entry["chance_error"],
                "converged": None if solver is None else solver["converged"],
                "n_iter": None if solver is None else solver["n_iter"],
                "solver": report["fit"]["solver"] if solver is None else solver["name"],
                "fit_seconds": None if solver is None else solver["fit_seconds"],
            }
        )
    return records


def build_report(
    info: ShardInfo,
    split_sizes: Mapping[str, int],
    entries: Sequence[Mapping[str, Any]],
    fit: Mapping[str, Any],
) -> dict[str, Any]:
    """Assemble the report of one checkpoint from its shard and its site entries.

    Parameters
    ----------
    info : ShardInfo
        The checkpoint's shard; its attributes are copied as provenance.
    split_sizes : mapping of str to int
        Rows in the ``train``, ``val`` and ``test`` splits.
    entries : sequence of dict
        Site entries, in forward order; at least one.
    fit : mapping
        The ``fit`` block: solver, grid of C, tol, max_iter, early_stopping,
        warm_start and settings_hash.
    """
    statuses = {entry["status"] for entry in entries}
    status = "partial" if len(statuses) > 1 else statuses.pop()
    report_warnings = [
        f"the {split} split has no rows, so its error and loss are null"
        for split, size in split_sizes.items()
        if size == 0
    ]
    return {
        "format": REPORT_FORMAT,
        "schema_version": REPORT_SCHEMA_VERSION,
        "created": _now(),
        "status": status,
        "checkpoint": {
            "name": info.checkpoint_name,
            "path": info.checkpoint_path,
            "kind": info.checkpoint_kind,
            "step": info.step,
            "sha256": info.checkpoint_sha256,
        },
        "dataset": {
            "name": info.dataset_name,
            "fingerprint": info.dataset_fingerprint,
            "class_names": list(info.class_names),
            "split_sizes": dict(split_sizes),
        },
        "shard": {
            "path": str(info.path),
            "shard_id": info.shard_id,
            "settings_hash": info.settings_hash,
            "storage_dtype": info.storage_dtype,
            "pooling": info.pooling,
        },
        "fit": dict(fit),
        "versions": software_versions(),
        "warnings": report_warnings,
        "sites": [dict(entry) for entry in entries],
    }


def same_report(path: Path, doc: Mapping[str, Any]) -> bool:
    """Return whether the report at ``path`` equals ``doc`` apart from its date."""
    if not Path(path).is_file():
        return False
    try:
        existing = read_report(path)
    except ReportError:
        return False
    existing.pop("created")
    return existing == {key: value for key, value in doc.items() if key != "created"}


class ReportIndex:
    """The entries of a reports folder's ``index.json``, by checkpoint name.

    Each entry names a checkpoint's report and its status, or, for a shard that
    could not be read, the error. :meth:`write` replaces the file atomically.
    """

    def __init__(self, entries: dict[str, dict[str, Any]] | None = None) -> None:
        self.entries = {} if entries is None else entries

    @classmethod
    def load(cls, reports_dir: Path) -> ReportIndex:
        """Build the index of the reports in ``reports_dir``.

        Failures recorded by the previous ``index.json`` are kept for the
        checkpoints that still have no report. Unreadable reports are left
        out, with a logged warning.
        """
        reports_dir = Path(reports_dir)
        entries: dict[str, dict[str, Any]] = {}
        index_path = reports_dir / INDEX_NAME
        if index_path.is_file():
            try:
                previous = read_index(index_path)
            except ReportError as err:
                logger.warning("%s; rebuilding it from the reports", err)
            else:
                for entry in previous["checkpoints"]:
                    if entry["report"] is None:
                        entries[entry["checkpoint"]] = entry
        for path in list_reports(reports_dir):
            try:
                doc = read_report(path)
            except ReportError as err:
                logger.warning("%s; it is left out of %s", err, INDEX_NAME)
                continue
            entries[doc["checkpoint"]["name"]] = _index_entry(doc, path)
        return cls(entries)

    def set_report(self, doc: Mapping[str, Any], path: Path) -> None:
        """Record the report ``doc`` written at ``path``."""
        self.entries[doc["checkpoint"]["name"]] = _index_entry(doc, Path(path))

    def set_failed(self, checkpoint: str, shard: str, error: str) -> None:
        """Record that the shard of ``checkpoint`` could not be read."""
        self.entries[checkpoint] = {
            "checkpoint": checkpoint,
            "step": None,
            "status": "failed",
            "report": None,
            "shard": shard,
            "shard_id": None,
            "settings_hash": None,
            "n_sites": 0,
            "n_ok": 0,
            "n_failed": 0,
            "error": error,
        }

    def write(self, reports_dir: Path) -> Path:
        """Validate the index and write it to ``reports_dir/index.json`` atomically."""
        checkpoints = sorted(
            self.entries.values(),
            key=lambda entry: (
                entry["step"] is None,
                entry["step"] or 0,
                entry["checkpoint"],
            ),
        )
        doc = {
            "format": INDEX_FORMAT,
            "schema_version": REPORT_SCHEMA_VERSION,
            "updated": _now(),
            "checkpoints": checkpoints,
        }
        path = Path(reports_dir) / INDEX_NAME
        write_index(path, doc)
        return path


def _index_entry(doc: Mapping[str, Any], path: Path) -> dict[str, Any]:
    n_sites = len(doc["sites"])
    n_failed = sum(1 for entry in doc["sites"] if entry["status"] == "failed")
    error = None
    if n_failed:
        error = f"{n_failed} of {n_sites} probe sites failed; see {path.name}"
    return {
        "checkpoint": doc["checkpoint"]["name"],
        "step": doc["checkpoint"]["step"],
        "status": doc["status"],
        "report": path.name,
        "shard": doc["shard"]["path"],
        "shard_id": doc["shard"]["shard_id"],
        "settings_hash": doc["fit"]["settings_hash"],
        "n_sites": n_sites,
        "n_ok": n_sites - n_failed,
        "n_failed": n_failed,
        "error": error,
    }


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _table_sort_key(record: Mapping[str, Any]) -> tuple[bool, int, str, int]:
    step = record["step"]
    return (step is None, step or 0, record["checkpoint"], record["site_order"])


@functools.cache
def _validator(kind: str) -> jsonschema.protocols.Validator:
    """Load the JSON schema for ``kind`` from the installed package, once."""
    text = (
        resources.files("probecvx")
        .joinpath("schemas", _SCHEMA_FILES[kind])
        .read_text(encoding="utf-8")
    )
    schema = json.loads(text)
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    return validator_class(schema)


def _validate(
    doc: Mapping[str, Any], kind: str, source: Path | str, writing: bool = False
) -> None:
    """Raise ReportError naming ``source`` unless ``doc`` is a valid ``kind``.

    When ``writing``, a failure is a bug in probecvx rather than a file to
    rewrite, and the message tells the user so. Nothing is written.
    """
    label = "report" if kind == REPORT_FORMAT else "report index"
    fix = "re-run `probecvx fit --force` to rewrite it"
    if writing:
        fix = "nothing was written; this is a bug in probecvx, please report it"
    if not isinstance(doc, Mapping) or doc.get("format") != kind:
        found = doc.get("format") if isinstance(doc, Mapping) else type(doc).__name__
        raise ReportError(
            f"{source} is not a probecvx {label} (format is {found!r}, expected "
            f"{kind!r}); pass the --out folder of `probecvx fit`"
        )
    version = doc.get("schema_version")
    if version != REPORT_SCHEMA_VERSION:
        raise ReportError(
            f"{label} {source} has schema_version {version!r}, but this probecvx "
            f"reads version {REPORT_SCHEMA_VERSION}; {fix}"
        )

    location = _non_finite_location(doc, "")
    if location is not None:
        raise ReportError(
            f"{label} {source} contains a NaN or infinite number at {location!r}, "
            f"but reports store null for values that are not finite; {fix}"
        )
    error = jsonschema.exceptions.best_match(_validator(kind).iter_errors(doc))
    if error is not None:
        field = "/".join(str(part) for part in error.absolute_path) or "(top level)"
        raise ReportError(
            f"{label} {source} does not match the schema at {field!r}: "
            f"{error.message}; {fix}"
        )


def _non_finite_location(value: Any, location: str) -> str | None:
    """Return the path of the first NaN or infinite float inside ``value``."""
    if isinstance(value, float):
        return None if math.isfinite(value) else location or "(top level)"
    if isinstance(value, Mapping):
        items: Any = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = _non_finite_location(
            item, f"{location}/{key}" if location else str(key)
        )
        if found is not None:
            return found
    return None


def _dumps(doc: Mapping[str, Any]) -> str:
    return json.dumps(doc, indent=2, allow_nan=False) + "\n"


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid in a probecvx report")


def _read(path: Path, kind: str) -> dict[str, Any]:
    label = "report" if kind == REPORT_FORMAT else "report index"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ReportError(
            f"{label} {path} not found; run `probecvx fit` to write it"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ReportError(f"cannot read {label} {path}: {err}") from err
    try:
        doc = json.loads(text, parse_constant=_reject_constant)
    except ValueError as err:
        raise ReportError(
            f"{label} {path} is not valid JSON ({err}); delete it and re-run "
            "`probecvx fit`"
        ) from err
    _validate(doc, kind, path)
    return dict(doc)
