"""Training entry: compose config -> datamodule, LightningModule, Trainer -> fit -> test."""
from __future__ import annotations

import logging
import math
import os
import sys
import time
from contextlib import contextmanager
from typing import Iterator

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.utilities import rank_zero_only

from serengeti.data.tokenizers import tokenizer_record
from serengeti.errors import CheckpointError, ConfigError, UnsafeConfigError
from serengeti.io.run_lock import RunDirBusy, lock_run_dir
from serengeti.io.run_record import FAILED, process_cpu_seconds, write_run_record
from serengeti.mixers.base import StateError
from serengeti.models.generation import state_size
from serengeti.training.accelerator import cuda_problem
from serengeti.training.callbacks.exact_resume import ExactResume
from serengeti.training.callbacks.nonfinite import NonFiniteError, NonFiniteGuard
from serengeti.training.callbacks.preemption import Preempted, Preemption, StopSignal, stop_on_signal
from serengeti.training.checkpoint_policy import ModelCheckpoint, SafeCheckpointIO, resolve_ckpt_path
from serengeti.training.compiling import compile_backbone
from serengeti.training.config_checks import check_config
from serengeti.training.global_batch import apply_global_batch
from serengeti.training.lm_task import LMTask
from serengeti.training.run_config import apply_final_overrides, fill_from_dataset
from serengeti.training.run_dirs import remove_fresh_run_dir

log = logging.getLogger("serengeti")


def prepare(cfg: DictConfig) -> tuple[pl.LightningDataModule, LMTask]:
    """Build the datamodule and the LightningModule, filling dataset-derived model keys.

    ``model.vocab_size``, ``model.l_max`` and ``scheduler.total_steps`` default (null) to the
    datamodule's values and the run length (:func:`serengeti.training.run_config.fill_from_dataset`). Raises
    :class:`ConfigError` for invalid settings before anything is trained or written.
    """
    check_config(cfg)  # types and ranges of every key, before anything is built
    if (problem := cuda_problem(cfg.get("trainer"))) is not None:
        raise ConfigError(problem)
    apply_global_batch(cfg)  # trainer.accumulate_grad_batches from dataset.global_batch_size and the world size
    try:
        datamodule = instantiate(cfg.dataset)
    except Exception as e:  # hydra wraps constructor errors; surface the message with the group name
        cause = _root_cause(e)  # messages from the data modules already start with their key
        raise ConfigError(cause if cause.startswith("dataset") else f"dataset: {cause}") from e
    filled = fill_from_dataset(cfg, vocab_size=datamodule.vocab_size, l_max=datamodule.l_max)
    with open_dict(cfg):  # the run record and the checkpoint show the filled values
        for group in ("model", "scheduler"):
            if group in filled:
                cfg[group] = filled[group]
    plain = OmegaConf.to_container(cfg, resolve=True)
    task_cfg = {k: plain[k] for k in ("model", "optimizer", "scheduler", "dataset") if k in plain}
    # the checkpoint records the tokenizer, so evaluate.py can decode without the training data
    task_cfg["tokenizer"] = tokenizer_record(getattr(datamodule, "tokenizer", None), datamodule.vocab_size)
    try:
        task = LMTask(task_cfg)
    except Exception as e:
        raise ConfigError(f"model: {_root_cause(e)}") from e
    if cfg.model.get("compile"):
        compile_backbone(task.model)  # model.compile=true: torch.compile each residual block in place
    return datamodule, task


def _root_cause(e: BaseException) -> str:
    while e.__cause__ is not None:
        e = e.__cause__
    return str(e)


def _callbacks(cfg: DictConfig, nan_policy: str) -> list[pl.Callback]:
    """The configured callbacks plus the ones every run needs: exact resume, the non-finite guard and
    pre-emption handling (which writes ``last.ckpt`` through the configured checkpoint callback)."""
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a progress-bar callback then
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.ProgressBar)]
    checkpoint = next((c for c in callbacks if isinstance(c, ModelCheckpoint)), None)
    return [*callbacks, ExactResume(), NonFiniteGuard(nan_policy), Preemption(checkpoint)]


