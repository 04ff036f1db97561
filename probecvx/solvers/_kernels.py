"""Numba kernels of the incremental probe solvers (SAGA, SAG, SVRG).

One call runs one epoch, a pass over the rows in a given order in mini-batches,
or the part of an epoch on one block of rows. The Python driver in
:mod:`probecvx.solvers.saga` runs the stopping rule, the validation loss and
the full-gradient pass between epochs.

The kernels work in preconditioned coordinates: a feature ``j`` enters as
``x_j * inv_scale[j]`` and its weight is ``W[:, j] * scale[j]``. The penalty on
``W`` is then ``0.5 * sum_j strength[j] * V[:, j]**2`` with a per-feature
strength, which the proximal step handles entry by entry (see ``prox`` below).

Everything that accumulates is float64: the weights, the residual memory, the
running gradient sums and the mini-batch buffer, into which float32 rows are
converted on the fly. The GEMMs of a mini-batch run in BLAS through
``np.dot``; the kernels themselves are compiled with ``fastmath=False``, so
LLVM does not reorder any floating-point sum.
"""

from __future__ import annotations

import numpy as np
from numba import njit

#: Update rules understood by :func:`run_epoch`.
SAGA = 0
SAG = 1
SVRG = 2


@njit(cache=True, fastmath=False)
def _softmax_residual(logits: np.ndarray, label: int) -> None:
    """Overwrite one row of logits with ``softmax(logits) - onehot(label)``."""
    n_classes = logits.shape[0]
    shift = logits[0]
    for k in range(1, n_classes):
        if logits[k] > shift:
            shift = logits[k]
    total = 0.0
    for k in range(n_classes):
        logits[k] = np.exp(logits[k] - shift)
        total += logits[k]
    for k in range(n_classes):
        logits[k] /= total
    logits[label] -= 1.0


@njit(cache=True, fastmath=False)
def run_epoch(
    X: np.ndarray,
    y: np.ndarray,
    order: np.ndarray,
    memory: np.ndarray,
    memory_offset: int,
    seen: np.ndarray,
    n_seen: int,
    inv_scale: np.ndarray,
    coef: np.ndarray,
    intercept: np.ndarray,
    grad_sum: np.ndarray,
    intercept_grad_sum: np.ndarray,
    step: float,
    prox: np.ndarray,
    batch_size: int,
    rule: int,
) -> int:
    """Run one epoch of mini-batch SAGA, SAG or SVRG over ``X[order]``, in place.

    Parameters
    ----------
    X : ndarray of shape (n_rows, n_features), float32 or float64
        The rows this call visits: all training rows, or one block of them.
    y : ndarray of shape (n_rows,), int64
        Local class indices of the rows of ``X``.
    order : ndarray of shape (n_visits,), int64
        Row indices into ``X``, visited in this order; consecutive runs of
        ``batch_size`` form the mini-batches.
    memory : ndarray of shape (n_samples, n_classes), float64
        The stored residual ``softmax - onehot`` of every training row; row
        ``memory_offset + i`` belongs to ``X[i]``. Updated by SAGA and SAG.
        SVRG only reads it, and there it contains the residuals at the
        snapshot.
    memory_offset : int
        Index in ``memory`` of the first row of ``X``.
    seen : ndarray of shape (n_samples,), bool
        Whether each training row has a gradient in ``memory``; rows not yet
        seen hold zeros. Updated.
    n_seen : int
        The number of true entries of ``seen``. The average of the stored
        gradients is ``grad_sum / n_seen``.
    inv_scale : ndarray of shape (n_features,), float64
        The preconditioner: each feature is multiplied by it.
    coef : ndarray of shape (n_classes, n_features), float64
        The weights ``V`` in preconditioned coordinates; updated.
    intercept : ndarray of shape (n_classes,), float64
        Updated.
    grad_sum : ndarray of shape (n_classes, n_features), float64
        ``sum_i memory[i] (x) (x_i * inv_scale)``, kept equal to it as
        ``memory`` changes (SVRG leaves both fixed).
    intercept_grad_sum : ndarray of shape (n_classes,), float64
        ``sum_i memory[i]``, kept likewise.
    step : float
        The step size.
    prox : ndarray of shape (n_features,), float64
        Per-feature factor applied to ``coef`` after each step: the proximal
        map ``1 / (1 + step * strength[j])`` for SAGA and SVRG, the shrinkage
        ``1 - step * strength[j]`` of the penalty's gradient step for SAG.
    batch_size : int
        Rows per mini-batch; the last one of the epoch may be smaller.
    rule : int
        :data:`SAGA`, :data:`SAG` or :data:`SVRG`.

    Returns
    -------
    int
        The updated ``n_seen``.
    """
    n_classes, n_features = coef.shape
    n_visits = order.shape[0]
    batch = np.empty((batch_size, n_features))
    delta = np.empty((batch_size, n_classes))
    delta_intercept = np.empty(n_classes)
    update_memory = rule != SVRG

    for start in range(0, n_visits, batch_size):
        size = min(batch_size, n_visits - start)

        # Gather the batch rows in float64, preconditioned.
        for j in range(size):
            row = X[order[start + j]]
            for d in range(n_features):
                batch[j, d] = row[d] * inv_scale[d]
        rows = batch[:size]

        # Residuals at the current weights, and their change from the memory.
        residual = np.dot(rows, coef.T)
        for k in range(n_classes):
            delta_intercept[k] = 0.0
        for j in range(size):
            sample = memory_offset + order[start + j]
            if not seen[sample]:
                seen[sample] = True
                n_seen += 1
            for k in range(n_classes):
                residual[j, k] += intercept[k]
            _softmax_residual(residual[j], y[order[start + j]])
            for k in range(n_classes):
                change = residual[j, k] - memory[sample, k]
                delta[j, k] = change
                delta_intercept[k] += change
                if update_memory:
                    memory[sample, k] = residual[j, k]
        change_sum = np.dot(delta[:size].T, rows)

        inv_size = 1.0 / size
        inv_n = 1.0 / n_seen
        if rule == SAG:
            # Step along the new average of the stored gradients.
            scaled_step = step * inv_n
            for k in range(n_classes):
                for d in range(n_features):
                    total = grad_sum[k, d] + change_sum[k, d]
                    grad_sum[k, d] = total
                    coef[k, d] = coef[k, d] * prox[d] - scaled_step * total
                intercept_grad_sum[k] += delta_intercept[k]
                intercept[k] -= scaled_step * intercept_grad_sum[k]
        else:
            # SAGA and SVRG: the unbiased estimate, the batch's change in
            # gradient plus the old average, then the proximal map.
            for k in range(n_classes):
                for d in range(n_features):
                    direction = change_sum[k, d] * inv_size + grad_sum[k, d] * inv_n
                    coef[k, d] = (coef[k, d] - step * direction) * prox[d]
                    if update_memory:
                        grad_sum[k, d] += change_sum[k, d]
                direction = (
                    delta_intercept[k] * inv_size + intercept_grad_sum[k] * inv_n
                )
                intercept[k] -= step * direction
                if update_memory:
                    intercept_grad_sum[k] += delta_intercept[k]
    return n_seen


