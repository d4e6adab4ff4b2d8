"""The LM experiment families: owt/* and pile/* (125M) and wikitext_small/* (CPU).

Models are built on the meta device from the composed experiment (no memory, no init), so the
parameter counts and the optimization budgets are checked without training anything.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import CONFIG_DIR, build_meta, compose_cfg, experiment_model_config
from serengeti.training.accelerator import cuda_problem
from serengeti.training.config_checks import check_config
from serengeti.training.global_batch import global_batch_plan
from serengeti.training.run_config import apply_final_overrides

# Hyena-S5 WT103 at vocab 50257 (docs/mixers.md#published-configurations); the OWT/Pile runs pad the vocab to 50264 (+7 rows of 768)
HYENA_S5_125M = 128_496_384 + 7 * 768
MODELS_125M = ["transformer", "h3", "hybrid_h3", "hyena", "hyena_s5"]


def mlp_width(model_cfg) -> int:
    """The MLP width a model config gets (``d_inner: null`` = 4 x d_model)."""
    return model_cfg.d_inner or 4 * model_cfg.d_model


def _params(overrides: list[str]) -> int:
    model, _ = build_meta(overrides, vocab_size=50257)  # GPT-2 BPE
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family,tokens_per_step", [("owt", 512 * 1024), ("pile", 256 * 2048)])
def test_125m_families_share_one_budget(family, tokens_per_step):
    budgets = set()
    for name in MODELS_125M:
        cfg = compose_cfg([f"experiment={family}/{name}"])
        plan = global_batch_plan(cfg)  # on one device
        tokens = cfg.dataset.batch_size * plan["accumulate_grad_batches"] * cfg.dataset.seq_len
        budgets.add((tokens, cfg.trainer.max_steps, cfg.optimizer.lr, cfg.scheduler.warmup_steps, cfg.scheduler.min_lr_ratio))
        assert (cfg.model.d_model, cfg.model.n_layer, mlp_width(cfg.model)) == (768, 12, 3072)
        assert plan["val_check_interval"] == 2000 * plan["accumulate_grad_batches"]
    assert budgets == {(tokens_per_step, 100_000, 6e-4, 1000, 0.1)}, "the same optimization for every model, warmup 1 %"
    pile_small = compose_cfg(["experiment=pile/hyena_small"])
    assert (pile_small.trainer.max_steps, pile_small.scheduler.warmup_steps) == (300_000, 3000)


@pytest.mark.slow
@pytest.mark.parametrize("experiment", [f"{f}/{m}" for f in ("owt", "pile") for m in MODELS_125M] + ["pile/hyena_small"])
def test_125m_parameter_counts(experiment):
    n = _params([f"experiment={experiment}"])
    if experiment.endswith("hyena_small"):
        assert abs(n / 153.7e6 - 1) < 0.005, f"{n:,} parameters"
    elif experiment.endswith("hyena_s5"):
        assert n == HYENA_S5_125M
    else:
        assert abs(n / 125e6 - 1) < 0.03, f"{experiment}: {n:,} parameters"


def test_wikitext_small_mixers_share_backbone_and_budget():
    budgets = set()
    for name in ["transformer", "h3", "hyena", "hyena_s5"]:
        cfg = compose_cfg([f"experiment=wikitext_small/{name}"])
        budgets.add((cfg.model.d_model, cfg.model.n_layer, cfg.model.d_inner, cfg.dataset.seq_len, cfg.dataset.batch_size,
                     cfg.trainer.max_steps, cfg.optimizer.lr, cfg.scheduler.warmup_steps, cfg.dataset.max_eval_tokens))
    assert len(budgets) == 1, budgets


CONFIG_ROOT = Path(CONFIG_DIR)
LM_EXPERIMENTS = sorted(f"{p.parent.name}/{p.stem}" for family in ("wikitext", "owt", "pile")
                        for p in (CONFIG_ROOT / "experiment" / family).glob("*.yaml") if p.stem != "base")


@pytest.mark.parametrize("experiment", LM_EXPERIMENTS)
def test_size_tiny_turns_every_lm_recipe_into_a_cpu_run(experiment):
    """size=tiny wins over the recipe's shape, batch, length and GPU trainer (keys merged at start-up)."""
    cfg = compose_cfg([f"experiment={experiment}", "size=tiny"])
    apply_final_overrides(cfg, keep=set())
    check_config(cfg)
    assert cuda_problem(cfg.trainer) is None and cfg.trainer.precision == "32-true"
    assert (cfg.model.d_model, cfg.model.n_layer, cfg.dataset.seq_len, cfg.dataset.batch_size) == (96, 2, 128, 4)
    assert cfg.trainer.max_steps == 60 and global_batch_plan(cfg) == {} and "final_overrides" not in cfg
    model, model_cfg = build_meta([f"experiment={experiment}", "size=tiny"] + [
        f"{k}={v}" for k, v in (("model.d_model", 96), ("model.n_layer", 2), ("model.d_inner", "null"))])
    assert sum(p.numel() for p in model.parameters()) < 6e6  # the 50K-token embedding is most of it


def test_command_line_keys_win_over_size_tiny():
    cfg = compose_cfg(["experiment=wikitext/hyena", "size=tiny", "trainer.max_steps=7"])
    assert apply_final_overrides(cfg, keep={"trainer.max_steps", "size"})
    assert (cfg.trainer.max_steps, cfg.model.d_model) == (7, 96)


def test_d_inner_follows_d_model_unless_set():
    assert experiment_model_config(["experiment=wikitext/hyena", "model.d_model=128"])["d_inner"] is None
    model, _ = build_meta(["experiment=wikitext/hyena", "model.d_model=128", "model.n_layer=1"])
    assert model.layers[0].mlp.fc1.out_features == 512
    model, _ = build_meta(["experiment=wikitext/hyena", "model.d_model=128", "model.n_layer=1", "model.d_inner=200"])
    assert model.layers[0].mlp.fc1.out_features == 200
