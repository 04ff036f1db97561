"""scikit-learn's ``LogisticRegression`` behind the probe solver interface.

These are the reference solvers that the fast ones are checked against, and a
fallback engine: ``sklearn-lbfgs``, ``sklearn-sag`` and ``sklearn-saga``.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence

import numpy as np
from sklearn.exceptions import ConvergenceWarning as SklearnConvergenceWarning
from sklearn.linear_model import LogisticRegression

from probecvx.solvers.base import (
    ProbeFit,
    Solver,
    Validation,
    objective,
    register_solver,
)


class SklearnSolver:
    """Fit probes with ``LogisticRegression(solver=...)``, one fit per ``C``."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.name = f"sklearn-{method}"

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
        # NOTE: scikit-learn has no early stopping for these solvers, so
        # ``early_stopping`` and ``validation`` are accepted and not used here.
        present = np.unique(y)
        return [
            self._fit_one(X, y, n_classes, present, C, tol, max_iter, warm_start)
            for C in Cs
        ]

    def _fit_one(
        self,
        X: np.ndarray,
        y: np.ndarray,
        n_classes: int,
        present: np.ndarray,
        C: float,
        tol: float,
        max_iter: int,
        warm_start: tuple[np.ndarray, np.ndarray] | None,
    ) -> ProbeFit:
        binary = len(present) == 2
        # With two classes scikit-learn fits the binomial model on w = w1 - w0.
        # The multinomial optimum is symmetric, w0 = -w1, so its penalty
        # ||W||^2 = ||w||^2 / 2 equals the binomial penalty at twice the C.
        model = LogisticRegression(
            C=2 * C if binary else C,
            solver=self.method,
            tol=tol,
            max_iter=max_iter,
            warm_start=True,
        )
        if warm_start is not None:
            coef_seen = warm_start[0][present]
            intercept_seen = warm_start[1][present]
            if binary:
                coef_seen = coef_seen[1:] - coef_seen[:1]
                intercept_seen = intercept_seen[1:] - intercept_seen[:1]
            model.coef_ = coef_seen.copy()
            model.intercept_ = intercept_seen.copy()

        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SklearnConvergenceWarning)
            model.fit(X, y)
        seconds = time.perf_counter() - start
        hit_cap = any(issubclass(w.category, SklearnConvergenceWarning) for w in caught)

        coef, intercept = _expand_classes(model, present, n_classes)
        n_iter = int(np.max(model.n_iter_))
        return ProbeFit(
            C=float(C),
            coef=coef,
            intercept=intercept,
            n_iter=n_iter,
            converged=not hit_cap,
            objective=objective(X, y, coef, intercept, C),
            grad_norm=float("nan"),
            data_passes=float(n_iter),
            fit_seconds=seconds,
            solver=self.name,
            stop_rule=f"scikit-learn {self.method} tol",
            tol=tol,
        )


def _expand_classes(
    model: LogisticRegression, present: np.ndarray, n_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Place scikit-learn's rows for the classes seen into all ``n_classes`` rows.

    A class absent from the training labels gets a zero weight row and an
    intercept of -1000, which stands in for minus infinity, so it is never
    predicted. With two classes scikit-learn returns one row for class 1; the
    symmetric multinomial form is ``(-w/2, +w/2)``.
    """
    coef_seen = np.asarray(model.coef_, dtype=np.float64)
    intercept_seen = np.asarray(model.intercept_, dtype=np.float64)
    if len(present) == 2 and coef_seen.shape[0] == 1:
        coef_seen = np.vstack([-coef_seen[0] / 2, coef_seen[0] / 2])
        intercept_seen = np.array([-intercept_seen[0] / 2, intercept_seen[0] / 2])

    coef = np.zeros((n_classes, coef_seen.shape[1]))
    intercept = np.full(n_classes, -1e3)
    coef[present] = coef_seen
    intercept[present] = intercept_seen
    return coef, intercept


def _factory(method: str) -> Callable[[], Solver]:
    def make() -> Solver:
        return SklearnSolver(method)

    return make


for _method in ("lbfgs", "sag", "saga"):
    register_solver(f"sklearn-{_method}", _factory(_method))
