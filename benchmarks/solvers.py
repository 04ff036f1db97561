"""Time the probe solvers against scikit-learn at the same objective gap.

For each problem the script computes a tight float64 optimum ``f*`` with
SciPy's L-BFGS-B, then times each solver to a relative objective gap
``(f - f*) / f* <= 1e-6``, with ``f`` evaluated in float64 on the same data.

A probecvx solver runs at ``DEFAULT_TOL``, as ``probecvx fit`` does; while the
gap is missed, the tolerance falls tenfold and the fit is repeated. A
scikit-learn solver runs with ``tol=0`` and a cap of ``max_iter`` epochs (or
iterations, for lbfgs): the cap doubles from 1 until a fit reaches the gap,
then bisection finds the smallest cap that does, to within 10%. So
scikit-learn is timed for the passes it needs and no more, which favours it.
The time reported is the median of ``--repeats`` runs of the fit found.

It also measures, for each probecvx solver: the cost of 8 values of ``C``
against 1, passes with a warm start against a cold one, and peak memory
against the bytes of the matrix. See ``benchmarks/README.md`` for how to run
it and the numbers recorded.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import tracemalloc
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.optimize import minimize
from sklearn.exceptions import ConvergenceWarning as SklearnConvergenceWarning
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from probecvx.errors import ConvergenceWarning
from probecvx.solvers import (
    ProbeFit,
    Solver,
    available_solvers,
    get_solver,
    objective,
)
from probecvx.solvers._objective import ABSENT_INTERCEPT, DEFAULT_TOL, loss_and_gradient
from probecvx.solvers.lbfgs import LbfgsSolver

TARGET_GAP = 1e-6
SKLEARN_METHODS = ("saga", "sag", "lbfgs")
N_CS = 8
FitFn = Callable[[float, int], tuple[float, float, int]]
MANY_CS = tuple(float(C) for C in np.logspace(-3, 2, N_CS))


@dataclass(frozen=True)
class Shape:
    """A synthetic problem: rows, features and classes."""

    n: int
    d: int
    k: int


PROBLEMS = {
    "20k-512-10": Shape(20_000, 512, 10),
    "50k-3136-10": Shape(50_000, 3136, 10),
    "10k-128-2": Shape(10_000, 128, 2),
    "20k-256-100": Shape(20_000, 256, 100),
}
QUICK_PROBLEMS = {
    "20k-512-10": Shape(2_000, 64, 10),
    "50k-3136-10": Shape(3_000, 196, 10),
    "10k-128-2": Shape(1_000, 32, 2),
    "20k-256-100": Shape(3_000, 32, 100),
}


@dataclass
class Result:
    """One solver on one problem: its first fit that reached the gap."""

    solver: str
    setting: str  # the tol or max_iter of the fit timed
    seconds: float
    gap: float
    passes: float
    n_iter: int
    reached: bool
    rerun: Callable[[], object] = field(repr=False, default=lambda: None)


@dataclass
class Extras:
    """Costs of one probecvx solver beyond the single cold fit."""

    solver: str
    many_cs_ratio: float = math.nan
    many_cs_pass_ratio: float = math.nan
    many_cs_vs_separate: float = math.nan
    warm_passes: float = math.nan
    cold_passes: float = math.nan
    peak_ratio: float = math.nan


@dataclass
class Report:
    """Everything measured on one problem."""

    name: str
    dtype: str
    shape: Shape
    read_seconds: float
    f_star: float
    results: list[Result] = field(default_factory=list)
    extras: list[Extras] = field(default_factory=list)


# --- Data ---------------------------------------------------------------------


def make_activations(
    shape: Shape, dtype: type, seed: int, drift: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Return standardised activation-like features and labels.

    Gaussian clusters in a 64-dimensional latent space, one per class, are
    mapped by a random projection and a ReLU, like a hidden layer. The noise
    makes the classes overlap, so no probe separates them. ``drift`` moves the
    projection by that fraction, as one more training step would: the next
    checkpoint's activations for a warm start.
    """
    rng = np.random.default_rng(seed)
    latent = 64
    centers = rng.standard_normal((shape.k, latent))
    y = rng.integers(0, shape.k, shape.n)
    projection = rng.standard_normal((latent, shape.d)) / math.sqrt(latent)
    bias = 0.1 * rng.standard_normal(shape.d)
    projection += drift * rng.standard_normal((latent, shape.d)) / math.sqrt(latent)

    X: np.ndarray = np.empty((shape.n, shape.d), dtype=dtype)
    block = 4096
    for start in range(0, shape.n, block):
        rows = slice(start, min(start + block, shape.n))
        z = centers[y[rows]] + 4.0 * rng.standard_normal((len(y[rows]), latent))
        X[rows] = np.maximum(z @ projection + bias, 0.0)
    standardise(X)
    return X, y.astype(np.int64)


