"""The L-BFGS probe solver against scikit-learn, on tiny problems built here.

scikit-learn's ``LogisticRegression`` minimises ``C * n`` times the probe
objective for three or more classes. For two classes it fits the binary
model with one weight vector ``w``. The probe's symmetric pair
``(-w/2, w/2)`` pays half that penalty, so the probe's optimum at ``C`` is
scikit-learn's at ``2 * C``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from probecvx.errors import ConvergenceWarning, SolverError
from probecvx.solvers import Validation, check_problem, get_solver, objective
from probecvx.solvers._objective import (
    ABSENT_INTERCEPT,
    DEFAULT_TOL,
    STOP_RULE,
    NumpyEvaluator,
    feature_scale,
    gradient_converged,
    loss_and_gradient,
    scaled_gradient_max,
)
from probecvx.solvers.auto import AutoSolver, choose_engine
from probecvx.solvers.lbfgs import LbfgsSolver, _pick_preconditioner, _top_eigenpairs

GAP = 1e-6


def make_problem(
    rng: np.random.Generator,
    n: int,
    d: int,
    k: int,
    dtype: type = np.float64,
    spread: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian clusters, one per class, overlapping so no class separates.

    The features are standardised, as the caller of a solver does.
    """
    centers = spread * rng.standard_normal((k, d))
    y = np.arange(n) % k
    rng.shuffle(y)
    X = centers[y] + rng.standard_normal((n, d))
    X = (X - X.mean(axis=0)) / X.std(axis=0)
    return X.astype(dtype), y.astype(np.int64)


