"""A rich progress bar that counts optimizer steps of ``trainer.max_steps``.

Lightning's :class:`~pytorch_lightning.callbacks.RichProgressBar` draws one bar per epoch and
labels it ``Epoch e/max_epochs-1``, which reads ``Epoch 0/-2`` for step-bounded runs
(``max_epochs: -1``) and restarts its count at every epoch and after a resume. When
``trainer.max_steps > 0`` this bar instead spans the whole run: its total is ``max_steps`` and its
position is ``trainer.global_step`` (optimizer steps, so gradient accumulation is counted once per
update and a resumed run continues where it stopped). Epoch-bounded runs keep Lightning's bar,
without the ``/-2`` when ``max_epochs`` is unbounded.
"""
from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """``RichProgressBar`` whose training bar shows ``global_step / max_steps`` (same constructor)."""

    def _max_steps(self) -> int | None:
        steps = self.trainer.max_steps
        return int(steps) if steps is not None and steps > 0 else None

    def _get_train_description(self, current_epoch: int) -> str:
        if self._max_steps() is not None:
            text = f"Step (epoch {current_epoch})"
        else:
            max_epochs = self.trainer.max_epochs
            text = f"Epoch {current_epoch}" + (f"/{max_epochs - 1}" if max_epochs and max_epochs > 0 else "")
        return f"{text:{len(self.validation_description)}}"  # equal widths keep the bars from flickering

    def _show_steps(self, trainer: pl.Trainer) -> None:
        """Create the run-long bar if needed and move it to ``global_step``."""
        if self.progress is None:
            return
        description = self._get_train_description(trainer.current_epoch)
        if self.theme.description:
            description = f"[{self.theme.description}]{description}"
        if self.train_progress_bar_id is None:
            self.train_progress_bar_id = self.progress.add_task(description, total=self._max_steps())
        self.progress.update(self.train_progress_bar_id, total=self._max_steps(), completed=trainer.global_step,
                             description=description, visible=True)

    def _initialize_train_progress_bar_id(self) -> None:
        if self._max_steps() is None:
            return super()._initialize_train_progress_bar_id()
        self._show_steps(self.trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._max_steps() is None:
            return super().on_train_epoch_start(trainer, pl_module)
        if self.is_disabled:
            return
        self._show_steps(trainer)
        self.refresh()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._max_steps() is None:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.is_disabled:
            return
        self._show_steps(trainer)
        self._update_metrics(trainer, pl_module)
        self.refresh()
