"""The ``auto`` solver: picks an engine by where the problem fits in memory.

Full-batch L-BFGS (:mod:`probecvx.solvers.lbfgs`) is the fastest engine on
the probe problems that ``benchmarks/solvers.py`` measures, as long as each
pass over ``X`` is a read from memory. So ``auto`` picks, in order:

1. ``lbfgs`` on the GPU when torch finds a CUDA device and ``X`` plus the working
   buffers fit in the device's free memory;
2. ``lbfgs`` on the CPU when ``X`` is in memory: any ndarray that is not a
   memory map, or a memory map no larger than the available memory;
3. ``saga`` when it is registered, for a memory map larger than the
   available memory;
4. ``lbfgs`` otherwise, reading the memory map block by block on every pass.

The choice and its reason are stored in ``ProbeFit.extra["picked"]`` and
``extra["picked_because"]``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from probecvx.solvers._objective import default_block_rows
from probecvx.solvers.base import (
    ProbeFit,
    Solver,
    Validation,
    available_solvers,
    get_solver,
    register_solver,
)
from probecvx.solvers.lbfgs import LbfgsSolver, preconditioner_bytes

logger = logging.getLogger(__name__)

# Use at most this share of the GPU's free memory, leaving the rest to the
# CUDA context, the caching allocator and other processes.
_GPU_HEADROOM = 0.8
# Vectors of one probe's size kept by L-BFGS besides its history pairs:
# iterate, gradient, direction, trial point, best iterate and temporaries.
_LBFGS_EXTRA_VECTORS = 8


@dataclass(frozen=True)
class EngineChoice:
    """The engine ``auto`` runs: a registered solver name and a device."""

    name: str
    device: str | None
    reason: str


def choose_engine(
    data_bytes: int,
    data_in_memory: bool,
    working_bytes: int,
    host_available: int | None,
    gpu_free: int | None,
    registered: Sequence[str],
) -> EngineChoice:
    """Pick the engine for a problem from its size and the free memory.

    Parameters
    ----------
    data_bytes : int
        Bytes of the training and validation matrices.
    data_in_memory : bool
        False when the training matrix is a memory map.
    working_bytes : int
        Bytes of optimiser state and GEMM buffers that L-BFGS adds.
    host_available : int or None
        Bytes of host memory available, or None when unknown (then the data
        is taken to fit).
    gpu_free : int or None
        Free bytes on the CUDA device, or None without CUDA.
    registered : sequence of str
        Names of the registered solvers.

    Returns
    -------
    EngineChoice
    """
    if gpu_free is not None and data_bytes + working_bytes <= _GPU_HEADROOM * gpu_free:
        return EngineChoice("lbfgs", "cuda", "data fits in GPU memory")
    if data_in_memory:
        return EngineChoice("lbfgs", None, "data is in memory")
    if host_available is None or data_bytes + working_bytes <= host_available:
        return EngineChoice("lbfgs", None, "memory-mapped data fits in memory")
    if "saga" in registered:
        return EngineChoice(
            "saga", None, "memory-mapped data is larger than the available memory"
        )
    return EngineChoice(
        "lbfgs",
        None,
        "memory-mapped data is larger than the available memory and saga is "
        "not registered",
    )


def host_available_bytes() -> int | None:
    """Return MemAvailable from ``/proc/meminfo``, or None where it is missing."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def gpu_free_bytes() -> int | None:
    """Return the free memory of the current CUDA device, or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info()
    return int(free)


def lbfgs_working_bytes(
    n_samples: int,
    n_features: int,
    n_classes: int,
    n_probes: int,
    itemsize: int,
    history: int,
) -> int:
    """Estimate the bytes L-BFGS allocates besides the data matrix."""
    vector = n_classes * (n_features + 1) * 8
    state = n_probes * (2 * history + _LBFGS_EXTRA_VECTORS) * vector
    rows = default_block_rows(n_features, itemsize, on_gpu=False)
    # One block of X in the GEMM dtype, plus the block's logits of every
    # probe: the GEMM output and its float64 copy.
    block = rows * (n_features * itemsize + n_probes * n_classes * 16)
    return (
        state
        + block
        + preconditioner_bytes(n_samples, n_features, n_classes, n_probes, itemsize)
    )


class AutoSolver:
    """Run the engine :func:`choose_engine` picks for each problem."""

    name = "auto"

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
        """Fit one probe per value in ``Cs`` with the engine picked for them.

        Takes the arguments of :meth:`probecvx.solvers.Solver.fit`.
        """
        choice = self._choose(X, n_classes, len(Cs), validation)
        logger.info(
            "auto picked %s on %s: %s",
            choice.name,
            choice.device or "the CPU",
            choice.reason,
        )
        solver: Solver
        if choice.name == "lbfgs":
            solver = LbfgsSolver(device=choice.device)
        else:
            solver = get_solver(choice.name)
        fits = solver.fit(
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
        for fit in fits:
            fit.extra["picked"] = solver.name
            fit.extra["picked_because"] = choice.reason
        return fits

    def _choose(
        self,
        X: np.ndarray,
        n_classes: int,
        n_probes: int,
        validation: Validation | None,
    ) -> EngineChoice:
        data_bytes = X.nbytes + (validation.X.nbytes if validation else 0)
        itemsize = 8 if X.dtype == np.float64 else 4
        working = lbfgs_working_bytes(
            X.shape[0], X.shape[1], n_classes, n_probes, itemsize, LbfgsSolver().history
        )
        return choose_engine(
            data_bytes=data_bytes,
            data_in_memory=not isinstance(X, np.memmap),
            working_bytes=working,
            host_available=host_available_bytes(),
            gpu_free=gpu_free_bytes(),
            registered=available_solvers(),
        )


register_solver("auto", AutoSolver)
