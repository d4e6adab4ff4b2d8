"""Stop cleanly on SIGTERM, SIGUSR1 (SLURM's pre-emption warning) and Ctrl-C: finish the current
optimizer step, write ``last.ckpt`` at that step, and leave with exit code 128 + signal number.

Lightning's own handling exits 0 without saving on SIGTERM and interrupts Ctrl-C mid-step; this
callback replaces both for the duration of ``fit``. A second Ctrl-C stops at once (no checkpoint).
Under DDP every rank stops at the same step (the flag is all-reduced after each step). Under SLURM,
SIGUSR1 also requeues the job (``scontrol requeue``, as Lightning's auto-requeue does) once the
checkpoint is written; the requeued job resumes with ``ckpt_path=auto`` (docs/reliability.md).

Outside the training steps (data preparation, the sanity check, the test after ``fit``, writing the
record) :func:`stop_on_signal` holds the same signals for the whole run and stops at once with
:class:`StopSignal`, which ``serengeti.training.run.run`` turns into :class:`Preempted` saying what had
finished. Lightning's own SIGTERM handling there would exit 0 without a record.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import pytorch_lightning as pl

from serengeti.training.checkpoint_policy import last_ckpt_path

log = logging.getLogger("serengeti")

SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGINT", None),
                            getattr(signal, "SIGUSR1", None)) if s is not None)


def slurm_requeue_command(env: Mapping[str, str] = os.environ) -> list[str] | None:
    """``["scontrol", "requeue", JOB]`` for the SLURM job (array task) this process runs in, else ``None``."""
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        job = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    else:
        job = env.get("SLURM_JOB_ID")
    if not job or not job.replace("_", "").isdigit():
        return None
    return ["scontrol", "requeue", job]


class Preempted(Exception):
    """The run stopped on a signal: during training after saving ``path`` at ``step``, or, with
    ``when``, at another point that ``when`` describes (e.g. "before training started: ...")."""

    def __init__(self, signum: int, step: int, path: str | None, when: str | None = None) -> None:
        self.signum, self.step, self.path = signum, step, path
        if when is None:
            when = f"at step {step}" + (f": saved {path}" if path else ": no checkpoint written")
        super().__init__(f"stopped by {signal.Signals(signum).name} {when}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def hint(self) -> str:
        """What to do next: resume, or (nothing trained yet) run the command again."""
        if self.step == 0 and self.path is None:
            return "nothing to resume: run the command again"
        return f"resume with ckpt_path={self.path or 'auto'}"


class StopSignal(BaseException):
    """Raised by :func:`stop_on_signal`'s handler: a signal arrived outside the training steps.

    A ``BaseException``, so that no ``except Exception`` on the way (data loading, Lightning's
    hooks) swallows it."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


@contextmanager
def stop_on_signal() -> Iterator[None]:
    """While active, SIGTERM / SIGINT / SIGUSR1 raise :class:`StopSignal` (in the main thread).

    :class:`Preemption` replaces the handler during the training steps; Lightning composes its own
    SIGTERM handler with this one while ``fit`` / ``test`` run, so this one still stops the run."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame: Any) -> None:
        raise StopSignal(signum)

    previous = {s: signal.signal(s, handle) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


class Preemption(pl.Callback):
    """See the module docstring. ``checkpoint``: the callback whose ``last.ckpt`` is written
    (:class:`serengeti.training.checkpoint_policy.ModelCheckpoint`); ``None`` writes ``<root>/checkpoints/last.ckpt``."""

    def __init__(self, checkpoint: Any = None) -> None:
        self.checkpoint = checkpoint
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == getattr(signal, "SIGINT", None):
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.received = signum
        log.warning("received %s: stopping after this step", signal.Signals(signum).name)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for s in SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        stop = self.received is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        if self.checkpoint is not None:
            path = self.checkpoint.save_last_now(trainer)
        else:
            path = str(last_ckpt_path(trainer.default_root_dir))
            trainer.save_checkpoint(path)
        if self.received == getattr(signal, "SIGUSR1", None) and trainer.is_global_zero:
            self._requeue()
        raise Preempted(self.received or signal.SIGTERM, trainer.global_step, path)

    @staticmethod
    def _requeue() -> None:
        cmd = slurm_requeue_command()
        if cmd is None:
            return
        try:
            code = subprocess.call(cmd)
        except OSError as e:
            log.warning("could not requeue the SLURM job (%s): resubmit it with ckpt_path=auto", e)
            return
        log.info("requeued the SLURM job (%s exited %d)", " ".join(cmd), code)
