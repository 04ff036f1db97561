"""Fit a linear probe to every (checkpoint, probe site) unit of a folder of shards.

How one probe is fitted (standardisation, the grid of ``C``, scoring) is in
:mod:`probecvx.probe`. This module plans the units, runs them in parallel and
turns their results into reports.

Units run with joblib or on a Dask cluster (:func:`probecvx.cluster.run_tasks`).
The units of one site form chains in checkpoint order, and each unit of a chain
starts from the solution of the one before it (a warm start): consecutive
checkpoints of one training run usually have nearby optima. A worker claims
each unit before fitting it (:mod:`probecvx.claims`), so that two jobs that
overlap by mistake do not fit it twice, and commits the result at once,
atomically, to its unit file under ``<out_dir>/.units/``. When all the units
of a checkpoint are done, the job that records the last one writes the report
``<checkpoint name>.json`` and updates ``index.json``.

A re-run skips units whose result is current (same shard id and fit
settings), failed units included unless ``retry_failed`` is set, so a killed
run loses only the units that were in flight. ``shard=(I, N)`` gives task
``I`` of ``N`` its part of the units (:func:`probecvx.cluster.partition`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib
import json
import logging
import math
import os
import re
import sys
import threading
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

import joblib
import numpy as np
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from probecvx import cluster, reports
from probecvx.atomic import (
    atomic_path,
    output_folder,
    remove_stale_temp_files,
    write_text_atomic,
)
from probecvx.claims import (
    CLAIM_SUFFIX,
    DEFAULT_CLAIM_TIMEOUT,
    LOCK_WAIT,
    Claim,
    Owner,
    break_claim,
    check_claim_timeout,
    claim_path,
    exclusive,
    read_claim,
    remove_stale_claims,
    slurm_task_label,
    try_claim,
    utc_now,
)
from probecvx.cluster import (
    active_dask_client,
    check_hdf5_locking,
    check_shard,
    explain_lock_error,
    items_of_shard,
    run_tasks,
)
from probecvx.errors import (
    ConvergenceWarning,
    InvalidInputError,
    ProbecvxError,
    ReportError,
    ShardError,
    SplitWarning,
)
from probecvx.probe import (
    DEFAULT_CS,
    DEFAULT_MAX_ITER,
    DONE_FAILED,
    DONE_OK,
    NO_VAL_C,
    PENDING,
    SPLIT_NAMES,
    FitSettings,
    UnitTask,
    error_text,
    fit_unit,
    list_class_names,
    new_entry,
)
from probecvx.shards import SHARD_SUFFIX, ShardInfo, read_shard_info, read_targets
from probecvx.solvers import EARLY_STOPPED, Solver, available_solvers, get_solver
from probecvx.solvers._objective import DEFAULT_TOL

__all__ = [
    "DEFAULT_CS",
    "DEFAULT_MAX_ITER",
    "NO_VAL_C",
    "PLAN_NAME",
    "UNITS_DIR",
    "FitSettings",
    "FitSummary",
    "fit_shards",
    "read_unit_file",
    "unit_path",
]

logger = logging.getLogger(__name__)

#: The hidden folder of per-unit results inside the reports folder.
UNITS_DIR = ".units"

#: The file in UNITS_DIR that records what the last run selected and with
#: which settings; ``probecvx status`` reads it. Checkpoint names cannot start
#: with a dot, so it never clashes with a checkpoint's folder.
PLAN_NAME = ".plan.json"
PLAN_FORMAT = "probecvx-fit-plan"

# The lock file, inside UNITS_DIR, held while index.json is rewritten.
_INDEX_LOCK = ".index.lock"

# Values of UnitResult.outcome. FITTED: fitted by this run. DONE_ELSEWHERE:
# found committed by another process, or by this run before one of its
# workers died. CLAIMED: claimed by another live process, so left to it.
FITTED, DONE_ELSEWHERE, CLAIMED = "fitted", "done_elsewhere", "claimed"


@dataclass(frozen=True)
class WorkerContext:
    """The settings, owner and retry rules that every chain of one run shares."""

    settings: FitSettings
    owner: Owner
    claim_timeout: float
    force: bool
    retry_failed: bool
    plugins: tuple[str, ...]
    hdf5_locking: str | None


@dataclass(frozen=True)
class ChainTask:
    """Units of one site in checkpoint order, fitted one after another by a worker.

    Units that are already done stay in the chain, so that the next unit
    warm-starts from the solution of the one before it, as in a run that was
    never interrupted.
    """

    units: tuple[UnitTask, ...]
    context: WorkerContext
    threads: int | None  # BLAS threads per worker, None to leave as found

    @property
    def pending(self) -> list[UnitTask]:
        """The units of the chain that are still to fit."""
        return [unit for unit in self.units if unit.status == PENDING]


@dataclass(frozen=True)
class UnitResult:
    """The outcome of one unit: fitted, done by another process, or claimed by one.

    ``entry`` is the report entry of the unit file, or None when the unit is
    claimed. ``provenance`` records the host, pid, task, run and times of the
    fit, or the holder of the claim.
    """

    checkpoint: str
    site: str
    outcome: str
    entry: dict[str, Any] | None
    provenance: dict[str, Any] | None


@dataclass
class FitSummary:
    """The outcome of a :func:`fit_shards` run.

    ``failed_units`` contains ``(checkpoint, site, error)`` for each unit that
    failed in this run, and ``failed_earlier`` for each failed unit that was
    not refitted because it failed in an earlier run (see ``retry_failed``).
    ``failed_checkpoints`` contains ``(checkpoint, error)`` for each shard
    that could not be read. ``n_claimed`` counts units left to another process
    that held their claim, and ``n_waiting`` the checkpoints whose report
    waits for units of other tasks. ``n_not_converged`` counts the probes that
    stopped before meeting ``tol``, except the ``n_stopped_early`` that early
    stopping returned. ``not_converged`` lists those probes as
    ``(checkpoint, site)``, in step order. ``no_train_rows`` lists, in the
    same form, the probes fitted in this run although some of their classes
    have no train rows, so that they never predict those classes.
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
    n_stopped_early: int = 0
    n_claimed: int = 0
    failed_earlier: list[tuple[str, str, str]] = field(default_factory=list)
    n_waiting: int = 0
    not_converged: list[tuple[str, str]] = field(default_factory=list)
    no_train_rows: list[tuple[str, str]] = field(default_factory=list)

    @property
    def n_failed(self) -> int:
        """The number of units that failed in this run."""
        return len(self.failed_units)

    @property
    def ok(self) -> bool:
        """Whether every unit is fitted and every shard could be read."""
        return not (self.failed_units or self.failed_checkpoints or self.failed_earlier)


