"""Compare the preconditioners of probecvx's L-BFGS on one probe problem.

For each preconditioner the script fits one probe at the default tolerance
and prints the passes over the data, the median wall time and the objective.
The problem is a synthetic one of ``benchmarks/solvers.py`` or the train
rows of one site of a shard, with constant columns dropped, as ``probecvx
fit`` drops them. See ``benchmarks/README.md`` for the numbers recorded.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from probecvx.errors import ConvergenceWarning
from probecvx.solvers._objective import DEFAULT_TOL
from probecvx.solvers.lbfgs import LbfgsSolver, _pick_preconditioner

sys.path.insert(0, str(Path(__file__).resolve().parent))
from solvers import PROBLEMS, load_shard, make_activations

PRECONDITIONERS = ("covariance", "lowrank", "diagonal")


def load_problem(args: argparse.Namespace) -> tuple[str, np.ndarray, np.ndarray]:
    """Return a label for the problem, its standardised features and labels."""
    if args.shard is not None:
        X, y = load_shard(args.shard, args.site)
        varying = X.std(axis=0) > 0
        X = np.ascontiguousarray(X[:, varying])
        return f"{args.shard.name} {args.site}", X, y
    shape = PROBLEMS[args.problem]
    X, y = make_activations(shape, np.dtype(args.dtype).type, seed=args.seed)
    return f"{args.problem} {args.dtype}", X, y


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--problem",
        default="20k-512-10",
        help=f"a synthetic problem from {', '.join(PROBLEMS)}",
    )
    parser.add_argument("--dtype", default="float32", help="float32 or float64")
    parser.add_argument(
        "--shard", type=Path, help="an HDF5 shard from probecvx extract"
    )
    parser.add_argument("--site", help="the probe site to read from --shard")
    parser.add_argument(
        "--preconditioners",
        default=",".join(PRECONDITIONERS),
        help="comma-separated, from " + ", ".join(PRECONDITIONERS),
    )
    parser.add_argument("--C", type=float, default=1.0, help="inverse penalty")
    parser.add_argument("--max-iter", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs, median")
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if (args.shard is None) != (args.site is None):
        parser.error("--shard and --site go together")
    args.preconditioners = [p for p in args.preconditioners.split(",") if p]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    label, X, y = load_problem(args)
    n_classes = int(y.max()) + 1
    n, d = X.shape
    picked = _pick_preconditioner(n, d, n_classes, 1)
    print(f"# {label}: n={n}, d={d}, k={n_classes}, C={args.C:g}; auto picks {picked}")
    print("| preconditioner | seconds | passes | objective | stop |")
    print("|---|---|---|---|---|")
    with threadpool_limits(args.threads), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for name in args.preconditioners:
            solver = LbfgsSolver(preconditioner=name)
            seconds = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                fit = solver.fit(
                    X, y, n_classes, [args.C], tol=DEFAULT_TOL, max_iter=args.max_iter
                )[0]
                seconds.append(time.perf_counter() - start)
            print(
                f"| {name} | {statistics.median(seconds):.3g} | "
                f"{fit.data_passes:.0f} | {fit.objective:.10g} | "
                f"{fit.extra['stop_reason']} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
