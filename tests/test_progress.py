"""The progress display (serengeti.training.callbacks.progress): the step bar on a terminal, plain lines in a log."""
from __future__ import annotations

import sys

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from conftest import compose_cfg
from entry_runs import start_forked
from serengeti.training.callbacks.progress import LogProgress, StepProgressBar, format_duration, progress_bar

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


def test_default_callbacks_select_the_bar_by_terminal(monkeypatch):
    cfg = compose_cfg([]).callbacks.rich_progress_bar
    assert cfg._target_ == "serengeti.training.callbacks.progress.progress_bar"
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    assert isinstance(progress_bar(), StepProgressBar)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False, raising=False)
    bar = progress_bar(every_s=cfg.every_s, every_n_steps=3)
    assert isinstance(bar, LogProgress) and bar.every_n_steps == 3


def test_log_progress_prints_plain_step_lines_with_rate_and_time_left(tmp_path, capsys):
    bar = LogProgress(every_n_steps=3)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_model_summary=False,
                         callbacks=[bar], default_root_dir=tmp_path, max_steps=7, max_epochs=-1,
                         accumulate_grad_batches=2)
    trainer.fit(_Regression())
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[progress]")]
    steps = [int(line.split("train step ")[1].split("/")[0]) for line in lines]
    assert steps == [1, 3, 6, 7], "the first step, every 3rd optimizer step (not micro-batch), the last"
    assert lines[-1].startswith("[progress] train step 7/7 (100%) | loss ")
    for part in ("| lr 1.00e-02 |", " tok/s |", "| elapsed 0:0", "| left 0:00"):
        assert part in lines[-1]


def test_log_progress_time_based_default_prints_first_and_last(tmp_path, capsys):
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_model_summary=False,
                         callbacks=[LogProgress(every_s=3600)], default_root_dir=tmp_path, max_steps=5, max_epochs=-1)
    trainer.fit(_Regression())
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[progress]")]
    assert [line.split("|")[0].strip() for line in lines] == ["[progress] train step 1/5 (20%)",
                                                             "[progress] train step 5/5 (100%)"]


def test_format_duration():
    assert [format_duration(x) for x in (0, 75.2, 3725, float("nan"))] == ["0:00", "1:15", "1:02:05", "?"]


def test_log_progress_rejects_bad_intervals():
    with pytest.raises(ValueError, match="every_n_steps"):
        LogProgress(every_n_steps=0)


def test_train_under_nohup_prints_progress_lines_into_the_log(tmp_path):
    """stdout and stderr redirected to a file (``nohup python train.py ... > log 2>&1``; a process forked from a
    server that has done the imports): training and test batches print plain lines while they run."""
    log = tmp_path / "log"
    proc = start_forked("train.py", ["threads=1", "logger=none", "dataset.num_examples=64", "dataset.num_test_examples=32",
                                     "dataset.batch_size=8", "trainer.max_steps=4",
                                     "callbacks.rich_progress_bar.every_n_steps=2", "~callbacks.rich_model_summary",
                                     f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, output=log)
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "[progress] train step 2/4 (50%) | loss " in text and "[progress] train step 4/4 (100%)" in text
    assert "[progress] test batch 4/4 (100%)" in text
    assert "val/* and test/* score the same held-out examples" in text
