"""Probe solvers. Importing this package registers every built-in solver."""

from probecvx.solvers import (
    auto,  # noqa: F401  (registers auto)
    lbfgs,  # noqa: F401  (registers lbfgs)
    reference,  # noqa: F401  (registers sklearn-*)
    saga,  # noqa: F401  (registers saga and sag)
)
from probecvx.solvers.base import (
    EARLY_STOPPED,
    ProbeFit,
    Solver,
    Validation,
    available_solvers,
    check_problem,
    get_solver,
    objective,
    register_solver,
    softmax_cross_entropy,
)

__all__ = [
    "EARLY_STOPPED",
    "ProbeFit",
    "Solver",
    "Validation",
    "available_solvers",
    "check_problem",
    "get_solver",
    "objective",
    "register_solver",
    "softmax_cross_entropy",
]
