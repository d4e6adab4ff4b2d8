"""Recurrent generation equals the full forward pass, for every mixer with a recurrent mode."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from conftest import MIXERS, compose_cfg, mixer_overrides
from serengeti.models.generation import _tensor_bytes, check_memory, generate, memory_needed, sample, state_size, state_size_by_block
from serengeti.training.lm_task import build_model
V, L_MAX = 13, 40


def _model(select: list[str], **extra) -> torch.nn.Module:
    """A float64 LM selected by ``select`` (e.g. ``["model=hybrid_h3"]``), small, parameters perturbed."""
    overrides = [*select, "model.d_model=16", "model.n_layer=2", f"model.vocab_size={V}", f"model.l_max={L_MAX}",
                 "model.pad_vocab_size_multiple=8"] + [f"model.{k}={v}" for k, v in extra.items()]
    cfg = compose_cfg(overrides)
    torch.manual_seed(0)
    model = build_model(OmegaConf.to_container(cfg.model, resolve=True)).double().eval()
    # perturb every parameter away from its (often zero / structured) init, so the test sees all paths
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("name", MIXERS)
def test_greedy_generation_equals_argmax_of_full_forward(name):
    model = _model(mixer_overrides(name))
    prompt = torch.randint(0, V, (2, 7))
    n = 12
    gen = generate(model, prompt, n, temperature=0.0, max_len=L_MAX)
    seq = torch.cat([prompt, gen.tokens], dim=1)
    with torch.no_grad():
        logits = model(seq[:, :-1])[..., :V]  # re-run the whole sequence in parallel
    expected = logits[:, prompt.shape[1] - 1:].argmax(-1)
    assert torch.equal(gen.tokens, expected)
    # and the recurrent logits themselves match the parallel ones (not just their argmax)
    state = model.allocate_state(2, max_len=seq.shape[1] - 1)
    with torch.no_grad():
        first = model(prompt, state=state)[:, -1, :V]
        steps = [first] + [model.step(seq[:, t], state)[:, :V] for t in range(prompt.shape[1], seq.shape[1] - 1)]
    torch.testing.assert_close(torch.stack(steps, 1), logits[:, prompt.shape[1] - 1:], rtol=1e-7, atol=1e-9)
    with torch.no_grad():  # the prefill's head runs on the last position only
        torch.testing.assert_close(model(seq, num_last_tokens=3), model(seq)[:, -3:], rtol=0, atol=0)


def test_hybrid_generation():
    model = _model(["model=hybrid_h3"], n_layer=3, attn_layer_idx="[1]", **{"attn_cfg.num_heads": 2})
    prompt = torch.randint(0, V, (1, 5))
    gen = generate(model, prompt, 6, temperature=0.0)
    seq = torch.cat([prompt, gen.tokens], dim=1)
    with torch.no_grad():
        expected = model(seq[:, :-1])[..., :V][:, 4:].argmax(-1)
    assert torch.equal(gen.tokens, expected)


def test_sampling_is_seeded_and_respects_top_k_top_p():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, -1.0]]).repeat(500, 1)
    g = torch.Generator().manual_seed(0)
    top2 = sample(logits, temperature=1.0, top_k=2, generator=g)
    assert set(top2.tolist()) == {2, 3}
    # probabilities 0.64, 0.24, 0.09, ...: top_p=0.7 keeps the two most likely tokens only
    nucleus = sample(logits, temperature=1.0, top_p=0.7, generator=torch.Generator().manual_seed(0))
    assert set(nucleus.tolist()) == {2, 3}
    a = sample(logits, generator=torch.Generator().manual_seed(3))
    b = sample(logits, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and len(set(a.tolist())) == 5
    assert torch.equal(sample(logits[:1], temperature=0.0), torch.tensor([3]))


def test_generation_errors():
    model = _model(["model=transformer"])
    with pytest.raises(ValueError, match="more than the model's maximum sequence length 40"):
        generate(model, torch.zeros(1, 35, dtype=torch.long), 10, max_len=L_MAX)
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="top_p"):
        sample(torch.zeros(1, 3), top_p=1.5)


def test_a_tiny_temperature_samples_the_argmax_instead_of_nan():
    """1e-300 is 0 in float32: logits / T used to be inf/NaN; the limit T -> 0 is greedy."""
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    for t in (1e-300, 5e-324, 1e-30):
        assert torch.equal(sample(logits, temperature=t, generator=torch.Generator().manual_seed(1)), logits.argmax(-1))
    assert torch.equal(sample(logits, temperature=1e-300, top_k=3, top_p=0.5), logits.argmax(-1))


def test_memory_estimate_counts_the_kv_cache_and_refuses_what_cannot_fit():
    model = _model(["model=transformer", "model.positions=none", "model.max_position_embeddings=0"]).float()  # no length limit
    assert model.max_seq_len is None
    heads = model.layers[0].mixer.num_heads
    # the KV cache of B sequences x T positions: 2 (k, v) x n_layer x B x d_model x T float32 values
    for batch, total in ((1, 7), (3, 50)):
        real = model.allocate_state(batch, max_len=total)  # the meta-device size is the real one
        assert _tensor_bytes(real) == 2 * 2 * batch * heads * (16 // heads) * total * 4
    grow = memory_needed(model, 2, 4, 100) - memory_needed(model, 1, 4, 100)
    assert grow >= 2 * 2 * 16 * 103 * 4 + 8 * 100  # one more sequence: its cache and its token ids
    check_memory(model, 4, 4, 100, "cpu")  # small: fits
    with pytest.raises(ValueError, match=r"^num_samples=1000000000 x \(prompt 4 \+ max_new_tokens=100 tokens\) needs "
                                         r"about .* GiB .* free on cpu: lower num_samples or max_new_tokens$"):
        check_memory(model, 10**9, 4, 100, "cpu")


def _state_size_cases():
    """name -> (mixer factory, floats per block counted by hand) for D = 16, seq_len = 32."""
    import functools

    from serengeti.mixers import Attention, H3, Hyena, HyenaS5, LongConv, S5

    D, L, K = 16, 32, 3  # K: short-conv taps, the last K - 1 projected inputs (of width (order + 1) D) are kept
    return {
        "attention": (functools.partial(Attention, num_heads=2), 2 * D * L),  # k and v of every position
        "h3": (functools.partial(H3, d_state=8), D * 8 + D * (8 // 2) * 2),  # shift history + complex diag state
        "h3_heads": (functools.partial(H3, d_state=8, head_dim=2), D * 8 + (D // 2) * 2 * 2 * (8 // 2) * 2),
        "hyena": (functools.partial(Hyena, filter_order=8), (K - 1) * 3 * D + 1 * D * L),  # + one long conv's inputs
        "hyena3": (functools.partial(Hyena, order=3, filter_order=8, emb_dim=5), (K - 1) * 4 * D + 2 * D * L),
        "longconv": (functools.partial(LongConv, channels=2), D * L),  # the inputs, whatever the kernels per channel
        "s5": (functools.partial(S5, ssm_size=8, blocks=2), (8 // 2) * 2),  # conj_sym: 4 complex states, MIMO
        "hyena_s5": (functools.partial(HyenaS5, ssm_size=8, blocks=2), (K - 1) * 3 * D + (8 // 2) * 2),
    }


@pytest.mark.parametrize("name", sorted(_state_size_cases()))
def test_state_size_matches_a_hand_count(name):
    """state_size reads the floats one sequence carries from allocate_state; hybrids add attention's KV cache."""
    from serengeti.models.backbone import LMHeadModel

    mixer, per_block = _state_size_cases()[name]
    model = LMHeadModel(d_model=16, n_layer=2, vocab_size=V, mixer=mixer, l_max=32)
    assert state_size_by_block(model, 32) == [per_block, per_block]
    assert state_size(model, 32) == 2 * per_block
    hybrid = LMHeadModel(d_model=16, n_layer=2, vocab_size=V, mixer=mixer, l_max=32, attn_layer_idx=[1])
    assert state_size_by_block(hybrid, 32) == [per_block, 2 * 16 * 32]


def test_state_size_needs_a_recurrent_mode():
    import functools

    from serengeti.mixers import S5, StateError
    from serengeti.models.backbone import LMHeadModel

    model = LMHeadModel(d_model=16, n_layer=1, vocab_size=V, mixer=functools.partial(S5, ssm_size=8, bidirectional=True), l_max=32)
    with pytest.raises(StateError, match="no recurrent mode"):
        state_size(model, 32)
