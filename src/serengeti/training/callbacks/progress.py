"""Progress of training and evaluation: a rich bar on a terminal, plain lines in a log.

:func:`progress_bar` (the ``callbacks.rich_progress_bar`` config entry) picks one at start-up:
:class:`StepProgressBar` when stdout is a terminal, :class:`LogProgress` when it is redirected
(``nohup``, SLURM, CI), where a live bar would print nothing until the run ends.

:class:`LogProgress` prints one line per interval (``every_s`` seconds, or every ``every_n_steps``
optimizer steps / evaluation batches), plus the first and the last::

    [progress] train step 120/800 (15%) | loss 2.3104 | lr 1.20e-03 | 3,450 tok/s | elapsed 1:02 | left 5:52
    [progress] validation batch 12/40 (30%) | 8,100 tok/s | elapsed 0:20 | left 0:47

``tok/s`` counts the input tokens of the batches (all ranks); ``left`` extrapolates the rate
since this fit (or evaluation loop) started, so a resumed run does not count the restored steps.


Lightning's :class:`~pytorch_lightning.callbacks.RichProgressBar` draws one bar per epoch and
labels it ``Epoch e/max_epochs-1``, which reads ``Epoch 0/-2`` for step-bounded runs
(``max_epochs: -1``) and restarts its count at every epoch and after a resume. When
``trainer.max_steps > 0`` this bar instead spans the whole run: its total is ``max_steps`` and its
position is ``trainer.global_step`` (optimizer steps, so gradient accumulation is counted once per
update and a resumed run continues where it stopped). Epoch-bounded runs keep Lightning's bar,
without the ``/-2`` when ``max_epochs`` is unbounded.
"""
from __future__ import annotations

import sys
import time
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ProgressBar, RichProgressBar


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


def stdout_is_terminal() -> bool:
    """Whether stdout is an interactive terminal (False under ``nohup``, SLURM, CI, ``> log``)."""
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced or closed stdout
        return False


def console():
    """A rich ``Console`` for tables: the terminal's width on a terminal; in a log file no 80-column cut
    (rich would otherwise fold or truncate wide tables such as a sweep summary)."""
    from rich.console import Console

    return Console() if stdout_is_terminal() else Console(width=100_000, soft_wrap=True)


def progress_bar(every_s: float = 20.0, every_n_steps: int | None = None) -> ProgressBar:
    """:class:`StepProgressBar` on a terminal, else :class:`LogProgress` (``every_s`` / ``every_n_steps``)."""
    return StepProgressBar() if stdout_is_terminal() else LogProgress(every_s=every_s, every_n_steps=every_n_steps)


def format_duration(seconds: float) -> str:
    """``75.2`` -> ``"1:15"``, ``3725`` -> ``"1:02:05"`` (``"?"`` when unknown)."""
    if seconds is None or seconds != seconds or seconds < 0 or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def batch_tokens(batch: Any) -> int:
    """Input tokens of a batch: elements of its first tensor (``(inputs, targets)`` pairs, a dict's first value)."""
    if isinstance(batch, torch.Tensor):
        return batch.numel()
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)) and batch:
        return batch_tokens(batch[0])
    return 0


def _count(batches: Any) -> int | float:
    """Lightning's per-dataloader batch counts (a list, or one number) as one total."""
    return sum(batches) if isinstance(batches, (list, tuple)) else batches


class _Loop:
    """Counts of one training or evaluation loop since it started: tokens, done, time of the last line."""

    def __init__(self, start_done: int) -> None:
        self.start = self.last_line = time.monotonic()
        self.start_done, self.done, self.tokens, self.lines = start_done, start_done, 0, 0

    def rate_parts(self, total: int | float | None, world: int) -> list[str]:
        elapsed = time.monotonic() - self.start
        parts = [f"{self.tokens * world / elapsed:,.0f} tok/s" if elapsed > 0 and self.tokens else "? tok/s",
                 f"elapsed {format_duration(elapsed)}"]
        done_here = self.done - self.start_done
        if total and total != float("inf") and done_here > 0:
            parts.append(f"left {format_duration(elapsed / done_here * (total - self.done))}")
        return parts


