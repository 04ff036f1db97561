"""Exclusive claims on units of work, for jobs that share one output folder.

Before a process works on a unit (a checkpoint to extract, a probe to fit), it
creates the unit's claim file, a small JSON record of the host, process id,
task and run that hold it. The file is written under a temporary name and
then hard-linked to the claim name: ``os.link`` fails when the name exists,
so at most one process holds a claim, including on NFS, where ``O_EXCL`` has
not always been atomic. The holder touches its claim files every quarter of
the claim timeout (a heartbeat) and deletes them when the unit is committed.

A claim is *stale*, and any process may break it, when its process is gone
(checked for claims of this host) or when its heartbeat is older than the
timeout (the only check possible for another host). Breaking renames the
file away and checks that the renamed file is the stale one, so two processes
that break the same claim at once cannot delete a fresh claim.

Claims only avoid duplicate work: outputs are committed atomically and
idempotently, so a unit done twice by mistake is still correct.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from probecvx.atomic import TEMP_PREFIX, host_name, process_alive
from probecvx.errors import InvalidInputError, ProbecvxError

logger = logging.getLogger(__name__)

CLAIM_SUFFIX = ".claim"

#: Seconds without a heartbeat after which a claim of another host is stale.
DEFAULT_CLAIM_TIMEOUT = 600.0

#: Seconds that :func:`exclusive` waits for a lock before giving up.
LOCK_WAIT = 300.0


def utc_now() -> str:
    """Return the current UTC time in ISO 8601, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def slurm_task_label(environ: dict[str, str] | None = None) -> str | None:
    """Return ``JOBID_TASKID`` of a SLURM array task, ``JOBID`` of a job, or None."""
    env = os.environ if environ is None else environ
    job = env.get("SLURM_ARRAY_JOB_ID")
    task = env.get("SLURM_ARRAY_TASK_ID")
    if job and task:
        return f"{job}_{task}"
    return env.get("SLURM_JOB_ID") or None


@dataclass(frozen=True)
class Owner:
    """Who does a piece of work: host, process, batch task and run.

    ``run`` is one id per ``extract`` or ``fit`` call, shared by the workers
    it starts. ``task`` is a label such as a SLURM job and array task id.
    """

    host: str
    pid: int
    task: str | None
    run: str

    @classmethod
    def new_run(cls, task: str | None) -> Owner:
        """Return the owner of a new run in this process."""
        return cls(host_name(), os.getpid(), task, uuid.uuid4().hex[:12])

    def here(self) -> Owner:
        """Return this owner with the host and pid of the calling process.

        Workers call it so that their claims name the process that holds them.
        """
        return replace(self, host=host_name(), pid=os.getpid())

    def record(self) -> dict[str, Any]:
        """Return the provenance record: host, pid, task, run."""
        return {"host": self.host, "pid": self.pid, "task": self.task, "run": self.run}

    def label(self) -> str:
        """Return ``host:pid``, with the task when there is one, for messages."""
        text = f"{self.host}:{self.pid}"
        return text if self.task is None else f"{text} (task {self.task})"


@dataclass(frozen=True)
class ClaimRecord:
    """The content of a claim file, and its age since the last heartbeat."""

    path: Path
    owner: Owner
    started: str
    token: str
    age: float
    inode: int

    def stale_reason(self, timeout: float, run: str | None = None) -> str | None:
        """Return why this claim is stale, or None while its holder may be alive.

        A claim of run ``run`` held by another process is stale too: a run
        hands each unit to one worker at a time, so such a claim was left by
        an earlier attempt whose worker died.
        """
        owner = self.owner
        if (
            run is not None
            and owner.run == run
            and (owner.host, owner.pid)
            != (
                host_name(),
                os.getpid(),
            )
        ):
            return f"it was left by {owner.label()}, an earlier worker of this run"
        if owner.host == host_name() and not process_alive(owner.pid):
            return f"process {owner.pid} on {owner.host} no longer exists"
        if self.age > timeout:
            return (
                f"its heartbeat is {self.age:.0f} s old, over the claim timeout "
                f"of {timeout:g} s"
            )
        return None

    def describe(self) -> str:
        """Return ``host:pid (task T) since TIME`` for messages and status."""
        return f"{self.owner.label()} since {self.started}"


def claim_path(target: Path) -> Path:
    """Return the claim file of the unit whose output is ``target``."""
    return target.with_name(f"{target.name}{CLAIM_SUFFIX}")


def read_claim(path: Path) -> ClaimRecord | None:
    """Return the claim at ``path``, or None when there is none.

    A file that is not a valid claim (written by hand, say) is returned with
    an unknown owner, pid 0, so that it counts as stale after the timeout.
    """
    try:
        stat = path.stat()
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    age = max(0.0, time.time() - stat.st_mtime)
    try:
        doc = json.loads(text)
        owner = Owner(
            host=str(doc["host"]),
            pid=int(doc["pid"]),
            task=None if doc.get("task") is None else str(doc["task"]),
            run=str(doc.get("run", "")),
        )
        started, token = str(doc["started"]), str(doc["token"])
    except (ValueError, KeyError, TypeError):
        owner = Owner(host="unknown", pid=0, task=None, run="")
        started, token = "unknown", ""
    return ClaimRecord(path, owner, started, token, age, stat.st_ino)


