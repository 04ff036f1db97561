"""Running probecvx on many machines: task shards, parallel backends, HDF5 locks.

- :func:`parse_shard`, :func:`shard_from_slurm` and :func:`partition` split
  the units of work into ``N`` task shards. Every task computes the same
  split from the same units, so tasks need not talk to each other.
- :func:`parallel_backend` selects the joblib backend (``loky``,
  ``threading`` or ``dask``). For Dask it connects to a scheduler or starts a
  local cluster.
- :func:`run_tasks` runs tasks on the active backend and yields each outcome
  as it arrives, including the death of a worker.
- :func:`hdf5_locking` sets the HDF5 file locking mode of the files probecvx
  writes (see ``docs/cluster.md``).
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import joblib
from joblib.parallel import get_active_backend

from probecvx.errors import InvalidInputError

if TYPE_CHECKING:
    import distributed

logger = logging.getLogger(__name__)

BACKENDS = ("loky", "threading", "dask")
HDF5_LOCKING_MODES = ("true", "false", "best-effort")
HDF5_LOCKING_ENV = "HDF5_USE_FILE_LOCKING"

_SHARD_SYNTAX = (
    "write I/N with 0 <= I < N; tasks count from 0, like SLURM's --array=0-15, "
    "so the first of 16 tasks is 0/16"
)

# The locking argument of h5py.File needs HDF5 1.10.7+ or 1.12.1+.
_HDF5_VERSION = h5py.version.hdf5_version_tuple[:3]
_LOCKING_SUPPORTED = _HDF5_VERSION >= (1, 12, 1) or (
    (1, 10, 7) <= _HDF5_VERSION < (1, 11, 0)
)
_LOCKING_ARGUMENTS: dict[str, bool | str] = {
    "true": True,
    "false": False,
    "best-effort": "best-effort",
}
_locking_mode: str | None = None


# --- Task shards ---------------------------------------------------------------------


def parse_shard(text: str) -> tuple[int, int]:
    """Parse ``I/N`` (task ``I`` of ``N``, counting from 0) into ``(I, N)``.

    Raises
    ------
    InvalidInputError
        When ``text`` is not two integers separated by ``/`` with 0 <= I < N.
    """
    index_text, slash, count_text = str(text).strip().partition("/")
    try:
        index, count = int(index_text), int(count_text)
    except ValueError:
        index, count = -1, 0
    if not slash or not 0 <= index < count:
        raise InvalidInputError(f"invalid --shard {text!r}: {_SHARD_SYNTAX}")
    return index, count


def check_shard(shard: tuple[int, int] | None) -> tuple[int, int] | None:
    """Validate a library ``shard=(I, N)`` argument; None means every unit."""
    if shard is None:
        return None
    if (
        not isinstance(shard, tuple)
        or len(shard) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in shard)
    ):
        raise InvalidInputError(
            f"invalid shard {shard!r}: give a tuple (I, N) of two integers"
        )
    index, count = shard
    if not 0 <= index < count:
        raise InvalidInputError(f"invalid shard {index}/{count}: {_SHARD_SYNTAX}")
    return shard


def shard_from_slurm(
    environ: Mapping[str, str] | None = None,
) -> tuple[int, int] | None:
    """Return ``(I, N)`` of the SLURM array task this process runs in, or None.

    ``I`` is ``(SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_STEP``
    and ``N`` is ``SLURM_ARRAY_TASK_COUNT``, so ``--array=0-15``,
    ``--array=1-16`` and ``--array=0-30:2`` all give tasks 0/16 to 15/16.

    Raises
    ------
    InvalidInputError
        For an array whose task ids are not evenly spaced, such as
        ``--array=1,5,6``: pass ``--shard`` to such tasks.
    """
    env = os.environ if environ is None else environ
    names = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT")
    if not all(env.get(name) for name in names):
        return None
    try:
        task_id = int(env["SLURM_ARRAY_TASK_ID"])
        count = int(env["SLURM_ARRAY_TASK_COUNT"])
        first = int(env.get("SLURM_ARRAY_TASK_MIN") or 0)
        step = int(env.get("SLURM_ARRAY_TASK_STEP") or 1)
    except ValueError as err:
        raise InvalidInputError(
            f"cannot read the SLURM array variables ({err}); pass --shard I/N"
        ) from err
    offset = task_id - first
    if step < 1 or offset % step or not 0 <= offset // step < count:
        raise InvalidInputError(
            f"SLURM array task {task_id} (min {first}, step {step}, count {count}) "
            "has no place in an evenly spaced array, as with --array=1,5,6; "
            f"pass --shard I/{count} to each task"
        )
    return offset // step, count


def resolve_shard(
    text: str | None, environ: Mapping[str, str] | None = None
) -> tuple[int, int] | None:
    """Return the task shard from ``--shard``, else from SLURM, else None."""
    if text is not None:
        return parse_shard(text)
    shard = shard_from_slurm(environ)
    if shard is not None:
        env = os.environ if environ is None else environ
        logger.info(
            "running task shard %d/%d, from SLURM_ARRAY_TASK_ID=%s and "
            "SLURM_ARRAY_TASK_COUNT=%s; pass --shard to override",
            shard[0],
            shard[1],
            env["SLURM_ARRAY_TASK_ID"],
            env["SLURM_ARRAY_TASK_COUNT"],
        )
    return shard


def partition(costs: Sequence[float], n_tasks: int) -> list[int]:
    """Assign items to ``n_tasks`` tasks, balancing the sum of ``costs``.

    Greedy longest-processing-time: items in decreasing cost (ties by
    position) go to the task with the lowest load so far (ties to the lowest
    task index). The largest task load is at most 4/3 of the optimum (Graham's
    bound for this rule). The result depends only on ``costs`` and
    ``n_tasks``.

    Returns
    -------
    list of int
        The task index of each item.
    """
    order = sorted(range(len(costs)), key=lambda item: (-costs[item], item))
    loads = [(0.0, task) for task in range(n_tasks)]
    assignment = [0] * len(costs)
    for item in order:
        load, task = heapq.heappop(loads)
        assignment[item] = task
        heapq.heappush(loads, (load + float(costs[item]), task))
    return assignment


def items_of_shard(costs: Sequence[float], shard: tuple[int, int] | None) -> list[int]:
    """Return the positions of the items that task ``shard`` takes, in order."""
    if shard is None:
        return list(range(len(costs)))
    index, count = shard
    assignment = partition(costs, count)
    return [item for item, task in enumerate(assignment) if task == index]


# --- Parallel backends ---------------------------------------------------------------


def check_backend(
    backend: str | None, scheduler: str | None, scheduler_file: Path | None
) -> None:
    """Reject an unknown backend, and scheduler options without ``dask``."""
    if backend is not None and backend not in BACKENDS:
        raise InvalidInputError(
            f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}"
        )
    if scheduler is not None and scheduler_file is not None:
        raise InvalidInputError(
            "give --scheduler or --scheduler-file, not both; both name the Dask "
            "scheduler to connect to"
        )
    if (scheduler is not None or scheduler_file is not None) and backend != "dask":
        raise InvalidInputError("--scheduler and --scheduler-file need --backend dask")
    if scheduler_file is not None and not Path(scheduler_file).is_file():
        raise InvalidInputError(
            f"scheduler file {scheduler_file} not found; pass the file that "
            "`dask scheduler --scheduler-file` or dask-jobqueue writes"
        )


@contextlib.contextmanager
def parallel_backend(
    backend: str | None = None,
    *,
    n_jobs: int = -1,
    scheduler: str | None = None,
    scheduler_file: Path | None = None,
) -> Iterator[None]:
    """Make ``backend`` the active joblib backend for the block.

    Parameters
    ----------
    backend : {"loky", "threading", "dask"}, optional
        None leaves the caller's ``joblib.parallel_config`` as it is.
    n_jobs : int, default=-1
        For ``dask`` without a scheduler: the number of local worker
        processes, one thread each; -1 starts one per core.
    scheduler : str, optional
        Address of a running Dask scheduler, such as ``tcp://node7:8786``.
    scheduler_file : Path, optional
        The JSON file in which a running Dask scheduler wrote its address.

    Notes
    -----
    With ``dask`` and neither ``scheduler`` nor ``scheduler_file``, a
    ``distributed.LocalCluster`` is started on 127.0.0.1 and closed at the
    end of the block. A client connected to a running scheduler is closed at
    the end too, but the scheduler and its workers are left running.
    """
    check_backend(backend, scheduler, scheduler_file)
    if backend is None:
        yield
        return
    if backend != "dask":
        with joblib.parallel_config(backend=backend):
            yield
        return

    with (
        _dask_client(n_jobs, scheduler, scheduler_file),
        joblib.parallel_config(backend="dask"),
    ):
        yield


@contextlib.contextmanager
def _dask_client(
    n_jobs: int, scheduler: str | None, scheduler_file: Path | None
) -> Iterator[distributed.Client]:
    import distributed

    if scheduler is None and scheduler_file is None:
        n_workers = joblib.cpu_count() if n_jobs < 0 else n_jobs
        logger.info("starting a local Dask cluster of %d workers", n_workers)
        with (
            distributed.LocalCluster(
                n_workers=n_workers,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
            ) as cluster,
            distributed.Client(cluster) as client,
        ):
            yield client
        return

    target = scheduler if scheduler is not None else f"file {scheduler_file}"
    try:
        if scheduler is not None:
            client = distributed.Client(scheduler, timeout="30s")
        else:
            client = distributed.Client(scheduler_file=str(scheduler_file))
    except (OSError, TimeoutError, ValueError) as err:
        raise InvalidInputError(
            f"cannot connect to the Dask scheduler at {target} ({err}); check that "
            "it is running, or leave out --scheduler and --scheduler-file to start "
            "a local cluster"
        ) from err
    logger.info("connected to the Dask scheduler at %s", target)
    with client:
        yield client


def active_dask_client() -> distributed.Client | None:
    """Return the client of the active joblib backend when it is Dask's, else None."""
    backend, _ = get_active_backend()
    if type(backend).__name__ != "DaskDistributedBackend":
        return None
    return getattr(backend, "client", None)


@dataclass(frozen=True)
class TaskOutcome:
    """What became of one task: its result, or the error of its dead worker."""

    index: int
    result: Any = None
    error: BaseException | None = None


def worker_death_errors() -> tuple[type[BaseException], ...]:
    """Return the exception classes that mean a worker process died."""
    from concurrent.futures.process import BrokenProcessPool

    from joblib.externals.loky.process_executor import TerminatedWorkerError

    errors: list[type[BaseException]] = [TerminatedWorkerError, BrokenProcessPool]
    with contextlib.suppress(ImportError):
        from distributed.scheduler import KilledWorker

        errors.append(KilledWorker)
    return tuple(errors)


def run_tasks(
    func: Callable[[Any], Any], tasks: Sequence[Any], n_jobs: int
) -> Iterator[TaskOutcome]:
    """Run ``func(task)`` for every task on the active backend, yielding as they end.

    When a worker process dies, the tasks it was running are yielded with the
    error. Under joblib's process backends a dead worker stops the whole pool,
    so every task that had not finished is yielded with the error; under Dask
    only the task whose worker died. Other exceptions raised by ``func``
    propagate.
    """
    if not tasks:
        return
    client = active_dask_client()
    if client is not None:
        yield from _run_on_dask(client, func, tasks)
    else:
        yield from _run_with_joblib(func, tasks, n_jobs)


def _indexed(func: Callable[[Any], Any], index: int, task: Any) -> tuple[int, Any]:
    return index, func(task)


def _run_with_joblib(
    func: Callable[[Any], Any], tasks: Sequence[Any], n_jobs: int
) -> Iterator[TaskOutcome]:
    try:
        parallel = joblib.Parallel(n_jobs=n_jobs, return_as="generator_unordered")
    except ValueError:
        # The backend cannot return results as they arrive (multiprocessing), so
        # they come at the end; workers still commit their output at once.
        parallel = joblib.Parallel(n_jobs=n_jobs)
    finished: set[int] = set()
    calls = (joblib.delayed(_indexed)(func, i, task) for i, task in enumerate(tasks))
    try:
        for index, result in parallel(calls):
            finished.add(index)
            yield TaskOutcome(index, result=result)
    except worker_death_errors() as err:
        logger.warning("a worker process died: %s", err)
        for index in range(len(tasks)):
            if index not in finished:
                yield TaskOutcome(index, error=err)


def _run_on_dask(
    client: distributed.Client, func: Callable[[Any], Any], tasks: Sequence[Any]
) -> Iterator[TaskOutcome]:
    # NOTE: joblib 1.6's Dask backend never returns when a worker dies: its
    # result collector skips the callback of a future in the "error" state, so
    # Parallel waits forever for a task that raised KilledWorker. Submitting
    # futures directly lets the other tasks finish and reports the dead one.
    import distributed

    futures = {
        client.submit(func, task, pure=False): index for index, task in enumerate(tasks)
    }
    try:
        for future in distributed.as_completed(futures):
            index = futures[future]
            try:
                result = future.result()
            except worker_death_errors() as err:
                logger.warning("a Dask worker died running task %d: %s", index, err)
                yield TaskOutcome(index, error=err)
            else:
                yield TaskOutcome(index, result=result)
    finally:
        client.cancel(list(futures))


# --- HDF5 file locking ---------------------------------------------------------------


def check_hdf5_locking(mode: str | None) -> str | None:
    """Validate an ``--hdf5-locking`` value; None keeps the default."""
    if mode is not None and mode not in HDF5_LOCKING_MODES:
        raise InvalidInputError(
            f"invalid HDF5 locking mode {mode!r}; choose one of "
            f"{', '.join(HDF5_LOCKING_MODES)}"
        )
    return mode


@contextlib.contextmanager
def hdf5_locking(mode: str | None, *, log: bool = True) -> Iterator[None]:
    """Set the locking mode of the HDF5 files written in this process for the block.

    ``true`` and ``best-effort`` lock files while they are written (the
    latter ignores file systems without lock support); ``false`` and the
    default, None, do not. Finished shards are never modified, so they are
    always read without a lock. The ``HDF5_USE_FILE_LOCKING`` environment
    variable, when set before the process started, takes precedence over
    both for every file. ``log=False`` leaves out the log line that says which
    setting applies, for workers that enter the block once per task.
    """
    global _locking_mode
    check_hdf5_locking(mode)
    env_value = os.environ.get(HDF5_LOCKING_ENV)
    if not log:
        pass
    elif env_value is not None and mode is not None:
        logger.warning(
            "%s=%s is set, and HDF5 applies it to every file it opens, so "
            "--hdf5-locking %s has no effect; unset the variable to use the option",
            HDF5_LOCKING_ENV,
            env_value,
            mode,
        )
    elif env_value is not None:
        logger.info(
            "HDF5 file locking follows %s=%s from the environment, for reads too",
            HDF5_LOCKING_ENV,
            env_value,
        )
    elif mode is not None:
        logger.info("HDF5 file locking for written shards: %s", mode)
    previous, _locking_mode = _locking_mode, mode
    try:
        yield
    finally:
        _locking_mode = previous


def h5py_locking_kwargs(*, writing: bool) -> dict[str, Any]:
    """Return the ``locking`` keyword for ``h5py.File``: the mode set for writes.

    Reads always pass ``locking=False``. An HDF5 library too old for the
    argument gets none, and then locks as its build decides.
    """
    if not _LOCKING_SUPPORTED:
        return {}
    if writing and _locking_mode is not None:
        return {"locking": _LOCKING_ARGUMENTS[_locking_mode]}
    return {"locking": False}


def current_hdf5_locking() -> str | None:
    """Return the mode set by the innermost :func:`hdf5_locking` block."""
    return _locking_mode


def explain_lock_error(message: str) -> str:
    """Append how to turn HDF5 file locking off when ``message`` is a lock failure."""
    if "unable to lock file" not in message.lower():
        return message
    return (
        f"{message}; HDF5 could not lock the file, as happens on NFS and Lustre "
        "mounts without lock support: pass --hdf5-locking false, or set "
        f"{HDF5_LOCKING_ENV}=FALSE in the environment of every job"
    )
