"""SAGA, SAG and SVRG for probes: incremental gradient methods with numba epochs.

Each epoch makes ``n`` visits to training rows, in mini-batches: a random
permutation of the rows for SAGA and SVRG, ``n`` draws with replacement for SAG.
A mini-batch step uses the change of the batch's gradients against a stored
copy (the *memory*) plus the average of the stored gradients, so its variance
vanishes at the optimum and a constant step converges linearly:

- ``saga`` (Defazio, Bach and Lacoste-Julien, 2014) steps along that unbiased
  estimate, then applies the proximal map of the L2 penalty, and replaces the
  batch's memory with the new gradients.
- ``sag`` (Schmidt, Le Roux and Bach, 2017) replaces the memory first and
  steps along the new average, a biased estimate with a lower variance. Like
  scikit-learn's SAG it draws rows with replacement and starts cold from an
  empty memory. With a random permutation per epoch, or with a memory filled
  at the starting point, it diverged on the 20k x 512 problem of
  ``benchmarks/solvers.py``.
- ``svrg`` (Johnson and Zhang, 2013) keeps the memory fixed during the epoch:
  it contains the gradients at the epoch's starting point (the snapshot). It took
  fewer epochs than SAGA but more time, because each epoch needs a full pass,
  so it is not registered; ``IncrementalSolver("svrg")`` runs it.

Only the residual ``softmax - onehot`` is stored per row, ``n * K`` values;
the gradient of row ``i`` is that residual times ``x_i``. The kernel keeps the
running sum of the stored gradients in float64. A full pass of GEMMs over the
rows computes the objective and the exact gradient for the stopping rule and
recomputes that sum from the memory, so rounding cannot accumulate in it.
SVRG runs a full pass after every epoch, its next snapshot. SAGA and SAG run
one after epochs 1, 3 and 7, then every ``_CHECK_INTERVAL`` epochs, and
whenever the average of their stored gradients meets ``tol``. That average
approaches the gradient as the iterates settle.

Step size. The multinomial cross-entropy of one row has the Hessian
``(diag(p) - p p^T) (x) [x, 1][x, 1]^T``. The first factor's largest
eigenvalue is the largest variance of a unit vector's entries under ``p``,
which is at most 1/2. So row ``i`` is ``L_i = (||x_i||^2 + 1) / 2`` smooth.
A batch of ``b`` rows drawn without replacement has the expected smoothness
``L(b) = n (b - 1) / (b (n - 1)) L + (n - b) / (b (n - 1)) L_max``
(Gazagnadou, Gower and Salmon, 2019). Here ``L`` is the smoothness of the mean
loss, estimated by power iteration on a subsample of rows. The step is
``step_scale / L(b)``. When a full pass finds the objective higher than at the
previous one, the iterate goes back there and the step is halved. A step that
is too long then costs a few epochs, not the fit.

Preconditioning. The solver works with the features divided by
``max(rms(x_j), 1)`` (see :func:`~probecvx.solvers._objective.feature_scale`)
and with the penalty reweighted to match. So a few columns of scale 1e4 neither
force a tiny step on every weight nor change the solution. On standardised
features the scaling is 1 everywhere and costs nothing.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from probecvx.errors import ConvergenceWarning, SolverError
from probecvx.solvers._kernels import SAG, SAGA, SVRG, run_epoch
from probecvx.solvers._objective import (
    STOP_RULE,
    NumpyEvaluator,
    default_block_rows,
    describe_gradient_gap,
    expand_classes,
    feature_scale,
    gradient_converged,
    initial_point,
    present_classes,
    record_validation,
    scaled_gradient_max,
)
from probecvx.solvers.base import (
    EARLY_STOPPED,
    ProbeFit,
    Validation,
    check_fit_arguments,
    register_solver,
)

logger = logging.getLogger(__name__)

_RULES = {"saga": SAGA, "sag": SAG, "svrg": SVRG}

# The subsample of rows on which the smoothness of the mean loss is estimated:
# at most _SUBSAMPLE_ROWS_PER_FEATURE rows per feature and _SUBSAMPLE_VALUES
# float64 values (8 MiB). The power iteration on it stops when the eigenvalue
# estimate grows by less than _POWER_RTOL.
_SUBSAMPLE_VALUES = 2**20
_SUBSAMPLE_ROWS_PER_FEATURE = 20
_POWER_ITERATIONS = 50
_POWER_RTOL = 1e-3
# The automatic batch size keeps the batch term L_max / b of L(b) at least this
# many times the mean-loss term L, so that batching barely shortens the step
# per row, and stays within these bounds.
_BATCH_RATIO = 4.0
# Feature scales closer than this to 1 are not preconditioned.
_UNIT_SCALE_RTOL = 1e-3
_MIN_AUTO_BATCH = 1
_MAX_AUTO_BATCH = 64
# SAGA and SAG run a full pass at least every _CHECK_INTERVAL epochs once the
# step has proved itself (see the module docstring). A full pass costs about as
# much as an epoch (40 and 30 ms of CPU time on the 20k x 512 benchmark
# problem, one thread), so one after every epoch would almost double the time.
_CHECK_INTERVAL = 5
# A full pass rejects the iterate when the objective rose by more than this
# fraction since the previous full pass. Smaller rises are rounding.
_RISE_RTOL = 1e-12
# After this many halvings of the step without meeting tol, the probe has
# stalled.
_MAX_HALVINGS = 30


class IncrementalSolver:
    """Mini-batch SAGA, SAG or SVRG on dense features, one value of ``C`` at a time.

    Parameters
    ----------
    method : {"saga", "sag", "svrg"}, default="saga"
        The update rule; see the module docstring.
    batch_size : int or None, default=None
        Rows per mini-batch. None picks it from the smoothness constants
        (between 1 and 64); 1 is the classic one-row-at-a-time method.
    step_scale : float, default=2.0
        The step is ``step_scale / L(batch_size)``. The SAGA paper proves
        convergence for steps up to ``1 / (3 L_max)``, a step_scale of 1/3
        with one row per batch. On the problems of ``benchmarks/solvers.py``,
        3 or 4 took up to half the epochs of 2 on some, but 3 made SAGA with
        one row per batch raise the objective on small problems.
    random_state : int, default=0
        Seed of the order in which rows are visited; a fixed seed gives the
        same result on the same data.
    patience : int, default=5
        With ``early_stopping``, a probe stops after this many epochs without
        a lower validation loss.
    block_rows : int or None, default=None
        Rows per block in the full-gradient passes; None sizes blocks to about
        4 MiB of float64 values.

    Notes
    -----
    A probe's ``n_iter`` counts epochs. ``data_passes`` counts, for each probe,
    the setup passes (feature scales, row norms, the subsample), one pass per
    epoch, one per full pass, and ``n_val / n`` per validation loss.

    The values of ``C`` are solved in increasing order. Each probe starts from
    whichever has the lower objective at its ``C``: the initial point (zero
    weights and log class frequencies, or ``warm_start``) or the solution for
    the previous ``C``.

    Features are read in place: a float32 matrix is not copied to float64.
    A memory map, an array that is not C-contiguous or another float dtype is
    read block by block. An epoch then visits the blocks in a random order and
    the rows of each block in a random order, so that a memory map larger than
    memory is read sequentially.
    """

    def __init__(
        self,
        method: str = "saga",
        *,
        batch_size: int | None = None,
        step_scale: float = 2.0,
        random_state: int = 0,
        patience: int = 5,
        block_rows: int | None = None,
    ) -> None:
        if method not in _RULES:
            raise SolverError(
                f"unknown incremental method {method!r}; valid methods: "
                f"{', '.join(sorted(_RULES))}"
            )
        if batch_size is not None and batch_size < 1:
            raise SolverError(f"batch_size must be at least 1, got {batch_size}")
        if not (math.isfinite(step_scale) and step_scale > 0):
            raise SolverError(
                f"step_scale must be a positive finite number, got {step_scale}"
            )
        if patience < 1:
            raise SolverError(f"patience must be at least 1, got {patience}")
        self.method = method
        self.name = method
        self.batch_size = batch_size
        self.step_scale = step_scale
        self.random_state = random_state
        self.patience = patience
        self.block_rows = block_rows

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

        Takes the arguments of :meth:`probecvx.solvers.Solver.fit`.
        ``max_iter`` counts epochs and must be at least 1. ``patience`` for
        ``early_stopping`` counts epochs too.
        """
        check_fit_arguments(Cs, early_stopping, validation)
        if max_iter < 1:
            raise SolverError(f"max_iter must be at least 1, got {max_iter}")
        if not Cs:
            return []
        start_time = time.perf_counter()
        present, y_local = present_classes(y, n_classes)
        data = _TrainingData(X, y_local, len(present), self.block_rows)
        batch_size = min(self.batch_size or data.auto_batch_size(), data.n_samples)
        initial = initial_point(present, y_local, X.shape[1], n_classes, warm_start)
        val = None
        if validation is not None:
            val = NumpyEvaluator(validation.X, validation.y, n_classes)
        setup_seconds = time.perf_counter() - start_time

        rng = np.random.default_rng(self.random_state)
        memory = np.empty((data.n_samples, data.n_classes))
        seen = np.zeros(data.n_samples, dtype=np.bool_)
        start = _Start.from_theta(initial, data)
        runs: dict[int, _Run] = {}
        previous: _Run | None = None
        for index in sorted(range(len(Cs)), key=lambda i: Cs[i]):
            probe_start = time.perf_counter()
            run = _Run(data, float(Cs[index]), batch_size, self.method, memory, seen)
            run.begin(start, previous, cold=warm_start is None)
            run.iterate(
                rng,
                self.step_scale,
                tol,
                max_iter,
                val,
                present,
                n_classes,
                self.patience if early_stopping else 0,
            )
            run.seconds = setup_seconds + time.perf_counter() - probe_start
            runs[index] = run
            previous = run

        fits = []
        for index in range(len(Cs)):
            fit = runs[index].probe_fit(self.name, present, n_classes, tol)
            if val is not None:
                record_validation([fit], val)
            _warn_if_not_converged(fit, runs[index].status, stacklevel=2)
            fits.append(fit)
        logger.debug(
            "%s fitted %d probes on %s in %.3g s",
            self.name,
            len(fits),
            X.shape,
            time.perf_counter() - start_time,
        )
        return fits


