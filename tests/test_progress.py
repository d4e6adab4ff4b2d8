"""The step progress bar (serengeti.progress) and the early refusal of GPU trainers without CUDA."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from conftest import ROOT, compose_cfg
from serengeti.accelerator import cuda_problem
from serengeti.progress import StepProgressBar

pytestmark = pytest.mark.usefixtures("one_thread")


class _Regression(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(12, 4, generator=g), torch.randn(12, 1, generator=g)), batch_size=2)


def _fit(tmp_path, ckpt_path=None, **trainer_kwargs) -> tuple[pl.Trainer, StepProgressBar]:
    bar = StepProgressBar()
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_model_summary=False,
                         callbacks=[bar], default_root_dir=tmp_path, **trainer_kwargs)
    trainer.fit(_Regression(), ckpt_path=ckpt_path)
    return trainer, bar


def _train_task(bar: StepProgressBar):
    return next(t for t in bar.progress.tasks if t.id == bar.train_progress_bar_id)


def test_bar_counts_optimizer_steps_of_max_steps_across_epochs(tmp_path):
    # 6 batches per epoch, 2 accumulated per step: 3 steps per epoch, so 7 steps span 3 epochs
    trainer, bar = _fit(tmp_path, max_steps=7, max_epochs=-1, accumulate_grad_batches=2)
    task = _train_task(bar)
    assert trainer.global_step == 7
    assert (task.completed, task.total) == (7, 7)
    assert "Step (epoch 2)" in task.description and "-" not in task.description


def test_bar_after_resume_continues_at_the_restored_step(tmp_path):
    trainer, _ = _fit(tmp_path, max_steps=4, max_epochs=-1)
    trainer.save_checkpoint(tmp_path / "step4.ckpt")
    trainer, bar = _fit(tmp_path, ckpt_path=str(tmp_path / "step4.ckpt"), max_steps=8, max_epochs=-1)
    task = _train_task(bar)
    assert trainer.global_step == 8
    assert (task.completed, task.total) == (8, 8), "steps of max_steps, not batches of this epoch"


def test_epoch_bounded_run_keeps_the_epoch_bar(tmp_path):
    _, bar = _fit(tmp_path, max_epochs=2)
    task = _train_task(bar)
    assert "Epoch 1/1" in task.description
    assert (task.completed, task.total) == (6, 6), "batches of the epoch"


def test_default_callbacks_select_the_step_bar():
    assert compose_cfg([]).callbacks.rich_progress_bar._target_ == "serengeti.progress.StepProgressBar"


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
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HYDRA_FULL_ERROR="0", CUDA_VISIBLE_DEVICES="")
    run_dir = tmp_path / "run"
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), "trainer=gpu", "logger=none",
                          f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert lines[-1].startswith("config error: trainer.accelerator=gpu needs a CUDA GPU"), res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert not run_dir.exists(), "the run dir is removed"
