"""Fit a linear probe to every (checkpoint, probe site) unit of a folder of shards.

For each unit, the activations of one site are read from the checkpoint's
shard and standardised with the mean and standard deviation of the train split.
A multinomial logistic regression is then fitted on the train split for every
``C`` of a grid. The ``C`` with the lowest val error is kept (ties go to the
lower val loss, then to the smaller ``C``), and its error and log-loss are
measured on the train, val and test splits.

Units run in parallel with joblib. The units of one site form chains in
checkpoint order, and each unit of a chain starts from the solution of the one
before it (a warm start): consecutive checkpoints of one training run usually
have nearby optima. Every finished unit is written at once, atomically, under
``<out_dir>/.units/``. When all the units of a checkpoint are done, its report
``<checkpoint name>.json`` and ``index.json`` are rewritten.
A re-run skips units whose result is current (same shard id and fit settings),
so a killed run loses only the units that were in flight.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import joblib
import numpy as np
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from probecvx import reports
from probecvx.atomic import remove_stale_temp_files, write_text_atomic
from probecvx.errors import (
    ConvergenceWarning,
    InvalidInputError,
    ProbecvxError,
    ReportError,
    ShardError,
    SolverError,
)
from probecvx.shards import (
    SHARD_SUFFIX,
    ShardInfo,
    read_shard_info,
    read_site,
    read_targets,
)
from probecvx.solvers import (
    ProbeFit,
    Solver,
    Validation,
    available_solvers,
    check_problem,
    get_solver,
    softmax_cross_entropy,
)
from probecvx.solvers._objective import DEFAULT_TOL

logger = logging.getLogger(__name__)

#: The default grid of ``C``: six values, one per decade from 1e-3 to 1e2.
#: Because the features are standardised and the penalty is
#: ``||W||^2 / (2 C n)``, ``C = 1`` (scikit-learn's default) is a moderate
#: penalty whatever the number of rows. The grid also tries penalties up to
#: 1000 times stronger and 100 times weaker.
DEFAULT_CS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)

#: ``C`` used when a checkpoint has no val rows to choose by: the grid value
#: nearest to this one on a log scale.
NO_VAL_C = 1.0

#: The iteration cap when the caller gives none; a probe that reaches it is
#: recorded as not converged.
DEFAULT_MAX_ITER = 1000

#: The hidden folder of per-unit results inside the reports folder.
UNITS_DIR = ".units"

SPLIT_NAMES = ("train", "val", "test")  # indexed by the shard's split codes

# Rows per block when computing statistics and standardising, so that the
# float64 temporaries stay near this many bytes whatever the site's width.
_BLOCK_BYTES = 8 * 2**20


@dataclass(frozen=True)
class FitSettings:
    """The settings that decide a probe's result; their hash marks a unit current."""

    solver: str
    Cs: tuple[float, ...]
    tol: float
    max_iter: int
    early_stopping: bool
    warm_start: bool
    device: str

    def record(self) -> dict[str, Any]:
        """Return the ``fit`` block of a report: these settings and their hash."""
        return {
            "solver": self.solver,
            "Cs": list(self.Cs),
            "tol": self.tol,
            "max_iter": self.max_iter,
            "early_stopping": self.early_stopping,
            "warm_start": self.warm_start,
            "settings_hash": self.settings_hash(),
        }

    def settings_hash(self) -> str:
        """Return the sha256 of the settings that change a probe's result.

        The device and the number of jobs are left out: they change how fast a
        probe is fitted, not the optimum it reaches.
        """
        fields = {
            "solver": self.solver,
            "Cs": list(self.Cs),
            "tol": self.tol,
            "max_iter": self.max_iter,
            "early_stopping": self.early_stopping,
            "warm_start": self.warm_start,
            "no_val_C": NO_VAL_C,
            "report_schema_version": reports.REPORT_SCHEMA_VERSION,
        }
        text = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class UnitTask:
    """One (checkpoint, site) probe to fit, with what a worker needs to fit it."""

    shard_path: Path
    checkpoint: str
    site: str
    order: int
    module_type: str | None
    n_features: int
    overflow_count: int
    n_classes: int
    class_names: tuple[str, ...]
    unit_path: Path
    shard_id: str


@dataclass(frozen=True)
class ChainTask:
    """Units of one site in checkpoint order, fitted one after another by a worker."""

    units: tuple[UnitTask, ...]
    settings: FitSettings
    solver: Solver
    threads: int | None  # BLAS threads per worker, None to leave as found


@dataclass(frozen=True)
class UnitResult:
    """A finished unit: its report entry, as written to its unit file."""

    checkpoint: str
    site: str
    entry: dict[str, Any]


@dataclass
class FitSummary:
    """The outcome of a :func:`fit_shards` run.

    ``failed_units`` contains ``(checkpoint, site, error)`` for each failed
    unit, and ``failed_checkpoints`` contains ``(checkpoint, error)`` for each
    shard that could not be read.
    """

    reports_dir: Path
    index_path: Path
    reports_written: list[Path]
    n_units: int
    n_fitted: int
    n_skipped: int
    failed_units: list[tuple[str, str, str]]
    failed_checkpoints: list[tuple[str, str]]
    n_not_converged: int

    @property
    def n_failed(self) -> int:
        """The number of units that failed in this run."""
        return len(self.failed_units)

    @property
    def ok(self) -> bool:
        """Whether every unit was fitted and every shard could be read."""
        return not self.failed_units and not self.failed_checkpoints