class _TrainingData:
    """The training rows with what every probe on them shares.

    Computes, in one or two passes, the feature scales of the preconditioner
    and the largest row norm, and on a subsample the smoothness of the mean
    loss. ``setup_passes`` counts those passes.
    """

    def __init__(
        self, X: np.ndarray, y: np.ndarray, n_classes: int, block_rows: int | None
    ) -> None:
        self.X = X
        self.y = np.ascontiguousarray(y, dtype=np.int64)
        self.n_classes = n_classes
        self.n_samples, self.n_features = X.shape
        self.block_rows = block_rows or default_block_rows(
            self.n_features, 8, on_gpu=False
        )
        # The epoch kernel reads a C-contiguous float32 or float64 ndarray in
        # place; anything else is read block by block.
        self.kernel_dtype = np.float64 if X.dtype == np.float64 else np.float32
        self.in_memory = (
            type(X) is np.ndarray
            and X.dtype in (np.float32, np.float64)
            and X.flags.c_contiguous
        )

        column_squares, row_squares = self._squares(np.ones(self.n_features))
        # The stopping rule divides each gradient entry by stop_scale. The
        # preconditioner uses the same scales, except that scales within
        # _UNIT_SCALE_RTOL of 1 are taken as 1: on standardised features that
        # skips a multiplication of every row, and any positive scale is a
        # valid preconditioner.
        self.stop_scale = feature_scale(column_squares / self.n_samples)
        self.scale = np.where(
            self.stop_scale <= 1.0 + _UNIT_SCALE_RTOL, 1.0, self.stop_scale
        )
        self.inv_scale = 1.0 / self.scale
        self.preconditioned = bool(np.any(self.scale != 1.0))
        self.setup_passes = 1.0
        if self.preconditioned:
            _, row_squares = self._squares(self.inv_scale)
            self.setup_passes += 1.0
        self.max_smoothness = 0.5 * (float(row_squares.max()) + 1.0)
        self.mean_smoothness = self._mean_loss_smoothness()

    def _squares(self, inv_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return the column sums and the row sums of ``(x_ij * inv_scale_j)^2``."""
        columns = np.zeros(self.n_features)
        rows_out = np.empty(self.n_samples)
        for start, stop, rows, _ in self._raw_blocks():
            squares = np.square(rows, dtype=np.float64)
            columns += squares.sum(axis=0)
            rows_out[start:stop] = squares @ np.square(inv_scale)
        return columns, rows_out

    def _mean_loss_smoothness(self) -> float:
        """Estimate the smoothness ``L`` of the mean loss on a subsample of rows.

        ``L`` is half the largest eigenvalue of ``mean_i [x_i, 1][x_i, 1]^T``
        (preconditioned). Rows at an even stride form the subsample. Because
        the largest eigenvalue is convex in the matrix, the subsample's
        exceeds that of all rows on average, which errs towards a shorter step.
        """
        size = min(
            self.n_samples,
            _SUBSAMPLE_ROWS_PER_FEATURE * self.n_features,
            max(1, _SUBSAMPLE_VALUES // self.n_features),
        )
        index = np.linspace(0, self.n_samples - 1, size).astype(np.intp)
        sample = np.asarray(self.X[index], dtype=np.float64) * self.inv_scale
        self.setup_passes += size / self.n_samples

        vector = np.random.default_rng(0).standard_normal(self.n_features + 1)
        eigenvalue = 0.0
        for _ in range(_POWER_ITERATIONS):
            vector /= np.linalg.norm(vector)
            projected = sample @ vector[:-1] + vector[-1]
            image = np.append(sample.T @ projected, projected.sum()) / size
            previous, eigenvalue = eigenvalue, float(vector @ image)
            vector = image
            if eigenvalue - previous <= _POWER_RTOL * eigenvalue:
                break
        return 0.5 * max(eigenvalue, 1.0)

    def auto_batch_size(self) -> int:
        """Return the largest batch whose ``L_max / b`` stays ``_BATCH_RATIO * L``."""
        ratio = self.max_smoothness / (_BATCH_RATIO * self.mean_smoothness)
        return int(min(max(math.floor(ratio), _MIN_AUTO_BATCH), _MAX_AUTO_BATCH))

    def batch_smoothness(self, batch_size: int) -> float:
        """Return ``L(b)``, the expected smoothness of a batch of ``b`` rows."""
        n, b = self.n_samples, batch_size
        if n == 1:
            return self.max_smoothness
        mean_weight = n * (b - 1) / (b * (n - 1))
        max_weight = (n - b) / (b * (n - 1))
        return mean_weight * self.mean_smoothness + max_weight * self.max_smoothness

    def _raw_blocks(self) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
        """Yield ``(start, stop, rows, labels)`` in the stored dtype."""
        for start in range(0, self.n_samples, self.block_rows):
            stop = min(start + self.block_rows, self.n_samples)
            yield start, stop, np.asarray(self.X[start:stop]), self.y[start:stop]

    def blocks(self) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
        """Yield ``(start, stop, rows, labels)``, rows float64 and preconditioned."""
        for start, stop, rows, labels in self._raw_blocks():
            rows64 = rows.astype(np.float64, copy=False)
            if self.preconditioned:
                rows64 = rows64 * self.inv_scale
            yield start, stop, rows64, labels

    def full_pass(
        self,
        coef: np.ndarray,
        intercept: np.ndarray,
        residual_out: np.ndarray | None = None,
        memory: np.ndarray | None = None,
    ) -> _Pass:
        """Evaluate the loss and its summed gradient at ``(coef, intercept)``.

        All arithmetic is float64, so the sums match the memory to rounding.

        Parameters
        ----------
        coef : ndarray of shape (n_classes, n_features)
            Weights in preconditioned coordinates.
        intercept : ndarray of shape (n_classes,)
        residual_out : ndarray of shape (n_samples, n_classes) or None
            When given, each row's residual ``softmax - onehot`` is written
            into it.
        memory : ndarray of shape (n_samples, n_classes) or None
            When given, the sums of the stored gradients ``memory[i] (x) x_i``
            are computed too, in the same read of the rows.
        """
        k = self.n_classes
        loss = 0.0
        stacked_sum = np.zeros((2 * k if memory is not None else k, self.n_features))
        intercept_grad_sum = np.zeros(k)
        for start, stop, rows, labels in self.blocks():
            logits = rows @ coef.T
            logits += intercept
            index = np.arange(stop - start)
            true_logit = logits[index, labels]
            shift = logits.max(axis=1)
            logits -= shift[:, None]
            np.exp(logits, out=logits)
            norm = logits.sum(axis=1)
            loss += float(np.sum(np.log(norm) + shift - true_logit))

            logits /= norm[:, None]
            logits[index, labels] -= 1.0
            intercept_grad_sum += logits.sum(axis=0)
            if residual_out is not None:
                residual_out[start:stop] = logits
            if memory is not None:
                logits = np.hstack([logits, memory[start:stop]])
            stacked_sum += logits.T @ rows

        result = _Pass(loss / self.n_samples, stacked_sum[:k], intercept_grad_sum)
        if memory is not None:
            result.memory_grad_sum = stacked_sum[k:]
            result.memory_intercept_sum = memory.sum(axis=0)
        return result

    def epoch_chunks(
        self, rng: np.random.Generator, replace: bool
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, int]]:
        """Yield ``(rows, labels, order, offset)`` for the kernel calls of one epoch.

        In memory: one random order of all rows. Otherwise: the blocks in a
        random order, each with a random order of its rows. The order is a
        permutation, or with ``replace`` as many draws with replacement.
        """

        def draw(size: int) -> np.ndarray:
            if replace:
                return rng.integers(0, size, size=size)
            return rng.permutation(size)

        if self.in_memory:
            yield self.X, self.y, draw(self.n_samples), 0
            return
        starts = np.arange(0, self.n_samples, self.block_rows)
        for start in rng.permutation(starts):
            stop = min(int(start) + self.block_rows, self.n_samples)
            rows = np.ascontiguousarray(self.X[start:stop], dtype=self.kernel_dtype)
            labels = self.y[start:stop]
            yield rows, labels, draw(stop - int(start)), int(start)


@dataclass
class _Pass:
    """The result of a full pass: mean loss and summed gradients.

    ``memory_grad_sum`` and ``memory_intercept_sum`` are the exact sums of the
    stored gradients, when the pass was asked for them.
    """

    loss: float
    grad_sum: np.ndarray
    intercept_grad_sum: np.ndarray
    memory_grad_sum: np.ndarray | None = None
    memory_intercept_sum: np.ndarray | None = None


@dataclass
class _Start:
    """The initial point in preconditioned coordinates, and its loss once known."""

    coef: np.ndarray
    intercept: np.ndarray
    loss: float | None = None

    @classmethod
    def from_theta(cls, theta: np.ndarray, data: _TrainingData) -> _Start:
        k, d = data.n_classes, data.n_features
        coef = theta[: k * d].reshape(k, d) * data.scale
        return cls(coef=coef, intercept=theta[k * d :].copy())


@dataclass
class _Run:
    """One probe's iterate, memory and bookkeeping, for one value of ``C``.

    The iterate moves every epoch, but the objective and its exact gradient
    are known only at the *checked point*, the latest iterate at which a full
    pass ran and which it accepted. ``loss``, ``objective``, ``grad_max`` and
    ``exact`` describe that point.
    """

    data: _TrainingData
    C: float
    batch_size: int
    method: str
    # The residual memory and which rows it contains, shared by the probes
    # because they run one after another.
    memory: np.ndarray
    seen: np.ndarray
    rule: int = field(init=False)
    strength: np.ndarray = field(init=False)
    coef: np.ndarray = field(init=False)
    intercept: np.ndarray = field(init=False)
    # The running sums of the stored gradients that the kernel keeps.
    grad_sum: np.ndarray = field(init=False)
    intercept_grad_sum: np.ndarray = field(init=False)
    n_seen: int = 0
    checked: tuple[np.ndarray, np.ndarray] = field(init=False)
    exact: _Pass = field(init=False)
    loss: float = math.nan
    objective: float = math.nan
    grad_max: float = math.nan
    step: float = math.nan
    n_iter: int = 0
    since_check: int = 0
    # Epochs between full passes: 1 at first and after a rejected epoch,
    # doubling after each accepted one up to _CHECK_INTERVAL (SAGA, SAG).
    check_interval: int = 1
    halvings: int = 0
    passes: float = 0.0
    status: str = "running"
    seconds: float = 0.0
    # Early stopping: the iterate with the lowest validation loss, and the
    # epoch it was reached at.
    best_val_loss: float = math.inf
    best_epoch: int = 0
    best: tuple[np.ndarray, np.ndarray] | None = None

    def __post_init__(self) -> None:
        data = self.data
        self.rule = _RULES[self.method]
        self.strength = np.square(data.inv_scale) / (self.C * data.n_samples)

    def penalty(self, coef: np.ndarray) -> float:
        """Return the penalty term of the objective at preconditioned weights."""
        return 0.5 * float(np.sum(self.strength * np.square(coef)))

    # --- Starting point ---------------------------------------------------------

    def begin(self, start: _Start, previous: _Run | None, cold: bool) -> None:
        """Set the first iterate and the memory for it.

        The candidates are the initial point and the previous probe's result;
        the one with the lower objective at this ``C`` wins. From the previous
        result the memory carries over as it is: it and its sums still match,
        which is all the updates need. From the initial point a full pass
        fills the memory with the gradients there, except for SAG from a cold
        start (see :meth:`_start_empty`).
        """
        self.passes = self.data.setup_passes
        use_previous = previous is not None and (
            start.loss is None
            or previous.loss + self.penalty(previous.coef)
            < start.loss + self.penalty(start.coef)
        )
        if previous is not None and use_previous:
            self.coef = previous.coef.copy()
            self.intercept = previous.intercept.copy()
            self.grad_sum = previous.grad_sum.copy()
            self.intercept_grad_sum = previous.intercept_grad_sum.copy()
            self.n_seen = previous.n_seen
            self._accept(previous.exact)
            return

        self.coef = start.coef.copy()
        self.intercept = start.intercept.copy()
        if self.rule == SAG and cold:
            self._start_empty()
        else:
            self._fill_memory()
        if start.loss is None:
            start.loss = self.loss

    def _fill_memory(self) -> None:
        """Run a full pass that stores every row's gradient at the iterate."""
        exact = self.data.full_pass(self.coef, self.intercept, self.memory)
        self.passes += 1.0
        self.seen[:] = True
        self.n_seen = self.data.n_samples
        self.grad_sum = exact.grad_sum.copy()
        self.intercept_grad_sum = exact.intercept_grad_sum.copy()
        self._accept(exact)

    def _start_empty(self) -> None:
        """Start SAG with an empty memory, averaging over the rows seen so far.

        SAG steps along the average of the stored gradients, in which a new
        row weighs ``1 / n_seen``. In a memory filled at a cold start each new
        gradient weighs ``1 / n``, so the whole first epoch steps along the
        initial gradient and overshoots. On the 20k x 512 benchmark problem
        the objective after the first epochs was four to eight times its starting
        value. An empty memory, as scikit-learn 1.9.1's SAG starts with, lets
        the average follow the iterate while few rows are in it.
        """
        exact = self.data.full_pass(self.coef, self.intercept)
        self.passes += 1.0
        self.memory[:] = 0.0
        self.seen[:] = False
        self.n_seen = 0
        self.grad_sum = np.zeros_like(self.coef)
        self.intercept_grad_sum = np.zeros_like(self.intercept)
        self._accept(exact)

    # --- Checked points -------------------------------------------------------

    def _accept(self, exact: _Pass) -> None:
        """Make the iterate the checked point, with a full pass's results there."""
        data = self.data
        self.checked = (self.coef.copy(), self.intercept.copy())
        self.exact = exact
        self.loss = exact.loss
        self.objective = exact.loss + self.penalty(self.coef)
        grad_coef = exact.grad_sum / data.n_samples + self.strength * self.coef
        grad_intercept = exact.intercept_grad_sum / data.n_samples
        # The gradient in W is the gradient in preconditioned coordinates
        # times the scale; the stopping rule takes it in W.
        self.grad_max = scaled_gradient_max(
            grad_coef * data.scale, grad_intercept, data.stop_scale
        )
        self.since_check = 0

    def _check(self, tol: float) -> None:
        """Run a full pass at the iterate; accept it, or go back and halve the step.

        The iterate is accepted unless the objective rose since the last
        checked point. On acceptance the kernel's running sums are replaced by
        the exact sums of the memory, so rounding cannot accumulate in them;
        SVRG takes the iterate as its next snapshot.
        """
        svrg = self.rule == SVRG
        exact = self.data.full_pass(
            self.coef,
            self.intercept,
            residual_out=self.memory if svrg else None,
            memory=None if svrg else self.memory,
        )
        self.passes += 1.0
        objective = exact.loss + self.penalty(self.coef)
        rise = objective - self.objective
        if math.isfinite(objective) and rise <= _RISE_RTOL * abs(self.objective):
            if svrg:
                self.grad_sum = exact.grad_sum.copy()
                self.intercept_grad_sum = exact.intercept_grad_sum.copy()
            else:
                assert exact.memory_grad_sum is not None
                assert exact.memory_intercept_sum is not None
                self.grad_sum = exact.memory_grad_sum
                self.intercept_grad_sum = exact.memory_intercept_sum
            self._accept(exact)
            if gradient_converged(self.grad_max, self.objective, tol):
                self.status = "converged"
            if self.rule != SVRG:
                self.check_interval = min(2 * self.check_interval, _CHECK_INTERVAL)
            return

        self.step *= 0.5
        self.halvings += 1
        self.check_interval = 1
        logger.debug(
            "%s epoch %d raised f by %.3g for C=%g; step halved to %.3g",
            self.method,
            self.n_iter,
            rise,
            self.C,
            self.step,
        )
        self.coef, self.intercept = (array.copy() for array in self.checked)
        self.since_check = 0
        if not svrg and exact.memory_grad_sum is not None:
            assert exact.memory_intercept_sum is not None
            self.grad_sum = exact.memory_grad_sum
            self.intercept_grad_sum = exact.memory_intercept_sum
        memory_finite = (
            np.isfinite(self.grad_sum).all() and np.isfinite(self.memory).all()
        )
        if svrg or not memory_finite:
            # SVRG's snapshot is now the rejected point, far from the iterate,
            # and a memory with infinities cannot be corrected: fill it anew.
            self._fill_memory()

    def _proxy_converged(self, tol: float) -> bool:
        """Return whether the average of the stored gradients meets ``tol``.

        For SAGA and SAG that average approaches the gradient as the iterates
        settle, so it indicates when a full pass is worth running.
        """
        if self.rule == SVRG or self.n_seen == 0:
            return False
        grad_coef = self.grad_sum / self.n_seen + self.strength * self.coef
        grad_max = max(
            float(np.max(np.abs(grad_coef))),
            float(np.max(np.abs(self.intercept_grad_sum))) / self.n_seen,
        )
        return gradient_converged(grad_max, self.objective, tol)

    # --- Epochs ---------------------------------------------------------------

    def iterate(
        self,
        rng: np.random.Generator,
        step_scale: float,
        tol: float,
        max_iter: int,
        val: NumpyEvaluator | None,
        present: np.ndarray,
        n_classes: int,
        patience: int,
    ) -> None:
        """Run epochs until the stopping rule, ``max_iter`` or early stopping."""
        self.step = step_scale / self._smoothness()
        if patience:
            assert val is not None
            self._observe_validation(val, present, n_classes, patience)
        if gradient_converged(self.grad_max, self.objective, tol):
            self.status = "converged"

        while self.status == "running":
            self._epoch(rng)
            if patience:
                assert val is not None
                self._observe_validation(val, present, n_classes, patience)
                if self.status == EARLY_STOPPED:
                    break
            last = self.n_iter >= max_iter
            if (
                last
                or self.since_check >= self.check_interval
                or self._proxy_converged(tol)
            ):
                self._check(tol)
            if self.status != "running":
                break
            if last:
                self.status = "max_iter"
            elif self.halvings > _MAX_HALVINGS:
                self.status = "stalled"

        if self.best is not None and self.status in (EARLY_STOPPED, "max_iter"):
            self._restore_best()
        elif self.since_check:
            # Stopped at max_iter or stalled after a rejected epoch.
            self.coef, self.intercept = (array.copy() for array in self.checked)

    def _smoothness(self) -> float:
        """Return the smoothness constant that sets the step."""
        smoothness = self.data.batch_smoothness(self.batch_size)
        if self.rule == SAG:
            # SAG takes a gradient step on the penalty, not a proximal one.
            smoothness += float(self.strength.max())
        return smoothness

    def _epoch(self, rng: np.random.Generator) -> None:
        """Run one epoch of the kernel over every training row."""
        data = self.data
        if self.rule == SAG:
            prox = 1.0 - self.step * self.strength
        else:
            prox = 1.0 / (1.0 + self.step * self.strength)
        # SAG diverged on the 20k x 512 benchmark problem with rows drawn as a
        # random permutation, so it draws rows with replacement, as
        # scikit-learn 1.9.1's SAG does.
        replace = self.rule == SAG
        for rows, labels, order, offset in data.epoch_chunks(rng, replace):
            self.n_seen = run_epoch(
                rows,
                labels,
                order,
                self.memory,
                offset,
                self.seen,
                self.n_seen,
                data.inv_scale,
                self.coef,
                self.intercept,
                self.grad_sum,
                self.intercept_grad_sum,
                self.step,
                prox,
                self.batch_size,
                self.rule,
            )
        self.n_iter += 1
        self.since_check += 1
        self.passes += 1.0

    # --- Early stopping -------------------------------------------------------

    def _observe_validation(
        self,
        val: NumpyEvaluator,
        present: np.ndarray,
        n_classes: int,
        patience: int,
    ) -> None:
        """Record the validation loss for early stopping; stop after patience."""
        coef, intercept = self.full_solution(present, n_classes)
        loss, _ = val.loss_error(coef[None], intercept[None])
        self.passes += val.n_samples / self.data.n_samples
        if loss[0] < self.best_val_loss:
            self.best_val_loss = float(loss[0])
            self.best_epoch = self.n_iter
            self.best = (self.coef.copy(), self.intercept.copy())
        elif self.n_iter - self.best_epoch >= patience:
            self.status = EARLY_STOPPED

    def _restore_best(self) -> None:
        """Go back to the iterate of lowest validation loss and evaluate it."""
        assert self.best is not None
        self.coef, self.intercept = self.best
        if not all(
            np.array_equal(a, b) for a, b in zip(self.best, self.checked, strict=True)
        ):
            exact = self.data.full_pass(self.coef, self.intercept)
            self.passes += 1.0
            self._accept(exact)

    def full_solution(
        self, present: np.ndarray, n_classes: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return the iterate over all classes, with weights in feature units."""
        return expand_classes(
            self.coef * self.data.inv_scale, self.intercept, present, n_classes
        )

    def probe_fit(
        self, solver: str, present: np.ndarray, n_classes: int, tol: float
    ) -> ProbeFit:
        """Return the checked point as a :class:`ProbeFit` over all classes."""
        coef, intercept = self.full_solution(present, n_classes)
        return ProbeFit(
            C=self.C,
            coef=coef,
            intercept=intercept,
            n_iter=self.n_iter,
            converged=self.status == "converged",
            objective=self.objective,
            grad_norm=self.grad_max,
            data_passes=self.passes,
            fit_seconds=self.seconds,
            solver=solver,
            stop_rule=STOP_RULE,
            tol=tol,
            extra={
                "stop_reason": self.status,
                "batch_size": self.batch_size,
                "step": self.step,
                "step_halvings": self.halvings,
            },
        )


def _warn_if_not_converged(fit: ProbeFit, status: str, stacklevel: int) -> None:
    """Emit a ConvergenceWarning for a probe stopped before meeting ``tol``."""
    gap = describe_gradient_gap(fit)
    if status == "max_iter":
        message = (
            f"{fit.solver} reached max_iter={fit.n_iter} epochs for C={fit.C:g} "
            f"with {gap}; raise max_iter"
        )
    elif status == "stalled":
        message = (
            f"{fit.solver} stalled for C={fit.C:g} with {gap}: {_MAX_HALVINGS} "
            "halvings of the step did not lower the objective; raise tol"
        )
    else:
        return
    warnings.warn(message, ConvergenceWarning, stacklevel=stacklevel + 1)


register_solver("saga", lambda: IncrementalSolver("saga"))
register_solver("sag", lambda: IncrementalSolver("sag"))
