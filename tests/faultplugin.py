"""Test-only solver plugins: one kills its worker, one waits, one is slow.

``probecvx fit --plugin tests.faultplugin --solver exit-on-marker`` imports
this module in the main process and in every worker. Both solvers fit like
``lbfgs``, except that:

- ``exit-on-marker``: a site with :data:`MARKER_FEATURES` features makes the
  process exit at once with ``os._exit``, as a worker killed for memory would;
- ``gated``: the first fit of a process waits until the file named by the
  environment variable :data:`GATE_ENV` exists, and every fit sleeps
  :data:`GATED_SLEEP` seconds, so that two processes are sure to overlap;
- ``slow``: every fit sleeps :data:`SLOW_SLEEP` seconds, so that a run killed
  a short time after its first probe cannot have finished them all, however
  fast the machine is.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from probecvx.solvers import ProbeFit, Validation, get_solver, register_solver

#: Sites of this many features kill the worker that fits them.
MARKER_FEATURES = 7
EXIT_CODE = 86

#: The environment variable that names the gate file of the ``gated`` solver.
GATE_ENV = "PROBECVX_TEST_GATE"
GATED_SLEEP = 0.05
GATE_TIMEOUT = 60.0

#: Seconds each fit of the ``slow`` solver sleeps.
SLOW_SLEEP = 0.3


class _LbfgsWrapper:
    """Delegates fit to ``lbfgs`` after :meth:`before_fit`."""

    name = "lbfgs-wrapper"

    def __init__(self) -> None:
        self._inner = get_solver("lbfgs")

    def before_fit(self, X: np.ndarray) -> None:
        """Run before each fit."""

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
        self.before_fit(X)
        return self._inner.fit(
            X,
            y,
            n_classes,
            Cs,
            tol=tol,
            max_iter=max_iter,
            warm_start=warm_start,
            validation=validation,
            early_stopping=early_stopping,
        )


class ExitOnMarkerSolver(_LbfgsWrapper):
    """``lbfgs``, but ``os._exit`` on a site of :data:`MARKER_FEATURES` features."""

    name = "exit-on-marker"

    def before_fit(self, X: np.ndarray) -> None:
        if X.shape[1] == MARKER_FEATURES:
            os._exit(EXIT_CODE)


_gate_passed = False


class GatedSolver(_LbfgsWrapper):
    """``lbfgs`` that waits for the gate file once per process, then sleeps."""

    name = "gated"

    def before_fit(self, X: np.ndarray) -> None:
        global _gate_passed
        gate = os.environ.get(GATE_ENV)
        deadline = time.monotonic() + GATE_TIMEOUT
        while gate and not _gate_passed and not Path(gate).exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"gate file {gate} did not appear")
            time.sleep(0.02)
        _gate_passed = True
        time.sleep(GATED_SLEEP)


class SlowSolver(_LbfgsWrapper):
    """``lbfgs`` that sleeps :data:`SLOW_SLEEP` seconds before each fit."""

    name = "slow"

    def before_fit(self, X: np.ndarray) -> None:
        time.sleep(SLOW_SLEEP)


register_solver("exit-on-marker", ExitOnMarkerSolver)
register_solver("gated", GatedSolver)
register_solver("slow", SlowSolver)
