"""SSM kernels against float64 recurrences: Vandermonde kernel and state, shift SSM taps, bilinear."""
from __future__ import annotations

import math

import pytest
import torch

from serengeti.ops.ssm_kernel import bilinear, shift_kernel, vandermonde_kernel, vandermonde_kernel_ref, vandermonde_state


pytestmark = pytest.mark.usefixtures("one_thread")


def _s4d(H=3, N2=5, seed=0):
    """S4D-Lin modes with H3's init ranges, discretized in complex128."""
    g = torch.Generator().manual_seed(seed)
    dt = torch.exp(torch.rand(H, generator=g, dtype=torch.float64) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    A = torch.complex(torch.full((H, N2), -0.5, dtype=torch.float64), math.pi * torch.arange(N2, dtype=torch.float64).expand(H, N2))
    B = torch.complex(torch.randn(H, N2, generator=g, dtype=torch.float64), torch.randn(H, N2, generator=g, dtype=torch.float64))
    C = torch.complex(torch.randn(H, N2, generator=g, dtype=torch.float64), torch.randn(H, N2, generator=g, dtype=torch.float64))
    dA, dB = bilinear(dt, A, B)
    return dA, dB, C


def test_bilinear_matches_formula():
    dt = torch.tensor([0.1], dtype=torch.float64)
    A = torch.tensor([[complex(-0.5, 2.0)]], dtype=torch.complex128)
    B = torch.tensor([[complex(1.0, 0.5)]], dtype=torch.complex128)
    dA, dB = bilinear(dt, A, B)
    a = complex(-0.5, 2.0) * 0.1
    assert abs(dA.item() - (1 + a / 2) / (1 - a / 2)) < 1e-15
    assert abs(dB.item() - 0.1 * complex(1.0, 0.5) / (1 - a / 2)) < 1e-15


def _kernel_by_recurrence(dA, dB, C, L):
    """Impulse response of x_t = dA x_{t-1} + dB u_t, y_t = 2 Re sum C x_t (float64 loop)."""
    x = torch.zeros_like(dA)
    out = []
    for t in range(L):
        x = dA * x + (dB if t == 0 else 0)
        out.append(2 * (C * x).sum(-1).real)
    return torch.stack(out, -1)


@pytest.mark.parametrize("L", [1, 2, 5, 64, 65, 300, 1000])
def test_vandermonde_kernel_matches_recurrence_and_naive(L):
    dA, dB, C = _s4d()
    loop = _kernel_by_recurrence(dA, dB, C, L)
    ref = vandermonde_kernel_ref(C * dB, dA, L)
    torch.testing.assert_close(ref, loop, rtol=0, atol=1e-11)
    K64 = vandermonde_kernel(C * dB, torch.log(dA), L)
    assert K64.dtype == torch.float64 and K64.shape == (3, L)
    torch.testing.assert_close(K64, loop, rtol=0, atol=1e-11)
    K32 = vandermonde_kernel(C * dB, torch.log(dA), L, dtype=torch.float32)
    assert K32.dtype == torch.float32
    scale = loop.abs().max()
    assert (K32.double() - loop).abs().max() < 1e-6 * scale  # a few float32 ulps at every length


def test_vandermonde_kernel_batched_coef_and_grads():
    dA, dB, C = _s4d(H=2, N2=3)
    coef = (C * dB).unsqueeze(0).expand(4, -1, -1).clone() * torch.arange(1, 5).view(4, 1, 1)
    torch.testing.assert_close(vandermonde_kernel(coef, torch.log(dA), 70), vandermonde_kernel_ref(coef, dA, 70),
                               rtol=0, atol=1e-11)
    coef = (C * dB).clone().requires_grad_()
    log_dA = torch.log(dA).clone().requires_grad_()
    g = torch.randn(2, 70, dtype=torch.float64)
    grads = torch.autograd.grad(vandermonde_kernel(coef, log_dA, 70), (coef, log_dA), g)
    grads_ref = torch.autograd.grad(vandermonde_kernel_ref(coef, torch.exp(log_dA), 70), (coef, log_dA), g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("L", [1, 33, 500])
def test_vandermonde_kernel_backward_batched_and_float32(L):
    """Hand-written backward: batched coef (log_dA's grad sums over the batch), float32 matmuls."""
    dA, dB, C = _s4d(H=2, N2=3, seed=L)
    coef = ((C * dB).unsqueeze(0) * torch.randn(3, 1, 1, dtype=torch.float64)).requires_grad_()
    log_dA = torch.log(dA).requires_grad_()
    g = torch.randn(3, 2, L, dtype=torch.float64)
    grads_ref = torch.autograd.grad(vandermonde_kernel_ref(coef, torch.exp(log_dA), L), (coef, log_dA), g)
    grads64 = torch.autograd.grad(vandermonde_kernel(coef, log_dA, L), (coef, log_dA), g)
    grads32 = torch.autograd.grad(vandermonde_kernel(coef, log_dA, L, dtype=torch.float32), (coef, log_dA), g.float())
    for a64, a32, b in zip(grads64, grads32, grads_ref):
        assert a64.shape == b.shape and a32.dtype == torch.complex128
        torch.testing.assert_close(a64, b, rtol=1e-9, atol=1e-9)
        assert (a32 - b).abs().max() <= 1e-5 * b.abs().max()
    args = (coef.detach()[:1, :, :2].clone().requires_grad_(), log_dA.detach()[:, :2].clone().requires_grad_())
    assert torch.autograd.gradcheck(lambda c_, l_: vandermonde_kernel(c_, l_, 9), args)


@pytest.mark.parametrize("L", [1, 7, 100])
def test_vandermonde_state_matches_recurrence(L):
    dA, dB, _ = _s4d()
    u = torch.randn(2, 3, L, dtype=torch.float64)
    x = torch.zeros(2, 3, 5, dtype=torch.complex128)
    for t in range(L):
        x = dA * x + dB * u[..., t, None]
    torch.testing.assert_close(vandermonde_state(u, torch.log(dA), dB), x, rtol=0, atol=1e-11)


def test_shift_kernel_is_the_shift_ssm_impulse_response():
    torch.manual_seed(0)
    H, N = 3, 6
    B, C = torch.randn(H, N, dtype=torch.float64), torch.randn(H, N, dtype=torch.float64)
    s = torch.zeros(H, N, dtype=torch.float64)
    taps = []
    for t in range(N + 2):  # state shifted one slot per step, impulse u_0 = 1 enters through B
        s = torch.cat([torch.zeros(H, 1, dtype=torch.float64), s[:, :-1]], -1) + (B if t == 0 else 0)
        taps.append((C * s).sum(-1))
    taps = torch.stack(taps, -1)
    torch.testing.assert_close(shift_kernel(B, C), taps[:, :N], rtol=0, atol=1e-14)
    assert torch.all(taps[:, N:] == 0)  # an FIR of N taps
    e1 = torch.zeros(H, N, dtype=torch.float64)
    e1[:, 0] = 1
    torch.testing.assert_close(shift_kernel(e1, C), C)  # B = e_1: the taps are C