@dataclass
class _Checkpoint:
    """A readable shard and the report entries gathered for it."""

    info: ShardInfo
    split_sizes: dict[str, int]
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    pending: set[str] = field(default_factory=set)
    fitted_now: bool = False


def fit_shards(
    acts_dir: Path,
    out_dir: Path,
    *,
    solver: str = "auto",
    Cs: Sequence[float] | None = None,
    sites: Sequence[str] | None = None,
    checkpoints: Sequence[str] | None = None,
    n_jobs: int = -1,
    tol: float | None = None,
    max_iter: int | None = None,
    early_stopping: bool = False,
    warm_start: bool = True,
    device: str = "cpu",
    force: bool = False,
    progress: bool = True,
) -> FitSummary:
    """Fit a probe to every (checkpoint, site) unit of the shards in ``acts_dir``.

    Parameters
    ----------
    acts_dir : Path
        The ``--out`` folder of ``probecvx extract``: one shard per checkpoint.
    out_dir : Path
        The reports folder; created if missing.
    solver : str, default="auto"
        A name from :func:`probecvx.solvers.available_solvers`.
    Cs : sequence of float, optional
        The grid of inverse penalty strengths; default :data:`DEFAULT_CS`.
    sites, checkpoints : sequence of str, optional
        Names or shell-style globs that select the probe sites and the
        checkpoints to fit. Default: all.
    n_jobs : int, default=-1
        Units fitted in parallel; -1 uses every core. The joblib backend is the
        one active in the caller's ``joblib.parallel_config``.
    tol : float, optional
        The solver's tolerance; default the solver's own, else
        :data:`DEFAULT_TOL`.
    max_iter : int, optional
        The iteration cap per probe; default :data:`DEFAULT_MAX_ITER`.
    early_stopping : bool, default=False
        Let solvers that support it stop when the val loss stops improving.
    warm_start : bool, default=True
        Start each unit from the solution of the previous checkpoint of the
        same site.
    device : str, default="cpu"
        ``"cpu"`` or a torch device such as ``"cuda"``, for solvers that
        support one.
    force : bool, default=False
        Refit units whose result is current.
    progress : bool, default=True
        Show a progress bar over units on stderr.

    Returns
    -------
    FitSummary
        The reports written and the units fitted, skipped and failed.

    Raises
    ------
    InvalidInputError
        When a setting is invalid, ``acts_dir`` contains no shard, or a filter
        matches nothing.

    Warns
    -----
    ConvergenceWarning
        When the chosen probe of some unit stopped at ``max_iter``.

    Notes
    -----
    A unit that fails (non-finite activations, a single class in the train
    split, an unreadable site) is recorded with its error, and the other units
    are still fitted. A shard that cannot be read is recorded in
    ``index.json`` in the same way.
    """
    settings, solver_instance = _check_settings(
        solver, Cs, tol, max_iter, early_stopping, warm_start, device
    )
    n_workers = _check_n_jobs(n_jobs)
    out_dir = Path(out_dir)

    # Read every shard's attributes and targets; unreadable ones are recorded.
    states, failed_shards = _read_shards(Path(acts_dir))
    states, failed_shards = _select_checkpoints(states, failed_shards, checkpoints)
    selected_sites = _select_sites(states, sites)

    # Find the units to fit; the others are current and only reported.
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out_dir)
    units = _plan_units(states, selected_sites, settings, out_dir, force)
    n_units = sum(
        len(selected_sites.intersection(s.info.sites)) for s in states.values()
    )
    logger.info(
        "%d units selected in %s: %d to fit, %d current",
        n_units,
        acts_dir,
        len(units),
        n_units - len(units),
    )

    # Report the checkpoints with nothing to fit, and the unreadable shards.
    run = _Run(states, settings, out_dir, reports.ReportIndex.load(out_dir))
    for name, path, error in failed_shards:
        run.index.set_failed(name, path, error)
    for state in states.values():
        if not state.pending:
            run.finish_checkpoint(state)
    run.index.write(out_dir)

    # Fit; each result is recorded as it arrives, in any order.
    chains = _make_chains(units, settings, solver_instance, n_workers)
    with tqdm(
        total=len(units),
        unit="probe",
        desc="fit",
        disable=not progress,
        file=sys.stderr,
    ) as bar:
        for results in _run_chains(chains, n_jobs):
            for result in results:
                run.record(result)
                bar.update(1)

    summary = FitSummary(
        reports_dir=out_dir,
        index_path=out_dir / reports.INDEX_NAME,
        reports_written=run.reports_written,
        n_units=n_units,
        n_fitted=len(units),
        n_skipped=n_units - len(units),
        failed_units=run.failed_units,
        failed_checkpoints=[(name, error) for name, _, error in failed_shards],
        n_not_converged=run.n_not_converged,
    )
    _warn_not_converged(summary, settings)
    logger.info(
        "fit finished: %d fitted, %d current, %d failed, %d shards unreadable",
        summary.n_fitted,
        summary.n_skipped,
        summary.n_failed,
        len(summary.failed_checkpoints),
    )
    return summary


# --- Validation at the public entry ---------------------------------------------


