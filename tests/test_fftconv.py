"""FFT long convolution, gated FFT convolution, FIR (shift SSM) convolution and the short
depthwise convolution against direct float64 oracles."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from serengeti.ops.fftconv import direct_conv_ref, fast_fft_size, fftconv
from serengeti.ops.gated_fftconv import gated_fftconv, gated_fftconv_ref
from serengeti.ops.short_conv import ShortConv, causal_depthwise_conv
from serengeti.ops import ssm_kernel
from serengeti.ops.ssm_kernel import fir_conv

LENGTHS = [1, 2, 7, 33, 100, 257]


pytestmark = pytest.mark.usefixtures("one_thread")


def _loop_conv(u, k, D=None):
    """Causal convolution as the textbook double loop, float64 (oracle of the oracle)."""
    B, H, L = u.shape
    y = torch.zeros(B, H, L, dtype=torch.float64)
    for t in range(L):
        for s in range(max(0, t - k.shape[-1] + 1), t + 1):
            y[..., t] += k[:, t - s] * u[..., s]
    return y if D is None else y + D[:, None] * u


def test_direct_conv_ref_is_the_textbook_sum():
    torch.manual_seed(0)
    u, k, D = torch.randn(1, 2, 11, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    torch.testing.assert_close(direct_conv_ref(u, k, D), _loop_conv(u, k, D), rtol=0, atol=1e-12)
    kl = torch.randn(2, 20, dtype=torch.float64)  # kernel longer than the input: taps past L unused
    torch.testing.assert_close(direct_conv_ref(u, kl), _loop_conv(u, kl[:, :11]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("L", LENGTHS)
@pytest.mark.parametrize("Lk", ["L", "short", "long"])
def test_fftconv_matches_direct_float64(L, Lk):
    torch.manual_seed(L)
    Lk = {"L": L, "short": max(1, L // 3), "long": 2 * L + 5}[Lk]
    u = torch.randn(2, 4, L, dtype=torch.float64)
    k = torch.randn(4, Lk, dtype=torch.float64)
    D = torch.randn(4, dtype=torch.float64)
    torch.testing.assert_close(fftconv(u, k, D), direct_conv_ref(u, k, D), rtol=0, atol=1e-11)
    torch.testing.assert_close(fftconv(u, k), direct_conv_ref(u, k), rtol=0, atol=1e-11)


def test_fftconv_float32_and_bf16_autocast_compute_in_float32():
    torch.manual_seed(0)
    L = 300
    u, k, D = torch.randn(2, 4, L), torch.randn(4, L) / L**0.5, torch.randn(4)
    ref = direct_conv_ref(u.double(), k.double(), D.double())
    y32 = fftconv(u, k, D)
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), ref, rtol=0, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yac = fftconv(u, k, D)
        yg = gated_fftconv(u, k, D)
    # fp32 inputs under bf16 autocast: still fp32 in and out, fp32-accurate (bf16 would be ~1e-2)
    assert yac.dtype == torch.float32 and yg.dtype == torch.float32
    torch.testing.assert_close(yac.double(), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(yg.double(), ref, rtol=0, atol=1e-5)
    # bf16 inputs: the result comes back in bf16 but was computed in fp32 (one final rounding)
    ub = u.bfloat16()
    yb = fftconv(ub, k, D)
    assert yb.dtype == torch.bfloat16
    exact = direct_conv_ref(ub.double(), k.double(), D.double())
    torch.testing.assert_close(yb.double(), exact.bfloat16().double(), rtol=1e-2, atol=1e-2)
    assert (yb.double() - exact).abs().max() <= exact.abs().max() * 2**-8 + 1e-6


def _smooth_235(n: int) -> bool:
    for p in (2, 3, 5):
        while n % p == 0:
            n //= p
    return n == 1


def test_fast_fft_size_is_smallest_235_smooth_at_least_n():
    for n in list(range(1, 300)) + [2 * 1000 + 1, 2 * 1024, 2 * 3000, 2 * 32768 + 2, 99991]:
        m = fast_fft_size(n)
        assert m >= n and _smooth_235(m), (n, m)
        assert all(not _smooth_235(j) for j in range(max(n, 1), m)), (n, m)
    assert fast_fft_size(2 * 1000) == 2000 and fast_fft_size(2 * 1025) == 2160


@pytest.mark.parametrize("L", [1, 7, 1000, 1025])
def test_fft_convs_use_a_smooth_size_of_at_least_2L(L, monkeypatch):
    sizes = []
    rfft = torch.fft.rfft

    def recording_rfft(x, n=None, **kw):
        sizes.append(n)
        return rfft(x, n=n, **kw)

    monkeypatch.setattr(torch.fft, "rfft", recording_rfft)
    u, k = torch.randn(1, 2, L), torch.randn(2, L)
    fftconv(u, k)
    gated_fftconv(u, k)
    assert len(sizes) == 4
    assert all(n >= 2 * L and _smooth_235(n) for n in sizes), sizes


@pytest.mark.parametrize("L", [1, 6, 33, 100])
@pytest.mark.parametrize("gates", [(), ("pre",), ("post",), ("pre", "post")])
@pytest.mark.parametrize("with_D", [True, False])
def test_gated_fftconv_forward_and_grad_match_reference(L, gates, with_D):
    torch.manual_seed(L)
    f64 = dict(dtype=torch.float64, requires_grad=True)
    u, k = torch.randn(2, 3, L, **f64), torch.randn(3, L + 4, **f64)  # taps past L must get zero grad
    D = torch.randn(3, **f64) if with_D else None
    pre = torch.randn(2, 3, L, **f64) if "pre" in gates else None
    post = torch.randn(2, 3, L, **f64) if "post" in gates else None
    inputs = [t for t in (u, k, D, pre, post) if t is not None]
    g = torch.randn(2, 3, L, dtype=torch.float64)

    y = gated_fftconv(u, k, D, pre=pre, post=post)
    y_ref = gated_fftconv_ref(u, k, D, pre=pre, post=post)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-11)
    grads = torch.autograd.grad(y, inputs, g)
    grads_ref = torch.autograd.grad(y_ref, inputs, g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    assert torch.all(grads[1][:, L:] == 0)


def test_gated_fftconv_gradcheck_and_dtypes():
    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64, requires_grad=True)
    args = (torch.randn(1, 2, 5, **f64), torch.randn(2, 5, **f64), torch.randn(2, **f64),
            torch.randn(1, 2, 5, **f64), torch.randn(1, 2, 5, **f64))
    assert torch.autograd.gradcheck(lambda *a: gated_fftconv(a[0], a[1], a[2], pre=a[3], post=a[4]), args)
    # float32 inputs: float32 outputs and grads, close to the float64 result
    u32, k32 = torch.randn(2, 3, 50, requires_grad=True), torch.randn(3, 50, requires_grad=True)
    y = gated_fftconv(u32, k32, pre=u32.detach())
    y.sum().backward()
    assert y.dtype == u32.grad.dtype == k32.grad.dtype == torch.float32
    torch.testing.assert_close(y.double(), gated_fftconv_ref(u32.double(), k32.double(), pre=u32.double()).detach(),
                               rtol=0, atol=1e-4)


def test_gated_fftconv_rejects_bad_shapes():
    u = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="k must be"):
        gated_fftconv(u, torch.randn(4, 8))
    with pytest.raises(ValueError, match="pre must be"):
        gated_fftconv(u, torch.randn(3, 8), pre=torch.randn(2, 3, 7))
    with pytest.raises(ValueError, match="does not broadcast"):
        gated_fftconv(u.unsqueeze(1).expand(2, 3, 3, 8), torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="D must be"):
        gated_fftconv(u, torch.randn(3, 8), torch.randn(2, 3))


@pytest.mark.parametrize("with_D", [True, False])
def test_gated_fftconv_broadcast_kernels_match_reference(with_D):
    """One input shared by C kernels (LongConv's layout): u (B, 1, H, L), k (C, H, Lk) -> (B, C, H, L)."""
    torch.manual_seed(1)
    f64 = dict(dtype=torch.float64, requires_grad=True)
    L = 37
    u, k = torch.randn(2, 1, 3, L, **f64), torch.randn(4, 3, L + 5, **f64)
    D = torch.randn(4, 3, **f64) if with_D else None
    inputs = [t for t in (u, k, D) if t is not None]
    y, y_ref = gated_fftconv(u, k, D), gated_fftconv_ref(u, k, D)
    assert y.shape == (2, 4, 3, L)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-11)
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, inputs, g), torch.autograd.grad(y_ref, inputs, g)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.fixture(params=["toeplitz", "fft"])
def fir_path(request, monkeypatch):
    """Runs a test through each of fir_conv's two paths (block-Toeplitz matmul, FFT for few chunk rows)."""
    monkeypatch.setattr(ssm_kernel, "FIR_FFT_MAX_ROWS", 0 if request.param == "toeplitz" else 10**9)
    return request.param


