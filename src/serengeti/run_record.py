"""The record of one finished training run: ``<run dir>/metrics.json``.

Written once per run, after the final validation and test, by :func:`write_run_record`; read by
:mod:`serengeti.report`. Fields::

    metrics          final metrics, {name: float} ("val/loss", "test/accuracy", ...)
    steps            optimizer steps taken
    wall_s           wall-clock seconds of fit + test
    cpu_s            CPU seconds (user + system) of this run, from the config check to the end of test
                     (not the whole process: a multirun runs its jobs one after another in one process)
    num_threads      torch intra-op threads the run used
    n_params         trainable parameters of the model
    git_commit       commit of the code (null outside a git checkout); git_dirty: uncommitted changes
    config           path of the resolved config written beside it (config_resolved.yaml)
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
from pathlib import Path
from typing import Any, Mapping

import torch
from omegaconf import DictConfig, OmegaConf

from serengeti.atomic import atomic_write_text

RECORD_NAME = "metrics.json"
RESOLVED_CONFIG_NAME = "config_resolved.yaml"
_REPO = Path(__file__).resolve().parents[2]


def process_cpu_seconds() -> float:
    """User + system CPU seconds of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def git_state(repo: Path = _REPO) -> tuple[str | None, bool | None]:
    """(commit hash, whether the work tree has uncommitted changes), or (None, None) without git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, bool(status.strip())


def write_run_record(run_dir: str | os.PathLike, cfg: DictConfig, metrics: Mapping[str, float], *, steps: int,
                     wall_s: float, cpu_s: float, n_params: int) -> Path:
    """Write ``config_resolved.yaml`` and ``metrics.json`` into ``run_dir``; returns the json's path."""
    run_dir = Path(run_dir)
    config_path = run_dir / RESOLVED_CONFIG_NAME
    atomic_write_text(config_path, OmegaConf.to_yaml(cfg, resolve=True))
    commit, dirty = git_state()
    record: dict[str, Any] = {
        "metrics": {k: float(v) for k, v in sorted(metrics.items())},
        "steps": int(steps),
        "wall_s": float(wall_s),
        "cpu_s": float(cpu_s),
        "num_threads": torch.get_num_threads(),
        "n_params": int(n_params),
        "git_commit": commit,
        "git_dirty": dirty,
        "config": RESOLVED_CONFIG_NAME,
    }
    path = run_dir / RECORD_NAME
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    return path


def read_run_record(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``metrics.json`` of ``run_dir``."""
    return json.loads((Path(run_dir) / RECORD_NAME).read_text())
