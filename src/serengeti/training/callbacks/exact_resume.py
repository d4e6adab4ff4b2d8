"""Bit-exact resume: what Lightning's checkpoint does not hold, this callback adds.

Lightning restores weights, optimizer, scheduler and loop counters. A run resumed mid-epoch
would still differ from an uninterrupted one in two ways, both fixed here:

* **random streams** — dropout draws from the global torch RNG (and user code may draw from
  numpy's and Python's). Every rank's states are stored in the checkpoint and put back just
  before the first training batch after the restore, after anything that re-seeds at start-up;
  the loaders have their own generators (``serengeti.data.samplers.seeded_loader``) so that making
  a data iterator never advances the global stream;
* **position in the epoch** — the training sampler skips the samples of the batches this epoch
  already trained on (``ResumableSampler.skip_next``), instead of starting the epoch over.

The position is stored in samples, so a run resumed with another ``dataset.batch_size`` skips the
samples already trained on and counts the epoch's batches done in the new size (Lightning's counter
is rescaled: the epoch ends when its data does, no sample is dropped). With another number of
processes the ranks' shares of the epoch differ, so the epoch restarts from its first batch, with a
warning.

Checkpoint entry ``checkpoint["serengeti_resume"]``::

    {"batches_done": int, "batch_size": int, "samples_done": int (per rank), "batches_in_epoch": int,
     "world_size": int,
     "rng": {"python": (W, 625) int64, "numpy": (W, 627) int64, "torch": (W, n) uint8[, "cuda": (W, m) uint8]}}
"""
from __future__ import annotations

import logging
import random
import struct
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from serengeti.data.samplers import loader_samplers

log = logging.getLogger("serengeti")

KEY = "serengeti_resume"


def capture_rng() -> dict[str, torch.Tensor]:
    """This process's RNG states as tensors (so that they can be gathered across ranks)."""
    version, py_state, gauss = random.getstate()
    if version != 3 or gauss is not None:
        raise RuntimeError("unexpected Python random state layout")
    _, keys, pos, has_gauss, cached = np.random.get_state()
    cached_bits = struct.unpack("<q", struct.pack("<d", float(cached)))[0]
    states = {
        "python": torch.tensor(py_state, dtype=torch.int64),
        "numpy": torch.tensor([*keys.astype(np.int64).tolist(), pos, has_gauss, cached_bits], dtype=torch.int64),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def restore_rng(states: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`capture_rng` (one rank's row)."""
    random.setstate((3, tuple(int(v) for v in states["python"].tolist()), None))
    numpy = states["numpy"].tolist()
    cached = struct.unpack("<d", struct.pack("<q", numpy[626]))[0]
    np.random.set_state(("MT19937", np.asarray(numpy[:624], dtype=np.uint32), numpy[624], numpy[625], cached))
    # a row of the gathered table is a view into shared storage: set_rng_state needs its own copy
    torch.set_rng_state(states["torch"].to(torch.uint8).clone())
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"].to(torch.uint8).clone())


class ExactResume(pl.Callback):
    """Stores RNG states and the batches done this epoch in every checkpoint; restores them on resume."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        mine = capture_rng()
        gathered = {}
        for name, t in mine.items():  # all ranks write the same (W, n) table; rank 0 saves it
            g = trainer.strategy.all_gather(t.to(trainer.strategy.root_device)) if trainer.world_size > 1 else t[None]
            gathered[name] = g.reshape(trainer.world_size, -1).cpu()
        done = int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)
        batch_size = getattr(trainer.train_dataloader, "batch_size", None)
        checkpoint[KEY] = {
            "batches_done": done,
            "batch_size": batch_size,
            "samples_done": done * batch_size if batch_size else None,
            "batches_in_epoch": _count(trainer.num_training_batches),
            "world_size": int(trainer.world_size),
            "rng": gathered,
        }

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self._pending = checkpoint.get(KEY)
        if self._pending is None:
            log.warning("the checkpoint holds no RNG states or data position (written before exact resume existed): "
                        "the resumed run will not match an uninterrupted one bit for bit")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Skip the samples of the current epoch that were trained on before the checkpoint."""
        if self._pending is None:
            return
        done = self._pending["batches_done"]
        in_epoch = self._pending.get("batches_in_epoch") or _count(trainer.num_training_batches)
        if not 0 < done < in_epoch:
            return
        batch_size = getattr(trainer.train_dataloader, "batch_size", None)
        saved_batch_size = self._pending.get("batch_size") or batch_size  # older checkpoints: assume the same
        samplers = [s for s in loader_samplers(trainer.train_dataloader) if callable(getattr(s, "skip_next", None))]
        if not samplers:
            log.warning("resuming mid-epoch (%d batches done) with a training loader that cannot skip: the epoch "
                        "restarts from its first batch, so the run will not match an uninterrupted one", done)
            _set_batches_done(trainer, 0)
            return
        if not batch_size or self._pending["world_size"] != trainer.world_size:
            log.warning("resuming mid-epoch with another batch layout (batch size %s, %d processes, checkpoint "
                        "from %d): the epoch restarts from its first batch", batch_size, trainer.world_size,
                        self._pending["world_size"])
            _set_batches_done(trainer, 0)
            return
        samples = self._pending.get("samples_done") or done * saved_batch_size
        if batch_size != saved_batch_size:
            log.warning("resuming mid-epoch with dataset.batch_size=%d, the checkpoint was written with %d: skipping "
                        "the %d samples per process already trained on this epoch and going on in batches of %d",
                        batch_size, saved_batch_size, samples, batch_size)
            _set_batches_done(trainer, samples // batch_size)
        for sampler in samplers:
            sampler.skip_next(samples)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        if pending["world_size"] != trainer.world_size:
            log.warning("the checkpoint was written by %d processes, this run has %d: random streams are not restored",
                        pending["world_size"], trainer.world_size)
            return
        restore_rng({name: table[trainer.global_rank] for name, table in pending["rng"].items()})


def _count(n: float) -> int:
    """A batch count as an int (Lightning uses inf for an iterable without length)."""
    return int(n) if n != float("inf") else 2**62


def _set_batches_done(trainer: pl.Trainer, batches: int) -> None:
    """Make Lightning count ``batches`` done in the current epoch (its ready/started/processed/completed
    counters move together, keeping their offsets), so the epoch ends when its remaining data does."""
    current = trainer.fit_loop.epoch_loop.batch_progress.current
    shift = batches - current.ready
    for name in ("ready", "started", "processed", "completed"):
        if hasattr(current, name):
            setattr(current, name, getattr(current, name) + shift)
