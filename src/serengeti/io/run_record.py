"""The record of one finished training run: ``<run dir>/metrics.json``.

Written once per run, after the final validation and test, or when the run fails (a non-finite
loss, an error while training; in a ``-m`` sweep also a config error), by :func:`write_run_record`;
read by :mod:`serengeti.report` and :mod:`serengeti.training.sweep_summary`. Fields::

    status           "completed" or "failed" (records written before this field existed: completed)
    reason           why a failed run stopped, in one line (null when completed)
    metrics          final metrics, {name: float} ("val/loss", "test/accuracy", ...); for a failed run
                     the last ones logged before it stopped
    steps            optimizer steps taken
    wall_s           wall-clock seconds of fit + test
    cpu_s            CPU seconds (user + system) of this run, from the config check to the end of test
                     (not the whole process: a multirun runs its jobs one after another in one process)
    num_threads      torch intra-op threads the run used
    n_params         trainable parameters of the model
    state_size       floats of recurrent state one sequence carries when generating model.l_max positions
                     (serengeti.models.generation.state_size: KV cache, SSM state, convolution input history);
                     null for a model without a recurrent mode, a failed run, and records before the field
    git_commit       commit of the code (null outside a git checkout); git_dirty: uncommitted changes
    config           path of the resolved config written beside it (config_resolved.yaml)

Readers (:func:`read_run_record`, :func:`read_run_config`) treat the files as untrusted: a damaged
file raises :class:`RunRecordError` naming it, YAML aliases are refused (a 1 KB alias bomb expands
to gigabytes) and interpolations such as ``${oc.env:...}`` are kept as text, never resolved.
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

from serengeti.io.atomic import atomic_write_text

RECORD_NAME = "metrics.json"
#: the fields of a record, as listed above (standalone_cifar.py writes the same, without importing serengeti)
RECORD_FIELDS = ("status", "reason", "metrics", "steps", "wall_s", "cpu_s", "num_threads", "n_params", "state_size",
                 "git_commit", "git_dirty", "config")
RESOLVED_CONFIG_NAME = "config_resolved.yaml"
_REPO = Path(__file__).resolve().parents[3]


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


COMPLETED, FAILED = "completed", "failed"


def write_run_record(run_dir: str | os.PathLike, cfg: DictConfig, metrics: Mapping[str, float], *, steps: int,
                     wall_s: float, cpu_s: float, n_params: int | None, status: str = COMPLETED,
                     reason: str | None = None, state_size: int | None = None) -> Path:
    """Write ``config_resolved.yaml`` and ``metrics.json`` into ``run_dir``; returns the json's path.

    A config that cannot be resolved (a failed job's bad override) is written unresolved.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / RESOLVED_CONFIG_NAME
    try:
        config_text = OmegaConf.to_yaml(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - an interpolation error is what made this run fail
        config_text = OmegaConf.to_yaml(cfg, resolve=False)
    atomic_write_text(config_path, config_text)
    commit, dirty = git_state()
    record: dict[str, Any] = {
        "status": status,
        "reason": reason,
        "metrics": {k: float(v) for k, v in sorted(metrics.items())},
        "steps": int(steps),
        "wall_s": float(wall_s),
        "cpu_s": float(cpu_s),
        "num_threads": torch.get_num_threads(),
        "n_params": None if n_params is None else int(n_params),
        "state_size": None if state_size is None else int(state_size),
        "git_commit": commit,
        "git_dirty": dirty,
        "config": RESOLVED_CONFIG_NAME,
    }
    path = run_dir / RECORD_NAME
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    return path


class RunRecordError(ValueError):
    """A run's ``metrics.json`` or config cannot be read; the message names the file."""


def read_run_record(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``metrics.json`` of ``run_dir``: a mapping whose ``metrics`` maps names to numbers.

    Raises:
        RunRecordError: unreadable, not JSON, or not of that shape.
    """
    path = Path(run_dir) / RECORD_NAME
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise RunRecordError(f"{path}: cannot read the run record ({_first_line(e)})") from None
    metrics = record.get("metrics") if isinstance(record, dict) else None
    if not isinstance(metrics, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values()):
        raise RunRecordError(f"{path}: expected a mapping with 'metrics': {{name: number}}")
    return record


def read_run_config(path: str | os.PathLike) -> Any:
    """The plain data of a run's config YAML (``config_resolved.yaml`` or Hydra's ``config.yaml``).

    Loaded as OmegaConf loads YAML but with aliases refused, and nothing resolved: a value such as
    ``${oc.env:SECRET}`` stays that string.

    Raises:
        RunRecordError: unreadable file, invalid YAML, or an alias.
    """
    import yaml
    from omegaconf._utils import get_yaml_loader

    class NoAliasLoader(get_yaml_loader()):  # OmegaConf's scalar rules (1e-3 is a float), no aliases
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                raise yaml.composer.ComposerError(None, None, "YAML aliases (*name) are not allowed in a run's config",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)

    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.load(f, Loader=NoAliasLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise RunRecordError(f"{path}: cannot read the config ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split())  # YAML errors span lines (problem, file position)
    return text[:300] or type(e).__name__


def record_status(record: Mapping[str, Any]) -> str:
    """``"completed"`` or ``"failed"`` (records from before the ``status`` field are completed runs)."""
    return str(record.get("status") or COMPLETED)
