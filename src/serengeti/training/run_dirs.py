"""What a failed start may delete: only the run directory, and the files in it, that this process made.

Hydra makes the run directory and writes ``.hydra/`` and the job's ``.log`` into it before the
task function runs. :class:`RecordRunDirs`, a Hydra callback (``hydra.callbacks.run_dirs`` in
``configs/hydra/default.yaml``), notes before that what already existed: the run directory
(``hydra.run.dir``) or the sweep directory and its job directories (``-m``). When a run stops on a
config error, :func:`remove_fresh_run_dir` deletes a directory this process made if it holds
nothing but Hydra's files. In a directory that existed it undoes Hydra's writes: the ``.hydra``
files and logs it added are deleted, the ``.hydra`` files it replaced get their old bytes back and
the logs it appended to get their old length. A directory it knows nothing about (no callback ran
in this process) is left alone.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

_KEEP_BYTES = 1 << 20  # .hydra files up to this size are kept to be restored (Hydra's are a few KB)
_HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")


@dataclass(frozen=True)
class _Before:
    """What a directory held before Hydra wrote into it (``names`` is ``None``: it did not exist)."""

    names: frozenset[str] | None
    hydra_files: dict[str, bytes] = field(default_factory=dict)
    log_sizes: dict[str, int] = field(default_factory=dict)


# absolute directory -> what it held before Hydra wrote anything
_BEFORE: dict[Path, _Before] = {}


class RecordRunDirs(Callback):
    """Note what the run (or sweep) directory held before Hydra writes into it."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        note_existing(_select(config, "hydra.run.dir"))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = _select(config, "hydra.sweep.dir")
        note_existing(sweep)
        if sweep is not None and sweep.is_dir():
            for job in sweep.iterdir():
                if job.is_dir() and not job.is_symlink():
                    note_existing(job)


def _select(config: DictConfig, key: str) -> Path | None:
    try:
        value = OmegaConf.select(config, key)
    except Exception:  # an interpolation Hydra resolves only later: nothing is noted, nothing will be removed
        return None
    return None if value is None else Path(os.path.abspath(str(value)))


def note_existing(directory: str | os.PathLike | None) -> None:
    """Record what ``directory`` holds now (or that it does not exist)."""
    if directory is None:
        return
    d = Path(os.path.abspath(directory))
    if not d.is_dir():
        _BEFORE[d] = _Before(None)
        return
    hydra = d / ".hydra"
    kept = {}
    if hydra.is_dir() and not hydra.is_symlink():
        kept = {p.name: p.read_bytes() for p in hydra.iterdir()
                if p.is_file() and not p.is_symlink() and p.stat().st_size <= _KEEP_BYTES}
    logs = {p.name: p.stat().st_size for p in d.glob("*.log") if p.is_file() and not p.is_symlink()}
    _BEFORE[d] = _Before(frozenset(os.listdir(d)), kept, logs)


def _hydra_made(p: Path) -> bool:
    return p.name == ".hydra" or p.suffix == ".log"


def remove_fresh_run_dir(output_dir: str | os.PathLike | None) -> None:
    """Undo what Hydra wrote for this run (see the module docstring); anything else stays."""
    if not output_dir:
        return
    out = Path(os.path.abspath(output_dir))
    if out in _BEFORE:
        before = _BEFORE[out]
    elif out.parent in _BEFORE:  # a sweep's job directory that was not there when the sweep started
        before = _Before(None)
    else:
        return
    if not out.is_dir() or out.is_symlink():
        return
    if before.names is None:
        if all(_hydra_made(p) for p in out.iterdir()):
            shutil.rmtree(out, ignore_errors=True)
        return
    for p in out.iterdir():
        if p.name not in before.names and _hydra_made(p):
            _remove(p)
    hydra = out / ".hydra"
    if ".hydra" in before.names and hydra.is_dir() and not hydra.is_symlink():
        for p in hydra.iterdir():
            if p.name in before.hydra_files:
                p.write_bytes(before.hydra_files[p.name])
            elif p.name in _HYDRA_FILES:
                _remove(p)
    for name, size in before.log_sizes.items():
        log = out / name
        if log.is_file() and not log.is_symlink() and log.stat().st_size > size:
            os.truncate(log, size)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)
