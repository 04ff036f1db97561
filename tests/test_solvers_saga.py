"""The incremental solvers (SAGA, SAG, SVRG) against references and edge cases.

There are three references. scikit-learn's ``LogisticRegression`` runs to a
tight tolerance, and SciPy's L-BFGS-B minimises the objective written out
below in float64. A plain numpy loop replays one epoch of each update rule
batch by batch, and the numba kernel must agree with it to rounding.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import minimize
from sklearn.linear_model import LogisticRegression

from probecvx.errors import ConvergenceWarning, SolverError
from probecvx.solvers import ProbeFit, Validation, get_solver, objective
from probecvx.solvers._kernels import SAG, SAGA, SVRG, run_epoch
from probecvx.solvers._objective import ABSENT_INTERCEPT
from probecvx.solvers.saga import IncrementalSolver

METHODS = ["saga", "sag", "svrg"]
GAP = 1e-6
TOL = 1e-7


def make_problem(
    seed: int, n: int, d: int, k: int, dtype: type = np.float64
) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping Gaussian clusters, standardised, every class present."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, d))
    y = np.arange(n) % k
    rng.shuffle(y)
    X = centers[y] + 1.5 * rng.standard_normal((n, d))
    X = (X - X.mean(axis=0)) / X.std(axis=0)
    return X.astype(dtype), y.astype(np.int64)


def scipy_optimum(
    X: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    C: float,
    column_scale: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Minimise the probe objective with L-BFGS-B, written out in float64.

    Classes absent from ``y`` are left out (their optimal intercept is minus
    infinity), and the intercepts of the others are centred to mean zero.
    With ``column_scale`` the minimisation runs over ``V = W * column_scale``,
    the same problem in variables that keep L-BFGS-B fast when a few columns
    are huge.
    """
    scale = np.ones(X.shape[1]) if column_scale is None else column_scale
    X = X.astype(np.float64) / scale
    present = np.unique(y)
    k = len(present)
    local = np.searchsorted(present, y)
    n, d = X.shape
    onehot = np.eye(k)[local]
    penalty = 1.0 / (C * n * scale**2)

    def value_and_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        coef, intercept = theta[: k * d].reshape(k, d), theta[k * d :]
        logits = X @ coef.T + intercept
        shift = logits.max(axis=1, keepdims=True)
        log_norm = shift[:, 0] + np.log(np.exp(logits - shift).sum(axis=1))
        value = np.mean(log_norm - logits[np.arange(n), local])
        value += 0.5 * np.sum(penalty * coef**2)
        residual = (np.exp(logits - log_norm[:, None]) - onehot) / n
        grad_coef = residual.T @ X + penalty * coef
        return float(value), np.concatenate([grad_coef.ravel(), residual.sum(0)])

    result = minimize(
        value_and_grad,
        np.zeros(k * (d + 1)),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": 100_000, "gtol": 1e-13, "ftol": 0.0},
    )
    coef = np.zeros((n_classes, d))
    intercept = np.full(n_classes, -np.inf)
    coef[present] = result.x[: k * d].reshape(k, d) / scale
    intercept[present] = result.x[k * d :] - result.x[k * d :].mean()
    return coef, intercept, float(result.fun)


def sklearn_optimum(
    X: np.ndarray, y: np.ndarray, n_classes: int, C: float
) -> tuple[np.ndarray, np.ndarray]:
    """Return scikit-learn's tight lbfgs fit as multinomial coefficients.

    With two classes scikit-learn fits the binary model, whose optimum at
    ``2 C`` is the probe's at ``C`` once ``w`` is split as ``(-w/2, w/2)``.
    """
    binary = n_classes == 2
    model = LogisticRegression(
        C=2 * C if binary else C, solver="lbfgs", tol=1e-10, max_iter=10_000
    )
    model.fit(X.astype(np.float64), y)
    coef, intercept = model.coef_, model.intercept_
    if binary:
        coef = np.vstack([-coef[0] / 2, coef[0] / 2])
        intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
    return coef, intercept - intercept.mean()


