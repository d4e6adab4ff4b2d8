"""A GPU trainer on a machine without CUDA is refused before anything is built (serengeti.training.accelerator)."""
from __future__ import annotations


import torch

from conftest import compose_cfg
from entry_runs import run_in_process
from serengeti.training.accelerator import cuda_problem


def test_cuda_problem_names_the_key_and_the_cpu_trainers(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cuda_problem({"accelerator": "cpu"}) is None
    assert cuda_problem({"accelerator": "auto"}) is None
    for trainer in ("gpu", "ddp"):
        message = cuda_problem(compose_cfg([f"trainer={trainer}"]).trainer)
        assert message.startswith("trainer.accelerator=gpu needs a CUDA GPU") and "trainer=cpu" in message
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cuda_problem({"accelerator": "gpu"}) is None

def test_gpu_trainer_without_cuda_fails_before_the_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    res = run_in_process("train.py", ["trainer=gpu", "logger=none", f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                         env={"CUDA_VISIBLE_DEVICES": ""})
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert lines[-1].startswith("config error: trainer.accelerator=gpu needs a CUDA GPU"), res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert not run_dir.exists(), "the run dir is removed"
