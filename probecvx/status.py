"""The state of every unit of an activations or reports folder, for ``probecvx status``.

Each unit is in one of five states:

- ``done``: its result is current (a shard; or a probe fitted with the shard
  and fit settings of the last ``fit`` run);
- ``pending``: not done and not claimed;
- ``failed``: its current result records an error;
- ``stale``: its result was made from another shard or with other settings;
- ``claimed``: a live process holds its claim and is working on it.

The reports folder is read together with the activations folder and the
selection that the last ``probecvx fit`` recorded in ``.units/.plan.json``.
For an activations folder, the pending and stale checkpoints are known only
when the checkpoint folder is given, because a shard records its checkpoint's
hash but not which other checkpoints exist.
"""

from __future__ import annotations

import fnmatch
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from probecvx import reports
from probecvx.atomic import TEMP_PREFIX, temp_owner
from probecvx.checkpoints import checkpoint_sha256, discover_checkpoints
from probecvx.claims import (
    CLAIM_SUFFIX,
    DEFAULT_CLAIM_TIMEOUT,
    ClaimRecord,
    claim_path,
    read_claim,
)
from probecvx.errors import InvalidInputError, ReportError, ShardError
from probecvx.extract import FAILURE_SUFFIX, claim_path_of, read_failure
from probecvx.fit import (
    PLAN_FORMAT,
    PLAN_NAME,
    UNITS_DIR,
    is_current,
    read_unit_file,
    unit_path,
)
from probecvx.shards import SHARD_SUFFIX, ShardInfo, read_shard_info

logger = logging.getLogger(__name__)

STATES = ("done", "pending", "failed", "stale", "claimed")


@dataclass(frozen=True)
class UnitStatus:
    """One unit's state: a shard (``site`` None) or a (checkpoint, site) probe.

    ``by`` names the process that produced the result, or that holds the
    claim, as ``host:pid (task T)``; ``detail`` is the error, why the result
    is stale, or since when the claim is held.
    """

    checkpoint: str
    site: str | None
    state: str
    by: str | None = None
    detail: str | None = None

    def record(self) -> dict[str, Any]:
        """Return the unit as a plain dict, for JSON."""
        return {
            "checkpoint": self.checkpoint,
            "site": self.site,
            "state": self.state,
            "by": self.by,
            "detail": self.detail,
        }