def sklearn_optimum(
    X: np.ndarray, y: np.ndarray, C: float, n_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Return scikit-learn's tight solution as a full multinomial (coef, b)."""
    present = np.unique(y)
    binary = len(present) == 2
    model = LogisticRegression(C=2 * C if binary else C, tol=1e-10, max_iter=10000)
    model.fit(X.astype(np.float64), y)
    coef_seen, intercept_seen = model.coef_, model.intercept_
    if binary:
        coef_seen = np.vstack([-coef_seen[0] / 2, coef_seen[0] / 2])
        intercept_seen = np.array([-intercept_seen[0] / 2, intercept_seen[0] / 2])
    coef = np.zeros((n_classes, X.shape[1]))
    intercept = np.full(n_classes, ABSENT_INTERCEPT)
    coef[present] = coef_seen
    intercept[present] = intercept_seen - intercept_seen.mean()
    return coef, intercept


def relative_gap(
    X: np.ndarray, y: np.ndarray, C: float, fit_coef: np.ndarray, fit_b: np.ndarray
) -> tuple[float, float]:
    """Return (our objective - optimum) / optimum, and the optimum, in float64."""
    X64 = X.astype(np.float64)
    coef, intercept = sklearn_optimum(X, y, C, fit_coef.shape[0])
    best = objective(X64, y, coef, intercept, C)
    ours = objective(X64, y, fit_coef, fit_b, C)
    return (ours - best) / best, best


def small_low_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the low-rank preconditioner keep 3 directions from 150 sampled rows."""
    monkeypatch.setattr("probecvx.solvers.lbfgs._LOW_RANK", 3)
    monkeypatch.setattr("probecvx.solvers.lbfgs._LOW_RANK_ROWS", 150)


@pytest.mark.parametrize("preconditioner", ["covariance", "lowrank", "diagonal"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("C", [0.05, 1.0, 20.0])
def test_lbfgs_matches_sklearn(
    seed: int,
    dtype: type,
    C: float,
    preconditioner: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    small_low_rank(monkeypatch)
    rng = np.random.default_rng(seed)
    X, y = make_problem(rng, n=300, d=8, k=4, dtype=dtype)
    solver = LbfgsSolver(preconditioner=preconditioner)

    fit = solver.fit(X, y, 4, [C], tol=DEFAULT_TOL, max_iter=500)[0]

    gap, best = relative_gap(X, y, C, fit.coef, fit.intercept)
    assert fit.converged
    assert abs(gap) <= GAP
    assert fit.objective == pytest.approx(best, rel=GAP)
    coef, intercept = sklearn_optimum(X, y, C, 4)
    scale = np.abs(coef).max()
    np.testing.assert_allclose(fit.coef, coef, atol=2e-3 * scale)
    np.testing.assert_allclose(fit.intercept, intercept, atol=2e-3 * scale)


def test_lbfgs_gradient_meets_stop_rule(seed: int) -> None:
    rng = np.random.default_rng(seed)
    X, y = make_problem(rng, n=400, d=6, k=3)

    fit = LbfgsSolver().fit(X, y, 3, [1.0], tol=1e-7, max_iter=500)[0]

    f, grad_coef, grad_intercept = loss_and_gradient(X, y, fit.coef, fit.intercept, 1.0)
    scale = feature_scale(np.mean(X**2, axis=0))
    grad_max = scaled_gradient_max(grad_coef, grad_intercept, scale)
    assert fit.stop_rule == STOP_RULE
    assert fit.tol == 1e-7
    assert f == pytest.approx(fit.objective, rel=1e-12)
    assert grad_max == pytest.approx(fit.grad_norm, rel=1e-6, abs=1e-12)
    assert gradient_converged(grad_max, f, 1e-7)


def test_scaled_gradient_divides_large_features() -> None:
    grad_coef = np.array([[3e4, 0.5], [-2.0, 0.1]])
    grad_intercept = np.array([0.25, -0.25])
    scale = feature_scale(np.array([1e8, 0.01]))

    assert scale.tolist() == [1e4, 1.0]
    assert scaled_gradient_max(grad_coef, grad_intercept, scale) == 3.0


def test_gradient_converged_threshold() -> None:
    assert gradient_converged(1e-5, 1.0, 1e-5)
    assert not gradient_converged(1.1e-5, 1.0, 1e-5)
    assert gradient_converged(2e-5, 2.0, 1e-5)
    # Below the floor the threshold stops shrinking with f.
    assert gradient_converged(1e-8, 1e-6, 1e-5)
    assert not gradient_converged(2e-8, 1e-6, 1e-5)


def test_lbfgs_two_classes(seed: int) -> None:
    rng = np.random.default_rng(seed)
    X, y = make_problem(rng, n=300, d=5, k=2)

    fit = LbfgsSolver().fit(X, y, 2, [0.5], tol=DEFAULT_TOL, max_iter=500)[0]

    gap, _ = relative_gap(X, y, 0.5, fit.coef, fit.intercept)
    assert abs(gap) <= GAP
    np.testing.assert_allclose(fit.coef[0], -fit.coef[1], atol=1e-6)


def test_lbfgs_hundred_classes(seed: int) -> None:
    rng = np.random.default_rng(seed)
    X, y = make_problem(rng, n=1000, d=4, k=100, spread=2.0)

    fit = LbfgsSolver().fit(X, y, 100, [1.0], tol=DEFAULT_TOL, max_iter=2000)[0]

    gap, _ = relative_gap(X, y, 1.0, fit.coef, fit.intercept)
    assert fit.converged
    assert abs(gap) <= GAP


def test_lbfgs_constant_column(seed: int) -> None:
    rng = np.random.default_rng(seed)
    X, y = make_problem(rng, n=300, d=5, k=3)
    X[:, 2] = 1.0

    fit = LbfgsSolver().fit(X, y, 3, [1.0], tol=DEFAULT_TOL, max_iter=500)[0]

    gap, _ = relative_gap(X, y, 1.0, fit.coef, fit.intercept)
    assert fit.converged
    assert abs(gap) <= GAP


@pytest.mark.parametrize("preconditioner", ["covariance", "lowrank", "diagonal"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lbfgs_huge_column_scale(
    seed: int, dtype: type, preconditioner: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # scikit-learn's lbfgs needs thousands of iterations here and still stops
    # short, so the reference is a float64 fit at a tight tolerance, and the
    # gradient is checked in float64 independently of the solver.
    small_low_rank(monkeypatch)
    rng = np.random.default_rng(seed)
    X, y = make_problem(rng, n=300, d=6, k=3)
    X[:, :2] *= 1e4
    tight = LbfgsSolver().fit(X, y, 3, [1.0], tol=1e-10, max_iter=2000)[0]

    solver = LbfgsSolver(preconditioner=preconditioner)
    fit = solver.fit(X.astype(dtype), y, 3, [1.0], tol=DEFAULT_TOL, max_iter=500)[0]

    f, grad_coef, grad_intercept = loss_and_gradient(X, y, fit.coef, fit.intercept, 1.0)
    scale = feature_scale(np.mean(X**2, axis=0))
    assert np.isfinite(fit.coef).all()
    assert fit.converged
    assert tight.converged
    assert f == pytest.approx(tight.objective, rel=GAP)
    assert scaled_gradient_max(grad_coef, grad_intercept, scale) <= 1e-3 * f


def test_lbfgs_class_absent_from_train(seed: int) -> None:
    rng = np.random.default_rng(seed)
    X, y = make_problem(rng, n=300, d=5, k=4)
    y[y == 2] = 3

    fit = LbfgsSolver().fit(X, y, 4, [1.0], tol=DEFAULT_TOL, max_iter=500)[0]

    gap, _ = relative_gap(X, y, 1.0, fit.coef, fit.intercept)
    assert abs(gap) <= GAP
    assert np.all(fit.coef[2] == 0.0)
    assert fit.intercept[2] == ABSENT_INTERCEPT
    assert np.isfinite(fit.objective)
    logits = X @ fit.coef.T + fit.intercept
    assert not np.any(logits.argmax(axis=1) == 2)


def test_lbfgs_two_of_three_classes_present(seed: int) -> None:
    rng = np.random.default_rng(seed)
    X, y = make_problem(rng, n=300, d=5, k=2)

    fit = LbfgsSolver().fit(X, y, 3, [1.0], tol=DEFAULT_TOL, max_iter=500)[0]

    gap, _ = relative_gap(X, y, 1.0, fit.coef, fit.intercept)
    assert abs(gap) <= GAP
    assert fit.intercept[2] == ABSENT_INTERCEPT


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_check_problem_rejects_non_finite(seed: int, bad: float) -> None:
    rng = np.random.default_rng(seed)
    X, y = make_problem(rng, n=50, d=4, k=3)
    X[7, 1] = bad

    with pytest.raises(SolverError, match="1 NaN or infinite values"):
        check_problem(X, y, 3)


def test_lbfgs_multi_c_equals_single_c(seed: int) -> None:
    rng = np.random.default_rng(seed)
    X, y = make_problem(rng, n=300, d=6, k=3)
    Cs = [0.01, 1.0, 100.0]

    joint = LbfgsSolver().fit(X, y, 3, Cs, tol=1e-8, max_iter=1000)
    single = [LbfgsSolver().fit(X, y, 3, [C], tol=1e-8, max_iter=1000)[0] for C in Cs]

    assert [fit.C for fit in joint] == Cs
    for together, alone in zip(joint, single, strict=True):
        assert together.objective == pytest.approx(alone.objective, rel=1e-10)
        np.testing.assert_allclose(together.coef, alone.coef, atol=1e-6)
        np.testing.assert_allclose(together.intercept, alone.intercept, atol=1e-6)
        assert together.extra["n_probes_joint"] == 3


def test_lbfgs_warm_start_needs_fewer_iterations(seed: int) -> None:
    rng = np.random.default_rng(seed)
    X, y = make_problem(rng, n=500, d=10, k=4)
    X_next = X + 0.05 * rng.standard_normal(X.shape)
    solver = LbfgsSolver()
    previous = solver.fit(X, y, 4, [1.0], tol=DEFAULT_TOL, max_iter=500)[0]

    cold = solver.fit(X_next, y, 4, [1.0], tol=DEFAULT_TOL, max_iter=500)[0]
    warm = solver.fit(
        X_next,
        y,
        4,
        [1.0],
        tol=DEFAULT_TOL,
        max_iter=500,
        warm_start=(previous.coef, previous.intercept),
    )[0]

    assert warm.n_iter < cold.n_iter
    assert warm.objective == pytest.approx(cold.objective, rel=GAP)


def test_lbfgs_warm_start_from_absent_class(seed: int) -> None:
    rng = np.random.default_rng(seed)
    X, y = make_problem(rng, n=300, d=5, k=3)
    y_missing = np.where(y == 1, 0, y)
    solver = LbfgsSolver()
    previous = solver.fit(X, y_missing, 3, [1.0], tol=DEFAULT_TOL, max_iter=500)[0]

    fit = solver.fit(
        X,
        y,
        3,
        [1.0],
        tol=DEFAULT_TOL,
        max_iter=500,
        warm_start=(previous.coef, previous.intercept),
    )[0]

    gap, _ = relative_gap(X, y, 1.0, fit.coef, fit.intercept)
    assert fit.converged
    assert abs(gap) <= GAP


def test_lbfgs_warm_start_shape_rejected(seed: int) -> None:
    rng = np.random.default_rng(seed)
    X, y = make_problem(rng, n=60, d=5, k=3)

    with pytest.raises(SolverError, match=r"warm_start has shapes \(3, 4\)"):
        LbfgsSolver().fit(
            X,
            y,
            3,
            [1.0],
            tol=DEFAULT_TOL,
            max_iter=10,
            warm_start=(np.zeros((3, 4)), np.zeros(3)),
        )


def test_lbfgs_warns_at_max_iter(seed: int) -> None:
    rng = np.random.default_rng(seed)
    X, y = make_problem(rng, n=200, d=6, k=3)

    with pytest.warns(ConvergenceWarning, match="max_iter=3 for C=1"):
        fit = LbfgsSolver().fit(X, y, 3, [1.0], tol=1e-10, max_iter=3)[0]

    assert not fit.converged
    assert fit.n_iter == 3
    assert fit.extra["stop_reason"] == "max_iter"


def test_lbfgs_rejects_unknown_preconditioner() -> None:
    with pytest.raises(SolverError, match="invalid preconditioner 'newton'"):
        LbfgsSolver(preconditioner="newton")


@pytest.mark.parametrize("preconditioner", ["covariance", "lowrank"])
def test_lbfgs_preconditioner_saves_passes(
    seed: int, preconditioner: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Strongly correlated features: a few latent factors mixed into many. The
    # low-rank model keeps 6 of the 40 directions, from 300 of the 600 rows.
    monkeypatch.setattr("probecvx.solvers.lbfgs._LOW_RANK", 6)
    monkeypatch.setattr("probecvx.solvers.lbfgs._LOW_RANK_ROWS", 300)
    rng = np.random.default_rng(seed)
    latent, y = make_problem(rng, n=600, d=4, k=3, spread=1.5)
    X = latent @ rng.standard_normal((4, 40)) + 0.1 * rng.standard_normal((600, 40))
    X = (X - X.mean(axis=0)) / X.std(axis=0)

    diagonal = LbfgsSolver(preconditioner="diagonal").fit(
        X, y, 3, [1.0], tol=DEFAULT_TOL, max_iter=2000
    )[0]
    modelled = LbfgsSolver(preconditioner=preconditioner).fit(
        X, y, 3, [1.0], tol=DEFAULT_TOL, max_iter=2000
    )[0]

    assert modelled.converged
    assert modelled.data_passes < diagonal.data_passes
    assert modelled.objective == pytest.approx(diagonal.objective, rel=GAP)


def test_top_eigenpairs_match_eigh(seed: int) -> None:
    # Five large directions over a small isotropic rest, as in activations.
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((500, 5)) @ (3 * rng.standard_normal((5, 60)))
    rows += 0.1 * rng.standard_normal((500, 60))
    exact_values, exact_vectors = np.linalg.eigh(rows.T @ rows / 500)

    def blocks() -> Iterator[np.ndarray]:
        # Uneven blocks, as a sample of rows ends in a short one.
        yield from (rows[:200], rows[200:400], rows[400:])

    values, vectors, trace = _top_eigenpairs(blocks, 500, 60, 5)

    assert trace == pytest.approx(exact_values.sum(), rel=1e-10)
    np.testing.assert_allclose(values, exact_values[::-1][:5], rtol=1e-8)
    np.testing.assert_allclose(vectors.T @ vectors, np.eye(5), atol=1e-12)
    overlap = np.abs(vectors.T @ exact_vectors[:, ::-1][:, :5])
    np.testing.assert_allclose(overlap, np.eye(5), atol=1e-6)


@pytest.mark.parametrize(
    ("n", "d", "n_classes", "expected"),
    [
        (10_000, 128, 2, "covariance"),
        (20_000, 512, 10, "lowrank"),
        (50_000, 3136, 10, "lowrank"),
        (1_000, 50_000, 2, "diagonal"),
    ],
)
def test_pick_preconditioner_by_build_cost(
    n: int, d: int, n_classes: int, expected: str
) -> None:
    assert _pick_preconditioner(n, d, n_classes, 1) == expected


def test_lbfgs_rejects_nonpositive_c(seed: int) -> None:
    rng = np.random.default_rng(seed)
    X, y = make_problem(rng, n=60, d=3, k=3)

    with pytest.raises(SolverError, match=r"positive finite number, got \[0.0\]"):
        LbfgsSolver().fit(X, y, 3, [1.0, 0.0], tol=DEFAULT_TOL, max_iter=10)


def test_lbfgs_blocks_match_one_block(seed: int) -> None:
    rng = np.random.default_rng(seed)
    X, y = make_problem(rng, n=301, d=5, k=3)

    one = LbfgsSolver().fit(X, y, 3, [1.0], tol=1e-8, max_iter=500)[0]
    many = LbfgsSolver(block_rows=64).fit(X, y, 3, [1.0], tol=1e-8, max_iter=500)[0]

    assert many.objective == pytest.approx(one.objective, rel=1e-12)
    np.testing.assert_allclose(many.coef, one.coef, atol=1e-6)


def test_lbfgs_float16_and_fortran_order(seed: int) -> None:
    rng = np.random.default_rng(seed)
    X, y = make_problem(rng, n=300, d=5, k=3)
    X16 = X.astype(np.float16)

    from_half = LbfgsSolver().fit(X16, y, 3, [1.0], tol=1e-8, max_iter=500)[0]
    from_single = LbfgsSolver().fit(
        np.asfortranarray(X16.astype(np.float32)), y, 3, [1.0], tol=1e-8, max_iter=500
    )[0]

    assert from_half.objective == pytest.approx(from_single.objective, rel=1e-9)
    np.testing.assert_allclose(from_half.coef, from_single.coef, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lbfgs_torch_matches_numpy(seed: int, dtype: type) -> None:
    rng = np.random.default_rng(seed)
    X, y = make_problem(rng, n=300, d=6, k=4, dtype=dtype)
    Cs = [0.1, 10.0]

    on_numpy = LbfgsSolver().fit(X, y, 4, Cs, tol=1e-7, max_iter=500)
    on_torch = LbfgsSolver(device="cpu").fit(X, y, 4, Cs, tol=1e-7, max_iter=500)

    # float32 GEMMs in torch and numpy round differently: f differs by ~1e-8.
    rel = 1e-7 if dtype == np.float32 else 1e-10
    for a, b in zip(on_numpy, on_torch, strict=True):
        assert b.converged
        assert b.extra["device"] == "cpu"
        assert b.objective == pytest.approx(a.objective, rel=rel)
        np.testing.assert_allclose(b.coef, a.coef, atol=1e-4)


def direct_loss_grad(
    X: np.ndarray, y: np.ndarray, coef: np.ndarray, intercept: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return the summed loss and gradients of ``m`` probes, in float64 numpy."""
    n = len(y)
    logits = np.einsum("nd,mkd->nmk", X.astype(np.float64), coef) + intercept
    shift = logits.max(axis=2, keepdims=True)
    exp = np.exp(logits - shift)
    norm = exp.sum(axis=2, keepdims=True)
    loss = np.log(norm[:, :, 0]) + shift[:, :, 0] - logits[np.arange(n), :, y]
    residual = exp / norm
    residual[np.arange(n), :, y] -= 1.0
    grad_coef = np.einsum("nmk,nd->mkd", residual, X.astype(np.float64))
    return loss.sum(axis=0), grad_coef, residual.sum(axis=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize(("m", "k"), [(1, 2), (1, 10), (3, 10), (8, 5), (2, 40)])
@pytest.mark.parametrize("block_rows", [None, 300])
def test_numpy_evaluator_paths_match_direct(
    seed: int, dtype: type, m: int, k: int, block_rows: int | None
) -> None:
    # (1, 2) to (3, 10) run the fused kernel, 8 probes of 5 classes the wide
    # GEMMs with the compiled softmax, 2 probes of 40 classes the wide GEMMs
    # with numpy's softmax. float16 always runs the wide GEMMs on float32
    # blocks. 300 rows per block leave a last block of 101 rows.
    rng = np.random.default_rng(seed)
    X, y = make_problem(rng, n=1001, d=37, k=k, dtype=dtype)
    coef = 0.3 * rng.standard_normal((m, k, 37))
    intercept = rng.standard_normal((m, k))
    Cs = np.linspace(0.5, 2.0, m)
    n = len(y)

    loss, grad_coef, grad_intercept = direct_loss_grad(X, y, coef, intercept)
    evaluator = NumpyEvaluator(X, y, k, block_rows)
    evaluator.loss_grad(coef, intercept, Cs)
    # The second call reuses the first one's buffers.
    objective, got_coef, got_intercept = evaluator.loss_grad(coef, intercept, Cs)

    penalty = (coef**2).sum(axis=(1, 2)) / (2 * Cs * n)
    rtol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(objective, loss / n + penalty, rtol=rtol)
    np.testing.assert_allclose(
        got_coef,
        grad_coef / n + coef / (Cs[:, None, None] * n),
        rtol=rtol,
        atol=rtol * 1e-2,
    )
    np.testing.assert_allclose(
        got_intercept, grad_intercept / n, rtol=rtol, atol=rtol * 1e-2
    )


def test_torch_evaluator_matches_numpy(seed: int) -> None:
    from probecvx.solvers._objective import TorchEvaluator

    rng = np.random.default_rng(seed)
    X, y = make_problem(rng, n=200, d=5, k=3)
    coef = rng.standard_normal((2, 3, 5))
    intercept = rng.standard_normal((2, 3))
    Cs = np.array([0.5, 2.0])

    expected = NumpyEvaluator(X, y, 3, block_rows=70).loss_grad(coef, intercept, Cs)
    got = TorchEvaluator(X, y, 3, "cpu", block_rows=70).loss_grad(coef, intercept, Cs)

    for a, b in zip(expected, got, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-14)


def test_lbfgs_records_validation(seed: int) -> None:
    rng = np.random.default_rng(seed)
    X, y = make_problem(rng, n=400, d=6, k=3)
    val = Validation(X[300:], y[300:])

    fits = LbfgsSolver().fit(
        X[:300], y[:300], 3, [0.1, 10.0], tol=DEFAULT_TOL, max_iter=500, validation=val
    )

    for fit in fits:
        logits = val.X @ fit.coef.T + fit.intercept
        error = np.mean(logits.argmax(axis=1) != val.y)
        assert fit.extra["val_error"] == pytest.approx(error)
        shift = logits.max(axis=1)
        log_norm = shift + np.log(np.exp(logits - shift[:, None]).sum(axis=1))
        loss = np.mean(log_norm - logits[np.arange(len(val.y)), val.y])
        assert fit.extra["val_loss"] == pytest.approx(loss, rel=1e-10)


def test_lbfgs_early_stopping_keeps_best_val_iterate(seed: int) -> None:
    # Few rows, many features and a weak penalty: the train loss keeps falling
    # long after the validation loss has turned up.
    rng = np.random.default_rng(seed)
    X, y = make_problem(rng, n=160, d=60, k=3, spread=0.3)
    val = Validation(X[80:], y[80:])
    solver = LbfgsSolver(patience=5)

    full = solver.fit(
        X[:80], y[:80], 3, [1e4], tol=1e-6, max_iter=2000, validation=val
    )[0]
    early = solver.fit(
        X[:80],
        y[:80],
        3,
        [1e4],
        tol=1e-6,
        max_iter=2000,
        validation=val,
        early_stopping=True,
    )[0]

    assert early.extra["stop_reason"] == "early_stopped"
    assert not early.converged
    assert early.n_iter < full.n_iter
    assert early.extra["val_loss"] < full.extra["val_loss"]
    assert early.objective > full.objective


def test_lbfgs_early_stopping_needs_validation(seed: int) -> None:
    rng = np.random.default_rng(seed)
    X, y = make_problem(rng, n=60, d=3, k=3)

    with pytest.raises(SolverError, match="early_stopping=True needs validation"):
        LbfgsSolver().fit(
            X, y, 3, [1.0], tol=DEFAULT_TOL, max_iter=10, early_stopping=True
        )


def test_lbfgs_is_registered() -> None:
    solver = get_solver("lbfgs")

    assert isinstance(solver, LbfgsSolver)
    assert solver.device is None


def test_choose_engine_cases() -> None:
    gib = 2**30
    on_gpu = choose_engine(gib, True, gib, 8 * gib, 4 * gib, ["lbfgs"])
    too_big_for_gpu = choose_engine(4 * gib, True, gib, 8 * gib, 4 * gib, ["lbfgs"])
    mapped_fits = choose_engine(4 * gib, False, gib, 8 * gib, None, ["lbfgs"])
    mapped_too_big = choose_engine(
        16 * gib, False, gib, 8 * gib, None, ["lbfgs", "saga"]
    )
    no_saga = choose_engine(16 * gib, False, gib, 8 * gib, None, ["lbfgs"])

    assert (on_gpu.name, on_gpu.device) == ("lbfgs", "cuda")
    assert (too_big_for_gpu.name, too_big_for_gpu.device) == ("lbfgs", None)
    assert (mapped_fits.name, mapped_fits.device) == ("lbfgs", None)
    assert mapped_too_big.name == "saga"
    assert no_saga.name == "lbfgs"
    assert "saga is not registered" in no_saga.reason


def test_auto_records_pick(seed: int) -> None:
    rng = np.random.default_rng(seed)
    X, y = make_problem(rng, n=200, d=4, k=3)

    fits = AutoSolver().fit(X, y, 3, [1.0], tol=DEFAULT_TOL, max_iter=500)

    assert fits[0].extra["picked"] == "lbfgs"
    assert fits[0].extra["picked_because"]
    assert fits[0].converged


def test_lowrank_preconditioner_on_memory_map(
    seed: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The sampled rows are read from the map, two at a time.
    small_low_rank(monkeypatch)
    monkeypatch.setattr("probecvx.solvers.lbfgs._LOW_RANK_BLOCK_BYTES", 2 * 8 * 12)
    rng = np.random.default_rng(seed)
    X, y = make_problem(rng, n=400, d=12, k=3, dtype=np.float32)
    path = tmp_path / "x.f32"
    X.tofile(path)
    mapped = np.memmap(path, dtype=np.float32, mode="r", shape=X.shape)
    solver = LbfgsSolver(preconditioner="lowrank")

    in_memory = solver.fit(X, y, 3, [1.0], tol=DEFAULT_TOL, max_iter=500)[0]
    from_map = solver.fit(mapped, y, 3, [1.0], tol=DEFAULT_TOL, max_iter=500)[0]

    assert from_map.converged
    assert from_map.n_iter == in_memory.n_iter
    np.testing.assert_allclose(from_map.coef, in_memory.coef, rtol=1e-6, atol=1e-9)
