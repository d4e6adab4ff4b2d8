"""Every config file composes; every experiment builds its model; every mixer config points at an importable class."""
from __future__ import annotations

import importlib
import shutil

import pytest

from conftest import MIXERS, ROOT, build_meta, compose_cfg
from serengeti.errors import UnsafeConfigError

EXPERIMENTS = sorted(
    str(p.relative_to(ROOT / "configs" / "experiment").with_suffix(""))
    for p in (ROOT / "configs" / "experiment").rglob("*.yaml")
)
MODELS = sorted(p.stem for p in (ROOT / "configs" / "model").glob("*.yaml") if p.stem != "base")


def _import_target(target: str):
    module, _, name = target.rpartition(".")
    return getattr(importlib.import_module(module), name)


def test_default_config_composes():
    cfg = compose_cfg()
    assert cfg.dataset.task == "associative_recall" and cfg.model.mixer._target_.endswith("Hyena")


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_builds(experiment):
    """Composed, filled as training fills it and built on the meta device through the registry, so a
    misspelt or undeclared option anywhere in the file fails here, not at the start of a run."""
    cfg = compose_cfg([f"experiment={experiment}"])
    _import_target(cfg.dataset._target_)
    assert cfg.trainer._target_ and cfg.optimizer.lr > 0
    model, _ = build_meta([f"experiment={experiment}"])
    assert sum(p.numel() for p in model.parameters()) > 0


def test_misspelt_experiment_key_fails_the_build(tmp_path):
    """The check above on a copy of configs/ with one experiment whose mixer option is misspelt."""
    configs = tmp_path / "configs"
    shutil.copytree(ROOT / "configs", configs)
    (configs / "experiment" / "misspelt.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /model: hyena\nmodel:\n  mixer:\n    filterorder: 64\n")
    cfg = compose_cfg(["experiment=misspelt"], config_dir=configs)
    assert cfg.model.mixer.filterorder == 64  # composing alone accepts it
    with pytest.raises(UnsafeConfigError, match="model.mixer.filterorder"):
        build_meta(["experiment=misspelt"], config_dir=configs)


@pytest.mark.parametrize("mixer", MIXERS)
def test_mixer_config_target_importable(mixer):
    cfg = compose_cfg([f"model/mixer={mixer}"])
    assert callable(_import_target(cfg.model.mixer._target_))


@pytest.mark.parametrize("model", MODELS)
def test_model_config_composes(model):
    cfg = compose_cfg([f"model={model}"])
    assert cfg.model.n_layer >= 1


def test_unknown_mixer_lists_choices():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="attention"):
        compose_cfg(["model/mixer=no_such_mixer"])
