"""Hyena-S5 operator: step == forward, prefill, causality, and the published parameter counts (AR 131K, WT103)."""
import pytest
import torch

from serengeti.mixers import HyenaS5

AR = dict(ssm_size=8, blocks=4, conj_sym=True, C_init="complex_normal", dt_min=1e-3, dt_max=0.5,
          clip_eigs=True, activation="half_glu2")


def _mixer(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    m = HyenaS5(8, l_max=64, dtype=dtype, **{**AR, **kw})
    with torch.no_grad():  # non-trivial short filter and biases
        m.in_proj.bias.normal_()
        m.short_filter.bias.normal_()
    return m.eval()


@pytest.mark.parametrize("kw", [{}, {"order": 3}, {"conj_sym": False, "activation": "gelu", "blocks": 2},
                                {"discretization": "bilinear", "activation": "full_glu"}])
def test_step_matches_forward(kw):
    m = _mixer(**kw)
    x = torch.randn(2, 24, 8)
    with torch.no_grad():
        y = m(x)
        state = m.allocate_state(2, max_len=24)
        ys = [m.step(x[:, t], state)[0] for t in range(24)]
    torch.testing.assert_close(torch.stack(ys, 1), y, rtol=1e-5, atol=1e-5)


def test_prefill_then_step_float64():
    m = _mixer(dtype=torch.float64)
    x = torch.randn(3, 30, 8, dtype=torch.float64)
    y = m(x)
    state = m.allocate_state(3, max_len=30, dtype=torch.float64)
    y_pre = m(x[:, :19], state=state)
    tail = [m.step(x[:, t], state)[0] for t in range(19, 30)]
    assert state.seqlen == 30
    torch.testing.assert_close(torch.cat([y_pre, torch.stack(tail, 1)], 1), y, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="prefills an empty state"):
        m(x, state=state)


def test_causal():
    m = _mixer(dtype=torch.float64)
    x = torch.randn(2, 40, 8, dtype=torch.float64)
    for t in (0, 17, 39):
        x2 = x.clone()
        x2[:, t:] += torch.randn_like(x2[:, t:])
        y, y2 = m(x), m(x2)
        torch.testing.assert_close(y[:, :t], y2[:, :t], rtol=0, atol=0)
        assert (y[:, t] - y2[:, t]).abs().max() > 1e-8


def test_gradcheck_float64():
    torch.manual_seed(0)
    m = HyenaS5(3, dtype=torch.float64, ssm_size=4, blocks=2, activation="half_glu2")
    x = torch.randn(1, 6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,), fast_mode=True)
    m(x).square().sum().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_rejects_bidirectional_and_unknown_keys():
    with pytest.raises(ValueError, match="bidirectional"):
        HyenaS5(8, ssm_size=8, bidirectional=True)
    with pytest.raises(TypeError, match="filter_order"):
        HyenaS5(8, ssm_size=8, filter_order=64)
    with pytest.raises(ValueError, match="model.mixer.scan_method"):
        HyenaS5(8, ssm_size=8, scan_method="sequential")


@pytest.mark.parametrize("experiment, vocab, expected", [
    ("synthetics/associative_recall/hyena_s5_131k_v30", 30, 120_288),  # docs/mixers.md#published-configurations
    ("wikitext/hyena_s5", 50257, 128_496_384),
])
def test_published_parameter_counts(experiment, vocab, expected):
    """The experiment configs build the S5 authors' models exactly (counted on the meta device)."""
    from conftest import build_meta

    model, _ = build_meta([f"experiment={experiment}"], vocab_size=vocab)
    assert sum(p.numel() for p in model.parameters()) == expected
