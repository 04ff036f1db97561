"""Every registered solver against scikit-learn and a plain Newton's method.

A probe is the optimum of a strictly convex problem (up to a common shift of
the intercepts), so every solver must return the same coefficients. The slow
reference here is Newton's method with the exact Hessian, written from the
definition of the objective in float64; it converges to machine precision on
these tiny problems. scikit-learn's ``LogisticRegression`` is checked against
it too, so both references vouch for each other.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from probecvx.solvers import ProbeFit, Solver, available_solvers, get_solver, objective
from probecvx.solvers.lbfgs import LbfgsSolver

GAP = 1e-6
# Tight enough for a gap far below GAP, loose enough for float32 data, where
# scikit-learn's sag and saga cannot meet 1e-8 on their change in weights.
TOL = 1e-6


def make_problem(
    seed: int, n: int, d: int, k: int, dtype: type
) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping Gaussian clusters, standardised, with every class present."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, d))
    y = np.arange(n) % k
    rng.shuffle(y)
    X = centers[y] + rng.standard_normal((n, d))
    X = (X - X.mean(axis=0)) / X.std(axis=0)
    return X.astype(dtype), y.astype(np.int64)


def newton_optimum(
    X: np.ndarray, y: np.ndarray, n_classes: int, C: float
) -> tuple[np.ndarray, np.ndarray, float]:
    """Minimise the probe objective by damped Newton steps with the exact Hessian.

    Classes absent from ``y`` are left out: the objective reaches its infimum
    as their intercepts go to minus infinity, so their rows are returned as
    zero weights and an intercept of -inf. Intercepts of the classes present
    are centred to mean zero.
    """
    X = X.astype(np.float64)
    present = np.unique(y)
    k = len(present)
    local = np.searchsorted(present, y)
    n, d = X.shape
    Xb = np.hstack([X, np.ones((n, 1))])  # the intercept as a last feature
    onehot = np.eye(k)[local]
    penalty = np.zeros((k, d + 1))
    penalty[:, :d] = 1.0 / (C * n)

    def value(theta: np.ndarray) -> float:
        logits = Xb @ theta.T
        shift = logits.max(axis=1, keepdims=True)
        log_norm = shift[:, 0] + np.log(np.exp(logits - shift).sum(axis=1))
        loss = np.mean(log_norm - logits[np.arange(n), local])
        return float(loss + 0.5 * np.sum(penalty * theta**2))

    theta = np.zeros((k, d + 1))
    for _ in range(100):
        logits = Xb @ theta.T
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        grad = (p - onehot).T @ Xb / n + penalty * theta
        if np.abs(grad).max() < 1e-13:
            break
        curvature = np.einsum("ia,ab->iab", p, np.eye(k)) - np.einsum(
            "ia,ib->iab", p, p
        )
        hessian = np.einsum("iab,ij,il->ajbl", curvature, Xb, Xb) / n
        hessian = hessian.reshape(k * (d + 1), k * (d + 1))
        hessian += np.diag(penalty.ravel())
        # The Hessian is singular along a common shift of the intercepts; the
        # pseudo-inverse steps orthogonally to it.
        step = -(np.linalg.pinv(hessian) @ grad.ravel()).reshape(k, d + 1)
        f0, t = value(theta), 1.0
        while value(theta + t * step) > f0 + 1e-4 * t * float(np.sum(grad * step)):
            t /= 2
            if t < 1e-10:
                break
        theta = theta + t * step

    coef = np.zeros((n_classes, d))
    intercept = np.full(n_classes, -np.inf)
    coef[present] = theta[:, :d]
    intercept[present] = theta[:, d] - theta[:, d].mean()
    return coef, intercept, value(theta)


def sklearn_optimum(
    X: np.ndarray, y: np.ndarray, n_classes: int, C: float
) -> tuple[np.ndarray, np.ndarray]:
    """Return scikit-learn's tight fit as multinomial coefficients.

    For two classes scikit-learn fits the binary model; its optimum at ``2 C``
    is the probe's at ``C`` once ``w`` is split as ``(-w/2, w/2)``.
    """
    present = np.unique(y)
    binary = len(present) == 2
    model = LogisticRegression(C=2 * C if binary else C, tol=1e-10, max_iter=10000)
    model.fit(X.astype(np.float64), y)
    coef_seen, intercept_seen = model.coef_, model.intercept_
    if binary:
        coef_seen = np.vstack([-coef_seen[0] / 2, coef_seen[0] / 2])
        intercept_seen = np.array([-intercept_seen[0] / 2, intercept_seen[0] / 2])
    coef = np.zeros((n_classes, X.shape[1]))
    intercept = np.full(n_classes, -np.inf)
    coef[present] = coef_seen
    intercept[present] = intercept_seen - intercept_seen.mean()
    return coef, intercept


def solver_params() -> list[object]:
    """Every registered solver, plus lbfgs's torch path and low-rank preconditioner.

    The torch path runs on CPU, and on CUDA where a device is present.
    """
    params: list[object] = [pytest.param(name, id=name) for name in available_solvers()]
    params.append(pytest.param("lbfgs@cpu-torch", id="lbfgs@cpu-torch"))
    params.append(pytest.param("lbfgs-lowrank", id="lbfgs-lowrank"))
    params.append(pytest.param("lbfgs-lowrank@cpu-torch", id="lbfgs-lowrank@cpu-torch"))
    for name in ("lbfgs@cuda", "lbfgs-lowrank@cuda"):
        params.append(
            pytest.param(
                name,
                id=name,
                marks=pytest.mark.skipif(
                    not torch.cuda.is_available(), reason="needs a CUDA device"
                ),
            )
        )
    return params


def make_solver(name: str) -> Solver:
    """Return the solver of a :func:`solver_params` name."""
    if name.startswith("lbfgs") and name != "lbfgs":
        method, _, device = name.partition("@")
        preconditioner = "lowrank" if method == "lbfgs-lowrank" else "auto"
        return LbfgsSolver(
            device=device.removesuffix("-torch") or None, preconditioner=preconditioner
        )
    return get_solver(name)


def centred(intercept: np.ndarray) -> np.ndarray:
    """Centre the finite intercepts (the classes present) to mean zero."""
    out = intercept.copy()
    finite = intercept > -100
    out[finite] -= intercept[finite].mean()
    return out


def check_against_newton(
    fit: ProbeFit, X: np.ndarray, y: np.ndarray, n_classes: int, C: float
) -> None:
    coef, intercept, best = newton_optimum(X, y, n_classes, C)
    X64 = X.astype(np.float64)
    recomputed = objective(X64, y, fit.coef, fit.intercept, C)
    present = np.unique(y)
    scale = np.abs(coef).max()

    assert fit.C == C
    assert fit.converged
    assert fit.coef.shape == (n_classes, X.shape[1])
    assert fit.intercept.shape == (n_classes,)
    assert (recomputed - best) / best <= GAP
    assert recomputed >= best * (1 - 1e-12)
    assert fit.objective == pytest.approx(recomputed, rel=1e-6)
    np.testing.assert_allclose(fit.coef, coef, atol=3e-3 * scale)
    np.testing.assert_allclose(
        centred(fit.intercept)[present], intercept[present], atol=3e-3 * scale
    )


@pytest.mark.parametrize("name", solver_params())
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_solver_matches_newton(name: str, dtype: type) -> None:
    X, y = make_problem(seed=1, n=240, d=5, k=3, dtype=dtype)
    Cs = [0.1, 10.0]

    fits = make_solver(name).fit(X, y, 3, Cs, tol=TOL, max_iter=10000)

    assert [fit.C for fit in fits] == Cs
    for fit, C in zip(fits, Cs, strict=True):
        check_against_newton(fit, X, y, 3, C)


@pytest.mark.parametrize("name", solver_params())
def test_solver_class_absent_from_train(name: str) -> None:
    X, y = make_problem(seed=2, n=240, d=4, k=4, dtype=np.float64)
    y[y == 1] = 0

    fit = make_solver(name).fit(X, y, 4, [1.0], tol=TOL, max_iter=10000)[0]

    check_against_newton(fit, X, y, 4, 1.0)
    assert np.all(fit.coef[1] == 0.0)
    assert fit.intercept[1] <= -100
    assert not np.any((X @ fit.coef.T + fit.intercept).argmax(axis=1) == 1)


@pytest.mark.parametrize("name", solver_params())
def test_solver_two_classes(name: str) -> None:
    X, y = make_problem(seed=3, n=200, d=4, k=2, dtype=np.float64)

    fit = make_solver(name).fit(X, y, 2, [1.0], tol=TOL, max_iter=10000)[0]

    check_against_newton(fit, X, y, 2, 1.0)


@pytest.mark.parametrize("name", solver_params())
def test_solver_warm_start_at_optimum(name: str) -> None:
    X, y = make_problem(seed=4, n=240, d=5, k=3, dtype=np.float64)
    coef, intercept, _ = newton_optimum(X, y, 3, 1.0)

    fit = make_solver(name).fit(
        X, y, 3, [1.0], tol=TOL, max_iter=10000, warm_start=(coef, intercept)
    )[0]

    check_against_newton(fit, X, y, 3, 1.0)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_references_agree(n_classes: int) -> None:
    X, y = make_problem(seed=5, n=240, d=5, k=n_classes, dtype=np.float64)

    newton_coef, newton_intercept, best = newton_optimum(X, y, n_classes, 1.0)
    sk_coef, sk_intercept = sklearn_optimum(X, y, n_classes, 1.0)

    assert objective(X, y, sk_coef, sk_intercept, 1.0) == pytest.approx(best, rel=1e-10)
    np.testing.assert_allclose(sk_coef, newton_coef, atol=1e-5)
    np.testing.assert_allclose(sk_intercept, newton_intercept, atol=1e-5)
