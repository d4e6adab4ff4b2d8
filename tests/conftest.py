"""Shared fixtures: compose the real configs with Hydra's compose API, tiny and on CPU."""
from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

# As the entry scripts do (serengeti.runtime.use_passive_omp_wait), before torch loads: idle OpenMP
# threads sleep instead of spinning. With spinning threads a test that trains in-process ran 12x
# slower while other processes held the cores (test_resume_continues_and_reproduces: 268 s vs 21 s).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

import serengeti  # noqa: F401  (registers the ${serengeti.*} resolvers the configs use)
from serengeti.config_catalog import mixer_names, mixer_overrides as _mixer_overrides
from serengeti.runtime import available_cpus

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest-xdist workers share the CPUs: each gets its part
    _threads = max(1, available_cpus() // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    torch.set_num_threads(_threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))  # and so do the processes the tests start

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = str(ROOT / "configs")
SHARED_DATA = Path(os.environ.get("SERENGETI_SHARED_DATA", ROOT.parent / "shared" / "data"))


_COMPOSED: dict[tuple, object] = {}


def _compose(config_name: str, overrides: list[str], config_dir: str | Path):
    """Hydra's compose of ``config_name`` in ``config_dir``; each test gets its own copy of a config composed once
    per session for the same files and overrides (composing takes 0.1-0.4 s, and many tests compose the same)."""
    yamls = [p.stat() for p in Path(config_dir).rglob("*.yaml")]
    key = (str(config_dir), config_name, tuple(overrides), len(yamls), max(s.st_mtime_ns for s in yamls))
    if key not in _COMPOSED:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            _COMPOSED[key] = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=False)
    return copy.deepcopy(_COMPOSED[key])


def compose_cfg(overrides: list[str] | None = None, output_dir: str | Path | None = None, config_dir: str | Path = CONFIG_DIR):
    """Compose ``train.yaml`` (of ``config_dir``) with overrides; ``paths.output_dir`` points at ``output_dir``."""
    cfg = _compose("train", list(overrides or []), config_dir)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir) if output_dir is not None else "/tmp/serengeti-test-unused"
    return cfg


#: every mixer, one per file of configs/model/mixer/ (the single list the mixer tests share)
MIXERS = mixer_names(CONFIG_DIR)


def mixer_overrides(name: str) -> list[str]:
    """``train.yaml`` overrides that select mixer ``name`` (:func:`serengeti.config_catalog.mixer_overrides`)."""
    return _mixer_overrides(name, CONFIG_DIR)


def compose_eval_cfg(overrides: list[str], output_dir: str | Path):
    """Compose ``evaluate.yaml`` with overrides; ``paths.output_dir`` points at ``output_dir``."""
    cfg = _compose("evaluate", list(overrides), CONFIG_DIR)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def build_mixer(name: str, d_model: int, l_max: int, seed: int = 0) -> torch.nn.Module:
    """Mixer ``name`` as its model preset configures it (:func:`mixer_overrides`), every dropout off."""
    from hydra.utils import instantiate

    mixer_cfg = compose_cfg(mixer_overrides(name)).model.mixer
    for key in mixer_cfg:
        if "dropout" in key:
            mixer_cfg[key] = 0.0
    torch.manual_seed(seed)
    return instantiate(mixer_cfg)(d_model, layer_idx=0, l_max=l_max)


def experiment_model_config(overrides: list[str], vocab_size: int | None = None, l_max: int | None = None,
                            config_dir: str | Path = CONFIG_DIR) -> dict:
    """The plain model config that training would build for ``overrides``, without loading data.

    ``vocab_size`` and ``l_max`` stand in for the dataset's (defaults: ``dataset.vocab_size`` when the
    config states one, else GPT-2's 50257; ``dataset.seq_len``), filled by the training path itself
    (:func:`serengeti.training.run_config.model_config`).
    """
    from serengeti.training.run_config import model_config

    cfg = compose_cfg(overrides, config_dir=config_dir)
    vocab_size = vocab_size or cfg.dataset.get("vocab_size") or 50257
    return model_config(cfg, vocab_size=vocab_size, l_max=l_max or cfg.dataset.get("seq_len"))


def build_meta(overrides: list[str], vocab_size: int | None = None, l_max: int | None = None,
               config_dir: str | Path = CONFIG_DIR):
    """``(model, model config)`` of :func:`experiment_model_config`, built by ``build_model`` on the meta
    device (no memory, no init): every option is checked against the registered classes."""
    from serengeti.models.backbone import build_model

    model_cfg = experiment_model_config(overrides, vocab_size, l_max, config_dir)
    with torch.device("meta"):
        return build_model(model_cfg), model_cfg


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


#: the files that take longest (real train.py processes, many compositions), run first: pytest-xdist hands out
#: whole files in collection order, and one of these handed out last would leave one worker running it alone
LONG_FILES_FIRST = ("test_resume.py", "test_scale.py", "test_bad_inputs.py", "test_configs.py", "test_progress.py",
                    "test_hf.py", "test_no_data_loss.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONG_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def pytest_sessionfinish(session):
    """Stop the fork server of ``entry_runs.start_forked`` (pytest-xdist workers end without atexit)."""
    entry_runs = sys.modules.get("entry_runs")
    if entry_runs is not None:
        entry_runs.stop_fork_server()


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
