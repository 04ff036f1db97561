"""Fit one linear probe: read a site, standardise it, fit the grid of C, score it.

:func:`fit_unit` is what a worker runs for one (checkpoint, probe site) unit.
The activations of the site are read from the checkpoint's shard and
standardised with the mean and standard deviation of the train split. A
multinomial logistic regression is then fitted on the train split for every
``C`` of a grid. The ``C`` with the lowest val error is kept (ties go to the
lower val loss, then to the smaller ``C``), and its error and log-loss are
measured on the train, val and test splits. The result is the unit's site
entry of the report (``docs/reports.md``).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from probecvx import reports
from probecvx.errors import ProbecvxError, SolverError
from probecvx.shards import read_site, read_targets
from probecvx.solvers import (
    ProbeFit,
    Solver,
    Validation,
    check_problem,
    softmax_cross_entropy,
)

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


#: Values of :attr:`UnitTask.status`. PENDING: to fit. DONE_OK: done with
#: status ok, so its solution can warm-start the next unit of its site.
#: DONE_FAILED: failed, or left out of this run; it is neither fitted nor
#: used for a warm start.
PENDING, DONE_OK, DONE_FAILED = "pending", "done_ok", "done_failed"


@dataclass(frozen=True)
class UnitTask:
    """One (checkpoint, site) probe, with what a worker needs to fit it.

    Workers get paths and shapes, never arrays or open files: they read the
    activations themselves. ``unit_path`` is the unit file that the result
    is committed to.
    """

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
    n_samples: int
    status: str = PENDING

    @property
    def cost(self) -> float:
        """Estimated cost of fitting this unit: its rows times its features."""
        return float(self.n_samples) * float(max(1, self.n_features))

    @property
    def solution_path(self) -> Path:
        """The ``.npz`` file of the chosen (coef, intercept), for warm starts."""
        return self.unit_path.with_name(f"{self.unit_path.stem}.solution.npz")


@dataclass
class _UnitData:
    """One site's standardised activations and labels, cut by split."""

    X: dict[str, np.ndarray]  # float32 views of one array, rows grouped by split
    y: dict[str, np.ndarray]
    n_constant: int


def fit_unit(
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
    entry = new_entry(unit)
    solution = None
    try:
        data = _load_unit_data(unit, entry)
        fields, solution = _fit_probe(data, unit, settings, solver, warm, entry)
    except (ProbecvxError, OSError, ValueError, MemoryError) as err:
        entry["error"] = error_text(err)
    else:
        entry.update(fields)
        entry["status"] = "ok"
    entry["seconds"] = time.perf_counter() - start
    return entry, solution


def new_entry(unit: UnitTask) -> dict[str, Any]:
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


def error_text(err: BaseException) -> str:
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
    n_constant = standardise(X_all, int(counts[0]))
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


def standardise(X: np.ndarray, n_train: int) -> int:
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


#: Classes named in messages about classes without train rows; the rest are counted.
LISTED_CLASSES = 10


def list_class_names(names: Sequence[str]) -> str:
    """Return the first :data:`LISTED_CLASSES` names quoted, and how many remain."""
    text = ", ".join(map(repr, names[:LISTED_CLASSES]))
    if len(names) > LISTED_CLASSES:
        text += f" and {len(names) - LISTED_CLASSES} more"
    return text


def _class_notes(y_train: np.ndarray, class_names: Sequence[str]) -> list[str]:
    counts = np.bincount(y_train, minlength=len(class_names))
    missing = [class_names[int(code)] for code in np.flatnonzero(counts == 0)]
    if not missing:
        return []
    names = list_class_names(missing)
    return [
        f"{len(missing)} of {len(class_names)} classes have no train rows "
        f"({names}); the probe never predicts them"
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
        "stop_reason": _optional_text(fit.extra.get("stop_reason")),
        "picked_because": _optional_text(fit.extra.get("picked_because")),
    }


def _optional_text(value: object) -> str | None:
    return None if value is None else str(value)