def standardise(X: np.ndarray) -> None:
    """Centre and scale the columns of ``X`` in place, as ``probecvx fit`` does."""
    mean = X.mean(axis=0, dtype=np.float64)
    std = X.std(axis=0, dtype=np.float64)
    std[std == 0] = 1.0
    X -= mean.astype(X.dtype)
    X /= std.astype(X.dtype)


def load_shard(path: Path, site: str) -> tuple[np.ndarray, np.ndarray]:
    """Return the standardised train rows of one site of a shard, and labels."""
    from probecvx.shards import read_site, read_targets

    labels, split, _ = read_targets(path)
    train = np.flatnonzero(split == 0)
    X = read_site(path, site, rows=train).astype(np.float32)
    standardise(X)
    return X, labels[train]


# --- Reference and measurements -----------------------------------------------


def reference_objective(X64: np.ndarray, y: np.ndarray, k: int, C: float) -> float:
    """Return ``f*`` from SciPy's L-BFGS-B run to a gradient of 1e-10."""
    d = X64.shape[1]

    def fun(theta: np.ndarray) -> tuple[float, np.ndarray]:
        coef, intercept = theta[: k * d].reshape(k, d), theta[k * d :]
        f, grad_coef, grad_intercept = loss_and_gradient(X64, y, coef, intercept, C)
        return f, np.concatenate([grad_coef.ravel(), grad_intercept])

    solution = minimize(
        fun,
        np.zeros(k * (d + 1)),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": 50_000, "maxfun": 100_000, "gtol": 1e-10, "ftol": 0.0},
    )
    return float(solution.fun)


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    """Return the median wall time of ``repeats`` calls of ``run``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def relative_gap(f: float, f_star: float) -> float:
    return (f - f_star) / abs(f_star)


def sklearn_fit(
    method: str, X: np.ndarray, y: np.ndarray, k: int, C: float, max_iter: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Fit ``LogisticRegression`` and return the full multinomial (coef, b, n_iter).

    With two classes scikit-learn fits the binary model, whose optimum at
    ``2 C`` is the probe's at ``C`` once ``w`` is split as ``(-w/2, w/2)``.
    """
    present = np.unique(y)
    binary = len(present) == 2
    model = LogisticRegression(
        C=2 * C if binary else C, solver=method, tol=0.0, max_iter=max_iter
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SklearnConvergenceWarning)
        model.fit(X, y)
    coef_seen, intercept_seen = model.coef_, model.intercept_
    if binary:
        coef_seen = np.vstack([-coef_seen[0] / 2, coef_seen[0] / 2])
        intercept_seen = np.array([-intercept_seen[0] / 2, intercept_seen[0] / 2])
    coef = np.zeros((k, X.shape[1]))
    intercept = np.full(k, ABSENT_INTERCEPT)
    coef[present] = coef_seen
    intercept[present] = intercept_seen
    return coef, intercept, int(np.max(model.n_iter_))


def log_attempt(setting: str, gap: float, seconds: float, passes: float) -> None:
    print(
        f"#     {setting}: gap {gap:.2e} in {seconds:.3g} s, {passes:.0f} passes",
        file=sys.stderr,
    )


def time_to_gap_by_tol(
    name: str,
    fit_once: Callable[[float], tuple[float, float, int]],
    first_tol: float,
    budget_seconds: float,
) -> Result:
    """Lower ``tol`` tenfold until a fit reaches the gap, and return that fit.

    ``fit_once(tol)`` returns ``(gap, passes, n_iter)``.
    """
    tol = first_tol
    spent = 0.0
    while True:
        start = time.perf_counter()
        gap, passes, n_iter = fit_once(tol)
        seconds = time.perf_counter() - start
        spent += seconds
        log_attempt(f"tol={tol:.0e}", gap, seconds, passes)
        reached = gap <= TARGET_GAP
        if reached or spent > budget_seconds or tol < 1e-12:
            break
        tol /= 10
    setting = f"tol={tol:.0e}"
    return Result(
        name, setting, seconds, gap, passes, n_iter, reached, lambda: fit_once(tol)
    )