def _check_settings(
    solver: str,
    Cs: Sequence[float] | None,
    tol: float | None,
    max_iter: int | None,
    early_stopping: bool,
    warm_start: bool,
    device: str,
) -> tuple[FitSettings, Solver]:
    """Validate the fit settings once, fill in defaults, and make the solver."""
    instance = _make_solver(solver, _check_device(device))
    grid = _check_grid(DEFAULT_CS if Cs is None else Cs)

    if tol is None:
        tol = DEFAULT_TOL
    elif isinstance(tol, bool) or not _is_positive_number(tol):
        raise InvalidInputError(f"invalid tol {tol!r}: give a positive number")
    if max_iter is None:
        max_iter = DEFAULT_MAX_ITER
    elif isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise InvalidInputError(f"invalid max_iter {max_iter!r}: give an integer >= 1")

    settings = FitSettings(
        solver=solver,
        Cs=grid,
        tol=float(tol),
        max_iter=int(max_iter),
        early_stopping=bool(early_stopping),
        warm_start=bool(warm_start),
        device=device,
    )
    return settings, instance


def _is_positive_number(value: object) -> bool:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return math.isfinite(number) and number > 0


def _check_grid(Cs: Sequence[float]) -> tuple[float, ...]:
    """Return the grid of C sorted and without repeats, or raise for a bad value."""
    if isinstance(Cs, str) or not len(Cs):
        raise InvalidInputError(
            f"invalid grid of C {Cs!r}: give a sequence of positive numbers"
        )
    for C in Cs:
        if isinstance(C, bool | str) or not _is_positive_number(C):
            raise InvalidInputError(
                f"invalid C {C!r}: every C must be a positive finite number"
            )
    return tuple(sorted({float(C) for C in Cs}))


def _check_device(device: str) -> str:
    if device == "cpu":
        return device
    if not device.startswith("cuda"):
        raise InvalidInputError(
            f"invalid device {device!r}: use 'cpu' or a CUDA device such as 'cuda'"
        )
    import torch

    if not torch.cuda.is_available():
        raise InvalidInputError(
            f"device {device!r} was requested, but torch finds no CUDA device; "
            "use --device cpu"
        )
    return device


def _make_solver(name: str, device: str) -> Solver:
    """Return a new solver registered as ``name``, placed on ``device``."""
    if name not in available_solvers():
        valid = ", ".join(available_solvers())
        raise InvalidInputError(f"unknown solver {name!r}; valid solvers: {valid}")
    solver = get_solver(name)
    # NOTE: only the CPU path is tested. Solvers that run on torch, such as
    # LbfgsSolver, expose a ``device`` attribute, which is set here.
    if device != "cpu":
        if not hasattr(solver, "device"):
            raise InvalidInputError(
                f"solver {name!r} has no device setting, so device {device!r} "
                "cannot be applied to it; use --solver lbfgs to run on a CUDA "
                "device (auto also uses one by itself when the data fits in its "
                "memory)"
            )
        solver.device = device
    return solver


def _check_n_jobs(n_jobs: int) -> int:
    """Return the number of workers that ``n_jobs`` gives under the active backend."""
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, int) or n_jobs == 0:
        raise InvalidInputError(
            f"invalid n_jobs {n_jobs!r}: give a positive number of workers, "
            "or -1 for one per core"
        )
    return max(1, int(joblib.effective_n_jobs(n_jobs)))


# --- Shards and filters ------------------------------------------------------------


def _read_shards(
    acts_dir: Path,
) -> tuple[dict[str, _Checkpoint], list[tuple[str, str, str]]]:
    """Read the shards in ``acts_dir``, ordered by step then name.

    Returns the readable shards by checkpoint name, and ``(name, path, error)``
    for each shard that cannot be read, named after its file.
    """
    if not acts_dir.is_dir():
        problem = "is not a folder" if acts_dir.exists() else "does not exist"
        raise InvalidInputError(
            f"activations folder {acts_dir} {problem}; pass the --out folder of "
            "`probecvx extract`"
        )
    paths = sorted(
        path
        for path in acts_dir.iterdir()
        if path.suffix == SHARD_SUFFIX
        and not path.name.startswith(".")
        and path.is_file()
    )
    if not paths:
        raise InvalidInputError(
            f"no shards (*{SHARD_SUFFIX}) in {acts_dir}; run `probecvx extract "
            f"... --out {acts_dir}` first"
        )

    readable: list[_Checkpoint] = []
    failed: list[tuple[str, str, str]] = []
    for path in paths:
        try:
            info = read_shard_info(path)
            labels, split, _ = read_targets(path)
            _check_targets(path, labels, split, len(info.class_names))
        except ShardError as err:
            logger.warning("skipping shard %s: %s", path, err)
            failed.append((path.stem, str(path), str(err)))
            continue
        counts = np.bincount(split, minlength=len(SPLIT_NAMES))
        sizes = {name: int(counts[code]) for code, name in enumerate(SPLIT_NAMES)}
        readable.append(_Checkpoint(info=info, split_sizes=sizes))

    readable.sort(key=lambda s: _step_key(s.info.step, s.info.checkpoint_name))
    states: dict[str, _Checkpoint] = {}
    for state in readable:
        name = state.info.checkpoint_name
        _check_checkpoint_name(name, state.info.path)
        if name in states:
            raise InvalidInputError(
                f"shards {states[name].info.path} and {state.info.path} both contain "
                f"checkpoint {name!r}; keep one of them in {acts_dir}"
            )
        states[name] = state
    return states, failed


