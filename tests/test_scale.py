"""Global batch size: accumulation derived from the world size; the same loss trajectory at any split."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, compose_cfg, tiny_overrides
from serengeti.scale import devices_per_node, global_batch_plan, world_size
from serengeti.train import ConfigError, prepare, run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("devices,expected", [(4, 4), ("4", 4), ("0,1,3", 3), ([0, 2], 2), ("auto", 1), (-1, 1)])
def test_devices_per_node_on_cpu(devices, expected):
    assert devices_per_node("cpu", devices) == expected


def test_world_size_counts_nodes():
    assert world_size({"accelerator": "gpu", "devices": 8, "num_nodes": 4}) == 32
    assert world_size({"accelerator": "cpu", "devices": 2}) == 2


@pytest.mark.parametrize("experiment,tokens", [("owt/hyena", 512 * 1024), ("pile/h3", 256 * 2048), ("wikitext/h3", 512 * 1024)])
@pytest.mark.parametrize("nodes,devices", [(1, 1), (1, 8), (2, 8)])
def test_experiments_keep_their_global_batch_at_any_world_size(experiment, tokens, nodes, devices):
    cfg = compose_cfg([f"experiment={experiment}", f"trainer.devices={devices}", f"trainer.num_nodes={nodes}"])
    plan = global_batch_plan(cfg)
    assert cfg.dataset.batch_size * nodes * devices * plan["accumulate_grad_batches"] * cfg.dataset.seq_len == tokens
    if cfg.get("val_every_n_steps"):
        assert plan["val_check_interval"] == 2000 * plan["accumulate_grad_batches"]


def test_global_batch_null_changes_nothing():
    assert global_batch_plan(compose_cfg()) == {}


def test_indivisible_global_batch_is_a_config_error(tmp_path):
    cfg = compose_cfg(tiny_overrides(tmp_path) + ["dataset.global_batch_size=12", "dataset.batch_size=8"], output_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"dataset.global_batch_size=12 is not a positive multiple of dataset.batch_size=8"):
        prepare(cfg)


def test_explicit_accumulation_that_disagrees_is_a_config_error(tmp_path):
    cfg = compose_cfg(tiny_overrides(tmp_path) + ["dataset.global_batch_size=32", "trainer.accumulate_grad_batches=2"],
                      output_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"trainer.accumulate_grad_batches=2 contradicts dataset.global_batch_size=32"):
        prepare(cfg)


def test_prepare_sets_the_accumulation(tmp_path):
    cfg = compose_cfg(tiny_overrides(tmp_path) + ["dataset.global_batch_size=32", "dataset.batch_size=4"], output_dir=tmp_path)
    prepare(cfg)
    assert cfg.trainer.accumulate_grad_batches == 8


# --- the same loss trajectory whatever splits the global batch of 8 sequences -------------------------------

STEPS = 4
EQUIVALENCE = [  # no dropout anywhere, deterministic data (the order depends only on the seed)
    "logger=csv", "trainer.log_every_n_steps=1", f"trainer.max_steps={STEPS}", "trainer.enable_progress_bar=false",
    "test_after_fit=false", "dataset.num_examples=64", "dataset.num_test_examples=16", "dataset.global_batch_size=8",
    "scheduler.warmup_steps=0", "model.embed_dropout=0.0", "model.resid_dropout=0.0", "model.mixer.dropout=0.0", "trainer.limit_val_batches=0",
    "~callbacks.rich_model_summary", "~callbacks.rich_progress_bar", "+callbacks.global_loss._target_=serengeti.scale.GlobalBatchLoss",
]


def _trajectory(run_dir: Path) -> list[float]:
    """train/global_loss per optimizer step from the CSV logger's metrics.csv."""
    (path,) = run_dir.rglob("metrics.csv")
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/global_loss")]
    return [float(r["train/global_loss"]) for r in sorted(rows, key=lambda r: int(r["step"]))]


def _in_process(tmp_path: Path, name: str, overrides: list[str]) -> list[float]:
    out = tmp_path / name
    cfg = compose_cfg(EQUIVALENCE + overrides, output_dir=out)
    run(cfg)
    return _trajectory(out)


def test_accumulation_and_two_processes_match_the_full_batch(tmp_path):
    full = _in_process(tmp_path, "full", ["dataset.batch_size=8"])
    accumulated = _in_process(tmp_path, "accumulate4", ["dataset.batch_size=2"])
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), *EQUIVALENCE, "trainer=ddp_sim", "dataset.batch_size=2",
                          f"hydra.run.dir={tmp_path / 'ddp'}"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    ddp = _trajectory(tmp_path / "ddp")
    assert len(full) == len(accumulated) == len(ddp) == STEPS
    assert full[0] > full[-1], "the loss falls over the steps (the comparison is not of constants)"
    diff = max(max(abs(a - b) for a, b in zip(full, accumulated)), max(abs(a - b) for a, b in zip(full, ddp)))
    print(f"max |loss difference| over {STEPS} steps: {diff:.3g} (full {full})")
    assert diff <= 1e-5


# --- shared machines: passive OpenMP waits, threads = the CPUs this process may use --------------------------

def test_threads_default_to_the_affinity_mask():
    import torch

    from serengeti.runtime import available_cpus, set_threads

    n = torch.get_num_threads()
    try:
        assert set_threads(None) == available_cpus() == len(os.sched_getaffinity(0)) == torch.get_num_threads()
        assert set_threads(1) == 1 == torch.get_num_threads()
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
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), "threads=0", f"hydra.run.dir={tmp_path / 'run'}"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert res.stderr.strip().splitlines()[-1].startswith("config error: threads=0: expected an integer >= 1"), res.stderr[-2000:]
    assert "Traceback" not in res.stderr
