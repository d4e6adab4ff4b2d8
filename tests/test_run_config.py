"""serengeti.training.run_config: the keys a run takes from its dataset, filled without touching the composed config."""
from __future__ import annotations

import pytest

from conftest import compose_cfg
from serengeti.errors import ConfigError
from serengeti.training.run_config import fill_from_dataset, model_config


def test_fill_sets_null_keys_and_leaves_the_input_alone():
    cfg = compose_cfg(["model=transformer", "trainer.max_steps=123", "scheduler.total_steps=null"])
    filled = fill_from_dataset(cfg, vocab_size=37, l_max=50)
    assert (filled.model.vocab_size, filled.model.l_max, filled.scheduler.total_steps) == (37, 50, 123)
    assert filled.model.max_position_embeddings == 50  # ${model.l_max} follows the fill
    assert cfg.model.vocab_size is None and cfg.model.l_max is None and cfg.scheduler.total_steps is None


def test_fill_keeps_set_values_and_refuses_a_small_vocabulary():
    cfg = compose_cfg(["model.vocab_size=64", "model.l_max=16", "trainer.max_steps=10", "scheduler.total_steps=99"])
    plain = model_config(cfg, vocab_size=50, l_max=40)
    assert (plain["vocab_size"], plain["l_max"]) == (64, 16)
    assert fill_from_dataset(cfg, vocab_size=50, l_max=40).scheduler.total_steps == 99
    with pytest.raises(ConfigError, match=r"model.vocab_size=64 is smaller than the dataset's vocabulary \(65\)"):
        fill_from_dataset(cfg, vocab_size=65, l_max=40)


def test_no_total_steps_without_max_steps():
    cfg = compose_cfg(["trainer.max_steps=-1", "scheduler.total_steps=null"])
    assert fill_from_dataset(cfg, vocab_size=8, l_max=8).scheduler.total_steps is None