def _check_checkpoint_name(name: str, path: Path) -> None:
    """Reject a checkpoint name that cannot name its report file."""
    stem = Path(reports.INDEX_NAME).stem
    if not name or name.startswith(".") or "/" in name or os.sep in name:
        raise InvalidInputError(
            f"shard {path} names its checkpoint {name!r}, which cannot be a file "
            "name; rename the checkpoint and re-run `probecvx extract`"
        )
    if name == stem:
        raise InvalidInputError(
            f"shard {path} names its checkpoint {name!r}, which would overwrite "
            f"{reports.INDEX_NAME}; rename the checkpoint and re-run "
            "`probecvx extract`"
        )


def _step_key(step: int | None, name: str) -> tuple[bool, int, str]:
    return (step is None, step or 0, name)


def _match(patterns: Sequence[str], valid: Sequence[str], noun: str) -> set[str]:
    """Return the names in ``valid`` that match any of ``patterns``.

    Raises InvalidInputError for a pattern that matches nothing, listing the
    valid names.
    """
    selected: set[str] = set()
    for pattern in patterns:
        matched = fnmatch.filter(valid, pattern)
        if not matched:
            listing = ", ".join(valid[:30]) + (", …" if len(valid) > 30 else "")
            raise InvalidInputError(
                f"unknown {noun} {pattern!r}; valid {noun}s: {listing}"
            )
        selected.update(matched)
    return selected


def _select_checkpoints(
    states: dict[str, _Checkpoint],
    failed: list[tuple[str, str, str]],
    patterns: Sequence[str] | None,
) -> tuple[dict[str, _Checkpoint], list[tuple[str, str, str]]]:
    if patterns is None:
        return states, failed
    valid = list(states) + [name for name, _, _ in failed]
    selected = _match(patterns, valid, "checkpoint")
    selected_states = {n: state for n, state in states.items() if n in selected}
    return selected_states, [item for item in failed if item[0] in selected]


def _select_sites(
    states: dict[str, _Checkpoint], patterns: Sequence[str] | None
) -> set[str]:
    # Every site of every shard, in order of first appearance.
    names = dict.fromkeys(site for s in states.values() for site in s.info.sites)
    valid = list(names)
    if patterns is None:
        return set(valid)
    if not valid:
        return set()
    return _match(patterns, valid, "probe site")


def _check_targets(
    path: Path, labels: np.ndarray, split: np.ndarray, n_classes: int
) -> None:
    """Reject a shard whose labels or split codes are out of range."""
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ShardError(
            f"shard {path} has labels {labels.min()}..{labels.max()} but "
            f"{n_classes} class names; delete it and re-run `probecvx extract`"
        )
    if split.size and split.max() >= len(SPLIT_NAMES):
        raise ShardError(
            f"shard {path} has split code {split.max()}; valid codes are "
            "0 (train), 1 (val) and 2 (test); delete it and re-run `probecvx extract`"
        )


# --- Planning: which units to fit ---------------------------------------------------


def _unit_path(out_dir: Path, checkpoint: str, site: str) -> Path:
    """Return the file of one unit's result; names are %-escaped to be file names."""
    folder = out_dir / UNITS_DIR / quote(checkpoint, safe="")
    return folder / f"{quote(site, safe='')}.json"


def _plan_units(
    states: dict[str, _Checkpoint],
    selected_sites: set[str],
    settings: FitSettings,
    out_dir: Path,
    force: bool,
) -> list[UnitTask]:
    """Return the units to fit, in checkpoint order, and load the current ones.

    Each checkpoint's current entries go to ``state.entries``, including those
    of sites outside the selection, so that its report keeps them.
    """
    settings_hash = settings.settings_hash()
    units: list[UnitTask] = []
    for name, state in states.items():
        info = state.info
        units_folder = _unit_path(out_dir, name, "-").parent
        if units_folder.is_dir():
            remove_stale_temp_files(units_folder)
        current = _current_entries(out_dir, info, settings_hash)

        for order, site in enumerate(info.sites):
            if site in selected_sites and (force or site not in current):
                units.append(_unit_task(info, site, order, out_dir))
                state.pending.add(site)
            elif site in current:
                state.entries[site] = current[site]
    return units


def _unit_task(info: ShardInfo, site: str, order: int, out_dir: Path) -> UnitTask:
    attrs = info.site_attrs[site]
    module_type = attrs.get("module_type")
    return UnitTask(
        shard_path=info.path,
        checkpoint=info.checkpoint_name,
        site=site,
        order=order,
        module_type=None if module_type is None else str(module_type),
        n_features=int(attrs["n_features"]),
        overflow_count=int(attrs.get("overflow_count", 0)),
        n_classes=len(info.class_names),
        class_names=tuple(info.class_names),
        unit_path=_unit_path(out_dir, info.checkpoint_name, site),
        shard_id=info.shard_id,
    )