def fit_one(
    method: str, X: np.ndarray, y: np.ndarray, n_classes: int, C: float, **kwargs
) -> ProbeFit:
    options = {"tol": TOL, "max_iter": 5000} | kwargs
    return get_solver_for(method).fit(X, y, n_classes, [C], **options)[0]


def get_solver_for(method: str, **kwargs) -> IncrementalSolver:
    return IncrementalSolver(method, **kwargs)


def relative_gap(fit: ProbeFit, X: np.ndarray, y: np.ndarray, best: float) -> float:
    value = objective(X.astype(np.float64), y, fit.coef, fit.intercept, fit.C)
    return (value - best) / best


def assert_matches(
    fit: ProbeFit, coef: np.ndarray, intercept: np.ndarray, present: np.ndarray
) -> None:
    scale = np.abs(coef).max()
    np.testing.assert_allclose(fit.coef, coef, atol=1e-3 * scale)
    np.testing.assert_allclose(
        fit.intercept[present] - fit.intercept[present].mean(),
        intercept[present],
        atol=1e-3 * scale,
    )


# --- Agreement with the references ----------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_solver_matches_sklearn_and_scipy(method: str, dtype: type) -> None:
    X, y = make_problem(seed=0, n=300, d=6, k=4, dtype=dtype)
    coef, intercept, best = scipy_optimum(X, y, 4, 1.0)
    sk_coef, sk_intercept = sklearn_optimum(X, y, 4, 1.0)

    fit = fit_one(method, X, y, 4, 1.0)

    assert fit.converged
    assert fit.extra["stop_reason"] == "converged"
    assert 0 <= relative_gap(fit, X, y, best) <= GAP
    assert fit.objective == pytest.approx(
        objective(X.astype(np.float64), y, fit.coef, fit.intercept, 1.0), rel=1e-9
    )
    assert_matches(fit, coef, intercept, np.arange(4))
    assert_matches(fit, sk_coef, sk_intercept, np.arange(4))


@pytest.mark.parametrize("method", METHODS)
def test_solver_two_classes(method: str) -> None:
    X, y = make_problem(seed=1, n=200, d=5, k=2)
    sk_coef, sk_intercept = sklearn_optimum(X, y, 2, 0.5)
    _, _, best = scipy_optimum(X, y, 2, 0.5)

    fit = fit_one(method, X, y, 2, 0.5)

    assert fit.converged
    assert relative_gap(fit, X, y, best) <= GAP
    assert_matches(fit, sk_coef, sk_intercept, np.arange(2))


@pytest.mark.parametrize("method", METHODS)
def test_solver_hundred_classes(method: str) -> None:
    X, y = make_problem(seed=2, n=400, d=8, k=100)
    coef, intercept, best = scipy_optimum(X, y, 100, 1.0)

    fit = fit_one(method, X, y, 100, 1.0)

    assert fit.converged
    assert fit.coef.shape == (100, 8)
    assert relative_gap(fit, X, y, best) <= GAP
    assert_matches(fit, coef, intercept, np.arange(100))


@pytest.mark.parametrize("method", METHODS)
def test_solver_constant_column(method: str) -> None:
    X, y = make_problem(seed=3, n=240, d=5, k=3)
    X[:, 2] = 0.0  # a standardised constant feature
    X[:, 4] = 3.0  # and one that was not centred
    coef, intercept, best = scipy_optimum(X, y, 3, 1.0)

    fit = fit_one(method, X, y, 3, 1.0)

    assert fit.converged
    assert relative_gap(fit, X, y, best) <= GAP
    assert np.all(fit.coef[:, 2] == 0.0)
    assert_matches(fit, coef, intercept, np.arange(3))