class Claim:
    """A claim held by this process; :meth:`release` deletes it."""

    def __init__(self, path: Path, token: str, timeout: float) -> None:
        self.path = path
        self.token = token
        _HEARTBEAT.add(self, timeout)

    def release(self) -> None:
        """Stop the heartbeat and delete the claim file if it is still this one."""
        _HEARTBEAT.discard(self)
        record = read_claim(self.path)
        if record is None or record.token != self.token:
            logger.warning(
                "claim %s was broken by another process while this one held it; "
                "raise the claim timeout if units take longer than it",
                self.path,
            )
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def try_claim(path: Path, owner: Owner, *, timeout: float) -> Claim | ClaimRecord:
    """Take the claim at ``path`` for ``owner``, breaking a stale one.

    Returns
    -------
    Claim or ClaimRecord
        The claim, now held by this process, or the record of the live
        process that holds it.
    """
    owner = owner.here()
    token = uuid.uuid4().hex
    doc = {**owner.record(), "started": utc_now(), "token": token}
    for _ in range(5):
        if _link_new(path, json.dumps(doc) + "\n"):
            return Claim(path, token, timeout)
        record = read_claim(path)
        if record is None:
            continue  # released between the link and the read
        reason = record.stale_reason(timeout, owner.run)
        if reason is None:
            return record
        if break_claim(record):
            logger.info(
                "broke the stale claim %s of %s: %s", path, record.describe(), reason
            )
    record = read_claim(path)
    if record is None:
        raise ProbecvxError(
            f"could not claim {path}: other processes kept creating and removing "
            "it; re-run, the unit will be picked up then"
        )
    return record


@contextlib.contextmanager
def exclusive(
    path: Path, owner: Owner, *, timeout: float, wait: float = LOCK_WAIT
) -> Iterator[None]:
    """Hold the claim at ``path`` for the block, waiting up to ``wait`` seconds.

    Used as a lock around short read-modify-write steps, such as updating
    ``index.json``.

    Raises
    ------
    ProbecvxError
        When another live process holds the lock for more than ``wait`` seconds.
    """
    deadline = time.monotonic() + wait
    delay = 0.01
    while True:
        result = try_claim(path, owner, timeout=timeout)
        if isinstance(result, Claim):
            break
        if time.monotonic() > deadline:
            raise ProbecvxError(
                f"timed out after {wait:g} s waiting for the lock {path}, held by "
                f"{result.describe()}; if that process is gone, delete the file"
            )
        time.sleep(delay)
        delay = min(0.5, delay * 2)
    try:
        yield
    finally:
        result.release()


def remove_stale_claims(folder: Path, pattern: str, *, timeout: float) -> list[Path]:
    """Break the stale claims in ``folder`` whose names match ``pattern``.

    A process killed after committing a unit but before releasing its claim
    leaves a claim that no later run would touch, because the unit is done.
    Returns the claims removed.
    """
    removed = []
    for path in Path(folder).glob(pattern):
        record = read_claim(path)
        if record is None:
            continue
        reason = record.stale_reason(timeout)
        if reason is not None and break_claim(record):
            logger.info("removed the stale claim %s: %s", path, reason)
            removed.append(path)
    return removed


def check_claim_timeout(timeout: float) -> float:
    """Return ``timeout`` as a float, or raise InvalidInputError if not positive."""
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise InvalidInputError(
            f"invalid claim timeout {timeout!r}: give a number of seconds"
        )
    if not timeout > 0:
        raise InvalidInputError(
            f"invalid claim timeout {timeout!r}: give a positive number of seconds"
        )
    return float(timeout)


def _link_new(path: Path, text: str) -> bool:
    """Create ``path`` holding ``text`` unless it exists; return whether it did."""
    temp = path.with_name(
        f"{TEMP_PREFIX}{path.name}.~{host_name()}~{os.getpid()}~{uuid.uuid4().hex}"
    )
    temp.write_text(text, encoding="utf-8")
    try:
        os.link(temp, path)
    except FileExistsError:
        return False
    finally:
        temp.unlink()
    return True


def break_claim(record: ClaimRecord) -> bool:
    """Remove the stale claim ``record``; return whether this call removed it."""
    path = record.path
    aside = path.with_name(
        f"{TEMP_PREFIX}{path.name}.~{host_name()}~{os.getpid()}~{uuid.uuid4().hex}"
    )
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return False
    if aside.stat().st_ino == record.inode:
        aside.unlink()
        return True

    # Another process broke the stale claim first and took a fresh one, which
    # was moved aside here; put it back unless a third claim appeared.
    with contextlib.suppress(FileExistsError):
        os.link(aside, path)
    aside.unlink()
    return False


class _Heartbeat:
    """A daemon thread that touches the claim files this process holds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._claims: dict[Path, float] = {}
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()

    def add(self, claim: Claim, timeout: float) -> None:
        with self._lock:
            self._claims[claim.path] = timeout
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="probecvx-claim-heartbeat", daemon=True
                )
                self._thread.start()
        self._wake.set()

    def discard(self, claim: Claim) -> None:
        with self._lock:
            self._claims.pop(claim.path, None)

    def _run(self) -> None:
        while True:
            with self._lock:
                timeouts = list(self._claims.values())
            interval = max(0.2, min(timeouts, default=60.0) / 4)
            self._wake.wait(interval)
            self._wake.clear()
            with self._lock:
                paths = list(self._claims)
            for path in paths:
                try:
                    os.utime(path)
                except FileNotFoundError:
                    logger.warning("claim %s disappeared while held", path)
                    with self._lock:
                        self._claims.pop(path, None)
                except OSError as err:
                    logger.warning("cannot refresh claim %s: %s", path, err)


_HEARTBEAT = _Heartbeat()