@dataclass
class FolderStatus:
    """The units of one folder, and notes about what is not a unit."""

    folder: Path
    kind: str  # "activations" or "reports"
    units: list[UnitStatus] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Return the number of units in each state, every state included."""
        counted = Counter(unit.state for unit in self.units)
        return {state: counted.get(state, 0) for state in STATES}

    def to_json(self) -> dict[str, Any]:
        """Return the status as a JSON-ready dict."""
        return {
            "folder": str(self.folder),
            "kind": self.kind,
            "counts": self.counts(),
            "units": [unit.record() for unit in self.units],
            "notes": list(self.notes),
        }


def folder_status(
    folder: Path,
    *,
    checkpoint_dir: Path | None = None,
    pattern: str | None = None,
    claim_timeout: float = DEFAULT_CLAIM_TIMEOUT,
) -> FolderStatus:
    """Return the state of every unit of an activations or reports folder.

    Parameters
    ----------
    folder : Path
        The ``--out`` folder of ``probecvx extract`` or of ``probecvx fit``.
    checkpoint_dir : Path, optional
        For an activations folder: the checkpoint folder that was extracted,
        to list pending checkpoints and find stale shards (this hashes every
        checkpoint). Ignored for a reports folder.
    pattern : str, optional
        The ``--glob`` of the extract run, with ``checkpoint_dir``.
    claim_timeout : float, default=600
        Seconds without a heartbeat after which a claim counts as stale.

    Raises
    ------
    InvalidInputError
        When ``folder`` is missing, is a reports folder without the plan
        that ``probecvx fit`` writes, or contains no file of either command
        and ``checkpoint_dir`` is not given.
    """
    folder = Path(folder)
    if not folder.is_dir():
        problem = "is not a folder" if folder.exists() else "does not exist"
        raise InvalidInputError(
            f"folder {folder} {problem}; pass the --out folder of `probecvx "
            "extract` or `probecvx fit`"
        )
    if (folder / UNITS_DIR).is_dir() or (folder / reports.INDEX_NAME).is_file():
        return _reports_status(folder, claim_timeout)
    return _activations_status(folder, checkpoint_dir, pattern, claim_timeout)


# --- Activations folders --------------------------------------------------------------


def _activations_status(
    folder: Path,
    checkpoint_dir: Path | None,
    pattern: str | None,
    claim_timeout: float,
) -> FolderStatus:
    status = FolderStatus(folder, "activations")
    shards: dict[str, ShardInfo] = {}
    names: list[str] = []
    for path in sorted(folder.glob(f"*{SHARD_SUFFIX}")):
        if path.name.startswith(".") or not path.is_file():
            continue
        try:
            shards[path.stem] = read_shard_info(path)
        except ShardError as err:
            status.units.append(UnitStatus(path.stem, None, "failed", None, str(err)))
            continue
        names.append(path.stem)
    for name in sorted(_hidden_names(folder, FAILURE_SUFFIX)):
        if name not in shards:
            names.append(name)
    for name in sorted(_hidden_names(folder, CLAIM_SUFFIX)):
        if name not in names:
            names.append(name)

    temp_notes = _temp_notes(folder)
    if not (status.units or names or temp_notes) and checkpoint_dir is None:
        raise InvalidInputError(
            f"{folder} is not an extract or fit output folder: it contains no "
            f"shards (*{SHARD_SUFFIX}), no hidden extract failure or claim files, "
            f"and no {reports.INDEX_NAME} or {UNITS_DIR}/ of a fit. Pass the --out "
            "folder of `probecvx extract` or `probecvx fit`, or add --checkpoints "
            "CKPT_DIR to list the checkpoints still to extract into this folder"
        )

    hashes: dict[str, str] = {}
    if checkpoint_dir is not None:
        for ref in discover_checkpoints(Path(checkpoint_dir), pattern):
            hashes[ref.name] = checkpoint_sha256(ref.path)
            if ref.name not in names:
                names.append(ref.name)

    for name in names:
        final = folder / f"{name}{SHARD_SUFFIX}"
        unit = _shard_unit(name, shards.get(name), hashes.get(name), final)
        status.units.append(_with_claim(unit, claim_path_of(final), claim_timeout))
    status.notes.extend(temp_notes)
    if checkpoint_dir is None:
        status.notes.append(
            "pass --checkpoints CKPT_DIR to list pending checkpoints and find "
            "shards of changed checkpoints"
        )
    return status


def _hidden_names(folder: Path, suffix: str) -> list[str]:
    """Return the checkpoint names of hidden files ``.<name>.h5<suffix>``."""
    tail = f"{SHARD_SUFFIX}{suffix}"
    return [
        path.name[1 : -len(tail)]
        for path in folder.glob(f".*{tail}")
        if not path.name.startswith(TEMP_PREFIX)
    ]


def _shard_unit(
    name: str, info: ShardInfo | None, checkpoint_hash: str | None, final: Path
) -> UnitStatus:
    if info is not None:
        by = _by(_provenance_of_shard(info))
        if checkpoint_hash is not None and checkpoint_hash != info.checkpoint_sha256:
            detail = "the checkpoint changed since its shard was written"
            return UnitStatus(name, None, "stale", by, detail)
        return UnitStatus(name, None, "done", by)
    failure = read_failure(final)
    if failure is not None:
        by = _by(failure.get("provenance"))
        return UnitStatus(name, None, "failed", by, str(failure.get("error")))
    return UnitStatus(name, None, "pending")


def _provenance_of_shard(info: ShardInfo) -> dict[str, Any] | None:
    text = info.attrs.get("provenance_json")
    if not isinstance(text, str):
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


# --- Reports folders ------------------------------------------------------------------


def _reports_status(folder: Path, claim_timeout: float) -> FolderStatus:
    status = FolderStatus(folder, "reports")
    plan = _read_plan(folder)
    acts_dir = Path(plan["acts_dir"])
    settings_hash = str(plan["fit"]["settings_hash"])
    site_patterns, checkpoint_patterns = plan.get("sites"), plan.get("checkpoints")

    for path in _shard_paths(acts_dir):
        if not _selected(path.stem, checkpoint_patterns):
            continue
        try:
            info = read_shard_info(path)
        except ShardError as err:
            status.units.append(UnitStatus(path.stem, None, "failed", None, str(err)))
            continue
        report = _read_report_entries(folder, info.checkpoint_name)
        units = []
        for site in info.sites:
            if not _selected(site, site_patterns):
                continue
            unit = _probe_unit(folder, info, site, settings_hash, report)
            path_of_claim = claim_path(unit_path(folder, info.checkpoint_name, site))
            units.append(_with_claim(unit, path_of_claim, claim_timeout))
        status.units.extend(units)
        note = _report_note(folder, info, settings_hash, units)
        if note:
            status.notes.append(note)
    status.notes.extend(_temp_notes(folder))
    return status


def _read_plan(folder: Path) -> dict[str, Any]:
    path = folder / UNITS_DIR / PLAN_NAME
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        doc = None
    except (OSError, ValueError) as err:
        raise InvalidInputError(
            f"cannot read the fit plan {path} ({err}); run `probecvx fit ACTS_DIR "
            f"--out {folder}` again to rewrite it (finished units are skipped)"
        ) from err
    if not isinstance(doc, dict) or doc.get("format") != PLAN_FORMAT:
        raise InvalidInputError(
            f"reports folder {folder} has no fit plan ({path}); run `probecvx fit "
            f"ACTS_DIR --out {folder}` once to write it (finished units are skipped)"
        )
    return doc


def _shard_paths(acts_dir: Path) -> list[Path]:
    if not acts_dir.is_dir():
        raise InvalidInputError(
            f"activations folder {acts_dir}, named in the fit plan, does not exist; "
            "run `probecvx fit` with the current folder to update the plan"
        )
    return sorted(
        path
        for path in acts_dir.glob(f"*{SHARD_SUFFIX}")
        if not path.name.startswith(".") and path.is_file()
    )


def _selected(name: str, patterns: list[str] | None) -> bool:
    return patterns is None or any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _read_report_entries(folder: Path, checkpoint: str) -> dict[str, Any] | None:
    path = reports.report_path(folder, checkpoint)
    if not path.is_file():
        return None
    try:
        return reports.read_report(path)
    except ReportError as err:
        logger.warning("%s", err)
        return None


def _probe_unit(
    folder: Path,
    info: ShardInfo,
    site: str,
    settings_hash: str,
    report: dict[str, Any] | None,
) -> UnitStatus:
    """Return a probe's state from its unit file, else from its report entry."""
    name = info.checkpoint_name
    doc = read_unit_file(unit_path(folder, name, site))
    if doc is not None:
        by = _by(doc.get("provenance"))
        if not is_current(doc, info.shard_id, settings_hash):
            reason = _stale_reason(doc.get("shard_id"), info.shard_id)
            return UnitStatus(name, site, "stale", by, reason)
        return _entry_unit(name, site, doc["entry"], by)

    entries = {} if report is None else {e["site"]: e for e in report["sites"]}
    if site not in entries:
        return UnitStatus(name, site, "pending")
    assert report is not None
    if report["shard"]["shard_id"] != info.shard_id or (
        report["fit"]["settings_hash"] != settings_hash
    ):
        reason = _stale_reason(report["shard"]["shard_id"], info.shard_id)
        return UnitStatus(name, site, "stale", None, reason)
    return _entry_unit(name, site, entries[site], None)


