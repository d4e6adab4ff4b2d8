"""Long runs survive kills exactly: real SIGKILL / SIGTERM on train.py subprocesses, then resume.

The reference is an uninterrupted run with dropout on; a run killed at a step inside an epoch
(or stopped by a signal) and resumed with ``ckpt_path=auto`` must end with bit-identical weights.
10 batches per epoch; checkpoints every 7 steps land inside epochs, every 10 steps on boundaries.
"""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from serengeti.training.checkpoint_policy import first_non_finite

RUN = ["trainer.max_steps=35", "dataset.num_examples=320", "dataset.num_test_examples=64", "logger=none",
       "trainer.enable_progress_bar=false", "callbacks.rich_model_summary=null", "test_after_fit=false",
       "model.embed_dropout=0.1", "model.resid_dropout=0.1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _train(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *RUN, f"hydra.run.dir={run_dir}", *extra],
                          capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600)


def _start(run_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *RUN, f"hydra.run.dir={run_dir}", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=ENV)


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _weights_hash(path: Path) -> str:
    sd = _ckpt(path)["state_dict"]
    return hashlib.sha256(b"".join(k.encode() + v.numpy().tobytes() for k, v in sorted(sd.items()))).hexdigest()


def _wait_for_step(proc: subprocess.Popen, last: Path, step: int) -> None:
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
    assert _ckpt(last)["global_step"] == 35
    return resumed_from


def test_sigkill_mid_epoch_then_resume_is_bit_exact(tmp_path, reference):
    resumed_from = _kill_and_resume(tmp_path, every=7, at=14)
    assert resumed_from % 10 != 0, "the kill point must be inside an epoch"
    assert _weights_hash(tmp_path / "checkpoints" / "last.ckpt") == reference


@pytest.mark.slow
@pytest.mark.parametrize("every,at", [(7, 7), (7, 21), (10, 20)])
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
    assert _train(ref_dir, *extra).returncode == 0
    last = run_dir / "checkpoints" / "last.ckpt"
    proc = _start(run_dir, *extra)
    _wait_for_step(proc, last, 14)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM
    r = _train(run_dir, *extra, "ckpt_path=auto")
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


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_intact(tmp_path):
    """SIGKILL the writer half-way through ``torch.save``; the old file must load unchanged."""
    path = tmp_path / "last.ckpt"
    script = textwrap.dedent(f"""
        import os, signal, torch
        from serengeti.training.checkpoint_policy import atomic_save
        atomic_save({{"step": 1, "w": torch.ones(1000)}}, {str(path)!r})
        def dying_save(obj, f):
            f.write(b"PK" + b"x" * 1000)  # a partial zip, then the power goes
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = dying_save
        atomic_save({{"step": 2, "w": torch.zeros(1000)}}, {str(path)!r})
    """)
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL
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