def _current_entries(
    out_dir: Path, info: ShardInfo, settings_hash: str
) -> dict[str, dict[str, Any]]:
    """Return the successful entries of ``info``'s sites fitted with these settings.

    A unit file written for the same shard id and settings decides its site.
    For a site without such a file, the existing report's entry is used if
    that report was written for the same shard id and settings.
    """
    entries: dict[str, dict[str, Any]] = {}
    path = reports.report_path(out_dir, info.checkpoint_name)
    if path.is_file():
        try:
            doc = reports.read_report(path)
        except ReportError as err:
            logger.warning("%s; its units will be refitted", err)
        else:
            if (
                doc["shard"]["shard_id"] == info.shard_id
                and doc["fit"]["settings_hash"] == settings_hash
            ):
                entries = {e["site"]: e for e in doc["sites"] if e["status"] == "ok"}

    for site in info.sites:
        unit = _read_unit_file(_unit_path(out_dir, info.checkpoint_name, site))
        if (
            unit is None
            or unit.get("shard_id") != info.shard_id
            or unit.get("settings_hash") != settings_hash
        ):
            continue
        entries.pop(site, None)
        if unit["entry"]["status"] == "ok":
            entries[site] = unit["entry"]
    return {site: entry for site, entry in entries.items() if site in info.sites}


def _read_unit_file(path: Path) -> dict[str, Any] | None:
    """Return a unit file's content, or None when it is missing or unreadable."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        logger.warning("ignoring unreadable unit file %s (%s); refitting it", path, err)
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("entry"), dict):
        logger.warning("ignoring malformed unit file %s; refitting it", path)
        return None
    return doc


def _write_unit_file(unit: UnitTask, settings_hash: str, entry: dict[str, Any]) -> None:
    doc = {
        "shard_id": unit.shard_id,
        "settings_hash": settings_hash,
        "checkpoint": unit.checkpoint,
        "site": unit.site,
        "entry": entry,
    }
    unit.unit_path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(unit.unit_path, json.dumps(doc, allow_nan=False) + "\n")


# --- Scheduling ----------------------------------------------------------------------


def _make_chains(
    units: Sequence[UnitTask], settings: FitSettings, solver: Solver, n_workers: int
) -> list[ChainTask]:
    """Group units into chains: one site's checkpoints in order, fitted in turn.

    With warm starts, each site's units are cut into as few contiguous chains
    as keep every worker busy, because the first unit of a chain starts cold.
    Without them every unit is its own chain. The cut depends only on the
    units and the number of workers.
    """
    cores = joblib.cpu_count()
    threads = None if n_workers == 1 else max(1, cores // n_workers)
    if not settings.warm_start:
        return [ChainTask((unit,), settings, solver, threads) for unit in units]

    by_site: dict[str, list[UnitTask]] = {}
    for unit in units:
        by_site.setdefault(unit.site, []).append(unit)
    per_site = max(1, math.ceil(n_workers / max(1, len(by_site))))
    chains = []
    for site_units in by_site.values():
        n_chains = min(per_site, len(site_units))
        for part in np.array_split(np.arange(len(site_units)), n_chains):
            chain = tuple(site_units[i] for i in part)
            chains.append(ChainTask(chain, settings, solver, threads))
    return chains


def _run_chains(chains: Sequence[ChainTask], n_jobs: int) -> Iterator[list[UnitResult]]:
    """Fit ``chains`` in parallel, yielding each chain's results as it finishes."""
    if not chains:
        return
    try:
        parallel = joblib.Parallel(n_jobs=n_jobs, return_as="generator_unordered")
    except ValueError:
        # The backend cannot return results as they arrive (multiprocessing), so
        # they come at the end; workers still commit every unit file at once.
        parallel = joblib.Parallel(n_jobs=n_jobs)
    yield from parallel(joblib.delayed(_fit_chain)(chain) for chain in chains)


@contextlib.contextmanager
def _limit_threads(threads: int | None) -> Iterator[None]:
    """Limit BLAS, OpenMP and torch threads in this worker to ``threads``."""
    if threads is None:
        yield
        return
    torch = sys.modules.get("torch")
    previous = torch.get_num_threads() if torch is not None else None
    with threadpool_limits(limits=threads):
        if torch is not None:
            torch.set_num_threads(threads)
        try:
            yield
        finally:
            if torch is not None and previous is not None:
                torch.set_num_threads(previous)


class _Run:
    """The bookkeeping of one fit run: results in, reports and index out."""

    def __init__(
        self,
        states: dict[str, _Checkpoint],
        settings: FitSettings,
        out_dir: Path,
        index: reports.ReportIndex,
    ) -> None:
        self.states = states
        self.settings = settings
        self.out_dir = out_dir
        self.index = index
        self.reports_written: list[Path] = []
        self.failed_units: list[tuple[str, str, str]] = []
        self.n_not_converged = 0

    def record(self, result: UnitResult) -> None:
        """Take one finished unit; write its checkpoint's report if it was the last."""
        entry = result.entry
        _log_unit(result)
        if entry["status"] == "failed":
            self.failed_units.append((result.checkpoint, result.site, entry["error"]))
        elif not entry["solver"]["converged"]:
            self.n_not_converged += 1

        state = self.states[result.checkpoint]
        state.entries[result.site] = entry
        state.pending.discard(result.site)
        state.fitted_now = True
        if not state.pending:
            self.finish_checkpoint(state)
            self.index.write(self.out_dir)

    def finish_checkpoint(self, state: _Checkpoint) -> None:
        """Write the report of a checkpoint whose units are all done, if it changed."""
        if not state.entries:
            return
        path = reports.report_path(self.out_dir, state.info.checkpoint_name)
        entries = [state.entries[s] for s in state.info.sites if s in state.entries]
        doc = reports.build_report(
            state.info, state.split_sizes, entries, self.settings.record()
        )
        if not state.fitted_now and reports.same_report(path, doc):
            self.index.set_report(doc, path)
            return
        reports.write_report(path, doc)
        self.reports_written.append(path)
        self.index.set_report(doc, path)
        logger.info("wrote report %s (%s)", path, doc["status"])