@pytest.mark.parametrize("method", METHODS)
def test_solver_huge_scale_columns(method: str) -> None:
    X, y = make_problem(seed=4, n=300, d=6, k=3)
    X_huge = X.copy()
    X_huge[:, :2] *= 1e4
    column_scale = np.array([1e4, 1e4, 1, 1, 1, 1])
    coef, intercept, best = scipy_optimum(X_huge, y, 3, 1.0, column_scale)

    fit = fit_one(method, X_huge, y, 3, 1.0)
    standard = fit_one(method, X, y, 3, 1.0)

    assert fit.converged
    assert relative_gap(fit, X_huge, y, best) <= GAP
    assert_matches(fit, coef, intercept, np.arange(3))
    # The preconditioner divides the huge columns back to unit scale, so the
    # step starts where it does on the standardised problem. The optimum is
    # not the same (the penalty on those weights is 1e8 times weaker), so the
    # number of epochs is only comparable.
    initial_step = fit.extra["step"] * 2.0 ** fit.extra["step_halvings"]
    standard_step = standard.extra["step"] * 2.0 ** standard.extra["step_halvings"]
    assert initial_step == pytest.approx(standard_step, rel=1e-9)
    assert fit.n_iter <= 2 * standard.n_iter


@pytest.mark.parametrize("method", METHODS)
def test_solver_class_absent_from_train(method: str) -> None:
    X, y = make_problem(seed=5, n=240, d=4, k=4)
    y[y == 2] = 1
    coef, intercept, best = scipy_optimum(X, y, 4, 1.0)

    fit = fit_one(method, X, y, 4, 1.0)

    present = np.array([0, 1, 3])
    assert fit.converged
    assert relative_gap(fit, X, y, best) <= GAP
    assert np.all(fit.coef[2] == 0.0)
    assert fit.intercept[2] == ABSENT_INTERCEPT
    assert not np.any((X @ fit.coef.T + fit.intercept).argmax(axis=1) == 2)
    assert_matches(fit, coef, intercept, present)


# --- The kernel against a row-by-row replay -------------------------------------


def replay_epoch(
    X: np.ndarray,
    y: np.ndarray,
    order: np.ndarray,
    memory: np.ndarray,
    seen: np.ndarray,
    coef: np.ndarray,
    intercept: np.ndarray,
    step: float,
    strength: float,
    batch_size: int,
    rule: int,
) -> None:
    """Replay one epoch of ``rule`` with plain numpy, from the definitions.

    Rows not ``seen`` hold zero memory and do not count in the average.
    """
    k = coef.shape[0]
    onehot = np.eye(k)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        seen[batch] = True
        n_seen = seen.sum()
        logits = X[batch] @ coef.T + intercept
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        residual = probs - onehot[y[batch]]
        if rule == SAG:
            for row, value in zip(batch, residual, strict=True):
                memory[row] = value
            coef[:] = coef * (1 - step * strength) - step * (memory.T @ X) / n_seen
            intercept[:] -= step * memory.sum(axis=0) / n_seen
            continue
        change = residual - memory[batch]
        average = memory.T @ X / n_seen
        direction = change.T @ X[batch] / len(batch) + average
        coef[:] = (coef - step * direction) / (1 + step * strength)
        intercept_average = memory.sum(axis=0) / n_seen
        intercept[:] -= step * (change.sum(axis=0) / len(batch) + intercept_average)
        if rule == SAGA:
            for row, value in zip(batch, residual, strict=True):
                memory[row] = value


