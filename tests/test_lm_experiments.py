"""The LM experiment families: owt/* and pile/* (125M) and wikitext_small/* (CPU).

Models are built on the meta device from the composed experiment (no memory, no init), so the
parameter counts and the optimization budgets are checked without training anything.
"""
from __future__ import annotations

import pytest

from conftest import build_meta, compose_cfg
from serengeti.scale import global_batch_plan

# Hyena-S5 WT103 at vocab 50257 (docs/mixers.md#published-configurations); the OWT/Pile runs pad the vocab to 50264 (+7 rows of 768)
HYENA_S5_125M = 128_496_384 + 7 * 768
MODELS_125M = ["transformer", "h3", "hybrid_h3", "hyena", "hyena_s5"]


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
        assert (cfg.model.d_model, cfg.model.n_layer, cfg.model.d_inner) == (768, 12, 3072)
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
