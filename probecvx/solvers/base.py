"""The probe solver interface: what every solver takes and returns.

A probe is the multinomial logistic regression ``softmax(W h + b)`` with an L2
penalty on ``W`` (the intercept ``b`` is not penalised). Every solver minimises
the same objective, written as scikit-learn's ``LogisticRegression`` writes it
divided by ``C * n``::

    f(W, b) = mean_i CE(y_i, softmax(W x_i + b)) + ||W||_F^2 / (2 * C * n)

so that results are comparable across solvers and with scikit-learn.
Solvers receive features already standardised by the caller and trust their
inputs: validation happens once, in :func:`check_problem`, at the public entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from probecvx.errors import InvalidInputError, SolverError

#: ``ProbeFit.extra["stop_reason"]`` of a probe that early stopping on the val
#: split returned before the stopping rule was met.
EARLY_STOPPED = "early_stopped"


@dataclass
class ProbeFit:
    """The solution of one probe problem for one value of ``C``."""

    C: float
    coef: np.ndarray  # (n_classes, n_features), float64
    intercept: np.ndarray  # (n_classes,), float64
    n_iter: int
    converged: bool
    objective: float
    grad_norm: float
    data_passes: float
    fit_seconds: float
    solver: str
    stop_rule: str
    tol: float
    extra: dict[str, float | int | str | None] = field(default_factory=dict)


@dataclass(frozen=True)
class Validation:
    """Held-out rows used to choose ``C`` and, when asked, to stop early."""

    X: np.ndarray
    y: np.ndarray


class Solver(Protocol):
    """A probe solver; register new ones with :func:`register_solver`."""

    name: str

    def fit(
        self,
        X: np.ndarray,
        y: np.ndarray,
        n_classes: int,
        Cs: Sequence[float],
        *,
        tol: float,
        max_iter: int,
        warm_start: tuple[np.ndarray, np.ndarray] | None = None,
        validation: Validation | None = None,
        early_stopping: bool = False,
    ) -> list[ProbeFit]:
        """Fit one probe per value in ``Cs`` and return them in the same order.

        Parameters
        ----------
        X : ndarray of shape (n_samples, n_features)
            Standardised features, float32 or float64.
        y : ndarray of shape (n_samples,)
            int64 class codes in ``0..n_classes-1``. A class may be absent
            from ``y``, and its row of ``coef`` then only sees the penalty.
        n_classes : int
            The size of the fixed class set.
        Cs : sequence of float
            Inverse penalty strengths. One probe is returned per value.
        tol : float
            Tolerance of the stopping rule
            :func:`~probecvx.solvers._objective.gradient_converged`.
        max_iter : int
            Iterations allowed per probe, in the solver's own unit.
        warm_start : (coef, intercept) or None, default=None
            A previous solution, shapes ``(n_classes, n_features)`` and
            ``(n_classes,)``.
        validation : Validation or None, default=None
            Rows on which each probe's loss and error are reported in
            ``extra["val_loss"]`` and ``extra["val_error"]``.
        early_stopping : bool, default=False
            Stop each probe after ``patience`` iterations without a lower
            validation loss and return its iterate of lowest validation loss.

        Returns
        -------
        list of ProbeFit
            In the order of ``Cs``.
        """
        ...


_REGISTRY: dict[str, Callable[[], Solver]] = {}


def register_solver(name: str, factory: Callable[[], Solver]) -> None:
    """Make a solver available under ``name`` to ``fit`` and the command line."""
    _REGISTRY[name] = factory


def available_solvers() -> list[str]:
    """Return the names of the registered solvers, sorted."""
    return sorted(_REGISTRY)


def get_solver(name: str) -> Solver:
    """Return a new instance of the solver registered under ``name``."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        valid = ", ".join(available_solvers())
        raise InvalidInputError(
            f"unknown solver {name!r}; valid solvers: {valid}"
        ) from None
    return factory()


def check_problem(X: np.ndarray, y: np.ndarray, n_classes: int) -> None:
    """Reject a problem that no solver can fit, naming what is wrong."""
    if X.ndim != 2:
        raise SolverError(f"expected a 2-D feature matrix, got shape {X.shape}")
    if y.shape != (X.shape[0],):
        raise SolverError(
            f"labels have shape {y.shape} but the feature matrix has {X.shape[0]} rows"
        )
    if n_classes < 2:
        raise SolverError(f"a probe needs at least 2 classes, got {n_classes}")
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise SolverError(
            f"labels must lie in 0..{n_classes - 1}, got {y.min()}..{y.max()}"
        )
    if len(np.unique(y)) < 2:
        raise SolverError(
            "the train split contains a single class, so no classifier can be fit; "
            "use a split with at least two classes in train"
        )
    if not np.isfinite(X).all():
        bad = int(np.count_nonzero(~np.isfinite(X)))
        raise SolverError(
            f"the feature matrix contains {bad} NaN or infinite values; "
            "the model produced non-finite activations at this site"
        )


def check_fit_arguments(
    Cs: Sequence[float], early_stopping: bool, validation: Validation | None
) -> None:
    """Reject values of ``C`` and early-stopping settings that no solver can use."""
    bad = [C for C in Cs if not (math.isfinite(C) and C > 0)]
    if bad:
        raise SolverError(
            f"every C must be a positive finite number, got {bad}; "
            "C is the inverse penalty strength"
        )
    if early_stopping and validation is None:
        raise SolverError(
            "early_stopping=True needs validation rows; pass validation= "
            "or set early_stopping=False"
        )


def softmax_cross_entropy(
    X: np.ndarray, y: np.ndarray, coef: np.ndarray, intercept: np.ndarray
) -> tuple[float, float]:
    """Return (mean log-loss, error rate) of a probe on (X, y), stably."""
    logits = X @ coef.T.astype(X.dtype, copy=False) + intercept.astype(X.dtype)
    logits = logits.astype(np.float64, copy=False)
    shift = logits.max(axis=1, keepdims=True)
    log_norm = shift[:, 0] + np.log(np.exp(logits - shift).sum(axis=1))
    loss = float(np.mean(log_norm - logits[np.arange(len(y)), y]))
    error = float(np.mean(logits.argmax(axis=1) != y))
    return loss, error


def objective(
    X: np.ndarray, y: np.ndarray, coef: np.ndarray, intercept: np.ndarray, C: float
) -> float:
    """Return the probe objective ``f(W, b)`` defined in this module's docstring."""
    loss, _ = softmax_cross_entropy(X, y, coef, intercept)
    return loss + float(np.sum(coef**2)) / (2.0 * C * X.shape[0])