@dataclass
class _Checkpoint:
    """A readable shard and the report entries gathered for it.

    ``pending`` are the sites this run fits; ``elsewhere`` the sites that
    other tasks or processes fit, read back from their unit files.
    """

    info: ShardInfo
    split_sizes: dict[str, int]
    classes_without_train_rows: list[str] = field(default_factory=list)
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    pending: set[str] = field(default_factory=set)
    elsewhere: set[str] = field(default_factory=set)
    fitted_now: bool = False


@dataclass
class _Plan:
    """The chains of this task and the counts of its units."""

    chains: list[ChainTask]
    n_units: int
    n_current: int
    failed_earlier: list[tuple[str, str, str]]


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
    shard: tuple[int, int] | None = None,
    retry_failed: bool = False,
    plugins: Sequence[str] = (),
    hdf5_locking: str | None = None,
    claim_timeout: float = DEFAULT_CLAIM_TIMEOUT,
    task: str | None = None,
) -> FitSummary:
    """Fit a probe to every (checkpoint, site) unit of the shards in ``acts_dir``.

    Parameters
    ----------
    acts_dir : Path
        The ``--out`` folder of ``probecvx extract``: one shard per checkpoint.
    out_dir : Path
        The reports folder; created if missing. A folder created by this call
        is removed again when the call raises before it commits a unit or a
        report.
    solver : str, default="auto"
        A name from :func:`probecvx.solvers.available_solvers`.
    Cs : sequence of float, optional
        The grid of inverse penalty strengths; default :data:`DEFAULT_CS`.
    sites, checkpoints : sequence of str, optional
        Names or shell-style globs that select the probe sites and the
        checkpoints to fit. Default: all.
    n_jobs : int, default=-1
        Units fitted in parallel; -1 uses every core, or every worker thread
        of a Dask cluster. The joblib backend is the one active in the
        caller's ``joblib.parallel_config``
        (see :func:`probecvx.cluster.parallel_backend`).
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
    shard : tuple of (int, int), optional
        ``(I, N)``: fit only the part of task ``I`` of ``N`` (``0 <= I < N``).
        Every task computes the same partition, balanced by rows times
        features; with warm starts a site's checkpoints stay together in
        pieces. Default: every unit.
    retry_failed : bool, default=False
        Refit units that failed in an earlier run. By default they keep
        their failed entry.
    plugins : sequence of str, default=()
        Modules (``PKG.MODULE``) imported here and in every worker before
        fitting, such as one that registers a solver with
        :func:`probecvx.solvers.register_solver`.
    hdf5_locking : {"true", "false", "best-effort"}, optional
        HDF5 file locking, see :func:`probecvx.cluster.hdf5_locking`.
    claim_timeout : float, default=600
        Seconds without a heartbeat after which another process's claim on a
        unit counts as stale and is broken.
    task : str, optional
        Label of this task in unit files and logs; default the SLURM job and
        array task ids, else ``I/N`` of ``shard``.

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
    SplitWarning
        Once, when some probes were fitted although classes of their shard
        have no train rows.

    Notes
    -----
    A unit that fails (non-finite activations, a single class in the train
    split, an unreadable site, a worker process that died) is recorded with
    its error, and the other units are still fitted. A shard that cannot be
    read is recorded in ``index.json`` in the same way.
    """
    plugin_names = _import_plugins(plugins)
    settings = _check_settings(
        solver, Cs, tol, max_iter, early_stopping, warm_start, device
    )
    n_workers = _check_n_jobs(n_jobs)
    shard = check_shard(shard)
    claim_timeout = check_claim_timeout(claim_timeout)
    check_hdf5_locking(hdf5_locking)
    out_dir = Path(out_dir)
    _check_out_dir_apart(Path(acts_dir), out_dir)
    if task is None:
        task = slurm_task_label()
    if task is None and shard is not None:
        task = f"{shard[0]}/{shard[1]}"
    context = WorkerContext(
        settings=settings,
        owner=Owner.new_run(task),
        claim_timeout=claim_timeout,
        force=bool(force),
        retry_failed=bool(retry_failed),
        plugins=plugin_names,
        hdf5_locking=hdf5_locking,
    )

    with cluster.hdf5_locking(hdf5_locking):
        # Read every shard's attributes and targets; unreadable ones are recorded.
        states, failed_shards = _read_shards(Path(acts_dir))
        states, failed_shards = _select_checkpoints(states, failed_shards, checkpoints)
        selected_sites = _select_sites(states, sites)

        # A run that fails before it commits a unit or a report removes the
        # folder it created. Its plan and index are rewritten by any re-run.
        scratch = [f"{UNITS_DIR}/{PLAN_NAME}", reports.INDEX_NAME]
        with output_folder(out_dir, scratch=scratch):
            # Plan every selected unit, then keep this task's part of them.
            remove_stale_temp_files(out_dir)
            _write_plan_file(out_dir, Path(acts_dir), sites, checkpoints, context)
            plan = _plan(states, selected_sites, context, out_dir, shard, n_workers)
            logger.info(
                "%d units for run %s of %s in %s: %d to fit, %d current%s",
                plan.n_units,
                context.owner.run,
                context.owner.label(),
                acts_dir,
                plan.n_units - plan.n_current,
                plan.n_current,
                "" if shard is None else f" (task shard {shard[0]}/{shard[1]})",
            )

            # Report the checkpoints with nothing to fit, and the unreadable
            # shards.
            run = _Run(states, out_dir, context)
            run.start(failed_shards)

            # Fit; each result is recorded as it arrives, in any order.
            n_pending = sum(len(chain.pending) for chain in plan.chains)
            with tqdm(
                total=n_pending,
                unit="probe",
                desc="fit",
                disable=not progress,
                file=sys.stderr,
            ) as bar:
                run.on_result = bar.update
                try:
                    _execute(plan.chains, n_jobs, run)
                except BaseException:
                    # Workers stopped by Ctrl-C or a crash here may not have
                    # released their claims or removed their temporary files.
                    _remove_dead_workers_files(out_dir, states, claim_timeout)
                    raise
            run.finish_waiting()

    summary = FitSummary(
        reports_dir=out_dir,
        index_path=out_dir / reports.INDEX_NAME,
        reports_written=run.reports_written,
        n_units=plan.n_units,
        n_fitted=run.n_fitted,
        n_skipped=plan.n_current + run.n_done_elsewhere,
        failed_units=run.failed_units,
        failed_checkpoints=[(name, error) for name, _, error in failed_shards],
        n_not_converged=run.n_not_converged,
        n_stopped_early=run.n_stopped_early,
        n_claimed=run.n_claimed,
        failed_earlier=plan.failed_earlier + run.failed_elsewhere,
        n_waiting=run.n_waiting,
        not_converged=sorted(run.not_converged, key=run.unit_order),
        no_train_rows=sorted(run.no_train_rows, key=run.unit_order),
    )
    _warn_not_converged(summary, settings)
    _warn_no_train_rows(summary, states)
    logger.info(
        "fit finished: %d fitted, %d current, %d failed, %d left to other "
        "processes, %d shards unreadable",
        summary.n_fitted,
        summary.n_skipped,
        summary.n_failed,
        summary.n_claimed,
        len(summary.failed_checkpoints),
    )
    return summary


