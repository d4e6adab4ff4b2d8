"""Process settings for shared machines: OpenMP wait policy and the number of torch threads.

torch's OpenMP threads spin-wait between parallel regions by default. When another process
holds one of the cores, a spinning team waits for a descheduled thread at every region, and a
run slows several-fold. The entry scripts (train.py, evaluate.py, standalone_cifar.py) call
:func:`use_passive_omp_wait` before torch is imported (OpenMP reads the variable once) and then
:func:`set_threads` with the ``threads`` setting. This module imports nothing heavy.
"""
from __future__ import annotations

import os


def use_passive_omp_wait() -> None:
    """Let idle OpenMP threads sleep (``OMP_WAIT_POLICY=PASSIVE``) unless the user chose a policy."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's or taskset's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API (macOS, Windows)
        return os.cpu_count() or 1


def set_threads(threads: int | None, key: str = "threads") -> int:
    """``torch.set_num_threads(threads)``; ``None`` = :func:`available_cpus`. Returns the count used.

    Raises ``ValueError`` naming ``key`` unless ``threads`` is None or an integer >= 1.
    """
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"{key}={threads!r}: expected an integer >= 1 or null (= the {available_cpus()} available CPUs)")
    import torch

    n = threads or available_cpus()
    torch.set_num_threads(n)
    return n


def threads_from_config(cfg) -> int:
    """:func:`set_threads` with the composed config's ``threads``; a bad value exits with a one-line error."""
    try:
        return set_threads(cfg.get("threads"))
    except ValueError as e:
        raise SystemExit(f"config error: {e}") from None
