"""Shared fixtures: compose the real configs with Hydra's compose API, tiny and on CPU."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = str(ROOT / "configs")
SHARED_DATA = Path(os.environ.get("SERENGETI_SHARED_DATA", ROOT.parent / "shared" / "data"))


def compose_cfg(overrides: list[str] | None = None, output_dir: str | Path | None = None):
    """Compose ``train.yaml`` with overrides; ``paths.output_dir`` points at ``output_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides or []), return_hydra_config=False)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir) if output_dir is not None else "/tmp/serengeti-test-unused"
    return cfg


def tiny_overrides(tmp_path: Path) -> list[str]:
    """Overrides that make any run small: tiny data, no logger, 0 workers."""
    return [
        "logger=none",
        "dataset.num_examples=64",
        "dataset.num_test_examples=16",
        "dataset.batch_size=8",
        "trainer.max_steps=4",
        "trainer.enable_progress_bar=false",
        "~callbacks.rich_model_summary",
        "~callbacks.rich_progress_bar",
    ]


@pytest.fixture(autouse=True)
def _restore_defaults():
    """Restore the default dtype and tear down process groups a test may leave behind."""
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add barrier waits (very slow on a shared 2-core box).

    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA} (set SERENGETI_SHARED_DATA)")
    return SHARED_DATA