def unit_path(out_dir: Path, checkpoint: str, site: str) -> Path:
    """Return the file of one unit's result; names are %-escaped to be file names."""
    folder = Path(out_dir) / UNITS_DIR / quote(checkpoint, safe="")
    return folder / f"{quote(site, safe='')}.json"


# The outcome for a unit whose file is ignored. A fit takes the entry from the
# checkpoint's report when that is current, so the unit is not always refitted.
_IGNORED = (
    "`probecvx fit` fits its probe again unless the checkpoint's report "
    "contains it, and the file can be deleted"
)


def read_unit_file(path: Path) -> dict[str, Any] | None:
    """Return a unit file's content, or None when it is missing or unreadable."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        logger.warning("ignoring unreadable unit file %s (%s); %s", path, err, _IGNORED)
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("entry"), dict):
        logger.warning("ignoring malformed unit file %s; %s", path, _IGNORED)
        return None
    return doc


def is_current(doc: dict[str, Any], shard_id: str, settings_hash: str) -> bool:
    """Return whether unit file ``doc`` was written for this shard and settings."""
    return doc.get("shard_id") == shard_id and doc.get("settings_hash") == settings_hash


# --- Validation at the public entry ---------------------------------------------


def _check_settings(
    solver: str,
    Cs: Sequence[float] | None,
    tol: float | None,
    max_iter: int | None,
    early_stopping: bool,
    warm_start: bool,
    device: str,
) -> FitSettings:
    """Validate the fit settings once and fill in defaults.

    The solver is made once here to check its name and device; workers make
    their own from the name.
    """
    _make_solver(solver, _check_device(device))
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
    return settings


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


def _import_plugins(plugins: Sequence[str]) -> tuple[str, ...]:
    """Import the plugin modules named ``PKG.MODULE``; return their names."""
    if isinstance(plugins, str):
        raise TypeError("plugins must be a sequence of module names, not one string")
    names = tuple(str(name).strip() for name in plugins)
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise InvalidInputError(
                f"cannot import plugin module {name!r} ({type(err).__name__}: "
                f"{err}); give a PKG.MODULE importable here and on every worker, "
                "for example by adding its folder to PYTHONPATH"
            ) from err
    return names


def _check_n_jobs(n_jobs: int) -> int:
    """Return the number of workers that ``n_jobs`` gives under the active backend."""
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, int) or n_jobs == 0:
        raise InvalidInputError(
            f"invalid n_jobs {n_jobs!r}: give a positive number of workers, "
            "or -1 for one per core"
        )
    return max(1, int(joblib.effective_n_jobs(n_jobs)))


# --- Shards and filters ------------------------------------------------------------


def _check_out_dir_apart(acts_dir: Path, out_dir: Path) -> None:
    """Reject a reports folder that is the activations folder itself."""
    if acts_dir.resolve() == out_dir.resolve():
        raise InvalidInputError(
            f"the reports folder {out_dir} is the activations folder {acts_dir}; "
            "give the reports a folder of their own, such as --out reports"
        )


def _reports_folder_hint(acts_dir: Path) -> str | None:
    """Return why ``acts_dir``, which contains no shard, looks like a reports folder."""
    if (acts_dir / reports.INDEX_NAME).is_file():
        return f"it contains {reports.INDEX_NAME}"
    if (acts_dir / UNITS_DIR).is_dir():
        return f"it contains {UNITS_DIR}/"
    report_names = sorted(path.name for path in acts_dir.glob("*.json"))
    if report_names:
        return f"it contains {report_names[0]}"
    return None


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
        hint = _reports_folder_hint(acts_dir)
        if hint is not None:
            raise InvalidInputError(
                f"no shards (*{SHARD_SUFFIX}) in {acts_dir}, and {hint}, so it "
                "looks like a reports folder of `probecvx fit`; pass the "
                "activations folder, the --out folder of `probecvx extract`, "
                "instead"
            )
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
            message = explain_lock_error(str(err))
            logger.warning("skipping shard %s: %s", path, message)
            failed.append((path.stem, str(path), message))
            continue
        counts = np.bincount(split, minlength=len(SPLIT_NAMES))
        sizes = {name: int(counts[code]) for code, name in enumerate(SPLIT_NAMES)}
        train_counts = np.bincount(
            labels[split == SPLIT_NAMES.index("train")],
            minlength=len(info.class_names),
        )
        missing = [info.class_names[int(i)] for i in np.flatnonzero(train_counts == 0)]
        readable.append(
            _Checkpoint(
                info=info, split_sizes=sizes, classes_without_train_rows=missing
            )
        )

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

# --- Planning: which units this task fits ---------------------------------------------


def _write_plan_file(
    out_dir: Path,
    acts_dir: Path,
    sites: Sequence[str] | None,
    checkpoints: Sequence[str] | None,
    context: WorkerContext,
) -> None:
    """Record the selection and settings of this run for ``probecvx status``."""
    doc = {
        "format": PLAN_FORMAT,
        "acts_dir": str(acts_dir.resolve()),
        "sites": None if sites is None else list(sites),
        "checkpoints": None if checkpoints is None else list(checkpoints),
        "fit": context.settings.record(),
        "updated": utc_now(),
        "by": context.owner.record(),
    }
    folder = out_dir / UNITS_DIR
    folder.mkdir(exist_ok=True)
    remove_stale_temp_files(folder)
    write_text_atomic(folder / PLAN_NAME, json.dumps(doc, indent=1) + "\n")


def _plan(
    states: dict[str, _Checkpoint],
    selected_sites: set[str],
    context: WorkerContext,
    out_dir: Path,
    shard: tuple[int, int] | None,
    n_workers: int,
) -> _Plan:
    """Cut every selected unit into segments, keep this task's, and make chains.

    The segments depend only on the selected units and the number of tasks,
    never on which units are done, so every task of an array, and a re-run,
    computes the same ones.
    """
    units = _plan_units(states, selected_sites, context, out_dir)
    n_tasks = 1 if shard is None else shard[1]
    segments = _segments(units, context.settings.warm_start, n_tasks)
    mine = [
        segments[i]
        for i in items_of_shard([_cost(segment) for segment in segments], shard)
    ]
    my_units = {(u.checkpoint, u.site) for segment in mine for u in segment}

    failed_earlier = []
    n_current = 0
    for unit in units:
        state = states[unit.checkpoint]
        if (unit.checkpoint, unit.site) not in my_units:
            if unit.status == PENDING:
                state.elsewhere.add(unit.site)
            continue
        if unit.status == PENDING:
            state.pending.add(unit.site)
            continue
        n_current += 1
        if unit.status == DONE_FAILED:
            entry = state.entries[unit.site]
            failed_earlier.append((unit.checkpoint, unit.site, entry["error"]))
    if failed_earlier:
        logger.warning(
            "%d probes failed in an earlier run and are not refitted; pass "
            "--retry-failed to refit them",
            len(failed_earlier),
        )

    threads = _threads_per_worker(n_workers)
    chains = _make_chains(mine, context, n_workers, threads)
    return _Plan(chains, len(my_units), n_current, failed_earlier)


def _plan_units(
    states: dict[str, _Checkpoint],
    selected_sites: set[str],
    context: WorkerContext,
    out_dir: Path,
) -> list[UnitTask]:
    """Return every selected unit in checkpoint order, marked pending or done.

    Each checkpoint's current entries go to ``state.entries``, including those
    of sites outside the selection, so that its report keeps them.
    """
    settings_hash = context.settings.settings_hash()
    units: list[UnitTask] = []
    for name, state in states.items():
        info = state.info
        units_folder = unit_path(out_dir, name, "-").parent
        if units_folder.is_dir():
            remove_stale_temp_files(units_folder)
            remove_stale_claims(
                units_folder, f"*{CLAIM_SUFFIX}", timeout=context.claim_timeout
            )
        current = _current_entries(out_dir, info, settings_hash)

        for order, site in enumerate(info.sites):
            entry = current.get(site)
            if site in selected_sites:
                status = _planned_status(entry, context)
                units.append(_unit_task(info, site, order, out_dir, status))
                if status != PENDING and entry is not None:
                    state.entries[site] = entry
            elif entry is not None:
                state.entries[site] = entry
    return units


def _remove_dead_workers_files(
    out_dir: Path, states: dict[str, _Checkpoint], claim_timeout: float
) -> None:
    """Remove the claims and temporary files of unit folders whose writer is gone."""
    for name in states:
        units_folder = unit_path(out_dir, name, "-").parent
        if units_folder.is_dir():
            remove_stale_temp_files(units_folder)
            remove_stale_claims(units_folder, f"*{CLAIM_SUFFIX}", timeout=claim_timeout)


def _planned_status(entry: dict[str, Any] | None, context: WorkerContext) -> str:
    if entry is None or context.force:
        return PENDING
    if entry["status"] == "ok":
        return DONE_OK
    return PENDING if context.retry_failed else DONE_FAILED


def _unit_task(
    info: ShardInfo, site: str, order: int, out_dir: Path, status: str
) -> UnitTask:
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
        unit_path=unit_path(out_dir, info.checkpoint_name, site),
        shard_id=info.shard_id,
        n_samples=info.n_samples,
        status=status,
    )


def _current_entries(
    out_dir: Path, info: ShardInfo, settings_hash: str
) -> dict[str, dict[str, Any]]:
    """Return the entries of ``info``'s sites fitted with these settings, failed too.

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
                entries = {entry["site"]: entry for entry in doc["sites"]}

    for site in info.sites:
        unit = read_unit_file(unit_path(out_dir, info.checkpoint_name, site))
        if unit is not None and is_current(unit, info.shard_id, settings_hash):
            entries[site] = unit["entry"]
    return {site: entry for site, entry in entries.items() if site in info.sites}


