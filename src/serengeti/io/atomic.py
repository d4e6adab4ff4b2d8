"""Write a file so that readers see the old content or the new one, never a part of it.

The data goes to a temporary file beside the target, named after the writing host and process
(created with ``open``, so it gets the user's umask modes, unlike ``mkstemp``'s 0600), is flushed
and fsynced, and replaces the target by ``os.replace``. A writer killed half-way leaves its
temporary file; the next write on the same host removes those of processes that no longer exist
(other hosts' and live writers' files are left alone: ranks may share a filesystem).

A directory (an export) is swapped in by :func:`replace_dir`, so its path always holds the old
directory or the new one; :func:`input_clash` tells a writer that its target is one of its inputs.
"""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
import socket
from pathlib import Path
from typing import BinaryIO, Callable, Mapping


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(f)`` on a temporary binary file, then move it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise no_space(path) from None
        raise
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


def temp_path(target: str | os.PathLike) -> Path:
    """``.<name>.tmp-<host>-<pid>`` beside ``target``, after removing the temporary files or directories
    that writers of ``target`` on this host left when they were killed (their process is gone)."""
    target = Path(target)
    prefix = f".{target.name}.tmp-{socket.gethostname()}-"
    for stale in target.parent.glob(f"{prefix}*"):
        if not _alive(stale.name[len(prefix):]):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
    return target.with_name(f"{prefix}{os.getpid()}")


def no_space(target: str | os.PathLike) -> OSError:
    """The error for a full disk while writing ``target``: it names the directory."""
    target = Path(target)
    return OSError(errno.ENOSPC, f"no space left on {target.parent} (writing {target.name})")


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


def input_clash(target: str | os.PathLike, inputs: Mapping[str, object]) -> str | None:
    """``"key=value"`` of the first input that writing ``target`` would touch, else ``None``.

    ``inputs`` maps a setting's name to a path (other values are skipped). Writing ``target``
    touches an input that is the same file or directory (symbolic links followed), one inside
    ``target`` (replacing a directory replaces what it holds), or one ``target`` is inside.
    """
    dest = Path(target).expanduser().resolve()
    for key, value in inputs.items():
        if not isinstance(value, (str, os.PathLike)) or not str(value):
            continue
        src = Path(value).expanduser()
        if not os.path.lexists(src):
            continue
        src = src.resolve()
        if dest == src or dest in src.parents or src in dest.parents:
            return f"{key}={value}"
    return None


def replace_dir(new: str | os.PathLike, target: str | os.PathLike) -> None:
    """Put directory ``new`` at ``target`` (an existing directory) and delete the old one.

    Linux swaps the two in one step (``renameat2(RENAME_EXCHANGE)``); elsewhere the old
    directory is renamed aside first and renamed back if the new one cannot be moved in, so a
    crash leaves the old directory beside ``target`` at worst, never nothing.
    """
    new, target = Path(new), Path(target)
    if _exchange(new, target):
        shutil.rmtree(new, ignore_errors=True)  # ``new`` now names the old directory
        return
    aside = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, aside)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; ``False`` where the system or filesystem cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))