@pytest.mark.parametrize("rule", [SAGA, SAG, SVRG])
@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_kernel_matches_replay(rule: int, batch_size: int, dtype: type) -> None:
    rng = np.random.default_rng(6)
    n, d, k = 20, 4, 3
    X = rng.standard_normal((n, d)).astype(dtype)
    X64 = X.astype(np.float64)
    y = rng.integers(0, k, n).astype(np.int64)
    order = rng.permutation(n).astype(np.int64)
    memory = 0.1 * rng.standard_normal((n, k))
    coef = rng.standard_normal((k, d))
    intercept = rng.standard_normal(k)
    step, strength = 0.05, 0.3
    expected = [memory.copy(), coef.copy(), intercept.copy()]
    replay_epoch(
        X64,
        y,
        order,
        expected[0],
        np.ones(n, dtype=np.bool_),
        expected[1],
        expected[2],
        step,
        strength,
        batch_size,
        rule,
    )

    grad_sum = memory.T @ X64
    intercept_sum = memory.sum(axis=0)
    if rule == SAG:
        prox = np.full(d, 1 - step * strength)
    else:
        prox = np.full(d, 1 / (1 + step * strength))
    n_seen = run_epoch(
        X,
        y,
        order,
        memory,
        0,
        np.ones(n, dtype=np.bool_),
        n,
        np.ones(d),
        coef,
        intercept,
        grad_sum,
        intercept_sum,
        step,
        prox,
        batch_size,
        rule,
    )

    assert n_seen == n
    np.testing.assert_allclose(memory, expected[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(coef, expected[1], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(intercept, expected[2], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grad_sum, memory.T @ X64, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(intercept_sum, memory.sum(axis=0), atol=1e-12)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_kernel_sag_from_empty_memory_with_repeats(batch_size: int) -> None:
    rng = np.random.default_rng(7)
    n, d, k = 30, 3, 4
    X = rng.standard_normal((n, d))
    y = rng.integers(0, k, n).astype(np.int64)
    order = rng.integers(0, n, size=n).astype(np.int64)  # with repeats
    assert len(np.unique(order)) < n
    coef = 0.1 * rng.standard_normal((k, d))
    intercept = np.zeros(k)
    step, strength = 0.1, 0.01
    expected = [np.zeros((n, k)), coef.copy(), intercept.copy()]
    expected_seen = np.zeros(n, dtype=np.bool_)
    replay_epoch(
        X,
        y,
        order,
        expected[0],
        expected_seen,
        expected[1],
        expected[2],
        step,
        strength,
        batch_size,
        SAG,
    )

    memory, seen = np.zeros((n, k)), np.zeros(n, dtype=np.bool_)
    grad_sum, intercept_sum = np.zeros((k, d)), np.zeros(k)
    n_seen = run_epoch(
        X,
        y,
        order,
        memory,
        0,
        seen,
        0,
        np.ones(d),
        coef,
        intercept,
        grad_sum,
        intercept_sum,
        step,
        np.full(d, 1 - step * strength),
        batch_size,
        SAG,
    )

    assert n_seen == len(np.unique(order))
    np.testing.assert_array_equal(seen, expected_seen)
    np.testing.assert_allclose(memory, expected[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(coef, expected[1], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(intercept, expected[2], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grad_sum, memory.T @ X, rtol=1e-12, atol=1e-12)


# --- Behaviour of the fit -------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_fixed_seed_is_deterministic(method: str) -> None:
    X, y = make_problem(seed=7, n=300, d=6, k=3)

    first = fit_one(method, X, y, 3, 1.0, tol=1e-4)
    second = fit_one(method, X, y, 3, 1.0, tol=1e-4)
    other_seed = get_solver_for(method, random_state=1).fit(
        X, y, 3, [1.0], tol=1e-4, max_iter=5000
    )[0]

    np.testing.assert_array_equal(first.coef, second.coef)
    np.testing.assert_array_equal(first.intercept, second.intercept)
    assert first.n_iter == second.n_iter
    assert not np.array_equal(first.coef, other_seed.coef)


@pytest.mark.parametrize("method", METHODS)
def test_warm_start_saves_epochs(method: str) -> None:
    X, y = make_problem(seed=8, n=400, d=8, k=4)
    rng = np.random.default_rng(0)
    X_next = X + 0.02 * rng.standard_normal(X.shape)
    previous = fit_one(method, X, y, 4, 1.0)

    cold = fit_one(method, X_next, y, 4, 1.0)
    warm = fit_one(
        method, X_next, y, 4, 1.0, warm_start=(previous.coef, previous.intercept)
    )
    _, _, best = scipy_optimum(X_next, y, 4, 1.0)

    assert warm.converged
    assert relative_gap(warm, X_next, y, best) <= GAP
    assert warm.n_iter < cold.n_iter
    assert warm.data_passes < cold.data_passes


@pytest.mark.parametrize("method", METHODS)
def test_several_cs_equal_separate_fits(method: str) -> None:
    X, y = make_problem(seed=9, n=300, d=6, k=3)
    Cs = [10.0, 0.01, 1.0]

    together = get_solver_for(method).fit(X, y, 3, Cs, tol=TOL, max_iter=5000)

    assert [fit.C for fit in together] == Cs
    for fit, C in zip(together, Cs, strict=True):
        alone = fit_one(method, X, y, 3, C)
        coef, intercept, best = scipy_optimum(X, y, 3, C)
        assert fit.converged
        assert relative_gap(fit, X, y, best) <= GAP
        assert relative_gap(alone, X, y, best) <= GAP
        assert_matches(fit, coef, intercept, np.arange(3))
        assert_matches(alone, coef, intercept, np.arange(3))


@pytest.mark.parametrize("method", METHODS)
def test_max_iter_warns_and_reports(method: str) -> None:
    X, y = make_problem(seed=10, n=200, d=5, k=3)

    with pytest.warns(ConvergenceWarning, match="reached max_iter=2 epochs"):
        fit = fit_one(method, X, y, 3, 1.0, tol=1e-12, max_iter=2)

    assert not fit.converged
    assert fit.n_iter == 2
    assert fit.extra["stop_reason"] == "max_iter"


def test_warning_points_at_caller() -> None:
    X, y = make_problem(seed=10, n=200, d=5, k=3)

    with pytest.warns(ConvergenceWarning) as caught:
        IncrementalSolver().fit(X, y, 3, [1.0], tol=1e-12, max_iter=1)

    assert caught[0].filename == __file__


@pytest.mark.parametrize("method", METHODS)
def test_too_long_step_is_halved(method: str) -> None:
    X, y = make_problem(seed=11, n=240, d=5, k=3)
    _, _, best = scipy_optimum(X, y, 3, 1.0)

    fit = fit_one(method, X, y, 3, 1.0, tol=TOL)
    long_step = get_solver_for(method, step_scale=100.0).fit(
        X, y, 3, [1.0], tol=TOL, max_iter=5000
    )[0]

    assert fit.converged
    assert long_step.converged
    assert long_step.extra["step_halvings"] >= 1
    assert np.isfinite(long_step.coef).all()
    assert relative_gap(long_step, X, y, best) <= GAP


@pytest.mark.parametrize("batch_size", [1, 7, 1000])
def test_batch_sizes_reach_optimum(batch_size: int) -> None:
    X, y = make_problem(seed=12, n=250, d=5, k=3)
    _, _, best = scipy_optimum(X, y, 3, 1.0)

    fit = get_solver_for("saga", batch_size=batch_size).fit(
        X, y, 3, [1.0], tol=TOL, max_iter=5000
    )[0]

    assert fit.converged
    assert fit.extra["batch_size"] == min(batch_size, 250)
    assert relative_gap(fit, X, y, best) <= GAP


def test_validation_loss_and_error_recorded() -> None:
    X, y = make_problem(seed=13, n=300, d=5, k=3)
    val = Validation(X[200:], y[200:])

    fits = IncrementalSolver().fit(
        X[:200], y[:200], 3, [0.1, 1.0], tol=1e-5, max_iter=5000, validation=val
    )

    for fit in fits:
        logits = X[200:] @ fit.coef.T + fit.intercept
        shift = logits.max(axis=1, keepdims=True)
        log_norm = shift[:, 0] + np.log(np.exp(logits - shift).sum(axis=1))
        loss = np.mean(log_norm - logits[np.arange(100), y[200:]])
        error = np.mean(logits.argmax(axis=1) != y[200:])
        assert fit.extra["val_loss"] == pytest.approx(loss, rel=1e-10)
        assert fit.extra["val_error"] == pytest.approx(error)


def test_early_stopping_keeps_lowest_validation_loss() -> None:
    # Few rows, many features and almost no penalty: the probe overfits, so the
    # validation loss rises long before the training objective converges. A
    # short step lets it fall for a few epochs first.
    rng = np.random.default_rng(14)
    X = rng.standard_normal((160, 60))
    y = (X[:, 0] + 1.5 * rng.standard_normal(160) > 0).astype(np.int64)
    train, val = slice(0, 80), Validation(X[80:], y[80:])
    solver = IncrementalSolver(patience=3, step_scale=0.3)

    fit = solver.fit(
        X[train],
        y[train],
        2,
        [1e4],
        tol=1e-12,
        max_iter=500,
        validation=val,
        early_stopping=True,
    )[0]

    assert fit.extra["stop_reason"] == "early_stopped"
    assert not fit.converged
    assert 3 < fit.n_iter < 500
    # The same seed replays the same epochs, so shorter runs give every
    # iterate that early stopping saw.
    val_losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for epochs in range(1, fit.n_iter + 1):
            partial = IncrementalSolver(step_scale=0.3).fit(
                X[train],
                y[train],
                2,
                [1e4],
                tol=1e-12,
                max_iter=epochs,
                validation=val,
            )[0]
            val_losses.append(partial.extra["val_loss"])
    assert fit.extra["val_loss"] == min(val_losses)
    assert int(np.argmin(val_losses)) + 1 == fit.n_iter - 3


def test_early_stopping_needs_validation() -> None:
    X, y = make_problem(seed=15, n=100, d=3, k=2)

    with pytest.raises(SolverError, match="early_stopping=True needs validation"):
        IncrementalSolver().fit(
            X, y, 2, [1.0], tol=1e-5, max_iter=10, early_stopping=True
        )


@pytest.mark.parametrize("method", METHODS)
def test_memory_map_read_by_blocks(method: str, tmp_path: Path) -> None:
    X, y = make_problem(seed=16, n=500, d=6, k=3, dtype=np.float32)
    path = tmp_path / "x.f32"
    X.tofile(path)
    mapped = np.memmap(path, dtype=np.float32, mode="r", shape=X.shape)
    _, _, best = scipy_optimum(X, y, 3, 1.0)

    fit = get_solver_for(method, block_rows=64).fit(
        mapped, y, 3, [1.0], tol=TOL, max_iter=5000
    )[0]
    fortran = fit_one(method, np.asfortranarray(X), y, 3, 1.0)

    assert fit.converged
    assert relative_gap(fit, X, y, best) <= GAP
    assert fortran.converged
    assert relative_gap(fortran, X, y, best) <= GAP


def test_float16_features_read_by_blocks() -> None:
    X, y = make_problem(seed=19, n=300, d=5, k=3)
    X16 = X.astype(np.float16)
    _, _, best = scipy_optimum(X16, y, 3, 1.0)

    fit = get_solver_for("saga", block_rows=100).fit(
        X16, y, 3, [1.0], tol=TOL, max_iter=5000
    )[0]

    assert fit.converged
    assert relative_gap(fit, X16, y, best) <= GAP


def test_float32_features_are_not_copied() -> None:
    import tracemalloc

    X, y = make_problem(seed=17, n=200_000, d=48, k=3, dtype=np.float32)
    solver = IncrementalSolver(block_rows=2048)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        solver.fit(X[:100], y[:100], 3, [1.0], tol=1e-3, max_iter=5)  # compile
        tracemalloc.start()
        solver.fit(X, y, 3, [1.0], tol=1e-12, max_iter=2)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    # A float64 copy alone would take 2 * X.nbytes.
    assert peak < 0.5 * X.nbytes


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "sgd"}, "unknown incremental method 'sgd'"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"step_scale": -1.0}, "step_scale must be a positive finite number"),
        ({"patience": 0}, "patience must be at least 1"),
    ],
)
def test_invalid_settings_rejected(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(SolverError, match=match):
        IncrementalSolver(**kwargs)  # type: ignore[arg-type]


def test_invalid_fit_arguments_rejected() -> None:
    X, y = make_problem(seed=18, n=60, d=3, k=2)
    solver = IncrementalSolver()

    with pytest.raises(SolverError, match="max_iter must be at least 1"):
        solver.fit(X, y, 2, [1.0], tol=1e-5, max_iter=0)
    with pytest.raises(SolverError, match="every C must be a positive"):
        solver.fit(X, y, 2, [0.0], tol=1e-5, max_iter=10)


def test_warm_start_of_wrong_shape_rejected() -> None:
    X, y = make_problem(seed=20, n=60, d=3, k=2)

    with pytest.raises(SolverError, match="warm_start has shapes"):
        IncrementalSolver().fit(
            X,
            y,
            2,
            [1.0],
            tol=1e-5,
            max_iter=10,
            warm_start=(np.zeros((2, 4)), np.zeros(2)),
        )


def test_registered_names() -> None:
    assert get_solver("saga").name == "saga"
    assert get_solver("sag").name == "sag"
