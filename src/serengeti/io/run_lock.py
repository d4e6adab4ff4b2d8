"""One training process per run directory: an exclusive lock held for the whole run.

Two ``train.py`` processes given the same ``hydra.run.dir`` (e.g. a job restarted while the old one
still runs, both with ``ckpt_path=auto``) would interleave checkpoints and logs. :func:`lock_run_dir`
takes ``fcntl.flock`` on ``<run dir>/.serengeti.lock`` (holding the owner's pid and host) without
waiting; a second process stops with :class:`RunDirBusy` naming the holder. The kernel drops the
lock when its process dies, so a crashed run never leaves the directory locked; the file is
removed on a clean release (after which a process that had opened it re-checks that its locked
file is still the one at the path).
"""
from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

LOCK_NAME = ".serengeti.lock"


class RunDirBusy(RuntimeError):
    """Another live process holds the run directory's lock; the message names its pid."""


@contextmanager
def lock_run_dir(run_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold the lock on ``run_dir`` (made if missing) while the block runs; yields the lock file's path.

    Raises:
        RunDirBusy: another process holds it.
    """
    try:
        import fcntl
    except ImportError:  # no flock (Windows): no lock
        yield Path(run_dir) / LOCK_NAME
        return
    path = Path(run_dir) / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode("utf-8", "replace").split()
            os.close(fd)
            who = f"pid {holder[0]} on {holder[1]}" if len(holder) >= 2 else "a process that is starting"
            raise RunDirBusy(f"run directory {path.parent} is in use by another run ({who}, lock file {path}): "
                             "wait for it to end, or give this run another hydra.run.dir") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder released and removed the file between our open and flock: try again
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        yield path
    finally:
        path.unlink(missing_ok=True)  # before unlocking: a process that opened it finds it gone and retries
        os.close(fd)
