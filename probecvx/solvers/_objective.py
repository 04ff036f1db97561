"""Loss, gradient and stopping rule of the probe objective, evaluated on GEMMs.

The objective is the one defined in :mod:`probecvx.solvers.base`::

    f(W, b) = mean_i CE(y_i, softmax(W x_i + b)) + ||W||_F^2 / (2 * C * n)

The evaluators here compute it, with its gradient, for several probes at once:
the weights of ``m`` probes are stacked into one ``(m * K, d)`` matrix, so one
GEMM gives the logits of every probe and one more gives every gradient. Rows
are processed in blocks: the block of ``X`` is still in cache for the second
GEMM, so a pass reads ``X`` from memory once, and the only buffers are a few
``(block_rows, m * K)`` arrays, whatever the number of rows. When ``m * K``
is small, :func:`~probecvx.solvers._kernels.loss_grad_blocks` runs the same
steps on smaller blocks in one compiled call, because narrow GEMMs are slow
and a Python loop over small blocks costs more than it saves. With few classes
per probe, the softmax of a wider block runs in the compiled
:func:`~probecvx.solvers._kernels.softmax_residual`.

Precision: the GEMMs run in the data's dtype (float32 data is never copied to
float64), while the softmax, the loss sums and the accumulation of the gradient
across blocks are float64.

Every probecvx solver stops by the same scale-free rule,
:func:`gradient_converged`, and reports it as :data:`STOP_RULE`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

import numpy as np

from probecvx.errors import SolverError
from probecvx.solvers._kernels import loss_grad_blocks, softmax_residual

if TYPE_CHECKING:
    import torch

    from probecvx.solvers.base import ProbeFit

logger = logging.getLogger(__name__)

#: The default ``tol`` for :func:`gradient_converged`. With lbfgs on the
#: float32 benchmark problems of ``benchmarks/solvers.py`` (20k x 512 with 10
#: classes, 10k x 128 with 2, 20k x 256 with 100; C = 0.01, 1, 100) it gave
#: relative objective gaps to the optimum of at most 4e-7. 1e-5 missed 1e-6
#: with 100 classes.
DEFAULT_TOL = 5e-6

#: The floor under ``|f|`` in the stopping rule; see :func:`gradient_converged`.
OBJECTIVE_FLOOR = 1e-3

#: The stopping rule of every probecvx solver, as recorded in ``ProbeFit``.
#: ``rms(x_j)`` is the root mean square of the feature that a weight multiplies
#: (1 for intercepts); see :func:`scaled_gradient_max`.
STOP_RULE = f"max|grad f| / max(rms(x_j), 1) <= tol * max(|f|, {OBJECTIVE_FLOOR:g})"

#: The intercept given to a class absent from the training labels. The
#: objective approaches its infimum as that intercept goes to minus infinity,
#: so the class's weight row stays zero and its intercept is a stand-in. It is
#: so negative that ``exp`` underflows to exactly 0 in float64, so the class is
#: never predicted and the objective equals that of the problem without it.
ABSENT_INTERCEPT = -1e3

# The bytes of X one block holds on the CPU: small enough to stay in the
# last-level cache between the two GEMMs of a block.
_CPU_BLOCK_BYTES = 4 * 2**20
# On a GPU the limit is device memory, not cache, so blocks are larger.
_GPU_BLOCK_BYTES = 512 * 2**20
_MIN_BLOCK_ROWS = 256
# Probes times classes up to which loss_grad runs the fused kernel. With 10
# columns, one OpenBLAS thread ran the GEMMs of a 20k x 512 pass at a quarter
# of the speed of 80 columns. In blocks that stay in the L2 cache the pass
# took half the time with 10 columns and a third with 2. With 80 or 100
# columns the fused kernel was no faster than the numpy path's wide GEMMs.
_FUSED_MAX_WIDTH = 32
# Classes per probe below which the softmax of a wider pass runs in the numba
# kernel. numpy's reductions over a few classes per row cost as much as the
# GEMMs, but with 100 classes its vectorised exp made numpy the faster one.
_KERNEL_SOFTMAX_MAX_CLASSES = 32
# The bytes of X in one block of the fused kernel, and its bounds in rows.
_FUSED_BLOCK_BYTES = 256 * 2**10
_FUSED_ROWS = (64, 1024)


def gradient_converged(grad_max: float, objective: float, tol: float) -> bool:
    """Return whether a probe meets the stopping rule :data:`STOP_RULE`.

    Parameters
    ----------
    grad_max : float
        The gradient size from :func:`scaled_gradient_max`.
    objective : float
        The objective ``f`` at the same point.
    tol : float
        The tolerance; :data:`DEFAULT_TOL` unless the caller asks otherwise.

    Notes
    -----
    ``f`` is a mean over samples, so the rule does not depend on ``n``. The
    gradient is measured relative to ``f`` itself, so nearly separable
    training rows (loss far below 1) are solved to the same relative gap as
    hard ones. The floor keeps the threshold above the rounding noise of
    float32 GEMMs, about 1e-9 on the gradient, when ``f`` is tiny.
    """
    return grad_max <= tol * max(abs(objective), OBJECTIVE_FLOOR)


def feature_scale(mean_squares: np.ndarray) -> np.ndarray:
    """Return ``max(rms(x_j), 1)`` per feature, the divisor in :data:`STOP_RULE`.

    Parameters
    ----------
    mean_squares : ndarray of shape (n_features,)
        ``mean_i x_ij^2``, as returned by ``Evaluator.column_mean_squares``.

    Returns
    -------
    ndarray of shape (n_features,)
    """
    return np.maximum(np.sqrt(mean_squares), 1.0)


def scaled_gradient_max(
    grad_coef: np.ndarray, grad_intercept: np.ndarray, scale: np.ndarray
) -> float:
    """Return ``max |df/dθ|`` with each weight's entry divided by its feature scale.

    The gradient of a weight grows with the scale of its feature, and so does
    its float32 rounding error, so a column of scale 1e4 could never meet an
    unscaled rule. Dividing by ``max(rms(x_j), 1)`` makes the rule invariant
    to scaling a feature up, and leaves it unchanged on standardised features.

    Parameters
    ----------
    grad_coef : ndarray of shape (n_classes, n_features)
    grad_intercept : ndarray of shape (n_classes,)
    scale : ndarray of shape (n_features,)
        From :func:`feature_scale`.
    """
    weights = float(np.max(np.abs(grad_coef) / scale, initial=0.0))
    return max(weights, float(np.max(np.abs(grad_intercept), initial=0.0)))


def present_classes(y: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the classes present in ``y`` and the labels renumbered to them.

    Parameters
    ----------
    y : ndarray of shape (n_samples,)
        Class codes in ``0..n_classes-1``.
    n_classes : int
        The size of the fixed class set.

    Returns
    -------
    present : ndarray of shape (n_present,), int64
        The sorted codes that occur in ``y``.
    y_local : ndarray of shape (n_samples,), int64
        ``y`` renumbered so that ``present[y_local] == y``.
    """
    present = np.unique(y).astype(np.int64)
    lookup = np.full(n_classes, -1, dtype=np.int64)
    lookup[present] = np.arange(len(present))
    return present, lookup[y]