def _log_unit(result: UnitResult) -> None:
    entry = result.entry
    if entry["status"] == "failed":
        logger.warning(
            "probe %s at %s failed: %s", result.site, result.checkpoint, entry["error"]
        )
        return
    test_error = entry["test"]["error"]
    logger.info(
        "fitted probe %s at %s: C=%g, test error %s, %d iterations, %.2f s",
        result.site,
        result.checkpoint,
        entry["C"],
        "n/a" if test_error is None else f"{test_error:.4f}",
        entry["solver"]["n_iter"],
        entry["seconds"],
    )


def _warn_not_converged(summary: FitSummary, settings: FitSettings) -> None:
    if not summary.n_not_converged:
        return
    warnings.warn(
        f"{summary.n_not_converged} of {summary.n_fitted} probes did not converge: "
        f"they stopped before meeting tol={settings.tol:g}, at "
        f"max_iter={settings.max_iter} or when the solver could not make "
        "progress. Their reports mark them converged: false. Raise max_iter or "
        "tol and re-run to refit them",
        ConvergenceWarning,
        stacklevel=3,
    )


# --- Workers: one chain, one unit -----------------------------------------------------


@dataclass
class _UnitData:
    """One site's standardised activations and labels, cut by split."""

    X: dict[str, np.ndarray]  # float32 views of one array, rows grouped by split
    y: dict[str, np.ndarray]
    n_constant: int


def _fit_chain(chain: ChainTask) -> list[UnitResult]:
    """Fit a chain's units in order, warm-starting each from the last success.

    Each unit's result is written to its unit file before the next starts.
    """
    settings = chain.settings
    settings_hash = settings.settings_hash()
    previous: tuple[np.ndarray, np.ndarray] | None = None
    results = []
    with _limit_threads(chain.threads):
        for unit in chain.units:
            warm = previous if settings.warm_start else None
            entry, solution = _fit_unit(unit, settings, chain.solver, warm)
            _write_unit_file(unit, settings_hash, entry)
            results.append(UnitResult(unit.checkpoint, unit.site, entry))
            if solution is not None:
                previous = solution
    return results


def _fit_unit(
    unit: UnitTask,
    settings: FitSettings,
    solver: Solver,
    warm: tuple[np.ndarray, np.ndarray] | None,
) -> tuple[dict[str, Any], tuple[np.ndarray, np.ndarray] | None]:
    """Fit one unit; return its report entry and the chosen (coef, intercept).

    Errors that belong to this unit's data are recorded in the entry, which
    then has status ``failed``, and the solution is None.
    """
    start = time.perf_counter()
    entry = _new_entry(unit)
    solution = None
    try:
        data = _load_unit_data(unit, entry)
        fields, solution = _fit_probe(data, unit, settings, solver, warm, entry)
    except (ProbecvxError, OSError, ValueError, MemoryError) as err:
        entry["error"] = _error_text(err)
    else:
        entry.update(fields)
        entry["status"] = "ok"
    entry["seconds"] = time.perf_counter() - start
    return entry, solution


def _new_entry(unit: UnitTask) -> dict[str, Any]:
    """Return a site entry for ``unit`` with status failed and nothing measured."""
    return {
        "site": unit.site,
        "order": unit.order,
        "module_type": unit.module_type,
        "n_features": unit.n_features,
        "status": "failed",
        "error": None,
        "C": None,
        "C_grid": [],
        "C_selection": None,
        "val_error_by_C": [],
        "val_loss_by_C": [],
        "converged_by_C": [],
        "train": {"error": None, "loss": None},
        "val": {"error": None, "loss": None},
        "test": {"error": None, "loss": None},
        "chance_error": None,
        "constant_features": None,
        "solver": None,
        "convergence_warnings": 0,
        "seconds": 0.0,
        "warnings": [],
    }


def _error_text(err: BaseException) -> str:
    if isinstance(err, MemoryError):
        return "out of memory while reading or fitting this probe site"
    text = " ".join(str(err).split())
    if isinstance(err, ProbecvxError):
        return text
    return f"{type(err).__name__}: {text}"


