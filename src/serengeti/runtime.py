"""Process settings for shared machines: OpenMP wait policy and the number of torch threads.

torch's OpenMP threads spin-wait between parallel regions by default. When another process
holds one of the cores, a spinning team waits for a descheduled thread at every region, and a
run slows several-fold. The entry scripts (train.py, evaluate.py, standalone_cifar.py) call
:func:`use_passive_omp_wait` before torch is imported (OpenMP reads the variable once) and then
:func:`set_threads` with the ``threads`` setting. This module imports nothing heavy.
"""
from __future__ import annotations

import os
from typing import Callable


def use_passive_omp_wait() -> None:
    """Let idle OpenMP threads sleep (``OMP_WAIT_POLICY=PASSIVE``) unless the user chose a policy."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's or taskset's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API (macOS, Windows)
        return os.cpu_count() or 1


def _omp_num_threads() -> int | None:
    """``OMP_NUM_THREADS`` as a positive integer, if the environment sets one."""
    try:
        n = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        return None
    return n if n >= 1 else None


#: Multiply-adds of one d_model × d_model projection over a step's tokens (tokens × d_model²) per
#: intra-op thread: a second thread pays for its synchronisation from twice this (measured with
#: benchmarks/threads.py on 2 cores: 1 thread faster at d_model 64 × 2,048 tokens (8.4M) and
#: 128 × 768 (12.6M), 2 threads faster at 768 × 256 (151M) and 768 × 2,048 (1.2G)).
WORK_PER_THREAD = 32_000_000


def auto_threads(work: int | None, cpus: int | None = None) -> int:
    """Intra-op threads for a step of ``work`` = tokens × d_model² multiply-adds (:func:`step_work`):
    one per :data:`WORK_PER_THREAD`, at least 1, at most ``cpus`` (default :func:`available_cpus`).
    ``None`` (work unknown) = all CPUs.

    Small models spend a step in many small ops, where every parallel region costs a barrier and
    a second thread only adds waiting (the default run: d_model 64, 2,048 tokens per step).
    """
    cpus = cpus or available_cpus()
    if work is None:
        return cpus
    return max(1, min(cpus, work // WORK_PER_THREAD))


def step_work(cfg) -> int | None:
    """``dataset.batch_size × dataset.seq_len × model.d_model²`` of a composed config (the multiply-adds
    of one width-square projection over a step's tokens); None when a key is missing."""
    try:
        d = int(cfg.model.d_model)
        return int(cfg.dataset.batch_size) * int(cfg.dataset.seq_len) * d * d
    except (AttributeError, KeyError, TypeError, ValueError):  # no model/dataset section, or a null value
        return None


def set_threads(threads: int | None, key: str = "threads", work: int | None = None) -> int:
    """``torch.set_num_threads(threads)``; ``None`` = ``OMP_NUM_THREADS`` when the user set it, else
    :func:`auto_threads` of ``work`` (all CPUs when the work is unknown). Returns the count used.

    Raises ``ValueError`` naming ``key`` unless ``threads`` is None or an integer from 1 to ``os.cpu_count()``.
    """
    most = os.cpu_count() or 1  # more threads than CPUs only add contention, and each costs memory
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= most):
        raise ValueError(f"{key}={threads!r}: expected an integer >= 1 and <= {most} (the CPUs of this machine) "
                         "or null (= chosen from tokens × d_model² per step)")
    import torch

    n = threads or _omp_num_threads() or auto_threads(work)
    torch.set_num_threads(n)
    return n


def threads_from_config(cfg) -> int:
    """:func:`set_threads` with the composed config's ``threads`` and :func:`step_work`; a bad value
    exits with a one-line error."""
    try:
        return set_threads(cfg.get("threads"), work=step_work(cfg))
    except ValueError as e:
        raise SystemExit(f"config error: {e}") from None


def run_hydra_entry(entry: Callable[[], object]) -> None:
    """Call a ``@hydra.main`` function so that Hydra's own errors end in one line too.

    Hydra reports a key that does not exist, an unknown config option or an unwritable run dir over
    several lines with a hint; here it raises instead (``HYDRA_FULL_ERROR=1``), and the error is said
    in one line with exit status 1. serengeti's errors never get here (the task functions turn them
    into ``SystemExit``). A user who sets ``HYDRA_FULL_ERROR`` or ``SERENGETI_DEBUG`` gets the traceback.
    """
    user_wants_trace = bool(os.environ.get("HYDRA_FULL_ERROR") or os.environ.get("SERENGETI_DEBUG"))
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        entry()
    except Exception as e:
        if user_wants_trace:
            raise
        parts = [str(e)] + ([str(e.__cause__)] if e.__cause__ is not None else [])
        lines = [line.strip() for part in parts for line in part.splitlines() if line.strip()]
        if "Config search path:" in lines:  # Hydra's list of search paths is no help here
            lines = lines[: lines.index("Config search path:")]
        text = "; ".join(lines).replace(":; ", ": ").replace(".; ", ". ")
        hydra_error = type(e).__module__.startswith(("hydra", "omegaconf"))
        raise SystemExit(f"config error: {text}" if hydra_error else f"error: {type(e).__name__}: {text}") from None