def time_to_gap_by_cap(
    name: str,
    fit_capped: Callable[[int], tuple[float, float, int]],
    budget_seconds: float,
) -> Result:
    """Find the smallest iteration cap whose fit reaches the gap; return that fit.

    ``fit_capped(max_iter)`` runs with ``tol=0`` and returns
    ``(gap, passes, n_iter)``. The cap doubles until the gap is reached, then
    bisection narrows it to within 10%. The search gives up when doubling the
    cap no longer lowers the gap, as with scikit-learn's saga on float32 data.
    """
    spent = 0.0
    tried: dict[int, tuple[float, float, int, float]] = {}

    def attempt(cap: int) -> bool:
        nonlocal spent
        start = time.perf_counter()
        gap, passes, n_iter = fit_capped(cap)
        seconds = time.perf_counter() - start
        spent += seconds
        tried[cap] = (gap, passes, n_iter, seconds)
        log_attempt(f"max_iter={cap}", gap, seconds, passes)
        return gap <= TARGET_GAP

    low, high, cap = 0, 0, 1
    while not attempt(cap):
        low = cap
        # Twice the passes and no better: rounding limits this solver. Below
        # 16 a solver may still be in a warm-up phase, such as SAG's first epoch.
        stalled = cap >= 16 and tried[cap][0] >= tried[cap // 2][0]
        if spent > budget_seconds or stalled:
            gap, passes, n_iter, seconds = tried[cap]
            setting = f"max_iter={cap}"
            return Result(
                name, setting, seconds, gap, passes, n_iter, False, lambda: None
            )
        cap *= 2
    high = cap
    while high - low > max(1, high // 10) and spent <= budget_seconds:
        middle = (low + high) // 2
        if attempt(middle):
            high = middle
        else:
            low = middle

    gap, passes, n_iter, seconds = tried[high]
    setting = f"max_iter={high}"
    return Result(
        name, setting, seconds, gap, passes, n_iter, True, lambda: fit_capped(high)
    )


def time_in_rounds(report: Report, X: np.ndarray, repeats: int) -> None:
    """Time one read of ``X`` and each fit found, round-robin; keep medians.

    Taking turns keeps the comparison fair on a shared machine whose load
    drifts over minutes. A fit that missed the gap keeps its search time.
    """
    reads: list[float] = []
    times: dict[str, list[float]] = {r.solver: [] for r in report.results}
    for _ in range(repeats):
        reads.append(median_seconds(lambda: X.sum(axis=0), 3))
        for result in report.results:
            if result.reached:
                times[result.solver].append(median_seconds(result.rerun, 1))
    report.read_seconds = statistics.median(reads)
    for result in report.results:
        if times[result.solver]:
            result.seconds = statistics.median(times[result.solver])


def make_ours(name: str, device: str | None) -> Solver:
    """Return the probecvx solver ``name``, with ``lbfgs`` on ``device`` if given."""
    if name == "lbfgs" and device is not None:
        return LbfgsSolver(device=device)
    return get_solver(name)


def ours_fit(
    name: str,
    X: np.ndarray,
    X64: np.ndarray,
    y: np.ndarray,
    k: int,
    C: float,
    f_star: float,
    device: str | None,
) -> FitFn:
    solver = make_ours(name, device)

    def fit(tol: float, max_iter: int) -> tuple[float, float, int]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            result = solver.fit(X, y, k, [C], tol=tol, max_iter=max_iter)
        coef, intercept = result[0].coef, result[0].intercept
        gap = relative_gap(objective(X64, y, coef, intercept, C), f_star)
        return gap, result[0].data_passes, result[0].n_iter

    return fit


def sklearn_fit_capped(
    method: str,
    X: np.ndarray,
    X64: np.ndarray,
    y: np.ndarray,
    k: int,
    C: float,
    f_star: float,
) -> Callable[[int], tuple[float, float, int]]:
    def fit_capped(max_iter: int) -> tuple[float, float, int]:
        coef, intercept, n_iter = sklearn_fit(method, X, y, k, C, max_iter)
        gap = relative_gap(objective(X64, y, coef, intercept, C), f_star)
        # One iteration of lbfgs or one epoch of sag(a) reads X about once.
        return gap, float(n_iter), n_iter

    return fit_capped


def measure_extras(
    name: str,
    X: np.ndarray,
    y: np.ndarray,
    k: int,
    C: float,
    seed: int,
    shape: Shape | None,
    repeats: int,
    device: str | None,
) -> Extras:
    """Measure 8 Cs against 1, warm against cold, and peak memory."""
    extras = Extras(name)
    solver = make_ours(name, device)

    def fit(
        Cs: Sequence[float],
        data: np.ndarray = X,
        warm_start: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> list[ProbeFit]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return solver.fit(
                data, y, k, Cs, tol=DEFAULT_TOL, max_iter=10_000, warm_start=warm_start
            )

    # Round-robin, as in time_in_rounds.
    ones, manys, separates = [], [], []
    for _ in range(repeats):
        ones.append(median_seconds(lambda: fit([C]), 1))
        manys.append(median_seconds(lambda: fit(MANY_CS), 1))
        start = time.perf_counter()
        for value in MANY_CS:
            fit([value])
        separates.append(time.perf_counter() - start)
    one = statistics.median(ones)
    many = statistics.median(manys)
    separate = statistics.median(separates)
    one_fit = fit([C])[0]
    many_fits = fit(MANY_CS)
    extras.many_cs_ratio = many / one
    extras.many_cs_vs_separate = many / separate
    many_passes = max(f.data_passes for f in many_fits)
    extras.many_cs_pass_ratio = (many / many_passes) / (one / one_fit.data_passes)

    if shape is not None:
        X_next, _ = make_activations(shape, X.dtype.type, seed, drift=0.05)
        cold = fit([C], X_next)[0]
        warm = fit([C], X_next, warm_start=(one_fit.coef, one_fit.intercept))[0]
        extras.cold_passes = cold.data_passes
        extras.warm_passes = warm.data_passes

    tracemalloc.start()
    fit([C])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    extras.peak_ratio = peak / X.nbytes
    return extras


# --- One problem ----------------------------------------------------------------


def run_problem(
    name: str,
    X: np.ndarray,
    y: np.ndarray,
    k: int,
    shape: Shape | None,
    args: argparse.Namespace,
) -> Report:
    X64 = X.astype(np.float64)
    print(f"# {name} {X.dtype} {X.shape} k={k}: reference...", file=sys.stderr)
    f_star = reference_objective(X64, y, k, args.C)
    report = Report(name, str(X.dtype), Shape(X.shape[0], X.shape[1], k), 0.0, f_star)

    for solver in args.ours:
        print(f"#   {solver}", file=sys.stderr)
        fit = ours_fit(solver, X, X64, y, k, args.C, f_star, args.device)

        def by_tol(tol: float, fit: FitFn = fit) -> tuple[float, float, int]:
            return fit(tol, 10_000)

        report.results.append(
            time_to_gap_by_tol(solver, by_tol, DEFAULT_TOL, args.budget)
        )

        # The same search as for scikit-learn, for a like-for-like comparison.
        def by_cap(cap: int, fit: FitFn = fit) -> tuple[float, float, int]:
            return fit(0.0, cap)

        report.results.append(
            time_to_gap_by_cap(f"{solver} (capped)", by_cap, args.budget)
        )
    for method in args.sklearn:
        print(f"#   sklearn {method}", file=sys.stderr)
        fit_capped = sklearn_fit_capped(method, X, X64, y, k, args.C, f_star)
        report.results.append(
            time_to_gap_by_cap(f"sklearn-{method}", fit_capped, args.budget)
        )

    print("#   timing the fits found, round-robin", file=sys.stderr)
    time_in_rounds(report, X, args.repeats)
    for solver in args.extras:
        print(f"#   extras of {solver}", file=sys.stderr)
        report.extras.append(
            measure_extras(
                solver, X, y, k, args.C, args.seed, shape, args.repeats, args.device
            )
        )

    # A solver that beat the reference shows that f* was not tight: report it.
    best = min(r.gap for r in report.results) if report.results else 0.0
    if best < -TARGET_GAP:
        print(f"# warning: a solver beat f* by {-best:.2g} relative", file=sys.stderr)
    return report


# --- Output ---------------------------------------------------------------------


def format_report(report: Report) -> str:
    """Return the report as Markdown tables."""
    s = report.shape
    lines = [
        f"### {report.name}, {report.dtype} (n={s.n}, d={s.d}, k={s.k})",
        "",
        f"One read of X (`X.sum(axis=0)`): {report.read_seconds * 1e3:.1f} ms; "
        f"f* = {report.f_star:.10g}",
        "",
        "| solver | setting | seconds | gap | passes | ms/pass | pass/read "
        "| x sk-saga | x sk-lbfgs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by_name = {r.solver: r for r in report.results}
    for r in report.results:
        per_pass = r.seconds / r.passes if r.passes else math.nan
        speedups = []
        for base in ("sklearn-saga", "sklearn-lbfgs"):
            other = by_name.get(base)
            if other is not None and other.reached and r.reached:
                speedups.append(f"{other.seconds / r.seconds:.1f}")
            else:
                speedups.append("-")
        mark = "" if r.reached else " (gap not reached)"
        lines.append(
            f"| {r.solver}{mark} | {r.setting} | {r.seconds:.3g} | {r.gap:.1e} "
            f"| {r.passes:.0f} | {per_pass * 1e3:.1f} "
            f"| {per_pass / report.read_seconds:.1f} | {speedups[0]} | {speedups[1]} |"
        )
    if report.extras:
        lines += [
            "",
            f"| solver | {N_CS} Cs / 1 C time | per pass | vs {N_CS} separate "
            "| warm / cold passes | peak / matrix |",
            "|---|---|---|---|---|---|",
        ]
        for e in report.extras:
            lines.append(
                f"| {e.solver} | {e.many_cs_ratio:.2f} | {e.many_cs_pass_ratio:.2f} "
                f"| {e.many_cs_vs_separate:.2f} "
                f"| {e.warm_passes:.0f} / {e.cold_passes:.0f} | {e.peak_ratio:.2f} |"
            )
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ours_default = [n for n in available_solvers() if not n.startswith("sklearn-")]
    ours_default = [n for n in ours_default if n != "auto"]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])

    # What to run.
    parser.add_argument("--quick", action="store_true", help="small shapes, seconds")
    parser.add_argument(
        "--problems",
        default=",".join(PROBLEMS),
        help=f"comma-separated problem names from {', '.join(PROBLEMS)}",
    )
    parser.add_argument("--dtypes", default="float32,float64", help="comma-separated")
    parser.add_argument(
        "--shard", type=Path, help="an HDF5 shard from probecvx extract"
    )
    parser.add_argument("--site", help="the probe site to read from --shard")
    parser.add_argument(
        "--solvers",
        default=",".join(ours_default),
        help="comma-separated probecvx solvers (default: all registered but "
        "sklearn-* and auto)",
    )
    parser.add_argument(
        "--sklearn",
        default=",".join(SKLEARN_METHODS),
        help="comma-separated scikit-learn solvers to compare with; '' for none",
    )
    parser.add_argument(
        "--extras",
        default=None,
        help="comma-separated probecvx solvers whose 8-C, warm-start and memory "
        "costs are measured (default: every one in --solvers)",
    )
    parser.add_argument("--skip-extras", action="store_true", help="measure no extras")

    # How to run it.
    parser.add_argument("--C", type=float, default=1.0, help="inverse penalty")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs, median")
    parser.add_argument(
        "--budget",
        type=float,
        default=600.0,
        help="seconds per solver and problem for the search of tol or max_iter "
        "before giving up",
    )
    parser.add_argument("--threads", type=int, default=None, help="BLAS threads")
    parser.add_argument(
        "--device",
        default=None,
        help="torch device for probecvx's lbfgs, such as cuda (default: numpy on "
        "the CPU); the other solvers run on the CPU",
    )
    parser.add_argument("--seed", type=int, default=0)

    args = parser.parse_args(argv)
    args.ours = [s for s in args.solvers.split(",") if s]
    args.sklearn = [s for s in args.sklearn.split(",") if s]
    if args.skip_extras:
        args.extras = []
    elif args.extras is None:
        args.extras = list(args.ours)
    else:
        args.extras = [s for s in args.extras.split(",") if s]
    if (args.shard is None) != (args.site is None):
        parser.error("--shard and --site go together")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    shapes = QUICK_PROBLEMS if args.quick else PROBLEMS
    with threadpool_limits(args.threads):
        if args.shard is not None:
            X, y = load_shard(args.shard, args.site)
            k = int(y.max()) + 1
            report = run_problem(f"{args.shard.name}:{args.site}", X, y, k, None, args)
            print(format_report(report))
            return 0
        for name in args.problems.split(","):
            if name not in shapes:
                print(
                    f"unknown problem {name!r}; valid: {', '.join(shapes)}",
                    file=sys.stderr,
                )
                return 2
            for dtype_name in args.dtypes.split(","):
                dtype = np.dtype(dtype_name).type
                X, y = make_activations(shapes[name], dtype, args.seed)
                report = run_problem(name, X, y, shapes[name].k, shapes[name], args)
                print(format_report(report), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
