"""Atomic commits of output files: a final name only ever holds a complete file.

A file is written under a temporary name in the folder of its final name, then
moved there with ``os.replace``. Temporary names record the host and process
that own them::

    .probecvx-tmp-<final name>.~<host>~<pid>~<random>

so that :func:`remove_stale_temp_files` deletes only the files of processes
that are gone, and never the file that another live job is writing in the same
folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from probecvx.errors import InvalidInputError

logger = logging.getLogger(__name__)

TEMP_PREFIX = ".probecvx-tmp-"

#: Seconds after its last modification when a temporary file of another host,
#: or of an unknown owner, counts as left by a killed job. A live writer
#: touches its file at least once per batch, so six hours is generous.
FOREIGN_TEMP_MAX_AGE = 6 * 3600.0

_OWNER_SEPARATOR = "~"
_UNSAFE_HOST_CHARACTERS = re.compile(r"[^A-Za-z0-9.\-]")


def host_name() -> str:
    """Return this machine's host name, reduced to characters safe in file names."""
    name = _UNSAFE_HOST_CHARACTERS.sub("_", socket.gethostname()) or "unknown-host"
    return name[:64]


def process_alive(pid: int) -> bool:
    """Return whether a process with id ``pid`` exists on this host.

    A process of another user counts as alive. A recycled pid also counts as
    alive, which is why callers combine this check with an age limit.
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class TempOwner:
    """The host and process that created a temporary file, read from its name."""

    host: str
    pid: int


def temp_owner(name: str) -> TempOwner | None:
    """Return the owner recorded in temporary file ``name``; None when it has none.

    Names written before owners were recorded (``.probecvx-tmp-<final>.<random>``)
    have none.
    """
    if not name.startswith(TEMP_PREFIX):
        return None
    parts = name[len(TEMP_PREFIX) :].rsplit(_OWNER_SEPARATOR, 3)
    if len(parts) != 4 or not parts[0].endswith("."):
        return None
    _, host, pid, _ = parts
    if not pid.isdigit() or not host:
        return None
    return TempOwner(host=host, pid=int(pid))


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; move it there if the block succeeds.

    The caller writes and closes the file at the yielded path. On success the
    file is fsynced and renamed over ``final`` with ``os.replace``, then the
    folder is fsynced so that the rename survives a crash. On any exception
    the temporary file is removed and ``final`` is left as it was.
    """
    final = Path(final)
    owner = f"{_OWNER_SEPARATOR}{host_name()}{_OWNER_SEPARATOR}{os.getpid()}"
    fd, temp_name = tempfile.mkstemp(
        prefix=f"{TEMP_PREFIX}{final.name}.{owner}{_OWNER_SEPARATOR}",
        dir=final.parent,
    )
    # mkstemp creates the file as 0600; give it the mode a plain open() would.
    os.fchmod(fd, 0o666 & ~_current_umask())
    os.close(fd)
    temp = Path(temp_name)
    try:
        yield temp
        _fsync_file(temp)
        os.replace(temp, final)
        _fsync_dir(final.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise


def prepare_out_dir(out_dir: Path, option: str = "--out") -> Path:
    """Create ``out_dir`` if missing and check that files can be created in it.

    Raises
    ------
    InvalidInputError
        When it is a file, cannot be created, or is not writable.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidInputError(
            f"output folder {out_dir} is a file; pass a folder to {option}"
        )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        # A real file creation catches read-only mounts that os.access misses.
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as err:
        raise InvalidInputError(
            f"output folder {out_dir} cannot be created or written "
            f"({err.strerror or err}); pass a folder you can write to with {option}"
        ) from err
    return out_dir


@contextlib.contextmanager
def output_folder(
    out_dir: Path, option: str = "--out", *, scratch: Sequence[str] = ()
) -> Iterator[Path]:
    """Prepare ``out_dir`` for a run; on failure remove it if the run created it.

    The folder is created and checked as by :func:`prepare_out_dir`. When the
    block raises, including on ``KeyboardInterrupt``, the folders that this
    call created are removed again if the run left no file in them. Files
    under the relative paths in ``scratch``, such as a run's plan, do not
    count as output and are removed with the folders. A folder that contains
    any other file, such as one written by another process sharing it, is kept.
    """
    out_dir = Path(out_dir)
    first_created = _first_missing_folder(out_dir)
    try:
        yield prepare_out_dir(out_dir, option)
    except BaseException:
        if first_created is not None:
            _remove_unused_folders(first_created, [out_dir / name for name in scratch])
        raise


def _first_missing_folder(path: Path) -> Path | None:
    """Return the outermost missing folder of ``path``, or None when it exists."""
    missing = None
    for folder in [path, *path.parents]:
        if folder.exists():
            break
        missing = folder
    return missing


def _remove_unused_folders(top: Path, scratch: Sequence[Path]) -> None:
    """Remove ``top`` and its subfolders unless they hold a file outside ``scratch``."""
    try:
        entries = list(top.rglob("*"))
    except OSError as err:
        logger.warning("kept output folder %s: cannot list it (%s)", top, err)
        return
    files = [entry for entry in entries if not entry.is_dir()]
    if any(entry not in scratch for entry in files):
        return
    # NOTE: a process that starts to write into the same folder between this
    # check and the removal makes a removal fail, and the folder is then kept.
    try:
        for entry in files:
            entry.unlink(missing_ok=True)
        folders = sorted(
            (entry for entry in entries if entry.is_dir()),
            key=lambda folder: len(folder.parts),
            reverse=True,
        )
        for folder in [*folders, top]:
            folder.rmdir()
    except OSError as err:
        logger.warning("kept output folder %s: %s", top, err)
        return
    logger.info("removed output folder %s: the failed run wrote nothing to it", top)


def write_bytes_atomic(final: Path, data: bytes) -> None:
    """Write ``data`` to ``final`` through :func:`atomic_path`."""
    with atomic_path(final) as temp:
        temp.write_bytes(data)


def write_text_atomic(final: Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``final`` through :func:`atomic_path`."""
    write_bytes_atomic(final, text.encode("utf-8"))


def remove_stale_temp_files(
    folder: Path, *, max_age: float = FOREIGN_TEMP_MAX_AGE
) -> list[Path]:
    """Delete the temporary files in ``folder`` that killed processes left; return them.

    A file created on this host is deleted when its process no longer exists.
    A file of another host, or one whose name records no owner, is deleted
    when it was last modified more than ``max_age`` seconds ago, because the
    process that owns it cannot be checked from here. Files of live processes
    are kept, so a job may clean a folder that another job is writing to.
    """
    removed = []
    this_host = host_name()
    now = time.time()
    for path in Path(folder).glob(f"{TEMP_PREFIX}*"):
        owner = temp_owner(path.name)
        if owner is not None and owner.host == this_host:
            stale = not process_alive(owner.pid)
        else:
            try:
                stale = now - path.stat().st_mtime > max_age
            except FileNotFoundError:
                continue
        if not stale:
            logger.debug("keeping %s: its writer may still be running", path)
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed


def _current_umask() -> int:
    """Return the process umask, read without changing it where Linux allows."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