@pytest.mark.parametrize("L", [1, 5, 63, 64, 65, 200])
@pytest.mark.parametrize("N", [1, 4, 64, 80])
def test_fir_conv_matches_direct_conv(L, N, fir_path):
    torch.manual_seed(L * 100 + N)
    u, taps, D = torch.randn(2, 3, L, dtype=torch.float64), torch.randn(3, N, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    torch.testing.assert_close(fir_conv(u, taps, D), direct_conv_ref(u, taps, D), rtol=0, atol=1e-12)
    torch.testing.assert_close(fir_conv(u, taps), direct_conv_ref(u, taps), rtol=0, atol=1e-12)
    # with history: the same as convolving the history followed by u, keeping the last L outputs
    hist = torch.randn(2, 3, N, dtype=torch.float64)
    full = direct_conv_ref(torch.cat([hist, u], -1), taps, D)[..., N:]
    torch.testing.assert_close(fir_conv(u, taps, D, history=hist), full, rtol=0, atol=1e-12)


def test_fir_conv_grads_match_direct_conv_and_float32(fir_path):
    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64, requires_grad=True)
    u, taps, D, hist = torch.randn(1, 2, 150, **f64), torch.randn(2, 5, **f64), torch.randn(2, **f64), torch.randn(1, 2, 5, **f64)
    g = torch.randn(1, 2, 150, dtype=torch.float64)
    y = fir_conv(u, taps, D, history=hist)
    y_ref = direct_conv_ref(torch.cat([hist, u], -1), taps, D)[..., 5:]
    for a, b in zip(torch.autograd.grad(y, (u, taps, D, hist), g), torch.autograd.grad(y_ref, (u, taps, D, hist), g)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)
    u32, t32 = torch.randn(2, 3, 130), torch.randn(3, 64)
    y = fir_conv(u32, t32)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), direct_conv_ref(u32.double(), t32.double()), rtol=0, atol=1e-5)


