"""S5 layer against float64 oracles: HiPPO init, scan == sequential loop, step == forward, conj_sym."""
import copy
import math

import pytest
import torch

from serengeti.mixers import S5
from serengeti.mixers.base import StateError
from serengeti.mixers.s5 import hippo_legs_diag, hippo_legs_normal
from serengeti.ops.scan import linear_scan_ref


def s5_ref(m: S5, u: torch.Tensor) -> torch.Tensor:
    """S5 written out plainly in complex128: discretize, B̄u, sequential loop (both ways), C̃x, D, act."""
    m = copy.deepcopy(m).double()
    u = u.double()
    re = m.Lambda_re.clamp(max=-1e-4) if m.clip_eigs else m.Lambda_re
    Lam = torch.complex(re, m.Lambda_im)
    dt = m.step_rescale * torch.exp(m.log_step[:, 0])
    B = torch.view_as_complex(m.B)
    if m.discretization == "zoh":
        Lam_bar = torch.exp(Lam * dt)
        B_bar = ((Lam_bar - 1) / Lam)[:, None] * B
    else:
        Lam_bar = (1 + dt * Lam / 2) / (1 - dt * Lam / 2)
        B_bar = (dt / (1 - dt * Lam / 2))[:, None] * B
    Bu = torch.einsum("ph,blh->blp", B_bar, u.to(torch.complex128))
    C = torch.view_as_complex(m.C)
    f = 2 if m.conj_sym else 1
    y = f * torch.einsum("hp,blp->blh", C[:, : m.P], linear_scan_ref(Lam_bar, Bu)).real
    if m.bidirectional:
        y = y + f * torch.einsum("hp,blp->blh", C[:, m.P :], linear_scan_ref(Lam_bar, Bu, reverse=True)).real
    return m._activate(y + m.D * u)


def _layer(seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"ssm_size": 8, "blocks": 2, "dt_min": 1e-3, "dt_max": 0.5, **kw}
    return S5(6, **kw)


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16])
def test_hippo_legs_n_eigenvalues(n):
    Lam, V = hippo_legs_diag(n)
    torch.testing.assert_close(Lam.real, torch.full((n,), -0.5, dtype=torch.float64), rtol=0, atol=1e-15)
    # a true eigendecomposition of the normal part, with unitary V, eigenvalues in conjugate pairs
    S = hippo_legs_normal(n).to(torch.complex128)
    torch.testing.assert_close(V @ torch.diag(Lam) @ V.conj().T, S, rtol=0, atol=1e-10)
    torch.testing.assert_close(V.conj().T @ V, torch.eye(n, dtype=torch.complex128), rtol=0, atol=1e-10)
    torch.testing.assert_close(Lam.imag, -Lam.imag.flip(0), rtol=0, atol=1e-10)
    # an independent general eigen-solver on S agrees
    ev = torch.linalg.eigvals(hippo_legs_normal(n))
    torch.testing.assert_close(ev.imag.sort().values, Lam.imag, rtol=0, atol=1e-9)


def test_hippo_known_values():
    # published HiPPO-N block spectra used by the AR (block 2) and WikiText (block 4) configs
    torch.testing.assert_close(hippo_legs_diag(2)[0].imag, torch.tensor([-math.sqrt(3) / 2, math.sqrt(3) / 2], dtype=torch.float64))
    assert torch.allclose(hippo_legs_diag(4)[0].imag.abs(), torch.tensor([4.6033, 0.5565, 0.5565, 4.6033], dtype=torch.float64), atol=1e-4)


