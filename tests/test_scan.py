"""Parallel diagonal scans (serengeti.ops.scan) against the complex128 sequential loop."""
import pytest
import torch

from serengeti.ops.scan import linear_scan, linear_scan_ref


def _problem(batch, L, P, *, dtype=torch.complex128, varying=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    real = torch.float64 if dtype == torch.complex128 else torch.float32
    # |a| in (0.37, 1): long memory, as S5's Λ̄ = exp(ΛΔ) with small Δ
    shape = (*batch, L, P) if varying else (P,)
    a = torch.polar(torch.exp(-torch.rand(shape, generator=g, dtype=real)), 3 * torch.randn(shape, generator=g, dtype=real))
    b = torch.randn(*batch, L, P, generator=g, dtype=dtype)
    x0 = torch.randn(*batch, P, generator=g, dtype=dtype)
    return a, b, x0


@pytest.mark.parametrize("method", ["chunked", "log"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("L", [1, 2, 7, 16, 33, 100, 300])
def test_scan_matches_loop_float64(method, reverse, L):
    a, b, x0 = _problem((2, 3), L, 5)
    ref = linear_scan_ref(a, b, x0, reverse=reverse)
    for init in (None, x0):
        ref = linear_scan_ref(a, b, init, reverse=reverse)
        got = linear_scan(a, b, init, reverse=reverse, method=method, chunk_size=4)
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reverse", [False, True])
def test_scan_time_varying_a(reverse):
    a, b, x0 = _problem((3,), 45, 4, varying=True)
    got = linear_scan(a, b, x0, reverse=reverse)  # auto -> log
    torch.testing.assert_close(got, linear_scan_ref(a, b, x0, reverse=reverse), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["chunked", "log"])
def test_scan_complex64_close_to_float64(method):
    a, b, x0 = _problem((4,), 2000, 8, dtype=torch.complex64)
    ref = linear_scan_ref(a, b, x0)
    got = linear_scan(a, b, x0, method=method)
    err = ((got.to(torch.complex128) - ref).abs() / ref.abs().clamp(min=1.0)).max().item()
    assert err < 1e-5


@pytest.mark.parametrize("method", ["chunked", "log"])
@pytest.mark.parametrize("reverse", [False, True])
def test_scan_gradcheck(method, reverse):
    a, b, x0 = _problem((2,), 11, 3)
    a.requires_grad_(), b.requires_grad_(), x0.requires_grad_()
    f = lambda a, b, x0: linear_scan(a, b, x0, reverse=reverse, method=method, chunk_size=3)
    assert torch.autograd.gradcheck(f, (a, b, x0))


def test_scan_gradcheck_time_varying():
    a, b, x0 = _problem((2,), 9, 3, varying=True)
    a.requires_grad_(), b.requires_grad_(), x0.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, x0: linear_scan(a, b, x0), (a, b, x0))


def test_chunked_scan_splits_like_a_state():
    """Scanning two halves, the second from the first one's last state, equals one scan."""
    a, b, _ = _problem((2,), 64, 6)
    whole = linear_scan(a, b)
    first = linear_scan(a, b[:, :40])
    second = linear_scan(a, b[:, 40:], first[:, -1])
    torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=1e-12, atol=1e-12)


def test_scan_errors_name_the_problem():
    a, b, _ = _problem((2,), 8, 3, varying=True)
    with pytest.raises(ValueError, match="time-invariant"):
        linear_scan(a, b, method="chunked")
    with pytest.raises(ValueError, match="unknown method"):
        linear_scan(a[0, 0], b, method="fft")
    with pytest.raises(ValueError, match="does not match"):
        linear_scan(a[0, 0, :2], b)
