"""Process settings for shared machines (serengeti.runtime): passive OpenMP waits, threads chosen from the
work per step (or OMP_NUM_THREADS, the affinity mask), and a bad ``threads`` as a one-line config error."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT
from entry_runs import run_in_process


def test_threads_default_to_omp_num_threads_else_the_affinity_mask(monkeypatch):
    import torch

    from serengeti.runtime import available_cpus, set_threads

    n = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert set_threads(None) == available_cpus() == len(os.sched_getaffinity(0)) == torch.get_num_threads()
        assert set_threads(1) == 1 == torch.get_num_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's choice wins over the affinity mask
        torch.set_num_threads(n)
        assert set_threads(None) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(n)

def test_automatic_threads_follow_the_work_per_step(monkeypatch):
    import torch

    from conftest import compose_cfg
    from serengeti.runtime import WORK_PER_THREAD, auto_threads, step_work, threads_from_config

    assert auto_threads(None, 4) == 4  # work unknown: every CPU
    assert auto_threads(1, 4) == 1 and auto_threads(WORK_PER_THREAD - 1, 4) == 1
    assert auto_threads(2 * WORK_PER_THREAD, 4) == 2 and auto_threads(100 * WORK_PER_THREAD, 4) == 4
    assert auto_threads(100 * WORK_PER_THREAD, 1) == 1
    cfg = compose_cfg([])  # the default run: d_model 64, batch 32 x 64 tokens
    assert step_work(cfg) == 32 * 64 * 64**2 < WORK_PER_THREAD
    big = compose_cfg(["model.d_model=768", "dataset.seq_len=1024", "dataset.batch_size=8"])
    assert step_work(big) == 8 * 1024 * 768**2 and auto_threads(step_work(big), 2) == 2
    assert step_work({"threads": None}) is None
    n = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert threads_from_config(cfg) == 1 == torch.get_num_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's choice still wins
        assert threads_from_config(cfg) == 2
    finally:
        torch.set_num_threads(n)

def test_available_cpus_follows_a_narrowed_affinity():
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from serengeti.runtime import available_cpus; print(available_cpus())")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.stdout.strip() == "1", res.stderr

@pytest.mark.parametrize("script", ["train.py", "evaluate.py"])
def test_entry_scripts_set_the_wait_policy_before_torch_loads(script):
    code = (f"import os, runpy, sys; os.environ.pop('OMP_WAIT_POLICY', None); "
            f"runpy.run_path({str(ROOT / script)!r}, run_name='not_main'); "
            f"print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.stdout.split() == ["PASSIVE", "False"], res.stderr[-2000:]

def test_bad_threads_is_a_one_line_config_error(tmp_path):
    res = run_in_process("train.py", ["threads=0", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert res.returncode != 0
    assert res.stderr.strip().splitlines()[-1].startswith("config error: threads=0: expected an integer >= 1"), res.stderr[-2000:]
    assert "Traceback" not in res.stderr