def _entry_unit(
    checkpoint: str, site: str, entry: dict[str, Any], by: str | None
) -> UnitStatus:
    if entry["status"] == "ok":
        return UnitStatus(checkpoint, site, "done", by)
    return UnitStatus(checkpoint, site, "failed", by, entry.get("error"))


def _stale_reason(fitted_shard_id: object, shard_id: str) -> str:
    if fitted_shard_id != shard_id:
        return "fitted on an earlier shard of this checkpoint; re-run fit"
    return "fitted with other fit settings than the last run's; re-run fit"


def _report_note(
    folder: Path, info: ShardInfo, settings_hash: str, units: list[UnitStatus]
) -> str | None:
    """Say when a checkpoint's units are all done but its report is not current."""
    if not units or any(unit.state not in ("done", "failed") for unit in units):
        return None
    report = _read_report_entries(folder, info.checkpoint_name)
    if report is not None and (
        report["shard"]["shard_id"] == info.shard_id
        and report["fit"]["settings_hash"] == settings_hash
    ):
        return None
    return (
        f"every selected unit of {info.checkpoint_name} is done, but its report is "
        "missing or out of date; run `probecvx fit` again to write it"
    )


# --- Claims, temporary files, owners -----------------------------------------------


def _with_claim(unit: UnitStatus, path: Path, claim_timeout: float) -> UnitStatus:
    """Return ``unit`` as claimed when a live process holds its claim."""
    record = read_claim(path)
    if record is None:
        return unit
    reason = record.stale_reason(claim_timeout)
    if reason is None:
        return UnitStatus(
            unit.checkpoint, unit.site, "claimed", record.owner.label(), _since(record)
        )
    detail = f"stale claim of {record.describe()} ({reason}); the next run breaks it"
    if unit.detail:
        detail = f"{unit.detail}; {detail}"
    return UnitStatus(unit.checkpoint, unit.site, unit.state, unit.by, detail)


def _since(record: ClaimRecord) -> str:
    return f"since {record.started}, heartbeat {record.age:.0f} s ago"


def _temp_notes(folder: Path) -> list[str]:
    """Count the temporary files being written, or left by killed runs."""
    paths = list(folder.glob(f"{TEMP_PREFIX}*"))
    units = folder / UNITS_DIR
    if units.is_dir():
        paths.extend(units.rglob(f"{TEMP_PREFIX}*"))
    if not paths:
        return []
    owners = Counter(
        "unknown owner" if owner is None else f"{owner.host}:{owner.pid}"
        for owner in (temp_owner(path.name) for path in paths)
    )
    listing = ", ".join(f"{count} of {owner}" for owner, count in owners.items())
    return [
        f"{len(paths)} temporary files ({listing}); those of processes that are "
        "gone are removed by the next run"
    ]


def _by(provenance: object) -> str | None:
    if not isinstance(provenance, dict) or "host" not in provenance:
        return None
    text = f"{provenance['host']}:{provenance.get('pid')}"
    task = provenance.get("task")
    return text if task is None else f"{text} (task {task})"
