"""Atomic commits of output files: a final name only ever holds a complete file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

TEMP_PREFIX = ".probecvx-tmp-"


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; move it there if the block succeeds.

    The caller writes and closes the file at the yielded path. On success the
    file is fsynced and renamed over ``final`` with ``os.replace``, then the
    folder is fsynced so that the rename survives a crash. On any exception
    the temporary file is removed and ``final`` is left as it was.
    """
    final = Path(final)
    fd, temp_name = tempfile.mkstemp(
        prefix=f"{TEMP_PREFIX}{final.name}.", dir=final.parent
    )
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


def write_bytes_atomic(final: Path, data: bytes) -> None:
    """Write ``data`` to ``final`` through :func:`atomic_path`."""
    with atomic_path(final) as temp:
        temp.write_bytes(data)


def write_text_atomic(final: Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``final`` through :func:`atomic_path`."""
    write_bytes_atomic(final, text.encode("utf-8"))


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete temporary files that a killed run left in ``folder``; return them."""
    removed = []
    for path in Path(folder).glob(f"{TEMP_PREFIX}*"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
