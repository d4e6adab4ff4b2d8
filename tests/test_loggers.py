"""Loggers (configs/logger/, serengeti.training.loggers): they write into the run dir and never block a run."""
from __future__ import annotations

import os

import pytest

from conftest import compose_cfg, tiny_overrides
from serengeti.training.run import run


@pytest.mark.parametrize("logger", ["csv", "tensorboard"])
def test_loggers_write_into_the_run_dir(tmp_path, logger):
    overrides = [o for o in tiny_overrides(tmp_path) if o != "logger=none"]
    cfg = compose_cfg(overrides + [f"logger={logger}", "trainer.max_steps=2", "test_after_fit=false"], output_dir=tmp_path)
    run(cfg)
    files = [p for p in tmp_path.rglob("*") if p.is_file() and "checkpoints" not in p.parts]
    assert files, f"logger={logger} wrote nothing under the run dir"

def test_wandb_logger_is_offline_without_api_key(tmp_path, monkeypatch, capsys):
    from hydra.utils import instantiate

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    cfg = compose_cfg(["logger=wandb"], output_dir=tmp_path)
    logger = instantiate(cfg.logger.wandb)  # the run itself starts lazily, on the first log call
    assert logger._offline and os.environ["WANDB_MODE"] == "offline"
    assert logger._wandb_init["name"].startswith("train")
    assert f"wandb sync {tmp_path}/wandb/offline-run-*" in capsys.readouterr().out

def test_wandb_run_name_says_which_run(tmp_path):
    from serengeti.training.loggers import run_name

    assert run_name("train", str(tmp_path / "2026-01-01_10-00-00")) == "train 2026-01-01_10-00-00"
    assert run_name(None, None) == "serengeti"