def run(cfg: DictConfig, state: dict | None = None) -> dict[str, float]:
    """Train (and test) one configuration; returns the final metrics as floats.

    ``state``: filled with the trainer, parameter count and start times once training begins.
    The run directory is locked for the whole run (:mod:`serengeti.io.run_lock`, rank 0 only), and a
    signal at any point stops it with :class:`Preempted` (exit 128 + signal) saying what finished.
    """
    apply_final_overrides(cfg)  # a preset's keys (size=tiny) over the experiment's, the command line's over both
    check_config(cfg)  # before seeding: seed=abc is a config error too
    stage = _Stage()
    try:
        with stop_on_signal(), _run_dir_lock(cfg.paths.output_dir):
            return _run(cfg, stage, state)
    except StopSignal as s:
        raise stage.preempted(s.signum) from None


class _Stage:
    """How far a run got, for the message when a signal stops it outside the training steps."""

    def __init__(self) -> None:
        self.trainer: pl.Trainer | None = None
        self.testing = self.recorded = False

    def preempted(self, signum: int) -> Preempted:
        trainer = self.trainer
        step = trainer.global_step if trainer is not None else 0
        if step == 0:
            return Preempted(signum, 0, None, "before training started: nothing was trained or saved")
        checkpoint = getattr(trainer.checkpoint_callback, "last_model_path", "") or None
        saved = f"saved {checkpoint}" if checkpoint else "no checkpoint written"
        if self.recorded:
            return Preempted(signum, step, checkpoint, f"after the run finished at step {step} (metrics.json written)")
        if not self.testing:  # between the training steps and the end of fit (validation, last save)
            return Preempted(signum, step, checkpoint, f"after training step {step} ({saved}); no metrics.json written")
        return Preempted(signum, step, checkpoint, f"during the test, after training finished at step {step} "
                                                   f"({saved}); no metrics.json written")


@contextmanager
def _run_dir_lock(run_dir: str) -> Iterator[None]:
    """:func:`serengeti.io.run_lock.lock_run_dir` in the rank-0 process (DDP's other ranks share its directory)."""
    if rank_zero_only.rank != 0:
        yield
        return
    with lock_run_dir(run_dir):
        yield


def _run(cfg: DictConfig, stage: _Stage, state: dict | None) -> dict[str, float]:
    cpu_start = process_cpu_seconds()
    pl.seed_everything(cfg.seed, workers=True)  # a resumed run gets its RNG states back at its first batch
    datamodule, task = prepare(cfg)
    try:
        ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.output_dir)
    except CheckpointError as e:
        raise ConfigError(str(e)) from e
    n_params = sum(p.numel() for p in task.model.parameters())
    log.info("model: %s parameters", f"{n_params:,}")
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    nan_policy = trainer_cfg.pop("nan_policy", "stop")
    try:
        callbacks = _callbacks(cfg, nan_policy)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    trainer: pl.Trainer = instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False,
                                      plugins=[SafeCheckpointIO(task)])
    stage.trainer = trainer
    start = time.time()
    if state is not None:  # what main() needs to record a run that fails from here on
        state.update(trainer=trainer, n_params=n_params, start=start, cpu_start=cpu_start)
    trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    stage.testing = True
    if cfg.get("test_after_fit", True):
        for result in trainer.test(task, datamodule=datamodule, verbose=False):
            metrics.update({k: float(v) for k, v in result.items()})
    metrics["time/fit_and_test_s"] = time.time() - start
    if trainer.is_global_zero:
        write_run_record(cfg.paths.output_dir, cfg, metrics, steps=trainer.global_step,
                         wall_s=metrics["time/fit_and_test_s"], cpu_s=process_cpu_seconds() - cpu_start,
                         n_params=n_params, state_size=_state_size(task.model))
        stage.recorded = True
        summary = ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()) if k.startswith(("test/", "val/")))
        log.info("final metrics: %s", summary)
        print(f"[serengeti] {summary} | steps={trainer.global_step} | wall={metrics['time/fit_and_test_s']:.1f}s")
        if cfg.get("test_after_fit", True) and getattr(datamodule, "val_is_test", False):
            print("[serengeti] val/* and test/* score the same held-out examples: val/* at the last validation "
                  "during training, test/* with the final weights")
    return metrics


