"""Every config file composes; every mixer config points at an importable class."""
from __future__ import annotations

import importlib

import pytest

from conftest import ROOT, compose_cfg

EXPERIMENTS = sorted(
    str(p.relative_to(ROOT / "configs" / "experiment").with_suffix(""))
    for p in (ROOT / "configs" / "experiment").rglob("*.yaml")
)
MIXERS = sorted(p.stem for p in (ROOT / "configs" / "model" / "mixer").glob("*.yaml"))
MODELS = sorted(p.stem for p in (ROOT / "configs" / "model").glob("*.yaml") if p.stem != "base")


def _import_target(target: str):
    module, _, name = target.rpartition(".")
    return getattr(importlib.import_module(module), name)


def test_default_config_composes():
    cfg = compose_cfg()
    assert cfg.dataset.task == "associative_recall" and cfg.model.mixer._target_.endswith("Hyena")


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes(experiment):
    cfg = compose_cfg([f"experiment={experiment}"])
    _import_target(cfg.model.mixer._target_)
    _import_target(cfg.dataset._target_)
    assert cfg.trainer._target_ and cfg.optimizer.lr > 0


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
