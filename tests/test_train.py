"""End-to-end training: fast_dev_run, resume, config errors, multirun, DDP on 2 CPU processes."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from conftest import compose_cfg, tiny_overrides
from entry_runs import run_in_process, run_subprocess
from serengeti.errors import ConfigError
from serengeti.training.run import prepare, run


def test_fast_dev_run(tmp_path):
    cfg = compose_cfg(tiny_overrides(tmp_path) + ["debug=fdr"], output_dir=tmp_path)
    metrics = run(cfg)
    assert "train/loss" in metrics and torch.isfinite(torch.tensor(metrics["train/loss"]))


def _train(tmp_path: Path, out: str, steps: int, ckpt_path: str | None = None) -> dict:
    overrides = tiny_overrides(tmp_path) + [
        f"trainer.max_steps={steps}", "trainer.max_epochs=-1", "model.embed_dropout=0.0",
        "dataset.num_examples=64", "dataset.batch_size=8",  # 8 steps per epoch
        "scheduler.warmup_steps=2", "scheduler.total_steps=16", "test_after_fit=false",
    ]
    if ckpt_path:
        overrides.append(f"ckpt_path={ckpt_path}")
    return run(compose_cfg(overrides, output_dir=tmp_path / out))


def test_resume_continues_and_reproduces(tmp_path):
    full = _train(tmp_path, "full", 16)
    _train(tmp_path, "first", 8)
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert last.is_file()
    ckpt = torch.load(last, map_location="cpu", weights_only=True)  # plain tensors and dicts only
    assert ckpt["global_step"] == 8 and ckpt["lr_schedulers"][0]["last_epoch"] == 8
    resumed = _train(tmp_path, "resumed", 16, ckpt_path=str(last))
    assert resumed["train/loss"] == pytest.approx(full["train/loss"], rel=1e-5, abs=1e-6)
    assert resumed["val/loss"] == pytest.approx(full["val/loss"], rel=1e-5, abs=1e-6)


def test_model_keys_filled_from_dataset(tmp_path):
    cfg = compose_cfg(tiny_overrides(tmp_path) + ["model=transformer", "dataset.vocab_size=12", "dataset.seq_len=20"], output_dir=tmp_path)
    _, task = prepare(cfg)
    assert task.cfg["model"]["vocab_size"] == 12 and task.cfg["model"]["l_max"] == 22
    assert task.model.position_embeddings.num_embeddings == 22


def test_invalid_shape_is_a_config_error(tmp_path):
    cfg = compose_cfg(tiny_overrides(tmp_path) + ["model=transformer", "model.d_model=30", "model.mixer.num_heads=4"], output_dir=tmp_path)
    with pytest.raises(ConfigError, match="num_heads"):
        prepare(cfg)
    cfg = compose_cfg(tiny_overrides(tmp_path) + ["dataset.seq_len=7"], output_dir=tmp_path)
    with pytest.raises(ConfigError, match="dataset.seq_len"):
        prepare(cfg)


def _train_py(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python train.py ARGS`` in ``cwd``, run in this process (:func:`entry_runs.run_in_process`)."""
    return run_in_process("train.py", args, cwd=cwd)


def test_cli_config_error_leaves_no_output_dir(tmp_path):
    res = _train_py(["model=transformer", "model.d_model=30", "model.mixer.num_heads=4", "logger=none"], cwd=tmp_path)
    assert res.returncode != 0
    assert "num_heads" in res.stderr and "model.d_model" in res.stderr
    assert not any((tmp_path / "outputs").rglob("*.yaml")), "no run dir is left behind"
    res = _train_py(["experiment=no/such/experiment"], cwd=tmp_path)
    assert res.returncode != 0 and "experiment" in res.stderr


def test_cli_multirun_one_dir_per_job(tmp_path):
    res = _train_py(["-m", "seed=1,2", "debug=fdr", "dataset.num_examples=32", "dataset.num_test_examples=8",
                     "dataset.batch_size=8", "trainer.enable_progress_bar=false"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    jobs = sorted(p.parent.parent.name for p in (tmp_path / "outputs").rglob("multiruns/*/*/.hydra/config.yaml"))
    assert jobs == ["0", "1"]


@pytest.mark.slow  # default runs: test_scale.py::test_accumulation_and_two_processes_match_the_full_batch
def test_ddp_two_cpu_processes(tmp_path):
    res = run_subprocess("train.py", ["trainer=ddp_sim", "logger=none", "dataset.num_examples=64", "dataset.num_test_examples=16",
                     "dataset.batch_size=8", "trainer.max_steps=3", "trainer.enable_progress_bar=false",
                     "~callbacks.rich_model_summary", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "test/accuracy" in res.stdout


@pytest.mark.parametrize("override,expected", [
    ("model.nope=1", "config error: Could not override 'model.nope'. To append to your config use +model.nope=1"),
    ("model=nope", "config error: In 'train': Could not find 'model/nope'; Available options in 'model': base; h3;"),
])
def test_hydra_composition_errors_are_one_line(tmp_path, override, expected):
    """A real ``python train.py`` (stops before the heavy imports)."""
    r = run_subprocess("train.py", [override, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path,
                       env={"HYDRA_FULL_ERROR": None})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith(expected), r.stderr
    assert not (tmp_path / "run").exists()
