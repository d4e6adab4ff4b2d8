"""Long runs survive kills exactly: real SIGKILL / SIGTERM on train.py subprocesses, then resume.

The reference is an uninterrupted run with dropout on; a run killed at a step inside an epoch
(or stopped by a signal) and resumed with ``ckpt_path=auto`` must end with bit-identical weights.
10 batches per epoch; checkpoints every 7 steps land inside epochs, every 10 steps on boundaries.
The killed and signalled runs are separate processes (most forked from a server that has imported torch,
Lightning and Hydra once: ``entry_runs.start_forked``); the uninterrupted references, the resumes and the runs that
stop on their own run train.py in this process (``entry_runs.run_in_process``; the weights are bit-identical to
a separate process's, and the comparison with the killed process's steps still crosses processes).
"""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from entry_runs import ForkedRun, fork_call, run_in_process, run_subprocess, start_forked, start_subprocess
from serengeti.training.checkpoint_policy import first_non_finite

STEPS = 24  # kills and signals at steps 7-15 land inside epochs and leave the run steps to go; resumes cross step 20
RUN = [f"trainer.max_steps={STEPS}", "dataset.num_examples=320", "dataset.num_test_examples=64", "logger=none",
       "trainer.enable_progress_bar=false", "callbacks.rich_model_summary=null", "test_after_fit=false",
       "model.embed_dropout=0.1", "model.resid_dropout=0.1"]


def _train(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    """``python train.py RUN ... extra``, run in this process (:func:`entry_runs.run_in_process`): the
    uninterrupted references, the resumes and the runs that stop on their own."""
    return run_in_process("train.py", [*RUN, f"hydra.run.dir={run_dir}", *extra])


def _start(run_dir: Path, *extra: str) -> ForkedRun:
    """``python train.py RUN ... extra`` in a separate process (forked from a server that has done the imports:
    :func:`entry_runs.start_forked`), to be signalled or killed."""
    return start_forked("train.py", [*RUN, f"hydra.run.dir={run_dir}", *extra])


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _weights_hash(path: Path) -> str:
    sd = _ckpt(path)["state_dict"]
    return hashlib.sha256(b"".join(k.encode() + v.numpy().tobytes() for k, v in sorted(sd.items()))).hexdigest()


def _wait_for_step(proc: ForkedRun | subprocess.Popen, last: Path, step: int) -> None:
    """Poll ``last.ckpt`` (replaced atomically, so always readable) until it reaches ``step``."""
    deadline = time.time() + 300
    while time.time() < deadline:
        assert proc.poll() is None, f"training ended before step {step}: {proc.stderr.read()[-2000:]}"
        if last.is_file() and _ckpt(last)["global_step"] >= step:
            return
        time.sleep(0.05)
    raise TimeoutError(f"no checkpoint at step {step}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> str:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    r = _train(run_dir, "callbacks.model_checkpoint.every_n_train_steps=7")
    assert r.returncode == 0, r.stderr[-3000:]
    return _weights_hash(run_dir / "checkpoints" / "last.ckpt")


def _kill_and_resume(run_dir: Path, every: int, at: int) -> int:
    last = run_dir / "checkpoints" / "last.ckpt"
    proc = _start(run_dir, f"callbacks.model_checkpoint.every_n_train_steps={every}")
    _wait_for_step(proc, last, at)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed_from = _ckpt(last)["global_step"]
    r = _train(run_dir, f"callbacks.model_checkpoint.every_n_train_steps={every}", "ckpt_path=auto")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _ckpt(last)["global_step"] == STEPS
    return resumed_from


def test_sigkill_mid_epoch_then_resume_is_bit_exact(tmp_path, reference):
    resumed_from = _kill_and_resume(tmp_path, every=7, at=14)
    assert resumed_from % 10 != 0, "the kill point must be inside an epoch"
    assert _weights_hash(tmp_path / "checkpoints" / "last.ckpt") == reference


@pytest.mark.slow
@pytest.mark.parametrize("every,at", [(7, 7), (5, 15), (10, 10)])
def test_sigkill_at_more_points_then_resume_is_bit_exact(tmp_path, reference, every, at):
    _kill_and_resume(tmp_path, every=every, at=at)
    assert _weights_hash(tmp_path / "checkpoints" / "last.ckpt") == reference


def test_sigterm_saves_at_the_signal_step_exits_nonzero_and_resumes_exactly(tmp_path, reference):
    last = tmp_path / "checkpoints" / "last.ckpt"
    proc = _start(tmp_path, "callbacks.model_checkpoint.every_n_train_steps=7")
    _wait_for_step(proc, last, 7)  # before the first validation: last.ckpt exists without val/accuracy
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    step = _ckpt(last)["global_step"]
    assert step % 7 != 0 or step > 7, "saved at the signal's step, not only at the periodic one"
    assert err.strip().splitlines()[-1].startswith(f"[serengeti] stopped by SIGTERM at step {step}: saved ")
    r = _train(tmp_path, "callbacks.model_checkpoint.every_n_train_steps=7", "ckpt_path=auto")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _weights_hash(last) == reference


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGUSR1])
def test_ctrl_c_and_sigusr1_save_and_exit_with_the_signal(tmp_path, sig):
    last = tmp_path / "checkpoints" / "last.ckpt"
    proc = _start(tmp_path, "callbacks.model_checkpoint.every_n_train_steps=5")
    _wait_for_step(proc, last, 5)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, err[-2000:]
    step = _ckpt(last)["global_step"]
    assert err.strip().splitlines()[-1].startswith(f"[serengeti] stopped by {sig.name} at step {step}: saved ")