def _load_unit_data(unit: UnitTask, entry: dict[str, Any]) -> _UnitData:
    """Read one site with rows grouped by split, and standardise it in place.

    Also fills ``chance_error`` in ``entry``: it needs only the labels, so a
    unit whose activations cannot be used still reports it.
    """
    labels, split, _ = read_targets(unit.shard_path)
    order = np.argsort(split, kind="stable")
    counts = np.bincount(split, minlength=len(SPLIT_NAMES))
    bounds = np.concatenate([[0], np.cumsum(counts)])
    y_all = labels[order]
    y = {
        name: y_all[bounds[code] : bounds[code + 1]]
        for code, name in enumerate(SPLIT_NAMES)
    }
    entry["chance_error"] = _chance_error(y["test"], unit.n_classes)

    # float16 storage needs a float32 copy; float32 is used as read.
    X_all = read_site(unit.shard_path, unit.site, rows=order)
    X_all = X_all.astype(np.float32, copy=False)
    if X_all.shape[1] == 0:
        raise SolverError(f"probe site {unit.site!r} has no features to fit a probe on")
    if counts[0] == 0:
        raise SolverError(
            "the train split has no rows; re-run `probecvx extract` with a "
            "split that gives train rows"
        )
    _check_finite(X_all, unit)
    n_constant = _standardise(X_all, int(counts[0]))
    X = {
        name: X_all[bounds[code] : bounds[code + 1]]
        for code, name in enumerate(SPLIT_NAMES)
    }
    return _UnitData(X=X, y=y, n_constant=n_constant)


def _chance_error(y_test: np.ndarray, n_classes: int) -> float | None:
    """Return 1 minus the frequency of the most common class in the test split."""
    if y_test.size == 0:
        return None
    counts = np.bincount(y_test, minlength=n_classes)
    return float(1.0 - counts.max() / y_test.size)


def _block_rows(n_features: int) -> int:
    """Return the rows per block that keep a float64 block near _BLOCK_BYTES."""
    return max(1, _BLOCK_BYTES // (8 * max(1, n_features)))


def _check_finite(X: np.ndarray, unit: UnitTask) -> None:
    block = _block_rows(X.shape[1])
    n_bad = 0
    for start in range(0, X.shape[0], block):
        chunk = X[start : start + block]
        n_bad += chunk.size - int(np.count_nonzero(np.isfinite(chunk)))
    if not n_bad:
        return
    if unit.overflow_count:
        cause = (
            f"{unit.overflow_count} values overflowed float16 when the shard was "
            "written; re-run `probecvx extract` with float32 storage"
        )
    else:
        cause = "the model produced them at this site at this checkpoint"
    raise SolverError(
        f"the activations of probe site {unit.site!r} contain {n_bad} NaN or "
        f"infinite values, so no probe can be fitted; {cause}"
    )


def _standardise(X: np.ndarray, n_train: int) -> int:
    """Standardise ``X`` in place with the mean and std of its first ``n_train`` rows.

    The mean and standard deviation are computed block by block in float64, in
    two passes. A column whose standard deviation is below float32 resolution
    relative to its mean (a dead ReLU unit, say) is centred but not scaled.
    Returns the number of such constant columns.
    """
    block = _block_rows(X.shape[1])
    total = np.zeros(X.shape[1])
    for start in range(0, n_train, block):
        total += X[start : min(start + block, n_train)].sum(axis=0, dtype=np.float64)
    mean = total / n_train

    squares = np.zeros(X.shape[1])
    for start in range(0, n_train, block):
        diff = X[start : min(start + block, n_train)].astype(np.float64) - mean
        squares += np.einsum("ij,ij->j", diff, diff)
    std = np.sqrt(squares / n_train)
    constant = std <= np.finfo(np.float32).eps * np.maximum(1.0, np.abs(mean))
    std[constant] = 1.0

    shift = mean.astype(np.float32)
    scale = (1.0 / std).astype(np.float32)
    for start in range(0, X.shape[0], block):
        chunk = X[start : start + block]
        chunk -= shift
        chunk *= scale
    return int(np.count_nonzero(constant))


def _probe_grid(Cs: tuple[float, ...], n_val: int) -> tuple[tuple[float, ...], str]:
    """Return the ``C`` values to fit and how the one reported is chosen."""
    if len(Cs) == 1:
        return Cs, "single_C"
    if n_val == 0:
        nearest = min(Cs, key=lambda C: abs(math.log(C / NO_VAL_C)))
        return (nearest,), "no_val_default"
    return Cs, "val_error"


def _fit_probe(
    data: _UnitData,
    unit: UnitTask,
    settings: FitSettings,
    solver: Solver,
    warm: tuple[np.ndarray, np.ndarray] | None,
    entry: dict[str, Any],
) -> tuple[dict[str, Any], tuple[np.ndarray, np.ndarray]]:
    """Fit the ``C`` grid on train, choose ``C`` on val, and measure every split.

    Returns the entry fields to set and the chosen (coef, intercept). Notes
    for the caller go to ``entry["warnings"]``.
    """
    notes: list[str] = entry["warnings"]
    X_train, y_train = data.X["train"], data.y["train"]
    X_val, y_val = data.X["val"], data.y["val"]
    check_problem(X_train, y_train, unit.n_classes)
    notes.extend(_class_notes(y_train, unit.class_names))

    # Fit every C in one call, so that solvers can share work across the grid.
    grid, selection = _probe_grid(settings.Cs, len(y_val))
    if selection == "no_val_default":
        notes.append(
            f"the val split has no rows, so C={grid[0]:g} was used without choosing it"
        )
    validation = Validation(X_val, y_val) if len(y_val) else None
    if settings.early_stopping and validation is None:
        notes.append("the val split has no rows, so early stopping was off")
    if warm is not None and warm[0].shape != (unit.n_classes, X_train.shape[1]):
        warm = None
    # Warnings go to the entry because a worker process cannot show them. The
    # caller counts the probes that did not converge and warns once.
    # NOTE: catch_warnings is process-wide, so under joblib's threading backend
    # a warning may land in the entry of another unit running at the same time.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fits = solver.fit(
            X_train,
            y_train,
            unit.n_classes,
            grid,
            tol=settings.tol,
            max_iter=settings.max_iter,
            warm_start=warm,
            validation=validation,
            early_stopping=settings.early_stopping and validation is not None,
        )
    notes.extend(_warning_notes(caught))

    # Choose C by val error, then val loss, then the smaller C.
    val_scores = [_split_scores(X_val, y_val, fit) for fit in fits]
    best = min(range(len(fits)), key=lambda i: (*_rank(val_scores[i]), fits[i].C))
    chosen = fits[best]
    if not (np.isfinite(chosen.coef).all() and np.isfinite(chosen.intercept).all()):
        raise SolverError(
            f"solver {chosen.solver!r} returned non-finite weights for C={chosen.C:g}; "
            "try another --solver or a smaller C"
        )
    notes.extend(_grid_notes(fits, best, selection, settings))

    metrics = {}
    for name in SPLIT_NAMES:
        loss, error = _split_scores(data.X[name], data.y[name], chosen)
        metrics[name] = {
            "error": error,
            "loss": _finite_or_none(loss, f"{name} loss", notes),
        }
    fields = {
        "C": chosen.C,
        "C_grid": [fit.C for fit in fits],
        "C_selection": selection,
        "val_error_by_C": [error for _, error in val_scores],
        "val_loss_by_C": [_finite_or_none(loss, "", []) for loss, _ in val_scores],
        "converged_by_C": [bool(fit.converged) for fit in fits],
        **metrics,
        "constant_features": data.n_constant,
        "solver": _solver_record(chosen, warm is not None, notes),
        "convergence_warnings": sum(1 for fit in fits if not fit.converged),
    }
    return fields, (chosen.coef, chosen.intercept)