def _cost(units: Sequence[UnitTask]) -> float:
    return sum(unit.cost for unit in units)


def _segments(
    units: Sequence[UnitTask], warm_start: bool, n_tasks: int
) -> list[tuple[UnitTask, ...]]:
    """Cut the units into the segments that tasks are given whole.

    Without warm starts every unit is a segment. With them, each site's units
    in checkpoint order are cut into contiguous segments of about
    ``1/n_tasks`` of the total cost each, rounded to the nearest count. A site
    not much larger than that stays whole, because the first unit of a
    segment starts cold.
    """
    if not warm_start:
        return [(unit,) for unit in units]
    by_site: dict[str, list[UnitTask]] = {}
    for unit in units:
        by_site.setdefault(unit.site, []).append(unit)
    target = _cost(units) / n_tasks
    segments = []
    for site_units in by_site.values():
        n_pieces = 1
        if n_tasks > 1 and target > 0:
            wanted = round(_cost(site_units) / target)
            n_pieces = min(len(site_units), max(1, wanted))
        for part in np.array_split(np.arange(len(site_units)), n_pieces):
            segments.append(tuple(site_units[i] for i in part))
    return segments


def _threads_per_worker(n_workers: int) -> int | None:
    """Return BLAS threads per local worker; None on Dask or with one worker."""
    if n_workers == 1 or active_dask_client() is not None:
        return None
    return max(1, joblib.cpu_count() // n_workers)


def _make_chains(
    segments: Sequence[tuple[UnitTask, ...]],
    context: WorkerContext,
    n_workers: int,
    threads: int | None,
) -> list[ChainTask]:
    """Cut this task's segments into chains, so that every worker has work.

    With warm starts each segment is cut into as few contiguous chains as
    keep every worker busy; without them every unit is a chain. The cut
    depends only on the segments and the number of workers, so a re-run
    cuts the same chains. Chains with nothing to fit are left out; the
    others are sorted by the cost left, largest first.
    """
    per_segment = 1
    if context.settings.warm_start and segments:
        per_segment = max(1, math.ceil(n_workers / len(segments)))
    chains = []
    for segment in segments:
        n_pieces = min(per_segment, len(segment))
        for part in np.array_split(np.arange(len(segment)), n_pieces):
            chain = ChainTask(tuple(segment[i] for i in part), context, threads)
            if chain.pending:
                chains.append(chain)
    chains.sort(key=lambda chain: -_cost(chain.pending))
    return chains


# --- Execution: chains on the backend, and workers that die ---------------------------


def _execute(chains: Sequence[ChainTask], n_jobs: int, run: _Run) -> None:
    """Run ``chains`` and record every unit, isolating units whose worker died.

    When a worker process dies (killed for memory, say), the units it had
    claimed are suspects. Under joblib, a dead worker stops the whole pool,
    so each suspect then runs alone, and a second death names its unit, which
    is recorded as failed. Dask reports the one task whose workers died, after
    retrying it on other workers, so its suspect is recorded as failed at once.
    The rest of each chain runs again, skipping what was committed. A death
    that no claimed unit explains fails the pending units of the chains it
    hit, since a retry could die the same way. So every round settles a unit
    or ends the loop.
    """
    blame_at_once = active_dask_client() is not None
    queue = list(chains)
    suspects: list[ChainTask] = []
    while queue or suspects:
        for suspect in suspects:
            for outcome in run_tasks(_fit_chain, [suspect], n_jobs):
                if outcome.error is None:
                    run.record_all(outcome.result)
                else:
                    run.record_worker_death(suspect.pending[0], outcome.error)
        suspects = []

        retry: list[ChainTask] = []
        unexplained: list[tuple[ChainTask, BaseException]] = []
        for outcome in run_tasks(_fit_chain, queue, n_jobs):
            chain = queue[outcome.index]
            if outcome.error is None:
                run.record_all(outcome.result)
                continue
            committed, in_flight = _triage(chain)
            run.record_all(committed)
            rest = _without(chain, committed, in_flight)
            if not in_flight:
                unexplained.append((rest, outcome.error))
                continue
            if blame_at_once:
                for unit in in_flight:
                    run.record_worker_death(unit, outcome.error)
            else:
                suspects.extend(replace(chain, units=(unit,)) for unit in in_flight)
            if rest.pending:
                retry.append(rest)

        # Under joblib one death stops every chain, so a chain with nothing in
        # flight is retried as long as another chain's unit takes the blame.
        if blame_at_once or not suspects:
            for chain, error in unexplained:
                for unit in chain.pending:
                    run.record_worker_death(unit, error)
        else:
            retry.extend(chain for chain, _ in unexplained if chain.pending)
        queue = retry


def _triage(chain: ChainTask) -> tuple[list[UnitResult], list[UnitTask]]:
    """Split a chain whose worker died: units it committed, and units in flight.

    A unit is in flight when its claim belongs to this run: the dead worker
    took it and did not commit it.
    """
    context = chain.context
    settings_hash = context.settings.settings_hash()
    committed, in_flight = [], []
    for unit in chain.pending:
        result = _committed_result(unit, context, settings_hash)
        if result is not None:
            committed.append(result)
            continue
        record = read_claim(claim_path(unit.unit_path))
        if record is not None and record.owner.run == context.owner.run:
            in_flight.append(unit)
    return committed, in_flight


def _without(
    chain: ChainTask, committed: Sequence[UnitResult], in_flight: Sequence[UnitTask]
) -> ChainTask:
    """Return ``chain`` with committed units marked done and in-flight ones left out.

    The units of a chain share one site, so they are keyed by checkpoint.
    """
    done = {
        result.checkpoint: DONE_OK if _entry_ok(result.entry) else DONE_FAILED
        for result in committed
    }
    left_out = {unit.checkpoint for unit in in_flight}
    units = []
    for unit in chain.units:
        if unit.status == PENDING and unit.checkpoint in done:
            unit = replace(unit, status=done[unit.checkpoint])
        elif unit.status == PENDING and unit.checkpoint in left_out:
            unit = replace(unit, status=DONE_FAILED)
        units.append(unit)
    return replace(chain, units=tuple(units))


def _entry_ok(entry: dict[str, Any] | None) -> bool:
    return entry is not None and entry["status"] == "ok"


# --- Workers: one chain, one unit -----------------------------------------------------


class _WarmStart:
    """The solution that the next unit of a chain starts from, loaded lazily."""

    def __init__(self, enabled: bool, settings_hash: str) -> None:
        self.enabled = enabled
        self.settings_hash = settings_hash
        self.solution: tuple[np.ndarray, np.ndarray] | None = None
        self.source: UnitTask | None = None

    def set(self, solution: tuple[np.ndarray, np.ndarray]) -> None:
        self.solution, self.source = solution, None

    def from_file(self, unit: UnitTask) -> None:
        """Start the next unit from ``unit``'s saved solution, read when needed."""
        self.solution, self.source = None, unit

    def get(self) -> tuple[np.ndarray, np.ndarray] | None:
        if not self.enabled:
            return None
        if self.solution is None and self.source is not None:
            self.solution = _read_solution(self.source, self.settings_hash)
            self.source = None
        return self.solution


def _fit_chain(chain: ChainTask) -> list[UnitResult]:
    """Fit a chain's pending units in order, warm-starting each from the last success.

    Each unit is claimed first and skipped when another process holds it or
    has committed it. Its result is committed to its unit file before the
    next unit starts.
    """
    context = chain.context
    _exit_when_driver_dies(context.owner.pid)
    for name in context.plugins:
        _import_in_worker(name)
    solver = _worker_solver(context.settings)
    owner = context.owner.here()
    settings_hash = context.settings.settings_hash()
    warm = _WarmStart(context.settings.warm_start, settings_hash)
    results = []
    with (
        _limit_threads(chain.threads),
        cluster.hdf5_locking(context.hdf5_locking, log=False),
    ):
        for unit in chain.units:
            if unit.status == DONE_OK:
                warm.from_file(unit)
            if unit.status != PENDING:
                continue
            result, solution = _claim_and_fit(unit, context, solver, owner, warm)
            results.append(result)
            if solution is not None:
                warm.set(solution)
            elif result.outcome == DONE_ELSEWHERE and _entry_ok(result.entry):
                warm.from_file(unit)
    return results


def _claim_and_fit(
    unit: UnitTask,
    context: WorkerContext,
    solver: Solver,
    owner: Owner,
    warm: _WarmStart,
) -> tuple[UnitResult, tuple[np.ndarray, np.ndarray] | None]:
    """Claim ``unit``, fit it and commit it; or skip it if another process has it."""
    settings_hash = context.settings.settings_hash()
    done = _committed_result(unit, context, settings_hash)
    if done is not None:
        return done, None
    unit.unit_path.parent.mkdir(parents=True, exist_ok=True)
    held = try_claim(claim_path(unit.unit_path), owner, timeout=context.claim_timeout)
    if not isinstance(held, Claim):
        holder = {**held.owner.record(), "started": held.started}
        return UnitResult(unit.checkpoint, unit.site, CLAIMED, None, holder), None

    with held:
        # Another process may have committed the unit just before the claim.
        done = _committed_result(unit, context, settings_hash)
        if done is not None:
            return done, None
        started = utc_now()
        entry, solution = _fit_unit_safely(unit, context.settings, solver, warm)
        provenance = {**owner.record(), "started": started, "finished": utc_now()}
        if solution is not None and context.settings.warm_start:
            _write_solution(unit, solution, settings_hash)
        _write_unit_file(unit, settings_hash, entry, provenance)
    return UnitResult(unit.checkpoint, unit.site, FITTED, entry, provenance), solution


def _fit_unit_safely(
    unit: UnitTask, settings: FitSettings, solver: Solver, warm: _WarmStart
) -> tuple[dict[str, Any], tuple[np.ndarray, np.ndarray] | None]:
    """Run :func:`probecvx.probe.fit_unit`, recording any error in the entry.

    fit_unit records the errors that belong to a unit's data. Any other
    exception (a solver bug, say) is recorded too, with its traceback in the
    log, so that one unit cannot stop the other units of a batch job.
    """
    try:
        entry, solution = fit_unit(unit, settings, solver, warm.get())
    except Exception as err:
        logger.exception("probe %s at %s raised", unit.site, unit.checkpoint)
        entry, solution = new_entry(unit), None
        entry["error"] = error_text(err)
    if entry["error"] is not None:
        entry["error"] = explain_lock_error(entry["error"])
    return entry, solution


def _committed_result(
    unit: UnitTask, context: WorkerContext, settings_hash: str
) -> UnitResult | None:
    """Return the unit's committed result if it counts as done for this run.

    A current unit file counts, unless this run refits it: with ``force``
    every unit is refitted once, and with ``retry_failed`` every failed unit,
    so only files that this run wrote count then.
    """
    doc = read_unit_file(unit.unit_path)
    if doc is None or not is_current(doc, unit.shard_id, settings_hash):
        return None
    provenance = doc.get("provenance")
    this_run = isinstance(provenance, dict) and provenance.get("run") == (
        context.owner.run
    )
    entry = doc["entry"]
    refit = context.force or (context.retry_failed and not _entry_ok(entry))
    if refit and not this_run:
        return None
    outcome = FITTED if this_run else DONE_ELSEWHERE
    return UnitResult(unit.checkpoint, unit.site, outcome, entry, provenance)


def _write_unit_file(
    unit: UnitTask,
    settings_hash: str,
    entry: dict[str, Any],
    provenance: dict[str, Any],
) -> None:
    doc = {
        "shard_id": unit.shard_id,
        "settings_hash": settings_hash,
        "checkpoint": unit.checkpoint,
        "site": unit.site,
        "provenance": provenance,
        "entry": entry,
    }
    unit.unit_path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(unit.unit_path, json.dumps(doc, allow_nan=False) + "\n")


def _write_solution(
    unit: UnitTask, solution: tuple[np.ndarray, np.ndarray], settings_hash: str
) -> None:
    """Save a unit's chosen (coef, intercept), so that a re-run can warm-start."""
    coef, intercept = solution
    with atomic_path(unit.solution_path) as temp, open(temp, "wb") as handle:
        np.savez(
            handle,
            coef=coef,
            intercept=intercept,
            shard_id=np.str_(unit.shard_id),
            settings_hash=np.str_(settings_hash),
        )


def _read_solution(
    unit: UnitTask, settings_hash: str
) -> tuple[np.ndarray, np.ndarray] | None:
    """Return the solution saved for ``unit``; None when missing or from other data."""
    try:
        with np.load(unit.solution_path, allow_pickle=False) as data:
            if (
                str(data["shard_id"]) != unit.shard_id
                or str(data["settings_hash"]) != settings_hash
            ):
                return None
            return np.array(data["coef"]), np.array(data["intercept"])
    except FileNotFoundError:
        logger.debug("no solution saved for %s; the next unit starts cold", unit.site)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        logger.warning(
            "cannot read %s (%s); the next unit starts cold", unit.solution_path, err
        )
    return None


def _worker_solver(settings: FitSettings) -> Solver:
    """Make the solver in a worker; the driver validated its name and device."""
    solver = get_solver(settings.solver)
    if settings.device != "cpu":
        solver.device = settings.device  # type: ignore[attr-defined]
    return solver


#: Seconds between a worker's checks that the fit process that started it is alive.
PARENT_POLL_SECONDS = 1.0

_parent_watch_lock = threading.Lock()
_parent_watch_started = False


def _exit_when_driver_dies(driver_pid: int) -> None:
    """Start a thread that ends this worker process when the fit process dies.

    A loky worker whose parent was killed with SIGKILL goes on with the chain
    it is fitting. Its heartbeat keeps its claims fresh, so a re-run leaves
    those units to it. It then waits for tasks until joblib's idle timeout,
    300 s in joblib 1.6. With this thread, a worker that the fit process
    started exits within PARENT_POLL_SECONDS of that process's death, when it
    is re-parented and its parent pid changes. The next run removes its
    claims and temporary files, as for any killed process. Workers that the
    fit process did not start, such as those of a Dask scheduler, are left
    alone.
    """
    global _parent_watch_started
    if os.getpid() == driver_pid or os.getppid() != driver_pid:
        return
    with _parent_watch_lock:
        if _parent_watch_started:
            return
        _parent_watch_started = True
    watch = threading.Thread(
        target=_watch_parent,
        args=(driver_pid,),
        name="probecvx-parent-watch",
        daemon=True,
    )
    watch.start()


def _watch_parent(driver_pid: int) -> None:
    while os.getppid() == driver_pid:
        time.sleep(PARENT_POLL_SECONDS)
    logger.warning(
        "worker %d exits because its fit process %d is gone", os.getpid(), driver_pid
    )
    os._exit(1)


def _import_in_worker(name: str) -> None:
    try:
        importlib.import_module(name)
    except ImportError as err:
        raise ProbecvxError(
            f"cannot import plugin module {name!r} in the worker process "
            f"{os.getpid()} ({err}); install it where the workers run"
        ) from err


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


# --- Bookkeeping: results in, reports and index out -----------------------------------


class _Run:
    """The bookkeeping of one fit run: results in, reports and index out."""

    def __init__(
        self, states: dict[str, _Checkpoint], out_dir: Path, context: WorkerContext
    ) -> None:
        self.states = states
        self.out_dir = out_dir
        self.context = context
        self.settings_hash = context.settings.settings_hash()
        self.index = reports.ReportIndex()
        self.index_changed: set[str] = set()
        self.recorded: set[tuple[str, str]] = set()
        self.reports_written: list[Path] = []
        self.failed_units: list[tuple[str, str, str]] = []
        self.failed_elsewhere: list[tuple[str, str, str]] = []
        self.n_not_converged = 0
        self.not_converged: list[tuple[str, str]] = []
        self.no_train_rows: list[tuple[str, str]] = []
        self.n_stopped_early = 0
        self.n_fitted = 0
        self.n_done_elsewhere = 0
        self.n_claimed = 0
        self.n_waiting = 0
        self.on_result: Callable[[int], object] = lambda n: None

    def start(self, failed_shards: Sequence[tuple[str, str, str]]) -> None:
        """Record unreadable shards and write the reports that need no fitting."""
        for name, path, error in failed_shards:
            self.index.set_failed(name, path, error)
            self.index_changed.add(name)
        for state in self.states.values():
            if not state.pending:
                self._finish_if_complete(state, write_index=False)
        self.write_index(rebuild=True)

    def record_all(self, results: Sequence[UnitResult]) -> None:
        for result in results:
            self.record(result)

    def record(self, result: UnitResult) -> None:
        """Take one unit's outcome; write its checkpoint's report if it was the last."""
        key = (result.checkpoint, result.site)
        if key in self.recorded:
            return  # read back from its unit file after a worker died
        self.recorded.add(key)
        self.on_result(1)
        state = self.states[result.checkpoint]
        state.pending.discard(result.site)

        if result.outcome == CLAIMED:
            self.n_claimed += 1
            state.elsewhere.add(result.site)
            logger.info(
                "probe %s at %s is claimed by %s; left to it",
                result.site,
                result.checkpoint,
                _where(result.provenance),
            )
        else:
            self._count(result)
            assert result.entry is not None
            state.entries[result.site] = result.entry
            state.fitted_now = state.fitted_now or result.outcome == FITTED
        if not state.pending:
            self._finish_if_complete(state, write_index=True)

    def record_worker_death(self, unit: UnitTask, error: BaseException) -> None:
        """Commit a failed entry for a unit whose worker died while fitting it."""
        entry = new_entry(unit)
        entry["error"] = (
            f"the worker process died while fitting this probe "
            f"({_death_reason(error)}); it may have run out of memory, so give each "
            "worker more memory or lower --jobs, then re-run with --retry-failed"
        )
        owner = self.context.owner
        provenance = {**owner.record(), "started": utc_now(), "finished": utc_now()}
        _write_unit_file(unit, self.settings_hash, entry, provenance)
        record = read_claim(claim_path(unit.unit_path))
        if record is not None and record.owner.run == owner.run:
            break_claim(record)
        self.record(UnitResult(unit.checkpoint, unit.site, FITTED, entry, provenance))

    def finish_waiting(self) -> None:
        """Write the reports whose last units other processes committed meanwhile."""
        for state in self.states.values():
            if not state.pending and state.elsewhere:
                self._finish_if_complete(state, write_index=True)
        waiting = [n for n, s in self.states.items() if s.pending or s.elsewhere]
        self.n_waiting = len(waiting)
        if waiting:
            logger.info(
                "%d checkpoints wait for units of other tasks or processes (first: "
                "%s); the process that commits their last unit writes their report",
                len(waiting),
                waiting[0],
            )

    def write_index(self, rebuild: bool = False) -> None:
        """Merge this run's index entries into ``index.json`` under a lock.

        Other tasks may update the index at the same time, so the file is read
        again under the lock and only this run's entries are replaced.
        ``rebuild`` rebuilds the rest from the report files, once per run.
        """
        lock = self.out_dir / UNITS_DIR / _INDEX_LOCK
        lock.parent.mkdir(parents=True, exist_ok=True)
        owner = self.context.owner
        # Wait past the claim timeout, so that a lock left by a dead process
        # on another host becomes stale before this run gives up.
        timeout = self.context.claim_timeout
        with exclusive(lock, owner, timeout=timeout, wait=timeout + LOCK_WAIT):
            base = (
                reports.ReportIndex.load(self.out_dir)
                if rebuild
                else _read_index(self.out_dir)
            )
            for name in self.index_changed:
                base.entries[name] = self.index.entries[name]
            base.write(self.out_dir)

    def unit_order(self, unit: tuple[str, str]) -> tuple[bool, int, str, int]:
        """Return the sort key of a (checkpoint, site): step, name, forward order."""
        checkpoint, site = unit
        info = self.states[checkpoint].info
        order = info.sites.index(site) if site in info.sites else len(info.sites)
        return (info.step is None, info.step or 0, checkpoint, order)

    def _count(self, result: UnitResult) -> None:
        entry = result.entry
        assert entry is not None
        _log_unit(result)
        failed = entry["status"] == "failed"
        error = (result.checkpoint, result.site, entry["error"])
        if result.outcome == DONE_ELSEWHERE:
            self.n_done_elsewhere += 1
            if failed:
                self.failed_elsewhere.append(error)
            return
        self.n_fitted += 1
        if failed:
            self.failed_units.append(error)
            return
        if self.states[result.checkpoint].classes_without_train_rows:
            self.no_train_rows.append((result.checkpoint, result.site))
        if entry["solver"].get("stop_reason") == EARLY_STOPPED:
            self.n_stopped_early += 1
        elif not entry["solver"]["converged"]:
            self.n_not_converged += 1
            self.not_converged.append((result.checkpoint, result.site))

    def _finish_if_complete(self, state: _Checkpoint, *, write_index: bool) -> None:
        """Write the checkpoint's report once every site has a current entry."""
        for site in sorted(state.elsewhere):
            path = unit_path(self.out_dir, state.info.checkpoint_name, site)
            doc = read_unit_file(path)
            if doc is not None and is_current(
                doc, state.info.shard_id, self.settings_hash
            ):
                state.entries[site] = doc["entry"]
                state.elsewhere.discard(site)
        if state.pending or state.elsewhere:
            return
        self._write_report(state)
        if write_index:
            self.write_index()

    def _write_report(self, state: _Checkpoint) -> None:
        """Write the report of a checkpoint whose units are all done, if it changed."""
        if not state.entries:
            return
        name = state.info.checkpoint_name
        path = reports.report_path(self.out_dir, name)
        entries = [state.entries[s] for s in state.info.sites if s in state.entries]
        doc = reports.build_report(
            state.info, state.split_sizes, entries, self.context.settings.record()
        )
        self.index_changed.add(name)
        if not state.fitted_now and reports.same_report(path, doc):
            self.index.set_report(doc, path)
            return
        reports.write_report(path, doc)
        self.reports_written.append(path)
        self.index.set_report(doc, path)
        logger.info("wrote report %s (%s)", path, doc["status"])


def _death_reason(error: BaseException) -> str:
    """Return the class of a worker-death error and its exit status, in one line."""
    text = " ".join(str(error).split())
    codes = re.search(r"exit codes of the workers are \{([^}]*)\}", text)
    if codes:
        return f"{type(error).__name__}, exit status {codes.group(1)}"
    first = re.split(r"(?<=\.) ", text, maxsplit=1)[0]
    return f"{type(error).__name__}: {first[:200]}"


def _read_index(out_dir: Path) -> reports.ReportIndex:
    """Return the entries of ``index.json``, or rebuild them if it is unreadable."""
    path = out_dir / reports.INDEX_NAME
    try:
        doc = reports.read_index(path)
    except ReportError:
        return reports.ReportIndex.load(out_dir)
    return reports.ReportIndex({e["checkpoint"]: e for e in doc["checkpoints"]})


def _where(provenance: dict[str, Any] | None) -> str:
    """Return ``host:pid (task T)`` from a provenance record, for log lines."""
    if not provenance:
        return "an unknown process"
    text = f"{provenance.get('host')}:{provenance.get('pid')}"
    task = provenance.get("task")
    return text if task is None else f"{text} (task {task})"


def _log_unit(result: UnitResult) -> None:
    entry = result.entry
    assert entry is not None
    where = _where(result.provenance)
    if result.outcome == DONE_ELSEWHERE:
        logger.info(
            "probe %s at %s was committed by %s; not refitted",
            result.site,
            result.checkpoint,
            where,
        )
        return
    if entry["status"] == "failed":
        logger.warning(
            "probe %s at %s failed on %s: %s",
            result.site,
            result.checkpoint,
            where,
            entry["error"],
        )
        return
    test_error = entry["test"]["error"]
    logger.info(
        "fitted probe %s at %s on %s: C=%g, test error %s, %d iterations, %.2f s",
        result.site,
        result.checkpoint,
        where,
        entry["C"],
        "n/a" if test_error is None else f"{test_error:.4f}",
        entry["solver"]["n_iter"],
        entry["seconds"],
    )


def _warn_not_converged(summary: FitSummary, settings: FitSettings) -> None:
    if not summary.n_not_converged:
        return
    probes = _name_probes(summary.not_converged)
    warnings.warn(
        f"{summary.n_not_converged} of {summary.n_fitted} probes did not converge "
        f"({probes}): they stopped before meeting tol={settings.tol:g}, at "
        f"max_iter={settings.max_iter} or when the solver could not make "
        "progress. Their reports mark them converged: false. Raise --max-iter "
        "or --tol (max_iter or tol in Python) and re-run to refit them",
        ConvergenceWarning,
        stacklevel=3,
    )


def _warn_no_train_rows(summary: FitSummary, states: dict[str, _Checkpoint]) -> None:
    """Warn once about the probes fitted although some classes have no train rows.

    Each report's entry carries the same note, but nothing else reaches the
    terminal. The classes named are those of the first such checkpoint.
    """
    if not summary.no_train_rows:
        return
    first_checkpoint = summary.no_train_rows[0][0]
    state = states[first_checkpoint]
    missing = state.classes_without_train_rows
    names = list_class_names(missing)
    n_checkpoints = len({checkpoint for checkpoint, _ in summary.no_train_rows})
    checkpoints = f"{n_checkpoints} checkpoint{'' if n_checkpoints == 1 else 's'}"
    warnings.warn(
        f"{len(summary.no_train_rows)} of {summary.n_fitted - summary.n_failed} "
        f"probes fitted, at "
        f"{checkpoints}, have classes without train rows, so they "
        f"never predict them ({len(missing)} of {len(state.info.class_names)} "
        f"classes at {first_checkpoint}: {names}). Fix the split so that every "
        "class has train rows, for example with a larger train fraction in "
        "`probecvx extract --split` or more rows in --limit, then re-run extract "
        "and fit",
        SplitWarning,
        stacklevel=3,
    )


def _name_probes(probes: Sequence[tuple[str, str]], max_shown: int = 5) -> str:
    """Return the first ``max_shown`` probes as ``site at checkpoint`` and a count."""
    names = [f"{site} at {checkpoint}" for checkpoint, site in probes[:max_shown]]
    if len(probes) > max_shown:
        names.append(f"and {len(probes) - max_shown} more")
    return ", ".join(names)