class LogProgress(ProgressBar):
    """Plain progress lines for logs (see the module docstring); only global rank 0 prints.

    Args:
        every_s: seconds between lines (default 20: three a minute).
        every_n_steps: print every N optimizer steps (training) and N batches (evaluation) instead.
    """

    def __init__(self, every_s: float = 20.0, every_n_steps: int | None = None) -> None:
        super().__init__()
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"callbacks.rich_progress_bar.every_n_steps must be >= 1 or null, got {every_n_steps}")
        if every_s <= 0:
            raise ValueError(f"callbacks.rich_progress_bar.every_s must be > 0, got {every_s}")
        self.every_s, self.every_n_steps = float(every_s), every_n_steps
        self._enabled = True
        self._train: _Loop | None = None
        self._eval: _Loop | None = None
        self._last_loss: torch.Tensor | None = None

    # ProgressBar interface
    @property
    def is_enabled(self) -> bool:
        return self._enabled

    @property
    def is_disabled(self) -> bool:
        return not self._enabled

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _due(self, loop: _Loop, total: int | float | None) -> bool:
        if loop.lines == 0 or (total and loop.done >= total):
            return True
        if self.every_n_steps is not None:
            return (loop.done - loop.start_done) % self.every_n_steps == 0
        return time.monotonic() - loop.last_line >= self.every_s

    def _emit(self, loop: _Loop, text: str) -> None:
        loop.lines += 1
        loop.last_line = time.monotonic()
        print(f"[progress] {text}", flush=True)

    # training
    def _train_total(self, trainer: pl.Trainer) -> int | float | None:
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return int(trainer.max_steps)
        batches = self.total_train_batches
        epochs = trainer.max_epochs
        if epochs is None or epochs < 0 or batches == float("inf"):
            return None
        return int(batches * epochs / max(1, trainer.accumulate_grad_batches))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._train = _Loop(trainer.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loop = self._train
        if loop is None or self.is_disabled:
            return
        loop.tokens += batch_tokens(batch)
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self._last_loss = loss.detach()  # the .item() (a device sync) waits until a line is printed
        if trainer.global_step == loop.done:  # an accumulation micro-batch: no optimizer step yet
            return
        loop.done = trainer.global_step
        total = self._train_total(trainer)
        if not self._due(loop, total):
            return
        step = f"train step {loop.done}/{total} ({100 * loop.done / total:.0f}%)" if total else f"train step {loop.done}"
        parts = [step]
        if self._last_loss is not None:
            parts.append(f"loss {self._last_loss.float().item() * trainer.accumulate_grad_batches:.4f}")
        if trainer.optimizers:
            parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.2e}")
        self._emit(loop, " | ".join(parts + loop.rate_parts(total, trainer.world_size)))

    # evaluation
    def _eval_start(self, trainer: pl.Trainer) -> None:
        self._eval = _Loop(0)

    def _eval_batch(self, trainer: pl.Trainer, name: str, total: int | float, batch: Any) -> None:
        loop = self._eval
        if loop is None or self.is_disabled:
            return
        loop.tokens += batch_tokens(batch)
        loop.done += 1
        if not self._due(loop, total):
            return
        known = total and total != float("inf")
        count = f"{name} batch {loop.done}/{total} ({100 * loop.done / total:.0f}%)" if known else f"{name} batch {loop.done}"
        self._emit(loop, " | ".join([count, *loop.rate_parts(total if known else None, trainer.world_size)]))

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start(trainer)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start(trainer)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if not trainer.sanity_checking:
            self._eval_batch(trainer, "validation", _count(trainer.num_val_batches), batch)

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_batch(trainer, "test", _count(trainer.num_test_batches), batch)
