"""Full-batch L-BFGS for probes, with every value of ``C`` sharing each pass.

Each iteration of L-BFGS needs the objective and gradient over all rows, which
costs two GEMMs with ``X``. The probes for the different values of ``C`` are
fitted together. Their weights are stacked so that one GEMM over a block of
``X`` serves all of them (see :mod:`probecvx.solvers._objective`). A pass for
``m`` probes therefore costs much less than ``m`` passes.

Each ``C`` still runs its own L-BFGS, with its own history, line search and
stopping test. One L-BFGS on the sum of the objectives would also have the
right minimiser, because the sum is separable, but it would mix the probes.
Its curvature pairs and line search step would be shared, so its Hessian model
would not be block-diagonal. Its stopping test on the joint gradient would let
one badly converged probe hide behind well converged ones. Here the probes run
in lockstep. In each round, every probe still running proposes one trial point,
the trial points are evaluated together, and each probe then accepts its step
or backtracks on its own. A probe that has stopped drops out of the GEMMs.

The optimiser state is float64 numpy on the host. With ``device="cuda"`` the
data and the GEMMs live on the GPU and only the weights travel each round.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from probecvx.errors import ConvergenceWarning, SolverError
from probecvx.solvers._objective import (
    STOP_RULE,
    Evaluator,
    NumpyEvaluator,
    TorchEvaluator,
    describe_gradient_gap,
    expand_classes,
    feature_scale,
    gradient_converged,
    initial_point,
    present_classes,
    record_validation,
)
from probecvx.solvers.base import (
    EARLY_STOPPED,
    ProbeFit,
    Validation,
    check_fit_arguments,
    register_solver,
)

logger = logging.getLogger(__name__)

# Armijo constant of the line search (sufficient decrease).
_ARMIJO = 1e-4
# Backtracking steps allowed in one line search before it is declared failed.
_MAX_BACKTRACKS = 30
# The maximum cost of building a preconditioner, in passes' worth of flops.
# See _pick_preconditioner.
_PRECONDITIONER_PASSES = 20
_PRECONDITIONERS = ("auto", "covariance", "lowrank", "diagonal")
# The low-rank covariance model: its rank, its oversampling columns, the
# rounds of subspace iteration that find it, and the rows it samples.
_LOW_RANK = 128
_LOW_RANK_OVERSAMPLING = 10
_LOW_RANK_POWER_ITERATIONS = 2
_LOW_RANK_ROWS = 4096
# The bytes of the sampled rows converted to float64 at a time.
_LOW_RANK_BLOCK_BYTES = 8 * 2**20
# A curvature pair is stored only when s.y > _CURVATURE_EPS * |s| |y|.
_CURVATURE_EPS = 1e-10
# A probe has stalled when for _STALL_ITERS iterations neither has f fallen
# by _STALL_RTOL relative nor has the gradient halved. Rounding then decides
# the steps, which happens when tol requests more than float32 GEMMs resolve.
_STALL_ITERS = 50
_STALL_RTOL = 1e-13


@dataclass
class _Problem:
    """One probe's L-BFGS state: the iterate, its history and its line search.

    ``theta`` packs the weights then the intercepts: ``K * d + K`` values.
    ``preconditioner`` is the initial inverse Hessian model, up to the scalar
    that L-BFGS fits from its latest curvature pair.
    ``grad_divisor`` contains the feature scale of each entry of ``theta`` for
    the stopping rule (see ``scaled_gradient_max``).
    """

    C: float
    theta: np.ndarray
    preconditioner: _Preconditioner
    grad_divisor: np.ndarray
    history: int
    objective: float = math.inf
    grad: np.ndarray = field(default_factory=lambda: np.zeros(0))
    grad_max: float = math.inf
    n_iter: int = 0
    n_evals: int = 0
    val_passes: float = 0.0
    status: str = "running"
    stopped_at: float = 0.0
    # Line search: direction, step, slope at step 0, backtracks so far.
    direction: np.ndarray = field(default_factory=lambda: np.zeros(0))
    step: float = 0.0
    slope: float = 0.0
    backtracks: int = 0
    # Stall detection: the lowest objective and the gradient size at the
    # iteration of the latest progress.
    lowest_objective: float = math.inf
    progress_grad_max: float = math.inf
    progress_iter: int = 0
    pairs: deque[tuple[np.ndarray, np.ndarray, float]] = field(default_factory=deque)
    # Early stopping on the validation loss.
    best_val_loss: float = math.inf
    best_theta: np.ndarray | None = None
    best_objective: float = math.inf
    best_grad_max: float = math.inf
    best_iter: int = 0

    @property
    def running(self) -> bool:
        return self.status == "running"

    def trial_point(self) -> np.ndarray:
        return self.theta + self.step * self.direction

    def start(self, objective: float, grad: np.ndarray, tol: float) -> None:
        """Take the objective and gradient at the initial point."""
        self._set_point(objective, grad)
        if gradient_converged(self.grad_max, self.objective, tol):
            self.status = "converged"
            return
        self._new_direction()

    def update(
        self, objective: float, grad: np.ndarray, tol: float, max_iter: int
    ) -> bool:
        """Take the objective and gradient at the trial point.

        Returns whether the trial point was accepted as the next iterate.
        """
        slope_new = float(grad @ self.direction)
        decrease_ok = objective <= self.objective + _ARMIJO * self.step * self.slope
        # On a convex objective f(t) <= f(0) + t f'(t), so a small enough slope
        # at the trial point proves sufficient decrease on its own. This test
        # still works when float32 rounding hides the change in f.
        slope_ok = slope_new <= _ARMIJO * self.slope
        if not (math.isfinite(objective) and (decrease_ok or slope_ok)):
            self._backtrack(objective, slope_new)
            return False

        s = self.step * self.direction
        y = grad - self.grad
        sy = float(s @ y)
        if sy > _CURVATURE_EPS * float(np.linalg.norm(s) * np.linalg.norm(y)):
            if len(self.pairs) == self.history:
                self.pairs.popleft()
            self.pairs.append((s, y, 1.0 / sy))
        self.theta = self.theta + s
        self._set_point(objective, grad)
        self.n_iter += 1

        if gradient_converged(self.grad_max, self.objective, tol):
            self.status = "converged"
        elif self.n_iter >= max_iter:
            self.status = "max_iter"
        elif self._stalled():
            self.status = "stalled"
        else:
            self._new_direction()
        return True

    def _stalled(self) -> bool:
        lowest = self.lowest_objective
        fell = not math.isfinite(lowest) or (
            self.objective < lowest - _STALL_RTOL * abs(lowest)
        )
        if fell or self.grad_max < 0.5 * self.progress_grad_max:
            self.lowest_objective = min(self.objective, lowest)
            self.progress_grad_max = self.grad_max
            self.progress_iter = self.n_iter
        return self.n_iter - self.progress_iter >= _STALL_ITERS

    def _set_point(self, objective: float, grad: np.ndarray) -> None:
        self.objective = objective
        self.grad = grad
        self.grad_max = float(np.max(np.abs(grad) / self.grad_divisor))

    def _new_direction(self) -> None:
        """Set the L-BFGS direction (two-loop recursion) and the first step."""
        q = self.grad.copy()
        alphas = []
        for s, y, rho in reversed(self.pairs):
            alpha = rho * float(s @ q)
            q -= alpha * y
            alphas.append(alpha)
        q = self.preconditioner.apply(q)
        if self.pairs:
            s, y, _ = self.pairs[-1]
            q *= float(s @ y) / float(y @ self.preconditioner.apply(y))
        for (s, y, rho), alpha in zip(self.pairs, reversed(alphas), strict=True):
            beta = rho * float(y @ q)
            q += (alpha - beta) * s
        self.direction = -q
        self.slope = float(self.grad @ self.direction)

        if self.pairs and self.slope < 0:
            self.step = 1.0
        else:
            # No history, or rounding broke the descent property: restart
            # along the scaled -grad with a step of scaled length at most 1.
            self.pairs.clear()
            self.direction = -self.preconditioner.apply(self.grad)
            self.slope = float(self.grad @ self.direction)
            self.step = min(1.0, 1.0 / math.sqrt(-self.slope))
        self.backtracks = 0

    def _backtrack(self, objective: float, slope_new: float) -> None:
        """Shrink the step by safeguarded cubic interpolation."""
        self.backtracks += 1
        if self.backtracks > _MAX_BACKTRACKS:
            self.status = "line_search"
            return
        step = self.step
        shrunk = 0.5 * step
        if math.isfinite(objective) and math.isfinite(slope_new):
            # Minimiser of the cubic through f(0), f'(0), f(step), f'(step).
            d1 = self.slope + slope_new - 3.0 * (objective - self.objective) / step
            radicand = d1 * d1 - self.slope * slope_new
            if radicand >= 0.0:
                d2 = math.sqrt(radicand)
                denominator = slope_new - self.slope + 2.0 * d2
                if denominator != 0.0:
                    shrunk = step - step * (slope_new + d2 - d1) / denominator
            shrunk = min(max(shrunk, 0.1 * step), 0.5 * step)
        else:
            shrunk = 0.1 * step
        self.step = shrunk

    def observe_validation(self, val_loss: float, patience: int) -> None:
        """Record the validation loss at the current iterate for early stopping."""
        if val_loss < self.best_val_loss:
            self.best_val_loss = val_loss
            self.best_theta = self.theta.copy()
            self.best_objective = self.objective
            self.best_grad_max = self.grad_max
            self.best_iter = self.n_iter
        elif self.running and self.n_iter - self.best_iter >= patience:
            self.status = EARLY_STOPPED

    def restore_best(self) -> None:
        """Go back to the iterate with the lowest validation loss.

        When that is not the last iterate, the probe returned is not the
        optimum, so its status becomes ``early_stopped`` even if L-BFGS went
        on to converge.
        """
        if self.best_theta is None or self.best_iter == self.n_iter:
            return
        self.theta = self.best_theta
        self.objective = self.best_objective
        self.grad_max = self.best_grad_max
        self.status = EARLY_STOPPED


class LbfgsSolver:
    """Full-batch L-BFGS on GEMMs, fitting every value of ``C`` in one pass.

    Parameters
    ----------
    device : str or None, default=None
        None runs on numpy. A torch device string (``"cpu"``, ``"cuda"``,
        ``"cuda:1"``) moves the data to that device once and runs the GEMMs
        there with torch. The optimiser state stays float64 on the host.
    history : int, default=10
        Curvature pairs kept per probe. Memory per probe is about
        ``2 * history + 8`` vectors of ``n_classes * (n_features + 1)``
        float64 values.
    block_rows : int or None, default=None
        Rows of ``X`` per GEMM block; None sizes blocks to about 4 MiB of
        ``X`` on the CPU and 512 MiB on a GPU.
    patience : int, default=10
        With ``early_stopping``, a probe stops after this many iterations
        without a new lowest validation loss.
    preconditioner : {"auto", "covariance", "diagonal"}, default="auto"
        The initial inverse Hessian model. ``covariance`` inverts
        ``kappa X^T X / n`` plus the penalty. Building it takes one pass that
        costs ``n d^2`` flops and an eigendecomposition in ``d^3``.
        ``diagonal`` uses the mean squares of the features alone. ``auto``
        picks ``covariance`` when it costs at most 20 passes.

    Notes
    -----
    Classes absent from ``y`` are left out of the optimisation: their weight
    row is zero and their intercept is
    :data:`~probecvx.solvers._objective.ABSENT_INTERCEPT`, which is where the
    objective reaches its infimum. The intercepts of the classes present are
    returned centred to mean zero, because the objective does not change when
    they all shift by the same amount.

    ``ProbeFit.data_passes`` counts the passes over the training rows made
    while that probe was running, plus the one pass that measures the feature
    scales. Each pass is shared with the other probes running then. A pass
    over validation rows counts as ``n_val / n`` of a pass.
    ``fit_seconds`` is the wall time from the start of the joint fit until that
    probe stopped.

    ``extra["stop_reason"]`` is ``converged``, ``max_iter``, ``line_search``
    or ``stalled`` (the last three emit a ConvergenceWarning), or
    ``early_stopped`` when early stopping returned an iterate before the
    last. An early-stopped probe reports ``converged=False`` without a
    warning, because it stopped where the caller requested.
    """

    name = "lbfgs"

    def __init__(
        self,
        device: str | None = None,
        *,
        history: int = 10,
        block_rows: int | None = None,
        patience: int = 10,
        preconditioner: str = "auto",
    ) -> None:
        if history < 1:
            raise SolverError(f"history must be at least 1, got {history}")
        if patience < 1:
            raise SolverError(f"patience must be at least 1, got {patience}")
        if preconditioner not in _PRECONDITIONERS:
            raise SolverError(
                f"invalid preconditioner {preconditioner!r}; valid: "
                f"{', '.join(_PRECONDITIONERS)}"
            )
        self.device = device
        self.history = history
        self.block_rows = block_rows
        self.patience = patience
        self.preconditioner = preconditioner

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
        """Fit one probe per value in ``Cs``.

        Takes the arguments of :meth:`probecvx.solvers.Solver.fit`. ``X`` may
        have another float dtype, which is read as float32 block by block.
        ``max_iter`` counts L-BFGS iterations, and so does ``patience`` for
        ``early_stopping``. ``warm_start`` is the starting point of every probe.
        """
        check_fit_arguments(Cs, early_stopping, validation)
        if not Cs:
            return []
        start_time = time.perf_counter()
        present, y_local = present_classes(y, n_classes)
        train = self._evaluator(X, y_local, len(present))
        val = None
        if validation is not None:
            val = self._evaluator(validation.X, validation.y, n_classes)
        theta0 = initial_point(present, y_local, X.shape[1], n_classes, warm_start)
        preconditioners, mean_squares = _make_preconditioners(
            train, y_local, len(present), Cs, self.preconditioner
        )
        divisor = np.concatenate(
            [np.tile(feature_scale(mean_squares), len(present)), np.ones(len(present))]
        )
        problems = [
            _Problem(
                C=float(C),
                theta=theta0.copy(),
                preconditioner=preconditioner,
                grad_divisor=divisor,
                history=self.history,
            )
            for C, preconditioner in zip(Cs, preconditioners, strict=True)
        ]

        loop = _Lockstep(problems, train, present, n_classes, tol, max_iter)
        if early_stopping and val is not None:
            loop.stop_early(val, self.patience)
        loop.run(start_time)

        fits = [
            self._probe_fit(problem, present, n_classes, tol, len(problems))
            for problem in problems
        ]
        if val is not None:
            record_validation(fits, val)
        for fit, problem in zip(fits, problems, strict=True):
            _warn_if_not_converged(fit, problem, self.name, stacklevel=2)
        logger.debug(
            "%s fitted %d probes on %s in %.3g s",
            self.name,
            len(fits),
            X.shape,
            time.perf_counter() - start_time,
        )
        return fits

    def _evaluator(self, X: np.ndarray, y: np.ndarray, n_classes: int) -> Evaluator:
        if self.device is None:
            return NumpyEvaluator(X, y, n_classes, self.block_rows)
        return TorchEvaluator(X, y, n_classes, self.device, self.block_rows)

    def _probe_fit(
        self,
        problem: _Problem,
        present: np.ndarray,
        n_classes: int,
        tol: float,
        n_probes: int,
    ) -> ProbeFit:
        coef, intercept = _expand(problem.theta, present, n_classes)
        return ProbeFit(
            C=problem.C,
            coef=coef,
            intercept=intercept,
            n_iter=problem.n_iter,
            converged=problem.status == "converged",
            objective=problem.objective,
            grad_norm=problem.grad_max,
            data_passes=1 + problem.n_evals + problem.val_passes,
            fit_seconds=problem.stopped_at,
            solver=self.name,
            stop_rule=STOP_RULE,
            tol=tol,
            extra={
                "stop_reason": problem.status,
                "n_evaluations": problem.n_evals,
                "n_probes_joint": n_probes,
                "device": self.device or "numpy",
            },
        )


class _Lockstep:
    """Runs the L-BFGS of several probes in lockstep, sharing each evaluation."""

    def __init__(
        self,
        problems: list[_Problem],
        train: Evaluator,
        present: np.ndarray,
        n_classes: int,
        tol: float,
        max_iter: int,
    ) -> None:
        self.problems = problems
        self.train = train
        self.present = present
        self.n_classes = n_classes
        self.tol = tol
        self.max_iter = max_iter
        self.val: Evaluator | None = None
        self.patience = 0

    def stop_early(self, val: Evaluator, patience: int) -> None:
        """Track the validation loss at every iterate and stop on it."""
        self.val = val
        self.patience = patience

    def run(self, start_time: float) -> None:
        """Iterate until every probe has stopped."""
        problems = self.problems
        for problem, objective, grad, val_loss in zip(
            problems,
            *self._evaluate(problems, [p.theta for p in problems]),
            strict=True,
        ):
            problem.start(objective, grad, self.tol)
            problem.stopped_at = time.perf_counter() - start_time
            if self.val is not None:
                problem.observe_validation(val_loss, self.patience)

        while True:
            active = [p for p in problems if p.running]
            for problem in active:
                problem.stopped_at = time.perf_counter() - start_time
            if not active:
                break
            trials = [p.trial_point() for p in active]
            for problem, objective, grad, val_loss in zip(
                active, *self._evaluate(active, trials), strict=True
            ):
                accepted = problem.update(objective, grad, self.tol, self.max_iter)
                if accepted and self.val is not None:
                    problem.observe_validation(val_loss, self.patience)

        if self.val is not None:
            for problem in problems:
                problem.restore_best()

    def _evaluate(
        self, problems: list[_Problem], thetas: list[np.ndarray]
    ) -> tuple[list[float], list[np.ndarray], list[float]]:
        """Return objective, gradient and validation loss at each theta."""
        k = len(self.present)
        coef, intercept = _stack(thetas, k)
        Cs = np.array([p.C for p in problems])
        objective, grad_coef, grad_intercept = self.train.loss_grad(coef, intercept, Cs)
        grads = [
            np.concatenate([gc.ravel(), gi])
            for gc, gi in zip(grad_coef, grad_intercept, strict=True)
        ]
        for problem in problems:
            problem.n_evals += 1

        val_loss = np.full(len(thetas), math.nan)
        if self.val is not None:
            full = [_expand(theta, self.present, self.n_classes) for theta in thetas]
            val_loss, _ = self.val.loss_error(
                np.stack([c for c, _ in full]), np.stack([b for _, b in full])
            )
            share = self.val.n_samples / self.train.n_samples
            for problem in problems:
                problem.val_passes += share
        return [float(f) for f in objective], grads, [float(v) for v in val_loss]


# --- Preconditioners -------------------------------------------------------------


class _Preconditioner(Protocol):
    """The initial inverse Hessian model ``H0`` of L-BFGS, up to a scalar."""

    def apply(self, vector: np.ndarray) -> np.ndarray:
        """Return ``H0 @ vector`` for a packed ``theta``-shaped vector."""
        ...


@dataclass(frozen=True)
class _DiagonalPreconditioner:
    """``H0`` diagonal, from the mean square of each feature.

    With ``kappa`` the softmax curvature, the diagonal of the Hessian of the
    objective is about ``kappa * mean(x_j^2) + 1 / (C n)`` for the weights on
    feature ``j`` and about ``kappa`` for the intercepts. Scaling by its inverse
    makes L-BFGS invariant to the scale of each feature, so a few columns a
    thousand times larger than the rest do not stall it. On standardised
    features it is close to the identity.
    """

    scaling: np.ndarray  # (K * d + K,)

    def apply(self, vector: np.ndarray) -> np.ndarray:
        return self.scaling * vector


@dataclass(frozen=True)
class _CovariancePreconditioner:
    """``H0 = (kappa * X^T X / n + I / (C n))^-1`` on each class's weights.

    This is the Hessian of the objective with every softmax curvature
    replaced by one ``kappa``, so it captures the correlation between
    features, which a diagonal cannot. Activations are strongly correlated,
    and on the benchmark problems it halves the passes L-BFGS needs. The
    intercepts are scaled by 1, as in the diagonal model.
    """

    basis: np.ndarray  # (d, d): eigenvectors of X^T X / n, shared by every C
    inverse: np.ndarray  # (d,): (kappa + 1/(C n)) / (kappa * eig + 1/(C n))
    n_classes: int

    def apply(self, vector: np.ndarray) -> np.ndarray:
        k, d = self.n_classes, self.basis.shape[0]
        weights = vector[: k * d].reshape(k, d)
        scaled = ((weights @ self.basis) * self.inverse) @ self.basis.T
        return np.concatenate([scaled.ravel(), vector[k * d :]])


@dataclass(frozen=True)
class _LowRankPreconditioner:
    """``H0`` of the covariance model, with ``X^T X / n`` replaced by a low-rank one.

    The model keeps the top eigenvectors ``U`` of the feature covariance,
    estimated from a sample of rows, and puts the mean of the remaining
    eigenvalues on the rest of the space: ``X^T X / n`` is modelled as
    ``U diag(e) U^T + rest * (I - U U^T)``. ``auto`` builds it for sites of
    more than ``r`` features, where it costs less than the full
    eigendecomposition. Activations have a few large principal components,
    which the low-rank part captures.
    """

    basis: np.ndarray  # (d, r): orthonormal top eigenvectors
    inverse: np.ndarray  # (r,): the covariance model's scaling on them
    inverse_rest: float  # the scaling on the rest of the space
    n_classes: int

    def apply(self, vector: np.ndarray) -> np.ndarray:
        k, d = self.n_classes, self.basis.shape[0]
        weights = vector[: k * d].reshape(k, d)
        projected = weights @ self.basis
        scaled = self.inverse_rest * weights
        scaled += (projected * (self.inverse - self.inverse_rest)) @ self.basis.T
        return np.concatenate([scaled.ravel(), vector[k * d :]])


def _top_eigenpairs(
    blocks: Callable[[], Iterator[np.ndarray]], n_rows: int, d: int, rank: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """Return the top eigenpairs and the trace of ``S^T S / s`` for rows ``S``.

    ``blocks()`` yields the ``s = n_rows`` rows of ``S`` in float64 blocks,
    and is called once per product with ``S^T S``, so that no copy of ``S``
    is kept. Randomised subspace iteration: a seeded random basis, multiplied
    by ``S^T S`` and orthonormalised a few times, spans the top eigenvectors
    closely. The eigenpairs within that span are then exact. The seed makes
    a fit reproducible.

    Returns
    -------
    eigenvalues : ndarray of shape (r,), descending
    eigenvectors : ndarray of shape (d, r), orthonormal columns
    trace : float
    """
    width = min(d, n_rows, rank + _LOW_RANK_OVERSAMPLING)
    trace = 0.0

    def gram_times(basis: np.ndarray) -> np.ndarray:
        nonlocal trace
        product = np.zeros_like(basis)
        trace = 0.0
        for rows in blocks():
            product += rows.T @ (rows @ basis)
            trace += float(np.square(rows).sum())
        return product / n_rows

    basis = np.random.default_rng(0).standard_normal((d, width))
    for _ in range(_LOW_RANK_POWER_ITERATIONS):
        basis, _ = np.linalg.qr(gram_times(basis))
    eigenvalues, rotation = np.linalg.eigh(basis.T @ gram_times(basis))
    top = np.argsort(eigenvalues)[::-1][: min(rank, width)]
    vectors = basis @ rotation[:, top]
    return np.maximum(eigenvalues[top], 0.0), vectors, trace / n_rows


def _make_preconditioners(
    train: Evaluator,
    y_local: np.ndarray,
    n_classes: int,
    Cs: Sequence[float],
    kind: str,
) -> tuple[list[_Preconditioner], np.ndarray]:
    """Return one preconditioner per C and the mean square of each feature.

    Both come from one pass over ``X``: the Gram matrix for the covariance
    model, or the column mean squares alone for the diagonal one.
    """
    n, d = train.n_samples, train.n_features
    frequencies = np.bincount(y_local, minlength=n_classes) / n
    kappa = float(np.mean(frequencies * (1.0 - frequencies)))
    strengths = [1.0 / (C * n) for C in Cs]

    if kind == "auto":
        kind = _pick_preconditioner(n, d, n_classes, len(Cs))
    if kind == "diagonal":
        mean_squares = train.column_mean_squares()
        diagonal: list[_Preconditioner] = []
        for strength in strengths:
            per_feature = (kappa + strength) / (kappa * mean_squares + strength)
            scaling = np.concatenate(
                [np.tile(per_feature, n_classes), np.ones(n_classes)]
            )
            diagonal.append(_DiagonalPreconditioner(scaling))
        return diagonal, mean_squares

    if kind == "lowrank":
        mean_squares = train.column_mean_squares()
        n_sampled = min(n, _LOW_RANK_ROWS)
        picked = np.random.default_rng(0).choice(n, n_sampled, replace=False)
        picked.sort()
        block_rows = max(1, _LOW_RANK_BLOCK_BYTES // (8 * d))

        def sampled_blocks() -> Iterator[np.ndarray]:
            # In float32, a few columns a thousand times larger than the rest
            # drown the other directions in rounding, so blocks are float64.
            for start in range(0, n_sampled, block_rows):
                indices = picked[start : start + block_rows]
                yield train.sample_rows(indices).astype(np.float64)

        eigenvalues, basis, trace = _top_eigenpairs(
            sampled_blocks, n_sampled, d, _LOW_RANK
        )
        # The trace of the sampled covariance, less its top eigenvalues, is
        # the sum of the remaining ones. Both come from the same rows, so the
        # sampling error of a few huge columns does not land in the rest.
        n_rest = max(d - len(eigenvalues), 1)
        rest = max((trace - float(eigenvalues.sum())) / n_rest, 0.0)
        low_rank: list[_Preconditioner] = [
            _LowRankPreconditioner(
                basis,
                (kappa + strength) / (kappa * eigenvalues + strength),
                (kappa + strength) / (kappa * rest + strength),
                n_classes,
            )
            for strength in strengths
        ]
        return low_rank, mean_squares

    gram = train.gram()
    mean_squares = np.diag(gram).copy()
    eigenvalues, basis = np.linalg.eigh(gram)
    del gram
    eigenvalues = np.maximum(eigenvalues, 0.0)  # rounding can make a few < 0
    covariance: list[_Preconditioner] = [
        _CovariancePreconditioner(
            basis, (kappa + strength) / (kappa * eigenvalues + strength), n_classes
        )
        for strength in strengths
    ]
    return covariance, mean_squares


def _pick_preconditioner(n: int, d: int, n_classes: int, n_probes: int) -> str:
    """Pick the preconditioner for a problem, among those that cost few passes.

    One pass costs ``4 n d K m`` flops for ``m`` probes, and a build may cost
    20 passes. With at most ``r`` features (the low-rank model's rank plus its
    oversampling), the covariance model is exact and costs about ``n d^2``
    flops for the Gram matrix and ``10 d^3`` for its eigendecomposition. With
    more, the low-rank model costs about ``12 s d r`` flops for ``s`` sampled
    rows. On synthetic activations it needed as few passes as the covariance
    model, and on real ones with fewer rows than features it needed fewer
    (``benchmarks/README.md``). The diagonal model costs one pass.
    """
    budget = _PRECONDITIONER_PASSES * 4 * n * d * n_classes * n_probes
    rank = min(d, _LOW_RANK + _LOW_RANK_OVERSAMPLING)
    covariance_build = n * d * d + 10 * d**3
    if d <= rank and covariance_build <= budget:
        return "covariance"
    if 12 * min(n, _LOW_RANK_ROWS) * d * rank <= budget:
        return "lowrank"
    if covariance_build <= budget:
        return "covariance"
    return "diagonal"


def preconditioner_bytes(
    n: int, d: int, n_classes: int, n_probes: int, itemsize: int
) -> int:
    """Estimate the bytes taken to build the preconditioner picked for a problem."""
    kind = _pick_preconditioner(n, d, n_classes, n_probes)
    if kind == "covariance":
        # The Gram matrix and its eigenvectors.
        return 2 * d * d * 8
    if kind == "lowrank":
        # One block of sampled rows, and the subspace iteration's basis,
        # product and eigenvectors.
        width = min(d, _LOW_RANK + _LOW_RANK_OVERSAMPLING)
        return 2 * _LOW_RANK_BLOCK_BYTES + 3 * d * width * 8
    return 2 * d * 8


def _stack(thetas: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Unpack thetas into coef ``(m, k, d)`` and intercept ``(m, k)``."""
    packed = np.stack(thetas)
    m = packed.shape[0]
    d = (packed.shape[1] - k) // k
    return packed[:, : k * d].reshape(m, k, d), packed[:, k * d :]


def _expand(
    theta: np.ndarray, present: np.ndarray, n_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Unpack ``theta`` and expand it to all classes with :func:`expand_classes`."""
    k = len(present)
    d = (theta.shape[0] - k) // k
    return expand_classes(
        theta[: k * d].reshape(k, d), theta[k * d :], present, n_classes
    )


def _warn_if_not_converged(
    fit: ProbeFit, problem: _Problem, solver: str, stacklevel: int
) -> None:
    """Emit a ConvergenceWarning for a probe stopped before meeting ``tol``."""
    gap = describe_gradient_gap(fit)
    if problem.status == "max_iter":
        message = (
            f"{solver} reached max_iter={fit.n_iter} for C={fit.C:g} with {gap}; "
            "raise max_iter"
        )
    elif problem.status in ("line_search", "stalled"):
        failure = "line search failed" if problem.status == "line_search" else "stalled"
        message = (
            f"{solver} {failure} for C={fit.C:g} with {gap}: the objective no "
            "longer decreases at the precision of the data's dtype; raise tol or "
            "pass float64 features"
        )
    else:
        return
    warnings.warn(message, ConvergenceWarning, stacklevel=stacklevel + 1)


register_solver("lbfgs", LbfgsSolver)
