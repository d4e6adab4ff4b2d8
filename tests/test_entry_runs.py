"""tests/entry_runs.py: a command line run in this process reports what a new interpreter does, and leaves
this process as it found it."""
from __future__ import annotations

import logging
import os
import signal

import torch
from hydra.core.global_hydra import GlobalHydra

from entry_runs import run_in_process, run_subprocess


def test_in_process_run_reports_what_a_new_interpreter_reports(tmp_path):
    args = ["model.nope=1", f"hydra.run.dir={tmp_path / 'run'}"]  # Hydra refuses it before the heavy imports
    real = run_subprocess("train.py", args, cwd=tmp_path, env={"HYDRA_FULL_ERROR": None})
    here = run_in_process("train.py", args, cwd=tmp_path, env={"HYDRA_FULL_ERROR": None})
    assert (here.returncode, here.stdout, here.stderr) == (real.returncode, real.stdout, real.stderr)
    assert real.returncode == 1 and real.stderr.startswith("config error: Could not override 'model.nope'")


def test_in_process_run_puts_the_process_back(tmp_path):
    """A run that got as far as Hydra's logging, the thread count and the config checks, then stopped."""
    before = (dict(os.environ), os.getcwd(), torch.get_num_threads(), list(logging.getLogger().handlers),
              logging.getLogger().level, {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)})
    torch.set_num_threads(2)
    try:
        res = run_in_process("train.py", ["optimizer.lr=0", "threads=1", f"hydra.run.dir={tmp_path / 'run'}"],
                             cwd=tmp_path)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before[2])
    assert (res.returncode, res.stderr) == (1, "config error: optimizer.lr=0: expected a number > 0\n")
    after = (dict(os.environ), os.getcwd(), torch.get_num_threads(), list(logging.getLogger().handlers),
             logging.getLogger().level, {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)})
    assert after == before
    assert not GlobalHydra.instance().is_initialized()
    assert not (tmp_path / "run").exists()
