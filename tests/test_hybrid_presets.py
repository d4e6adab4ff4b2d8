"""model=hybrid_h3 / hybrid_hyena are small like every model/ preset; the experiments set the 125M layout."""
from __future__ import annotations

import pytest

from conftest import compose_cfg


@pytest.mark.parametrize("name,mixer", [("hybrid_h3", "H3"), ("hybrid_hyena", "Hyena")])
def test_hybrid_presets_are_small(name, mixer):
    base, hybrid = compose_cfg(["model=h3"]).model, compose_cfg([f"model={name}"]).model
    assert (hybrid.d_model, hybrid.n_layer, hybrid.d_inner) == (base.d_model, base.n_layer, base.d_inner) == (64, 2, None)
    assert list(hybrid.attn_layer_idx) == [1] and hybrid.d_model % hybrid.attn_cfg.num_heads == 0
    assert hybrid.mixer._target_.endswith(mixer)


@pytest.mark.parametrize("experiment", ["wikitext/hybrid_h3", "wikitext/hybrid_hyena", "owt/hybrid_h3",
                                        "pile/hybrid_h3"])
def test_hybrid_experiments_set_the_125m_layout(experiment):
    model = compose_cfg([f"experiment={experiment}"]).model
    assert (model.d_model, model.n_layer, model.d_inner or 4 * model.d_model) == (768, 12, 3072)  # d_inner: null = 4 x d_model
    assert list(model.attn_layer_idx) == [1, 8]
    assert (model.attn_cfg.num_heads, model.attn_cfg.dropout) == (12, 0.1)