def initial_point(
    present: np.ndarray,
    y_local: np.ndarray,
    n_features: int,
    n_classes: int,
    warm_start: tuple[np.ndarray, np.ndarray] | None,
) -> np.ndarray:
    """Return the packed starting point for the classes present.

    The point packs the ``(K, n_features)`` weights row by row, then the ``K``
    intercepts, where ``K = len(present)``. Cold: zero weights and the
    intercepts that are optimal for them, the log class frequencies. Warm: the
    given solution restricted to the classes present. A class that was absent
    when that solution was fitted carries the stand-in intercept, so it
    restarts from zero weights and the lowest intercept of the others.

    Raises
    ------
    SolverError
        When ``warm_start`` has the wrong shapes or non-finite values.
    """
    k = len(present)
    if warm_start is None:
        counts = np.bincount(y_local, minlength=k)
        intercept = np.log(counts / counts.sum())
        return np.concatenate([np.zeros(k * n_features), intercept - intercept.mean()])

    coef_all = np.asarray(warm_start[0], dtype=np.float64)
    intercept_all = np.asarray(warm_start[1], dtype=np.float64)
    if coef_all.shape != (n_classes, n_features) or intercept_all.shape != (n_classes,):
        raise SolverError(
            f"warm_start has shapes {coef_all.shape} and {intercept_all.shape}, "
            f"expected ({n_classes}, {n_features}) and ({n_classes},); pass the "
            "coef and intercept of a probe fitted on the same site"
        )
    if not (np.isfinite(coef_all).all() and np.isfinite(intercept_all).all()):
        raise SolverError(
            "warm_start contains NaN or infinite values; start cold "
            "(warm_start=None) instead"
        )
    coef = coef_all[present].copy()
    intercept = intercept_all[present].copy()
    was_absent = intercept <= ABSENT_INTERCEPT / 2
    if was_absent.all():
        intercept[:] = 0.0
    elif was_absent.any():
        intercept[was_absent] = intercept[~was_absent].min()
    coef[was_absent] = 0.0
    return np.concatenate([coef.ravel(), intercept - intercept.mean()])


