"""Shared mixer tests (every mixer of configs/model/mixer/: H3, Hyena order 2 and 3, LongConv, Attention,
S5, Hyena-S5): exact causality, shapes, gradients, recurrent step == parallel forward, optimizer groups,
LongConv regularisers."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import MIXERS, compose_cfg
from serengeti.mixers import Attention, H3, Hyena, HyenaS5, LongConv, S5, StateError
from serengeti.ops.fftconv import direct_conv_ref
from serengeti.training.optim import param_groups

D_MODEL, L_MAX = 8, 48

FACTORIES = {
    "h3": lambda **kw: H3(D_MODEL, l_max=L_MAX, d_state=16, **kw),
    "h3_heads": lambda **kw: H3(D_MODEL, l_max=L_MAX, d_state=8, head_dim=2, **kw),
    "hyena2": lambda **kw: Hyena(D_MODEL, l_max=L_MAX, order=2, filter_order=16, **kw),
    "hyena3": lambda **kw: Hyena(D_MODEL, l_max=L_MAX, order=3, filter_order=16, emb_dim=5, **kw),
    "longconv": lambda **kw: LongConv(D_MODEL, l_max=L_MAX, channels=2, **kw),
    "attention": lambda **kw: Attention(D_MODEL, l_max=L_MAX, num_heads=2, **kw),
    "s5": lambda **kw: S5(D_MODEL, l_max=L_MAX, ssm_size=16, blocks=2, activation="half_glu1", **kw),
    "hyena_s5": lambda **kw: HyenaS5(D_MODEL, l_max=L_MAX, ssm_size=8, blocks=2, **kw),
}


def test_every_mixer_config_is_covered():
    """A new file in configs/model/mixer/ needs a factory here (the shared tests run on all of them)."""
    targets = {compose_cfg([f"model/mixer={name}"]).model.mixer._target_.rpartition(".")[2] for name in MIXERS}
    assert targets == {type(make()).__name__ for make in FACTORIES.values()}


pytestmark = pytest.mark.usefixtures("one_thread")


def _build(name: str, dtype=torch.float32, seed: int = 0, **kw):
    torch.manual_seed(seed)
    m = FACTORIES[name](dtype=dtype, **kw)
    with torch.no_grad():  # non-zero biases, so every path carries signal
        for n, p in m.named_parameters():
            if n.endswith("bias") and p.ndim == 1:
                p.normal_(0, 0.5)
    return m


# --- causality ------------------------------------------------------------------------------
def _max_past_change(fn, x: torch.Tensor, k: int) -> float:
    """Largest change of outputs at positions <= k when every input after k is redrawn."""
    x2 = x.clone()
    x2[:, k + 1:] = torch.randn_like(x2[:, k + 1:]) * 3
    return (fn(x2)[:, : k + 1] - fn(x)[:, : k + 1]).abs().max().item()


CAUSAL_TOL = 1e-11  # float64 FFT round-off is ~1e-15; a leaked tap moves outputs by >= 1e-6 here


def test_causality_check_catches_the_reference_long_conv_leak():
    """The reference's FFT size 2L with an untruncated l_max-tap kernel wraps future inputs
    into the past; the same check (and tolerance) the mixers pass must flag it."""
    torch.manual_seed(0)
    L, l_max = 20, L_MAX
    k = torch.randn(3, l_max, dtype=torch.float64) * 0.002  # LongConv's init scale
    k = torch.sign(k) * F.relu(k.abs() - 1e-3)  # after the squash: the leak survives it

    def leaky(x):  # x (B, L, H)
        u = x.mT
        y = torch.fft.irfft(torch.fft.rfft(u, n=2 * L) * torch.fft.rfft(k, n=2 * L), n=2 * L)[..., :L]
        return y.mT

    x = torch.randn(2, L, 3, dtype=torch.float64)
    assert _max_past_change(leaky, x, 5) > 1e3 * CAUSAL_TOL
    assert _max_past_change(lambda x: direct_conv_ref(x.mT, k).mT, x, 5) < CAUSAL_TOL


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("L", [L_MAX, 21])  # L < l_max: the reference long conv leaks there
def test_causal_exactly(name, L):
    m = _build(name, torch.float64).eval()
    x = torch.randn(2, L, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        for k in (0, L // 3, L - 2):
            assert _max_past_change(m, x, k) < CAUSAL_TOL, (name, L, k)


# --- shapes and gradients -------------------------------------------------------------------
@pytest.mark.parametrize("name", list(FACTORIES))
def test_shapes_odd_lengths_and_single_token(name):
    m = _build(name)
    for L in (1, 7, 33):
        x = torch.randn(3, L, D_MODEL)
        y = m(x)
        assert y.shape == (3, L, D_MODEL) and y.dtype == torch.float32 and torch.isfinite(y).all()


@pytest.mark.parametrize("name", list(FACTORIES))
def test_gradients_reach_every_parameter(name):
    m = _build(name).train()
    x = torch.randn(2, 29, D_MODEL, requires_grad=True)
    (m(x) * torch.randn(2, 29, D_MODEL)).sum().backward()
    params = dict(m.named_parameters())
    assert params
    for n, p in params.items():
        assert p.grad is not None, f"{name}: no gradient for {n}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient for {n}"
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient for {n}"
    if name == "longconv":  # taps past L are unused; the squash zeroes the grads of taps |k| <= lam
        k = params.pop("kernel")
        assert torch.all(k.grad[..., 29:] == 0)
        live = k.detach()[..., :29].abs() > m.kernel_lam
        assert (k.grad[..., :29][live] != 0).float().mean() > 0.5
    # "most" entries move, not just one
    nonzero = sum((p.grad != 0).sum().item() for p in params.values())
    assert nonzero > 0.5 * sum(p.numel() for p in params.values())
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", list(FACTORIES))
def test_bf16_autocast_forward_backward(name):
    """Regression: Hyena's short conv crashed in backward under bf16 autocast (fp32 weight,
    bf16 activations). Every mixer must train under autocast, close to its fp32 output."""
    m = _build(name).eval()
    x = torch.randn(2, 33, D_MODEL, requires_grad=True)
    y32 = m(x).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    # S5 ends in g * sigmoid(out2(g)) with g from its float32 SSM (autocast is off there): float32 out
    assert y.dtype == (torch.float32 if name == "s5" else torch.bfloat16)
    assert (y.float() - y32).abs().max() <= 0.05 * y32.abs().max()
    y.float().sum().backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and p.grad.dtype == p.dtype and torch.isfinite(p.grad).all(), n


# --- recurrent mode ---------------------------------------------------------------------------
def _has_recurrent_mode(make) -> bool:
    try:
        make().allocate_state(1, max_len=1)
    except StateError:
        return False
    return True


#: every factory whose mixer has a recurrent mode (a new one cannot miss the step tests)
RECURRENT = [name for name, make in FACTORIES.items() if _has_recurrent_mode(make)]


@pytest.mark.parametrize("name", RECURRENT)
def test_step_matches_parallel_forward(name):
    m = _build(name).eval()
    L = 40
    x = torch.randn(2, L, D_MODEL)
    with torch.no_grad():
        full = m(x)
        state = m.allocate_state(2, max_len=L)
        ys = [m.step(x[:, t], state)[0] for t in range(L)]
    torch.testing.assert_close(torch.stack(ys, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", RECURRENT)
def test_prefill_then_step_matches_forward(name):
    m = _build(name).eval()
    L, P = 40, 17
    x = torch.randn(2, L, D_MODEL)
    with torch.no_grad():
        full = m(x)
        state = m.allocate_state(2, max_len=L)
        torch.testing.assert_close(m(x[:, :P], state=state), full[:, :P], rtol=1e-5, atol=1e-5)
        ys = [m.step(x[:, t], state)[0] for t in range(P, L)]
    torch.testing.assert_close(torch.stack(ys, 1), full[:, P:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["h3", "h3_heads"])
def test_h3_chunked_prefill_and_long_step_float32(name):
    """H3's state continues across prefill chunks; step stays within 1e-5 of forward over
    several Vandermonde chunks (L = 300 -> chunk 32, 10 chunks)."""
    m = _build(name).eval()
    L = 300
    x = torch.randn(1, L, D_MODEL)
    with torch.no_grad():
        full = m(x)
        state = m.allocate_state(1, max_len=L)
        parts = [m(x[:, :50], state=state), m(x[:, 50:123], state=state)]
        ys = [m.step(x[:, t], state)[0] for t in range(123, L)]
    torch.testing.assert_close(torch.cat(parts + [torch.stack(ys, 1)], 1), full, rtol=1e-5, atol=1e-5)


def test_hyena_step_float64_exact():
    m = _build("hyena3", torch.float64).eval()
    x = torch.randn(2, 25, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        full = m(x)
        state = m.allocate_state(2, max_len=25)
        ys = [m.step(x[:, t], state)[0] for t in range(25)]
    torch.testing.assert_close(torch.stack(ys, 1), full, rtol=0, atol=1e-12)


# --- optimizer groups -------------------------------------------------------------------------
def _groups(m):
    return {n: (g["lr"], g["weight_decay"]) for g in param_groups(m, lr=0.5, weight_decay=0.1) for n in g["names"]}


def test_h3_ssm_parameters_have_their_own_group():
    groups = _groups(H3(D_MODEL, d_state=8, ssm_lr=2e-4))
    for n in ("log_neg_A_real", "A_imag", "B", "log_dt", "ssm_k_B"):
        assert groups[n] == (2e-4, 0.0), n
    for n in ("C", "D", "ssm_k_C", "ssm_k_D", "q_proj.weight", "output_linear.weight"):
        assert groups[n] == (0.5, 0.1), n


def test_hyena_filter_parameters_have_their_own_group():
    m = Hyena(D_MODEL, l_max=16, filter_order=8, filter_lr=3e-4, filter_wd=0.0, lr_pos_emb=1e-5)
    groups = _groups(m)
    mlp = [n for n in groups if n.startswith("filter_fn.implicit_filter.")]
    assert len(mlp) == 2 * 3 + 1 + 1  # 3 Linear with bias, output Linear without, one shared freq
    for n in mlp:
        assert groups[n] == (3e-4, 0.0), n
    assert groups["filter_fn.pos_emb.z"] == (1e-5, 0.0)
    for n in ("filter_fn.bias", "in_proj.weight", "short_filter.weight", "out_proj.weight"):
        assert groups[n] == (0.5, 0.1), n
    frozen = Hyena(D_MODEL, l_max=16, filter_order=8, lr_pos_emb=0.0)
    assert "filter_fn.pos_emb.z" not in dict(frozen.named_parameters()) and "filter_fn.pos_emb.z" in dict(frozen.named_buffers())


def test_longconv_kernel_has_its_own_group():
    groups = _groups(LongConv(D_MODEL, l_max=16, kernel_lr=7e-4))
    assert groups["kernel"] == (7e-4, 0.0)
    for n in ("D", "out_proj.weight", "out_proj.bias"):
        assert groups[n] == (0.5, 0.1), n


# --- LongConv regularisers (docs/mixers.md#long-convolution) ------------------------------------------
def test_longconv_squash_is_a_soft_threshold():
    m = LongConv(2, l_max=5, channels=1, kernel_lam=0.01, kernel_dropout=0.5).eval()
    with torch.no_grad():
        m.kernel.copy_(torch.tensor([[[-0.03, -0.005, 0.0, 0.004, 0.02], [0.01, -0.01, 0.5, -0.5, 0.0101]]]))
    expected = torch.tensor([[[-0.02, 0.0, 0.0, 0.0, 0.01], [0.0, 0.0, 0.49, -0.49, 0.0001]]])
    torch.testing.assert_close(m.kernels(), expected, rtol=0, atol=1e-7)


def test_longconv_moving_average_smoothing():
    m = LongConv(3, l_max=12, channels=2, kernel_lam=0.0, smoothing="ma", ma_window_len=5, kernel_dropout=0.0).double()
    k = m.kernel.detach()
    w = 5
    padded = F.pad(k, (w // 2, w // 2))  # zero padding, divided by the full window (AvgPool1d)
    ma = torch.stack([padded[..., t:t + w].sum(-1) / w for t in range(12)], -1)
    torch.testing.assert_close(m.kernels(), ma, rtol=0, atol=1e-14)
    m.kernel_lam = 1e-3  # smoothing first, then the squash
    torch.testing.assert_close(m.kernels(), torch.sign(ma) * F.relu(ma.abs() - 1e-3), rtol=0, atol=1e-14)


@pytest.mark.parametrize("l_max", [12, 13])
def test_longconv_frequency_smoothing(l_max):
    m = LongConv(3, l_max=l_max, channels=2, kernel_lam=0.0, smoothing="freq", ma_window_len=3, kernel_dropout=0.0).double()
    k = m.kernel.detach()
    kf = torch.fft.rfft(k)
    win = [math.exp(-0.5), 1.0, math.exp(-0.5)]  # Gaussian over neighbouring bins, unnormalised
    padded = F.pad(kf, (1, 1))
    sm = sum(win[j] * padded[..., j:j + kf.shape[-1]] for j in range(3))
    torch.testing.assert_close(m.kernels(), torch.fft.irfft(sm, n=l_max), rtol=0, atol=1e-14)


def test_longconv_kernel_dropout_train_only():
    m = LongConv(16, l_max=64, channels=2, kernel_lam=0.0, kernel_dropout=0.25, dropout=0.0)
    clean = m.kernel.detach()
    torch.manual_seed(1)
    k = m.train().kernels().detach()
    kept = k != 0
    assert 0.2 < 1 - kept.float().mean().item() < 0.3  # about p of the taps dropped ...
    torch.testing.assert_close(k[kept], clean[kept] / 0.75)  # ... the rest rescaled by 1/(1-p)
    torch.testing.assert_close(m.eval().kernels(), clean)
    x = torch.randn(1, 10, 16)
    torch.testing.assert_close(m(x), m(x))  # eval: deterministic
    m.train()
    assert not torch.allclose(m(x), m(x))  # train: a fresh kernel mask per call
