"""Parameter counts of the 125M WikiText-103 configs against the published sizes.

Each model is built from its experiment config on the meta device (no memory, no init cost) and
its count is checked twice: exactly against a closed-form count of the layers of docs/mixers.md (so a
missing or extra parameter in a mixer shows up), and within 3 % of the published size.
"""
from __future__ import annotations

import pytest

from conftest import build_meta

# name -> (experiment overrides, published size, where it is stated)
CASES = {
    "transformer": (["experiment=wikitext/transformer"], 125e6, "Transformer 125M (H3 / Hyena papers)"),
    "h3": (["experiment=wikitext/h3"], 125e6, "H3 125M (H3 paper)"),
    "hyena": (["experiment=wikitext/hyena"], 125e6, "Hyena 125M (Hyena paper)"),
    "hybrid_h3": (["experiment=wikitext/hybrid_h3"], 126.1e6, "Hybrid H3 125M, ~126.1M (docs/mixers.md#published-configurations)"),
    "hybrid_hyena": (["experiment=wikitext/hybrid_hyena"], 125e6, "Hyena with the 125M hybrid layout"),
    # Transformer++ (rotary, RMSNorm, SwiGLU of width 2/3 d_inner, no biases) at the 125M shape: the Transformer's size
    "transformer_pp": (["experiment=wikitext/transformer", "model.positions=rotary", "model.max_position_embeddings=0",
                        "model.norm=rmsnorm", "model.mlp=swiglu", "model.bias=false", "+model.mixer.bias=false"],
                       125e6, "Transformer++ 125M (Mamba paper)"),
    # Pile Hyena-small (docs/mixers.md#published-configurations): D 864, 18 layers, d_inner 1728, emb_dim 33, w 14, l_max 2048
    "hyena_small_pile": (
        ["experiment=wikitext/hyena", "model.d_model=864", "model.n_layer=18", "model.d_inner=1728",
         "model.mixer.emb_dim=33", "model.mixer.filter_order=64", "model.mixer.w=14",
         "model.mixer.lr_pos_emb=6e-4", "dataset.seq_len=2048"],
        153.7e6, "Hyena-small 153.7M (docs/mixers.md#published-configurations)",
    ),
}


def _mixer_count(name: str, D: int, kw: dict, l_max: int) -> int:
    """Parameters of one mixer, from the equations of docs/mixers.md (attention, Hyena, H3)."""
    linear = lambda i, o, bias=True: i * o + (o if bias else 0)  # noqa: E731
    if name == "Attention":  # Wqkv + out_proj
        return linear(D, 3 * D, kw.get("bias", True)) + linear(D, D, kw.get("bias", True))
    if name == "H3":  # q, k, v, output_linear; shift SSM B, C, D_k; diag SSM log(-Re A), Im A, B, C (complex), log dt, D
        N, H = kw["d_state"], D // kw["head_dim"]
        return 4 * linear(D, D) + 2 * D * N + D + H * (N // 2) * (1 + 1 + 2 + 2) + 2 * H
    if name == "Hyena":  # in_proj, short conv, out_proj; filter MLP (+freq), skip bias, trainable z
        n, W, E = kw["order"], kw["filter_order"], kw["emb_dim"]
        C = D * (n - 1)
        mlp = linear(E, W) + 2 * linear(W, W) + W + linear(W, C, bias=False)
        z = l_max * E if kw["lr_pos_emb"] else 0
        return linear(D, (n + 1) * D) + (n + 1) * D * (kw["short_filter_order"] + 1) + linear(D, D) + mlp + C + z
    raise AssertionError(name)


def _closed_form(cfg: dict) -> int:
    D, n_layer, d_inner = cfg["d_model"], cfg["n_layer"], cfg["d_inner"] or 4 * cfg["d_model"]
    mult = cfg["pad_vocab_size_multiple"]
    vocab = -(-cfg["vocab_size"] // mult) * mult
    bias = cfg["bias"]
    norm = D + (D if bias and cfg["norm"] == "layernorm" else 0)  # scale (+ shift); RMSNorm has no shift
    if cfg["mlp"] == "swiglu":  # fc1: D -> 2 hidden (value, gate), fc2: hidden -> D; hidden = 2/3 d_inner rounded to 8
        hidden = 8 * round(2 * d_inner / 24)
        mlp = D * 2 * hidden + hidden * D + ((2 * hidden + D) if bias else 0)
    else:
        mlp = D * d_inner + d_inner * D + ((d_inner + D) if bias else 0)
    total = vocab * D + cfg["max_position_embeddings"] * D + norm  # tied embedding/head, positions, ln_f
    for i in range(n_layer):
        if i in cfg["attn_layer_idx"]:
            mixer = _mixer_count("Attention", D, cfg["attn_cfg"], cfg["l_max"])
        else:
            mixer = _mixer_count(cfg["mixer"]["_target_"].rpartition(".")[2], D, cfg["mixer"], cfg["l_max"])
        total += mixer + mlp + 2 * norm
    return total


@pytest.mark.parametrize("name", list(CASES))
def test_125m_parameter_count(name):
    overrides, published, source = CASES[name]
    model, cfg = build_meta(overrides, vocab_size=50257)  # GPT-2 BPE
    assert all(p.is_meta for p in model.parameters())
    n = sum(p.numel() for p in model.parameters())  # the tied head is counted once
    rel = n / published - 1
    print(f"\n{name}: {n:,} parameters; published {published / 1e6:.1f}M ({source}); {100 * rel:+.2f} %")
    assert n == _closed_form(cfg)
    assert abs(rel) <= 0.03, f"{name}: {n:,} parameters is {100 * rel:+.2f} % from {source}"
