"""Writing and reading training checkpoints: atomic, finite, weights-only, and when asked.

* :class:`SafeCheckpointIO` (a Lightning ``CheckpointIO`` plugin) writes each file under a temporary
  name and renames it into place, so a kill during a save leaves the previous file intact; refuses to
  write weights holding NaN/inf; and reads resume checkpoints with ``torch.load(weights_only=True)``,
  so a checkpoint from elsewhere cannot run code through ``train.py ckpt_path=...``, and checks their
  weights against the model being trained (keys, shapes, dtypes, finite values) in one line naming
  the file (:func:`serengeti.io.checkpoint.check_state`).
* :class:`ModelCheckpoint` is Lightning's, except that ``last.ckpt`` is written every
  ``every_n_train_steps`` even while the monitored metric does not exist yet (before the first
  validation), where Lightning defers every save until it does.
* :func:`resolve_ckpt_path` turns ``ckpt_path=auto`` into the run's own ``last.ckpt`` (or a fresh start).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from serengeti.errors import CheckpointError
from serengeti.io.atomic import atomic_write
from serengeti.io.checkpoint import check_state, load_weights_only

log = logging.getLogger("serengeti")

LAST_NAME = "last.ckpt"


def last_ckpt_path(run_dir: str | os.PathLike) -> Path:
    """``<run_dir>/checkpoints/last.ckpt``: where a run keeps the checkpoint it resumes from
    (``configs/callbacks/default.yaml`` points the checkpoint callback at the same folder)."""
    return Path(run_dir) / "checkpoints" / LAST_NAME


class NonFiniteWeightsError(RuntimeError):
    """Saving was refused because a tensor of the model holds NaN or inf."""


def first_non_finite(state_dict: dict[str, Any]) -> str | None:
    """Name of the first floating-point tensor in ``state_dict`` holding NaN/inf, else ``None``."""
    for name, t in state_dict.items():
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` atomically (:mod:`serengeti.io.atomic`)."""
    atomic_write(path, lambda f: torch.save(obj, f))


class SafeCheckpointIO(TorchCheckpointIO):
    """Atomic, finite-only saves; weights-only, checked loads (see the module docstring).

    ``module``: the LightningModule whose ``state_dict()`` a resumed checkpoint must fit (``None``:
    only finiteness is checked).
    """

    def __init__(self, module: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.module = module

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any = None) -> None:
        bad = first_non_finite(checkpoint.get("state_dict", {}))
        if bad is not None:
            raise NonFiniteWeightsError(f"refusing to write {path}: weight {bad!r} holds NaN or inf")
        atomic_save(checkpoint, path)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = load_weights_only(path, map_location=map_location)
        state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
        expected = self.module.state_dict() if self.module is not None else state
        check_state(state, expected, path)
        return checkpoint


class ModelCheckpoint(pl.callbacks.ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` that writes ``last.ckpt`` every ``every_n_train_steps`` even
    before the monitored metric exists (the best-by-``monitor`` file still waits for it), and at
    the end of training, so that ``last.ckpt`` always holds the final weights."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        n = self._every_n_train_steps
        if not (self.save_last and n and trainer.global_step % n == 0) or self._should_skip_saving_checkpoint(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        if self.monitor is None or self.monitor in candidates:
            return  # Lightning saved (or chose not to) with the metric in hand
        self.save_last_now(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``last.ckpt`` holds the final step, also when it is not a multiple of ``every_n_train_steps``."""
        super().on_train_end(trainer, pl_module)
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self.save_last_now(trainer)

    def save_last_now(self, trainer: pl.Trainer) -> str:
        """Write ``last.ckpt`` at the current step; returns its path.

        The step is not marked as saved, so a best-by-metric save at the same step (after a
        validation) still happens.
        """
        marked = self._last_global_step_saved
        save_last, self.save_last = self.save_last, True
        try:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        finally:
            self.save_last, self._last_global_step_saved = save_last, marked
        return self.last_model_path


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str | os.PathLike) -> str | None:
    """``auto`` -> ``<output_dir>/checkpoints/last.ckpt`` when it exists, else ``None`` (fresh start);
    any other value must name an existing file."""
    if ckpt_path is None:
        return None
    if str(ckpt_path) == "auto":
        last = last_ckpt_path(output_dir)
        if last.is_file():
            log.info("ckpt_path=auto: resuming from %s", last)
            return str(last)
        log.info("ckpt_path=auto: no %s yet, starting fresh", last)
        return None
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"ckpt_path={ckpt_path}: no such checkpoint file (give a .ckpt written by train.py, "
                              "or ckpt_path=auto to resume the run's own last.ckpt)")
    return str(path)