def test_init_layout_and_optimizer_tags():
    m = S5(16, ssm_size=32, blocks=16, conj_sym=True, dt_min=1e-4, dt_max=0.1, ssm_lr=7e-4)
    assert m.P == 16
    assert m.Lambda_re.shape == (16,) and m.B.shape == (16, 16, 2) and m.C.shape == (16, 16, 2)
    assert m.D.shape == (16,) and m.log_step.shape == (16, 1)
    # AR config: every 2x2 block keeps its Im < 0 mode -> all states start at -0.5 - 0.866i
    torch.testing.assert_close(m.Lambda_im, torch.full((16,), -math.sqrt(3) / 2))
    assert (m.log_step >= math.log(1e-4)).all() and (m.log_step <= math.log(0.1)).all()
    for name in ("Lambda_re", "Lambda_im", "B"):
        assert getattr(m, name)._optim == {"lr": 7e-4, "weight_decay": 0.0}
    for name in ("C", "D", "log_step"):
        assert not hasattr(getattr(m, name), "_optim")
    assert S5(4, ssm_size=4, dt_no_decay=True, ssm_lr=1e-3).log_step._optim == {"lr": 1e-3, "weight_decay": 0.0}


def test_B_is_V_inverse_of_a_real_lecun_matrix():
    torch.manual_seed(0)
    m = S5(64, ssm_size=256, blocks=4, conj_sym=False).double()
    _, V = hippo_legs_diag(64)
    B0 = torch.block_diag(*[V] * 4) @ torch.view_as_complex(m.B)  # undo V^-1
    assert B0.imag.abs().max() < 1e-5  # B0 was real (float32 storage rounding)
    assert abs(B0.real.std().item() - 1 / 16) < 0.004  # lecun: std 1/sqrt(ssm_size)
    assert B0.real.abs().max() <= 2 / 16 / 0.8796 + 1e-5  # truncated at 2 sigma


@pytest.mark.parametrize("C_init", ["complex_normal", "trunc_standard_normal", "lecun_normal"])
def test_C_init_scales(C_init):
    torch.manual_seed(0)
    m = S5(64, ssm_size=128, blocks=4, conj_sym=False, C_init=C_init)
    std = torch.view_as_complex(m.C).abs().pow(2).mean().sqrt().item()  # E|C̃|^2 ^ 1/2 (V unitary)
    expected = {"complex_normal": 1.0, "trunc_standard_normal": math.sqrt(2 / 128), "lecun_normal": math.sqrt(2 / (128 * 64))}[C_init]
    assert abs(std / expected - 1) < 0.05


@pytest.mark.parametrize("discretization", ["zoh", "bilinear"])
@pytest.mark.parametrize("conj_sym", [True, False])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("activation", ["gelu", "half_glu2"])
def test_s5_matches_float64_loop(discretization, conj_sym, bidirectional, activation):
    m = _layer(discretization=discretization, conj_sym=conj_sym, bidirectional=bidirectional, activation=activation,
               C_init="complex_normal" if conj_sym else "trunc_standard_normal", clip_eigs=True, step_rescale=1.5)
    u = torch.randn(3, 70, 6)
    torch.testing.assert_close(m(u).double(), s5_ref(m, u), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["half_glu1", "full_glu"])
def test_s5_glu_variants_match_loop(activation):
    m = _layer(activation=activation, C_init="lecun_normal")
    u = torch.randn(2, 33, 6)
    torch.testing.assert_close(m(u).double(), s5_ref(m, u), rtol=1e-5, atol=1e-5)


def test_clip_eigs_clamps_real_part():
    m = _layer(clip_eigs=True).double()
    with torch.no_grad():
        m.Lambda_re.fill_(0.3)  # unstable unless clipped
    assert (m.discretize()[0].abs() < 1).all()
    u = torch.randn(1, 20, 6, dtype=torch.float64)
    y = m(u)
    torch.testing.assert_close(y, s5_ref(m, u))
    y.sum().backward()
    assert (m.Lambda_re.grad == 0).all()  # clamped: no gradient, as in the reference


def test_s5_gradcheck_float64():
    torch.manual_seed(0)
    m = S5(3, ssm_size=4, blocks=2, activation="half_glu2", clip_eigs=True, dt_max=0.5).double()
    u = torch.randn(2, 7, 3, dtype=torch.float64, requires_grad=True)
    params = [m.Lambda_re, m.Lambda_im, m.B, m.C, m.D, m.log_step]

    def f(u, *ps):
        return torch.func.functional_call(m, dict(zip(["Lambda_re", "Lambda_im", "B", "C", "D", "log_step"], ps)), (u,))

    assert torch.autograd.gradcheck(f, (u, *[p.detach().clone().requires_grad_() for p in params]), fast_mode=True)