@njit(cache=True, fastmath=False)
def softmax_residual(
    logits: np.ndarray,
    y: np.ndarray,
    bias: np.ndarray,
    n_classes: int,
    grad_intercept: np.ndarray,
    loss: np.ndarray,
) -> None:
    """Turn a block's logits into the residual ``softmax - onehot``, in place.

    The softmax is computed in float64 whatever the dtype of ``logits``.

    Parameters
    ----------
    logits : ndarray of shape (rows, m * n_classes), float32 or float64
        ``X_block @ weights`` without the bias; overwritten by the residual.
    y : ndarray of shape (rows,)
        Local class indices of the block's rows.
    bias : ndarray of shape (m * n_classes,), float64
    n_classes : int
    grad_intercept : ndarray of shape (m, n_classes), float64
        Receives the sum over rows of the residual.
    loss : ndarray of shape (m,), float64
        Receives the summed cross-entropy of each probe.
    """
    width = logits.shape[1]
    n_probes = width // n_classes
    shifted = np.empty(n_classes)
    for i in range(logits.shape[0]):
        label = y[i]
        for probe in range(n_probes):
            offset = probe * n_classes
            shift = -np.inf
            for k in range(n_classes):
                shifted[k] = logits[i, offset + k] + bias[offset + k]
                if shifted[k] > shift:
                    shift = shifted[k]
            true_logit = shifted[label]
            total = 0.0
            for k in range(n_classes):
                shifted[k] = np.exp(shifted[k] - shift)
                total += shifted[k]
            loss[probe] += np.log(total) + shift - true_logit
            for k in range(n_classes):
                value = shifted[k] / total
                if k == label:
                    value -= 1.0
                logits[i, offset + k] = value
                grad_intercept[probe, k] += value


@njit(cache=True, fastmath=False)
def loss_grad_blocks(
    X: np.ndarray,
    y: np.ndarray,
    weights: np.ndarray,
    bias: np.ndarray,
    n_classes: int,
    block_rows: int,
    grad: np.ndarray,
    grad_intercept: np.ndarray,
) -> np.ndarray:
    """Add the summed loss gradient of ``m`` probes to ``grad``; return their losses.

    One block of rows at a time: the logits GEMM, the softmax and the
    residual GEMM run while the block is still in cache, so ``X`` is read once
    per call and no Python runs per block.

    Parameters
    ----------
    X : ndarray of shape (n, d), float32 or float64, C-contiguous
    y : ndarray of shape (n,)
        Local class indices.
    weights : ndarray of shape (d, m * n_classes), the dtype of ``X``
        The stacked coefficients, probe after probe.
    bias : ndarray of shape (m * n_classes,), float64
    n_classes : int
    block_rows : int
    grad : ndarray of shape (m * n_classes, d), float64
        Receives the sum over rows of ``residual_i x_i``.
    grad_intercept : ndarray of shape (m, n_classes), float64
        Receives the sum over rows of ``residual_i``.

    Returns
    -------
    loss : ndarray of shape (m,), float64
        The summed cross-entropy of each probe.
    """
    n, d = X.shape
    width = weights.shape[1]
    loss = np.zeros(width // n_classes)
    for start in range(0, n, block_rows):
        stop = min(start + block_rows, n)
        rows = X[start:stop]
        residual = np.dot(rows, weights)
        softmax_residual(residual, y[start:stop], bias, n_classes, grad_intercept, loss)
        block_grad = np.dot(residual.T, rows)
        for row in range(width):
            for j in range(d):
                grad[row, j] += block_grad[row, j]
    return loss