def _warning_notes(caught: Sequence[warnings.WarningMessage]) -> list[str]:
    """Return the messages of the warnings a solver raised, without repeats."""
    messages = [f"{w.category.__name__}: {w.message}" for w in caught]
    return list(dict.fromkeys(messages))


def _split_scores(
    X: np.ndarray, y: np.ndarray, fit: ProbeFit
) -> tuple[float | None, float | None]:
    """Return (log-loss, error) of ``fit`` on one split, or Nones when it is empty."""
    if len(y) == 0:
        return None, None
    return softmax_cross_entropy(X, y, fit.coef, fit.intercept)


def _rank(scores: tuple[float | None, float | None]) -> tuple[float, float]:
    """Sort key (error, loss) of val scores; missing or NaN values rank last."""
    loss, error = scores
    return (
        math.inf if error is None or math.isnan(error) else error,
        math.inf if loss is None or math.isnan(loss) else loss,
    )


def _finite_or_none(
    value: float | None, quantity: str, notes: list[str]
) -> float | None:
    """Return ``value`` if finite; else None, with a note naming ``quantity``."""
    if value is None or math.isfinite(value):
        return value
    if quantity:
        notes.append(f"the {quantity} is {value}, stored as null")
    return None


def _class_notes(y_train: np.ndarray, class_names: Sequence[str]) -> list[str]:
    counts = np.bincount(y_train, minlength=len(class_names))
    missing = [class_names[int(code)] for code in np.flatnonzero(counts == 0)]
    if not missing:
        return []
    return [
        f"{len(missing)} of {len(class_names)} classes have no train rows "
        f"({', '.join(map(repr, missing))}); the probe never predicts them"
    ]


def _grid_notes(
    fits: Sequence[ProbeFit], best: int, selection: str, settings: FitSettings
) -> list[str]:
    notes = []
    chosen = fits[best]
    if not chosen.converged:
        notes.append(
            f"the probe for the chosen C={chosen.C:g} did not converge: it "
            f"stopped before meeting tol={settings.tol:g} (max_iter="
            f"{settings.max_iter})"
        )
    others = sum(1 for i, fit in enumerate(fits) if i != best and not fit.converged)
    if others:
        notes.append(
            f"{others} of the other {len(fits) - 1} fits over the C grid did not "
            "converge"
        )
    if selection == "val_error" and best in (0, len(fits) - 1):
        edge = "smallest" if best == 0 else "largest"
        notes.append(
            f"the chosen C={chosen.C:g} is the {edge} in the grid; extend the grid "
            "past it to check that the val error is lowest inside it"
        )
    return notes


def _solver_record(
    fit: ProbeFit, warm_started: bool, notes: list[str]
) -> dict[str, Any]:
    """Return the solver record of the chosen fit; NaN grad_norm means not reported."""
    grad_norm = fit.grad_norm
    return {
        "name": fit.solver,
        "n_iter": int(fit.n_iter),
        "converged": bool(fit.converged),
        "objective": _finite_or_none(float(fit.objective), "objective", notes),
        "grad_norm": None
        if math.isnan(grad_norm)
        else _finite_or_none(float(grad_norm), "gradient norm", notes),
        "stop_rule": fit.stop_rule,
        "tol": float(fit.tol),
        "fit_seconds": float(fit.fit_seconds),
        "data_passes": _finite_or_none(
            float(fit.data_passes), "data pass count", notes
        ),
        "warm_started": warm_started,
    }