def expand_classes(
    coef: np.ndarray, intercept: np.ndarray, present: np.ndarray, n_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Return the full ``(n_classes, d)`` coef and ``(n_classes,)`` intercept.

    ``coef`` and ``intercept`` are the ``(K, d)`` and ``(K,)`` solution for the
    classes present. Their intercepts are centred to mean zero, and absent
    classes get zero weights and :data:`ABSENT_INTERCEPT`.
    """
    full_coef = np.zeros((n_classes, coef.shape[1]))
    full_intercept = np.full(n_classes, ABSENT_INTERCEPT)
    full_coef[present] = coef
    full_intercept[present] = intercept - intercept.mean()
    return full_coef, full_intercept


def record_validation(fits: list[ProbeFit], val: Evaluator) -> None:
    """Store each probe's validation loss and error in ``extra``, in one pass."""
    coef = np.stack([fit.coef for fit in fits])
    intercept = np.stack([fit.intercept for fit in fits])
    loss, error = val.loss_error(coef, intercept)
    for fit, fit_loss, fit_error in zip(fits, loss, error, strict=True):
        fit.extra["val_loss"] = float(fit_loss)
        fit.extra["val_error"] = float(fit_error)


def describe_gradient_gap(fit: ProbeFit) -> str:
    """Describe how far a probe's gradient is above the :data:`STOP_RULE` bound.

    Warnings about probes that stopped before meeting ``tol`` quote it.
    """
    target = fit.tol * max(abs(fit.objective), OBJECTIVE_FLOOR)
    return f"max|grad f|={fit.grad_norm:.3g} above {target:.3g} (tol={fit.tol:g})"


def default_block_rows(n_features: int, itemsize: int, on_gpu: bool) -> int:
    """Return the rows per block for a matrix with rows of ``n_features`` values."""
    budget = _GPU_BLOCK_BYTES if on_gpu else _CPU_BLOCK_BYTES
    return max(_MIN_BLOCK_ROWS, budget // max(1, n_features * itemsize))


class Evaluator(Protocol):
    """Loss and gradient of ``m`` probes on one data matrix.

    Inputs and outputs are float64 numpy arrays on the host whatever the
    backend, so an optimiser written against this protocol runs on any device.
    Labels are local class indices ``0..K-1`` where ``K`` is the number of
    classes present (see :func:`present_classes`).
    """

    n_samples: int
    n_features: int

    def loss_grad(
        self, coef: np.ndarray, intercept: np.ndarray, Cs: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return the objective and its gradient for each of ``m`` probes.

        Parameters
        ----------
        coef : ndarray of shape (m, K, n_features)
        intercept : ndarray of shape (m, K)
        Cs : ndarray of shape (m,)
            The inverse penalty strength of each probe.

        Returns
        -------
        objective : ndarray of shape (m,)
        grad_coef : ndarray of shape (m, K, n_features)
        grad_intercept : ndarray of shape (m, K)
        """
        ...

    def column_mean_squares(self) -> np.ndarray:
        """Return ``mean_i x_ij^2`` for each feature ``j``, shape (n_features,)."""
        ...

    def gram(self) -> np.ndarray:
        """Return ``X^T X / n``, shape (n_features, n_features), float64."""
        ...

    def sample_rows(self, indices: np.ndarray) -> np.ndarray:
        """Return the rows at sorted ``indices`` on the host, in the GEMM dtype."""
        ...

    def loss_error(
        self, coef: np.ndarray, intercept: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return the mean log-loss and the error rate of each of ``m`` probes.

        Parameters
        ----------
        coef : ndarray of shape (m, K, n_features)
        intercept : ndarray of shape (m, K)

        Returns
        -------
        loss, error : ndarray of shape (m,)
        """
        ...


class NumpyEvaluator:
    """:class:`Evaluator` on a numpy matrix (a ``np.memmap`` works too).

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
        float64 data is used as is; any other float dtype is read block by
        block into float32, so no float64 copy of it is ever made.
    y : ndarray of shape (n_samples,)
        Local class indices ``0..n_classes-1``.
    n_classes : int
        ``K``, the number of classes present.
    block_rows : int or None, default=None
        Rows per block; None sizes blocks to about 4 MiB of ``X``.
    """

    def __init__(
        self,
        X: np.ndarray,
        y: np.ndarray,
        n_classes: int,
        block_rows: int | None = None,
    ) -> None:
        self.X = X
        self.y = np.asarray(y, dtype=np.intp)
        self.n_classes = n_classes
        self.n_samples, self.n_features = X.shape
        self.dtype = np.float64 if X.dtype == np.float64 else np.float32
        itemsize = np.dtype(self.dtype).itemsize
        self.block_rows = block_rows or default_block_rows(
            self.n_features, itemsize, on_gpu=False
        )
        # The fused kernel reads X as it is, so it needs float32 or float64 in
        # C order. np.asarray drops the memmap subclass without copying.
        self._fused_X = None
        if X.dtype == self.dtype and X.flags.c_contiguous:
            self._fused_X = np.asarray(X)
        low, high = _FUSED_ROWS
        fitting = _FUSED_BLOCK_BYTES // max(1, self.n_features * itemsize)
        self._fused_rows = block_rows or min(high, max(low, fitting))
        self._buffers: tuple[np.ndarray, np.ndarray] | None = None

    def _blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        # A generator, so that a dtype conversion holds one block at a time.
        for start in range(0, self.n_samples, self.block_rows):
            stop = min(start + self.block_rows, self.n_samples)
            rows = self.X[start:stop].astype(self.dtype, copy=False)
            yield rows, self.y[start:stop]

    def column_mean_squares(self) -> np.ndarray:
        """Return ``mean_i x_ij^2`` for each feature ``j``, shape (n_features,)."""
        total = np.zeros(self.n_features)
        for rows, _ in self._blocks():
            total += np.square(rows, dtype=np.float64).sum(axis=0)
        return total / self.n_samples

    def gram(self) -> np.ndarray:
        """Return ``X^T X / n``, shape (n_features, n_features), float64."""
        total = np.zeros((self.n_features, self.n_features))
        for rows, _ in self._blocks():
            total += rows.T @ rows
        return total / self.n_samples

    def sample_rows(self, indices: np.ndarray) -> np.ndarray:
        """Return the rows at sorted ``indices``, in the GEMM dtype."""
        return np.asarray(self.X[indices], dtype=self.dtype)

    def _stacked_weights(self, coef: np.ndarray) -> np.ndarray:
        """Return ``coef`` as one ``(n_features, m * K)`` matrix in the GEMM dtype."""
        m, k, d = coef.shape
        return coef.reshape(m * k, d).T.astype(self.dtype)

    def _logits_buffers(self, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Return a block's logits buffers in the GEMM dtype and in float64.

        For float64 data both are one array. They are kept for the next call
        with the same number of columns.
        """
        if self._buffers is None or self._buffers[0].shape[1] != width:
            rows = min(self.block_rows, self.n_samples)
            gemm = np.empty((rows, width), dtype=self.dtype)
            wide = gemm if self.dtype == np.float64 else np.empty((rows, width))
            self._buffers = (gemm, wide)
        return self._buffers

    def loss_grad(
        self, coef: np.ndarray, intercept: np.ndarray, Cs: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return the objective and its gradient; see :class:`Evaluator`."""
        m, k, d = coef.shape
        weights = self._stacked_weights(coef)
        bias = np.ascontiguousarray(intercept.reshape(m * k), dtype=np.float64)
        loss = np.zeros(m)
        grad_stacked = np.zeros((m * k, d))
        grad_intercept = np.zeros((m, k))

        if self._fused_X is not None and m * k <= _FUSED_MAX_WIDTH:
            loss = loss_grad_blocks(
                self._fused_X,
                self.y,
                np.ascontiguousarray(weights),
                bias,
                k,
                self._fused_rows,
                grad_stacked,
                grad_intercept,
            )
            return _add_penalty(
                loss, grad_stacked, grad_intercept, coef, Cs, self.n_samples
            )

        # The GEMMs write into buffers reused across blocks and calls, because
        # the page faults of fresh arrays cost about a fifth of a pass with
        # 100 classes.
        residual_block, logits_block = self._logits_buffers(m * k)
        residual_grad = np.empty((m * k, d), dtype=self.dtype)
        for rows, labels in self._blocks():
            residual = residual_block[: len(rows)]
            np.matmul(rows, weights, out=residual)
            if k < _KERNEL_SOFTMAX_MAX_CLASSES:
                softmax_residual(residual, labels, bias, k, grad_intercept, loss)
            else:
                logits = logits_block[: len(rows)]
                _numpy_softmax_residual(
                    residual, logits, labels, bias, k, grad_intercept, loss
                )
            np.matmul(residual.T, rows, out=residual_grad)
            grad_stacked += residual_grad

        return _add_penalty(
            loss, grad_stacked, grad_intercept, coef, Cs, self.n_samples
        )

    def loss_error(
        self, coef: np.ndarray, intercept: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return the mean log-loss and the error rate; see :class:`Evaluator`."""
        m, k, _ = coef.shape
        weights = self._stacked_weights(coef)
        bias = intercept.reshape(1, m * k)
        loss = np.zeros(m)
        wrong = np.zeros(m)

        for rows, labels in self._blocks():
            logits = (rows @ weights).astype(np.float64)
            logits += bias
            logits3 = logits.reshape(len(rows), m, k)
            true_logit = logits3[np.arange(len(rows)), :, labels]
            wrong += (logits3.argmax(axis=2) != labels[:, None]).sum(axis=0)
            shift = logits3.max(axis=2, keepdims=True)
            norm = np.exp(logits3 - shift).sum(axis=2)
            loss += (np.log(norm) + shift[:, :, 0] - true_logit).sum(axis=0)

        return loss / self.n_samples, wrong / self.n_samples


class TorchEvaluator:
    """:class:`Evaluator` on a torch device, for example ``"cuda"``.

    ``X`` is moved to the device once (on ``"cpu"`` the tensor shares the
    numpy memory). Only the weights, ``m * K * (n_features + 1)`` values,
    travel between host and device at each evaluation.

    NOTE: the tests run this class on ``"cpu"`` only; no CUDA device was
    available when it was written, so the ``"cuda"`` path has not been run.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
        float64 data is used as is; other float dtypes are cast to float32
        block by block on the device.
    y : ndarray of shape (n_samples,)
        Local class indices ``0..n_classes-1``.
    n_classes : int
        ``K``, the number of classes present.
    device : str
        A torch device string: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
    block_rows : int or None, default=None
        Rows per block; None sizes blocks to about 4 MiB of ``X`` on the CPU
        and 512 MiB on other devices.
    """

    def __init__(
        self,
        X: np.ndarray,
        y: np.ndarray,
        n_classes: int,
        device: str,
        block_rows: int | None = None,
    ) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.n_samples, self.n_features = X.shape
        self.n_classes = n_classes
        self.dtype = torch.float64 if X.dtype == np.float64 else torch.float32
        if self.dtype == torch.float32 and torch.get_float32_matmul_precision() != (
            "highest"
        ):
            # TF32 or bfloat16 GEMMs keep about 10 bits of mantissa, far too few
            # for the float32 gradients that the stopping rule measures.
            logger.warning(
                "float32 matmul precision is %r, so GEMMs on %s may use TF32 and "
                "probes may stop short of tol; call "
                "torch.set_float32_matmul_precision('highest')",
                torch.get_float32_matmul_precision(),
                self.device,
            )
        with warnings.catch_warnings():
            # A read-only array (a memmap opened "r") triggers a warning that
            # writes would be undefined; the tensor is only ever read.
            warnings.filterwarnings("ignore", message=".*not writable.*")
            self.X = torch.from_numpy(X).to(self.device)
        self.y = torch.from_numpy(np.asarray(y, dtype=np.int64)).to(self.device)
        itemsize = 8 if self.dtype == torch.float64 else 4
        self.block_rows = block_rows or default_block_rows(
            self.n_features, itemsize, on_gpu=self.device.type != "cpu"
        )

    def _blocks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, self.n_samples, self.block_rows):
            stop = min(start + self.block_rows, self.n_samples)
            rows = self.X[start:stop].to(self.dtype)
            yield rows, self.y[start:stop]

    def column_mean_squares(self) -> np.ndarray:
        """Return ``mean_i x_ij^2`` for each feature ``j``, shape (n_features,)."""
        torch = self.torch
        total = torch.zeros(self.n_features, dtype=torch.float64, device=self.device)
        for rows, _ in self._blocks():
            total += rows.to(torch.float64).square().sum(dim=0)
        return total.cpu().numpy() / self.n_samples

    def gram(self) -> np.ndarray:
        """Return ``X^T X / n``, shape (n_features, n_features), float64."""
        torch = self.torch
        d = self.n_features
        total = torch.zeros((d, d), dtype=torch.float64, device=self.device)
        for rows, _ in self._blocks():
            total += (rows.T @ rows).to(torch.float64)
        return total.cpu().numpy() / self.n_samples

    def sample_rows(self, indices: np.ndarray) -> np.ndarray:
        """Return the rows at sorted ``indices`` on the host, in the GEMM dtype."""
        index = self.torch.from_numpy(indices).to(self.device)
        return self.X[index].to(self.dtype).cpu().numpy()

    def _to_device(self, array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return self.torch.from_numpy(np.ascontiguousarray(array)).to(
            device=self.device, dtype=dtype
        )

    def loss_grad(
        self, coef: np.ndarray, intercept: np.ndarray, Cs: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return the objective and its gradient; see :class:`Evaluator`."""
        torch = self.torch
        m, k, d = coef.shape
        weights = self._to_device(coef.reshape(m * k, d), self.dtype).T
        bias = self._to_device(intercept.reshape(1, m * k), torch.float64)
        loss = torch.zeros(m, dtype=torch.float64, device=self.device)
        grad_stacked = torch.zeros((m * k, d), dtype=torch.float64, device=self.device)
        grad_intercept = torch.zeros((m, k), dtype=torch.float64, device=self.device)

        for rows, labels in self._blocks():
            logits = (rows @ weights).to(torch.float64) + bias
            logits3 = logits.view(len(rows), m, k)
            index = torch.arange(len(rows), device=self.device)
            true_logit = logits3[index, :, labels]
            log_norm = torch.logsumexp(logits3, dim=2)
            loss += (log_norm - true_logit).sum(dim=0)

            residual3 = torch.exp(logits3 - log_norm[:, :, None])
            residual3[index, :, labels] -= 1.0
            grad_intercept += residual3.sum(dim=0)
            residual = residual3.view(len(rows), m * k).to(self.dtype)
            grad_stacked += (residual.T @ rows).to(torch.float64)

        return _add_penalty(
            loss.cpu().numpy(),
            grad_stacked.cpu().numpy(),
            grad_intercept.cpu().numpy(),
            coef,
            Cs,
            self.n_samples,
        )

    def loss_error(
        self, coef: np.ndarray, intercept: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return the mean log-loss and the error rate; see :class:`Evaluator`."""
        torch = self.torch
        m, k, d = coef.shape
        weights = self._to_device(coef.reshape(m * k, d), self.dtype).T
        bias = self._to_device(intercept.reshape(1, m * k), torch.float64)
        loss = torch.zeros(m, dtype=torch.float64, device=self.device)
        wrong = torch.zeros(m, dtype=torch.float64, device=self.device)

        for rows, labels in self._blocks():
            logits = (rows @ weights).to(torch.float64) + bias
            logits3 = logits.view(len(rows), m, k)
            true_logit = logits3[torch.arange(len(rows), device=self.device), :, labels]
            wrong += (logits3.argmax(dim=2) != labels[:, None]).sum(dim=0)
            loss += (torch.logsumexp(logits3, dim=2) - true_logit).sum(dim=0)

        n = self.n_samples
        return loss.cpu().numpy() / n, wrong.cpu().numpy() / n


def _numpy_softmax_residual(
    residual: np.ndarray,
    logits: np.ndarray,
    labels: np.ndarray,
    bias: np.ndarray,
    n_classes: int,
    grad_intercept: np.ndarray,
    loss: np.ndarray,
) -> None:
    """Do what :func:`~probecvx.solvers._kernels.softmax_residual` does, in numpy.

    ``logits`` is a float64 buffer of the shape of ``residual``, or
    ``residual`` itself when that is float64.
    """
    if logits is not residual:
        np.copyto(logits, residual)
    logits += bias
    rows = len(logits)
    logits3 = logits.reshape(rows, -1, n_classes)
    index = np.arange(rows)
    true_logit = logits3[index, :, labels]
    shift = logits3.max(axis=2, keepdims=True)
    logits3 -= shift
    np.exp(logits3, out=logits3)
    norm = logits3.sum(axis=2)
    loss += (np.log(norm) + shift[:, :, 0] - true_logit).sum(axis=0)
    logits3 /= norm[:, :, None]
    logits3[index, :, labels] -= 1.0
    grad_intercept += logits3.sum(axis=0)
    if logits is not residual:
        np.copyto(residual, logits, casting="same_kind")


def _add_penalty(
    loss_sum: np.ndarray,
    grad_stacked: np.ndarray,
    grad_intercept_sum: np.ndarray,
    coef: np.ndarray,
    Cs: np.ndarray,
    n_samples: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Turn sums over samples into the objective and gradient of each probe."""
    m, k, d = coef.shape
    strength = 1.0 / (Cs * n_samples)  # (m,)
    objective = loss_sum / n_samples + 0.5 * strength * np.einsum(
        "mkd,mkd->m", coef, coef
    )
    grad_coef = grad_stacked.reshape(m, k, d) / n_samples
    grad_coef += strength[:, None, None] * coef
    return objective, grad_coef, grad_intercept_sum / n_samples


def loss_and_gradient(
    X: np.ndarray,
    y: np.ndarray,
    coef: np.ndarray,
    intercept: np.ndarray,
    C: float,
) -> tuple[float, np.ndarray, np.ndarray]:
    """Return ``f``, ``df/dcoef`` and ``df/dintercept`` of one probe.

    A convenience for solvers that check :func:`gradient_converged` now and
    then, and for tests. Every class in ``0..n_classes-1`` takes part, so a
    class absent from ``y`` needs a very negative intercept
    (:data:`ABSENT_INTERCEPT`) for the result to match a fit.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
    y : ndarray of shape (n_samples,)
        Class codes in ``0..n_classes-1``.
    coef : ndarray of shape (n_classes, n_features)
    intercept : ndarray of shape (n_classes,)
    C : float

    Returns
    -------
    objective : float
    grad_coef : ndarray of shape (n_classes, n_features)
    grad_intercept : ndarray of shape (n_classes,)
    """
    evaluator = NumpyEvaluator(X, y, coef.shape[0])
    objective, grad_coef, grad_intercept = evaluator.loss_grad(
        np.asarray(coef, dtype=np.float64)[None],
        np.asarray(intercept, dtype=np.float64)[None],
        np.array([float(C)]),
    )
    return float(objective[0]), grad_coef[0], grad_intercept[0]
