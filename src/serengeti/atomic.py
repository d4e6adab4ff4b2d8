"""Write a file so that readers see the old content or the new one, never a part of it.

The data goes to a temporary file beside the target, named after the writing host and process
(created with ``open``, so it gets the user's umask modes, unlike ``mkstemp``'s 0600), is flushed
and fsynced, and replaces the target by ``os.replace``. A writer killed half-way leaves its
temporary file; the next write on the same host removes those of processes that no longer exist
(other hosts' and live writers' files are left alone: ranks may share a filesystem).
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import BinaryIO, Callable


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(f)`` on a temporary binary file, then move it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.tmp-{socket.gethostname()}-"
    tmp = path.with_name(f"{prefix}{os.getpid()}")
    for stale in path.parent.glob(f"{prefix}*"):
        if not _alive(stale.name[len(prefix):]):
            stale.unlink(missing_ok=True)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write` of UTF-8 text."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