@pytest.mark.parametrize("discretization", ["zoh", "bilinear"])
def test_conj_sym_equals_full_complex_system(discretization):
    """conj_sym (P_ modes, 2 Re) == the non-halved layer holding both members of each conjugate pair."""
    half = _layer(conj_sym=True, discretization=discretization).double()
    full = _layer(conj_sym=False, discretization=discretization).double()
    assert full.P == 2 * half.P
    with torch.no_grad():
        full.Lambda_re.copy_(torch.cat([half.Lambda_re, half.Lambda_re]))
        full.Lambda_im.copy_(torch.cat([half.Lambda_im, -half.Lambda_im]))
        conj = torch.tensor([1.0, -1.0], dtype=torch.float64)
        full.B.copy_(torch.cat([half.B, half.B * conj]))
        full.C.copy_(torch.cat([half.C, half.C * conj], dim=1))
        full.log_step.copy_(torch.cat([half.log_step, half.log_step]))
        full.D.copy_(half.D)
    u = torch.randn(2, 40, 6, dtype=torch.float64)
    torch.testing.assert_close(full(u), half(u), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("conj_sym", [True, False])
@pytest.mark.parametrize("discretization", ["zoh", "bilinear"])
def test_step_matches_forward(conj_sym, discretization):
    m = _layer(conj_sym=conj_sym, discretization=discretization, activation="half_glu2")
    u = torch.randn(2, 30, 6)
    with torch.no_grad():
        y = m(u)
        state = m.allocate_state(2, max_len=30)
        ys = []
        for t in range(30):
            y_t, state = m.step(u[:, t], state)
            ys.append(y_t)
    torch.testing.assert_close(torch.stack(ys, 1), y, rtol=1e-5, atol=1e-5)


def test_prefill_then_step_continues_the_sequence():
    m = _layer().double()
    u = torch.randn(2, 25, 6, dtype=torch.float64)
    y = m(u)
    state = m.allocate_state(2, max_len=25)
    y_pre = m(u[:, :17], state=state)  # prefill leaves the state at position 16
    tail = [m.step(u[:, t], state)[0] for t in range(17, 25)]
    torch.testing.assert_close(torch.cat([y_pre, torch.stack(tail, 1)], 1), y, rtol=1e-12, atol=1e-12)
    state2 = m.allocate_state(2, max_len=25)
    m(u[:, :10], state=state2)
    torch.testing.assert_close(m(u[:, 10:], state=state2), y[:, 10:], rtol=1e-12, atol=1e-12)


def test_causal_unless_bidirectional():
    u = torch.randn(1, 30, 6, dtype=torch.float64)
    v = u.clone()
    v[:, 20:] += torch.randn(1, 10, 6, dtype=torch.float64)
    m = _layer().double()
    torch.testing.assert_close(m(u)[:, :20], m(v)[:, :20], rtol=0, atol=0)
    mb = _layer(bidirectional=True).double()
    assert (mb(u)[:, :20] - mb(v)[:, :20]).abs().max() > 1e-6
    with pytest.raises(StateError, match="bidirectional"):
        mb.allocate_state(1, max_len=30)


def test_autocast_keeps_ssm_in_float32():
    m = _layer()
    u = torch.randn(2, 20, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(u.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), m(u.bfloat16().float()), rtol=2e-2, atol=2e-2)


def test_bad_hyperparameters_name_the_key():
    with pytest.raises(ValueError, match="model.mixer.blocks"):
        S5(4, ssm_size=6, blocks=4)
    with pytest.raises(ValueError, match="conj_sym"):
        S5(4, ssm_size=6, blocks=2, conj_sym=True)
    with pytest.raises(ValueError, match="model.mixer.C_init"):
        S5(4, ssm_size=4, C_init="ones")
    with pytest.raises(ValueError, match="model.mixer.scan_method"):  # at construction, not at the first forward
        S5(4, ssm_size=4, scan_method="parallel")
    with pytest.raises(StateError, match="allocate_state"):
        S5(4, ssm_size=4).step(torch.randn(1, 4), None)