@pytest.mark.parametrize("L", [1, 2, 3, 10])
@pytest.mark.parametrize("K", [1, 3, 4])
@pytest.mark.parametrize("bias", [True, False])
def test_causal_depthwise_conv_matches_conv1d(L, K, bias):
    torch.manual_seed(L + K)
    C = 3
    x, w = torch.randn(2, C, L, dtype=torch.float64), torch.randn(C, 1, K, dtype=torch.float64)
    b = torch.randn(C, dtype=torch.float64) if bias else None
    ref = F.conv1d(F.pad(x, (K - 1, 0)), w, b, groups=C)
    torch.testing.assert_close(causal_depthwise_conv(x, w, b), ref, rtol=0, atol=1e-13)
    args = [t.requires_grad_() for t in (x, w, b) if t is not None]
    fn = (lambda x_, w_, b_: causal_depthwise_conv(x_, w_, b_)) if bias else (lambda x_, w_: causal_depthwise_conv(x_, w_))
    assert torch.autograd.gradcheck(fn, tuple(args))


def test_causal_depthwise_conv_under_bf16_autocast_like_conv1d():
    """Regression: bf16 activations with fp32 weights under autocast crashed in backward
    (mixed-dtype einsum); now all run in the autocast dtype, as conv1d does."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 12).bfloat16().requires_grad_()
    w, b = torch.randn(4, 1, 3, requires_grad=True), torch.randn(4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = causal_depthwise_conv(x, w, b)
        ref = F.conv1d(F.pad(x, (2, 0)), w, b, groups=4)
    assert y.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == b.grad.dtype == torch.float32
    assert torch.isfinite(w.grad).all() and torch.all(b.grad == 24)  # 2 * 12 ones per channel


def test_short_conv_step_matches_forward():
    torch.manual_seed(0)
    conv = ShortConv(6, 3).double()
    x = torch.randn(2, 6, 9, dtype=torch.float64)
    y = conv(x)
    buf = conv.history(x[..., :4])
    outs = []
    for t in range(4, 9):
        y_t, buf = conv.step(x[..., t], buf)
        outs.append(y_t)
    torch.testing.assert_close(torch.stack(outs, -1), y[..., 4:], rtol=0, atol=1e-13)