@pytest.mark.slow
def test_ddp_sigterm_then_resume_is_bit_exact(tmp_path_factory):
    """2 processes (gloo): every rank stops at the signal's step; per-rank RNG states come back."""
    ref_dir, run_dir = tmp_path_factory.mktemp("ddp_ref"), tmp_path_factory.mktemp("ddp_run")
    extra = ["trainer=ddp_sim", "callbacks.model_checkpoint.every_n_train_steps=7"]
    assert run_subprocess("train.py", [*RUN, f"hydra.run.dir={ref_dir}", *extra]).returncode == 0
    last = run_dir / "checkpoints" / "last.ckpt"
    proc = start_subprocess("train.py", [*RUN, f"hydra.run.dir={run_dir}", *extra])  # a new interpreter spawns DDP
    _wait_for_step(proc, last, 14)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM
    r = run_subprocess("train.py", [*RUN, f"hydra.run.dir={run_dir}", *extra, "ckpt_path=auto"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert _weights_hash(last) == _weights_hash(ref_dir / "checkpoints" / "last.ckpt")


def test_nonfinite_loss_stops_at_once_and_never_saves_nan(tmp_path):
    r = _train(tmp_path, "optimizer.lr=1e6", "callbacks.model_checkpoint.every_n_train_steps=1")
    assert r.returncode == 1
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: non-finite loss or gradient at step ") and "nan_policy=stop" in line, line
    stopped_at = int(line.split("at step ")[1].split(":")[0])
    ckpts = sorted((tmp_path / "checkpoints").glob("*.ckpt"))
    assert ckpts, "the finite steps before it were checkpointed"
    for path in ckpts:
        ckpt = _ckpt(path)
        assert first_non_finite(ckpt["state_dict"]) is None, path
        assert ckpt["global_step"] == stopped_at - 1


def test_nonfinite_skip_policy_counts_and_finishes(tmp_path):
    r = _train(tmp_path, "optimizer.lr=1e6", "trainer.nan_policy=skip", "trainer.max_steps=12")
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = _ckpt(tmp_path / "checkpoints" / "last.ckpt")
    assert first_non_finite(ckpt["state_dict"]) is None
    skipped = next(v for k, v in ckpt["callbacks"].items() if k.startswith("NonFiniteGuard"))["skipped"]
    assert 0 < skipped <= 12


def _save_then_die_while_saving(path: str) -> None:
    """In a separate process: one good ``atomic_save``, then one that the power cuts half-way through."""
    from serengeti.training.checkpoint_policy import atomic_save

    atomic_save({"step": 1, "w": torch.ones(1000)}, path)

    def dying_save(obj, f):
        f.write(b"PK" + b"x" * 1000)  # a partial zip, then the power goes
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = dying_save
    atomic_save({"step": 2, "w": torch.zeros(1000)}, path)


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_intact(tmp_path):
    """SIGKILL the writer half-way through ``torch.save``; the old file must load unchanged."""
    path = tmp_path / "last.ckpt"
    writer = fork_call(_save_then_die_while_saving, str(path))
    assert writer.wait(timeout=120) == -signal.SIGKILL, writer.stderr.read()[-2000:]
    ckpt = _ckpt(path)
    assert ckpt["step"] == 1 and bool((ckpt["w"] == 1).all())
    from serengeti.training.checkpoint_policy import atomic_save

    assert len(list(tmp_path.glob(".last.ckpt.tmp-*"))) == 1  # the dead writer's partial file
    atomic_save({"step": 3}, path)
    assert _ckpt(path)["step"] == 3 and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_rng_states_round_trip_from_any_rank_row():
    """What a rank restores is its row of the gathered (world, n) table (a view: must be copied)."""
    import random

    import numpy as np

    from serengeti.training.callbacks.exact_resume import capture_rng, restore_rng

    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    other = capture_rng()
    torch.rand(5), np.random.rand(5), random.random()
    mine = capture_rng()
    expected = (torch.rand(4), np.random.rand(4), random.random(), np.random.randn())
    table = {k: torch.stack([other[k], mine[k]]) for k in mine}
    restore_rng({k: t[1] for k, t in table.items()})
    got = (torch.rand(4), np.random.rand(4), random.random(), np.random.randn())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2:] == expected[2:]


def test_slurm_requeue_command_names_the_job_or_array_task():
    from serengeti.training.callbacks.preemption import slurm_requeue_command

    assert slurm_requeue_command({"SLURM_JOB_ID": "123"}) == ["scontrol", "requeue", "123"]
    assert slurm_requeue_command({"SLURM_JOB_ID": "130", "SLURM_ARRAY_JOB_ID": "123",
                                  "SLURM_ARRAY_TASK_ID": "4"}) == ["scontrol", "requeue", "123_4"]
    assert slurm_requeue_command({}) is None
    assert slurm_requeue_command({"SLURM_JOB_ID": "1; rm -rf /"}) is None



class _Killed(Exception):
    pass


def _epoch_run(run_dir: Path, batch_size: int, *extra: str, kill_at: int | None = None) -> list[list[int]]:
    """Train in-process on 320 examples in batches of ``batch_size`` (with ``kill_at``: die at that step,
    as a SIGKILL would, after the periodic ``last.ckpt``); returns the indices each epoch's training
    sampler handed out (after any resume skip)."""
    from conftest import compose_cfg
    from serengeti.data.samplers import EpochShuffleSampler
    from serengeti.training.lm_task import LMTask
    from serengeti.training.run import run

    handed_out, resumed, step = [], EpochShuffleSampler._resumed, LMTask.training_step

    def recording(self, indices):
        it = list(resumed(self, indices))
        if len(indices) == 320:  # the training sampler (validation runs in order)
            handed_out.append(it)
        return iter(it)

    def dying(self, *args, **kwargs):
        if self.trainer.global_step == kill_at:
            raise _Killed
        return step(self, *args, **kwargs)

    cfg = compose_cfg([*RUN[1:], "trainer.limit_val_batches=1", f"dataset.batch_size={batch_size}",
                       "dataset.num_workers=0", *extra], output_dir=run_dir)
    EpochShuffleSampler._resumed, LMTask.training_step = recording, dying
    try:
        run(cfg)
    except _Killed:
        pass
    finally:
        EpochShuffleSampler._resumed, LMTask.training_step = resumed, step
    return handed_out


def test_resume_mid_epoch_with_another_batch_size_trains_every_sample_once(tmp_path, caplog):
    """6 steps of 4 samples, then resumed in batches of 8: the epoch goes on with the 296 samples not
    yet seen (37 batches, ending at step 43), none skipped (before: 6 x 8 = 48 skipped, 24 never seen)."""
    (first,) = _epoch_run(tmp_path, 4, "callbacks.model_checkpoint.every_n_train_steps=6", kill_at=6)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert _ckpt(last)["serengeti_resume"]["samples_done"] == 24 and _ckpt(last)["epoch"] == 0
    second = _epoch_run(tmp_path, 8, "trainer.max_steps=60", "trainer.max_epochs=1", "ckpt_path=auto")
    assert len(second) == 1 and second[0] == first[24:]  # the same permutation, from sample 24 on
    assert _ckpt(last)["global_step"] == 6 + 296 // 8  # the rest of the epoch: 37 batches of 8
    assert "resuming mid-epoch with dataset.batch_size=8, the checkpoint was written with 4" in caplog.text


def test_sigterm_during_the_test_exits_with_the_signal_and_says_what_finished(tmp_path):
    """Before: Lightning's handler took over after fit and the run exited 0 without metrics.json."""
    proc = _start(tmp_path, "trainer.max_steps=4", "dataset.num_examples=32", "dataset.num_test_examples=40000",
                  "test_after_fit=true", "trainer.limit_val_batches=1")
    # Lightning, imported before Hydra's logging setup (by the fork server), prints "fit stopped" to stderr
    seen, deadline = "", time.time() + 300
    while "Trainer.fit` stopped" not in seen:
        assert proc.poll() is None and time.time() < deadline, seen[-2000:]
        time.sleep(0.05)
        seen += proc.stderr.read()
    time.sleep(0.5)  # into the test's 1250 batches
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert err.strip().splitlines()[-1] == (
        f"[serengeti] stopped by SIGTERM during the test, after training finished at step 4 (saved {last}); "
        f"no metrics.json written; resume with ckpt_path={last}")
    assert not (tmp_path / "metrics.json").exists()


def test_a_signal_before_training_starts_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    from conftest import compose_cfg
    import serengeti.training.run as train

    prepare = train.prepare

    def signalled(cfg):  # the signal arrives while the data are prepared
        os.kill(os.getpid(), signal.SIGTERM)
        return prepare(cfg)

    monkeypatch.setattr(train, "prepare", signalled)
    with pytest.raises(SystemExit) as stop:
        train.main(compose_cfg(RUN[1:], output_dir=tmp_path))
    assert stop.value.code == 128 + signal.SIGTERM
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "[serengeti] stopped by SIGTERM before training started: nothing was trained or saved; "
        "nothing to resume: run the command again")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the run's handler is gone again


def test_a_second_run_in_a_locked_run_directory_refuses_naming_the_holder(tmp_path):
    from serengeti.io.run_lock import LOCK_NAME, RunDirBusy, lock_run_dir

    with lock_run_dir(tmp_path):  # this process plays the first run
        r = _train(tmp_path, "ckpt_path=auto", "trainer.max_steps=2")
        with pytest.raises(RunDirBusy, match=f"pid {os.getpid()} on "):
            with lock_run_dir(tmp_path):
                pass
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith(
        f"error: run directory {tmp_path} is in use by another run (pid {os.getpid()} on ")
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / LOCK_NAME).exists()
    (tmp_path / LOCK_NAME).write_text("999999 elsewhere\n")  # left by a killed run: no flock is held on it
    with lock_run_dir(tmp_path) as lock:
        assert lock.read_text().split()[0] == str(os.getpid())