def _state_size(model) -> int | None:
    """Floats of recurrent state per sequence at the training length (:func:`serengeti.models.generation.state_size`);
    ``None`` for a model without a recurrent mode (e.g. a bidirectional S5) or without an ``l_max``."""
    if model.l_max is None:
        return None
    try:
        return state_size(model, model.l_max)
    except StateError:
        return None


_OURS = (Preempted, NonFiniteError, ConfigError, CheckpointError, UnsafeConfigError)


def failure_message(e: BaseException) -> str:
    """The one line a failed run ends with: ``error: <non-finite ...>``, ``config error: ...`` or
    ``error while training: <type>: ...``."""
    ours = _first_of(e, _OURS)
    if isinstance(ours, NonFiniteError):
        return f"error: {_first_line(str(ours))}"
    if ours is not None:
        return f"config error: {_first_line(str(ours))}"
    return f"error while training: {type(e).__name__}: {_first_line(_root_cause(e))}"


def in_multirun() -> bool:
    """Whether this is one job of a ``-m`` sweep (Hydra's multirun mode)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def main(cfg: DictConfig) -> float | None:
    """Hydra task function: run, and turn every expected failure into one line and a non-zero exit.

    Config errors (also those raised while training starts: data, optimizer, first forward) remove
    the fresh run dir; a signal exits with 128 + its number after saving ``last.ckpt``; a non-finite
    loss exits 1 keeping the last finite checkpoint and a ``metrics.json`` with ``status: failed``.
    In a ``-m`` sweep a failed job (other than a signal) is recorded as failed in its directory
    instead and the sweep goes on; :class:`serengeti.training.sweep_summary.SweepSummary` shows it and exits
    non-zero at the end. ``SERENGETI_DEBUG=1`` re-raises with the traceback.
    """
    state: dict = {}
    try:
        metrics = run(cfg, state)
    except Exception as e:
        if os.environ.get("SERENGETI_DEBUG"):
            raise
        ours = _first_of(e, _OURS)
        if isinstance(ours, Preempted):
            print(f"[serengeti] {ours}; {ours.hint}", file=sys.stderr)
            raise SystemExit(ours.exit_code) from None
        if isinstance(e, RunDirBusy):  # the directory is another live run's: touch nothing in it
            raise SystemExit(f"error: {e}") from None
        message = failure_message(e)
        if ours is None:
            message += " (SERENGETI_DEBUG=1 shows the traceback)"
        output_dir = cfg.paths.get("output_dir") if cfg.get("paths") else None
        sweep_job = in_multirun()
        if output_dir and (sweep_job or isinstance(ours, NonFiniteError)):
            _write_failure(output_dir, cfg, state, failure_message(e))
        if sweep_job and output_dir:
            print(f"[serengeti] job failed, the sweep goes on: {message}", file=sys.stderr)
            return None
        if not isinstance(ours, NonFiniteError):
            remove_fresh_run_dir(output_dir)
        raise SystemExit(message) from None
    value = metrics.get(cfg.get("monitor"))
    return None if value is None or math.isnan(value) else value


def _write_failure(output_dir: str, cfg: DictConfig, state: dict, reason: str) -> None:
    """``metrics.json`` with ``status: failed``, the reason and what the run logged before it stopped."""
    trainer = state.get("trainer")
    if trainer is not None and not trainer.is_global_zero:
        return
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()} if trainer is not None else {}
    start, cpu_start = state.get("start"), state.get("cpu_start")
    write_run_record(output_dir, cfg, metrics, steps=trainer.global_step if trainer is not None else 0,
                     wall_s=time.time() - start if start is not None else 0.0,
                     cpu_s=process_cpu_seconds() - cpu_start if cpu_start is not None else 0.0,
                     n_params=state.get("n_params"), status=FAILED, reason=reason)


def _first_of(e: BaseException | None, types: tuple[type, ...]) -> BaseException | None:
    """The outermost exception of ``types`` in ``e``'s chain of causes."""
    while e is not None and not isinstance(e, types):
        e = e.__cause__ or e.__context__
    return e


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0][:500]
