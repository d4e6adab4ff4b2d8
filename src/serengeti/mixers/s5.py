"""S5: a MIMO diagonal state-space layer computed with a parallel scan (docs/mixers.md#s5).

::

    x_k = Λ̄ ⊙ x_{k-1} + B̄ u_k          P_ complex states shared by all H channels
    y_k = f · Re(C̃ x_k) + D ⊙ u_k       f = 2 with conj_sym (the dropped conjugate half), else 1
    out = act(y)                        gelu | half_glu1 | half_glu2 | full_glu

Parameters are real tensors (complex ones as a trailing (re, im) pair), so optimizers, DDP and
checkpoints need no complex support. The complex math (discretization, ``B̄u``, scan, ``C̃x``)
runs in complex64 with autocast disabled (complex128 for a float64 module, as in the tests).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from serengeti.mixers.base import Mixer, StateError
from serengeti.ops.init import lecun_normal_, set_optim
from serengeti.ops.scan import SCAN_METHODS, linear_scan
from serengeti.ops.ssm_kernel import bilinear

C_INITS = ("complex_normal", "trunc_standard_normal", "lecun_normal")
DISCRETIZATIONS = ("zoh", "bilinear")
ACTIVATIONS = ("gelu", "half_glu1", "half_glu2", "full_glu")


@dataclass
class S5State:
    """Generation state of one S5 layer.

    Attributes:
        x: (B, P_) complex state after the last consumed input (complex64, or complex128 for a
            float64 module).
        Lam_bar: (P_,) complex, W_in: (H, 2 P_) and W_out: (2 P_, H) real: the discretized
            system, computed once by ``allocate_state`` from the current parameters so a step
            does no parameter math (allocate a new state after changing them); ``None`` =
            compute in every step.
    """

    x: torch.Tensor
    Lam_bar: torch.Tensor | None = None
    W_in: torch.Tensor | None = None
    W_out: torch.Tensor | None = None


def hippo_legs_normal(n: int) -> torch.Tensor:
    """The normal part S of the HiPPO-LegS matrix, (n, n) float64.

    ``S[i, k] = -1/2 sqrt((2i+1)(2k+1))`` below the diagonal, ``+1/2 sqrt(...)`` above, ``-1/2`` on
    it: ``-1/2 I`` plus a skew-symmetric matrix, so every eigenvalue has real part -1/2.
    """
    q = torch.sqrt(2 * torch.arange(n, dtype=torch.float64) + 1)
    outer = 0.5 * q[:, None] * q[None, :]
    return torch.triu(outer, 1) - torch.tril(outer, -1) - 0.5 * torch.eye(n, dtype=torch.float64)


def hippo_legs_diag(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Diagonalize :func:`hippo_legs_normal`: ``S = V diag(Λ) V^H``.

    Returns:
        Λ: (n,) complex128, ``-1/2 + i ω`` with ω ascending (eigh of the Hermitian ``-i (S + I/2)``);
        V: (n, n) complex128 unitary eigenvectors (columns).
    """
    S = hippo_legs_normal(n)
    skew = S - torch.diag(torch.diagonal(S))  # S + I/2
    omega, V = torch.linalg.eigh(-1j * skew.to(torch.complex128))
    re = torch.diagonal(S).mean()  # exactly -1/2
    return torch.complex(re.expand(n), omega), V


def _lecun_normal(shape: tuple[int, ...], fan_in: int) -> torch.Tensor:
    """Flax's lecun normal (:func:`~serengeti.ops.init.lecun_normal_`) of ``shape``, float64."""
    return lecun_normal_(torch.empty(shape, dtype=torch.float64), fan_in)


class S5(Mixer):
    """S5 layer over ``H = d_model`` channels.

    Args:
        d_model: H, input and output width.
        layer_idx, l_max: from the backbone (S5 has no length-dependent parameters).
        ssm_size: state size before ``conj_sym`` halving (P in the paper).
        blocks: number of HiPPO-N blocks on the diagonal; ``ssm_size`` must be a multiple of it.
        conj_sym: keep only the modes with negative imaginary part (P_ = ssm_size / 2) and
            output ``2 Re(C̃x)``; needs an even block size.
        C_init: ``complex_normal`` (Re, Im ~ N(0, 1/2), modal coordinates),
            ``trunc_standard_normal`` (each row lecun with fan-in ssm_size, then ·V) or
            ``lecun_normal`` (fan-in ssm_size·H, then ·V).
        discretization: ``zoh`` or ``bilinear``.
        dt_min, dt_max: range of the log-uniform initial step, one per state.
        step_rescale: multiplies every step Δ (evaluating at another sampling rate).
        clip_eigs: clamp Re Λ to at most -1e-4 at every forward.
        bidirectional: add a reverse-time scan (states concatenated, C̃ has 2P_ columns). Not causal;
            no recurrent mode.
        activation: ``gelu`` (exact), ``half_glu1`` g·σ(out2(g)), ``half_glu2`` y·σ(out2(g)) or
            ``full_glu`` out1(g)·σ(out2(g)), with g = gelu(y).
        ssm_lr: learning rate of Λ_re, Λ_im and B̃ (all without weight decay); None = base lr.
        dt_no_decay: also put log Δ in that group (the original S5 paper code). The Hyena-S5 LM
            runs leave it in the ordinary group (faithful default, docs/mixers.md#s5).
        scan_method: ``auto`` | ``chunked`` | ``log``, see :func:`serengeti.ops.scan.linear_scan`.
    """

    def __init__(
        self,
        d_model: int,
        *,
        layer_idx: int | None = None,
        l_max: int | None = None,
        device=None,
        dtype=None,
        ssm_size: int = 64,
        blocks: int = 1,
        conj_sym: bool = True,
        C_init: str = "complex_normal",
        discretization: str = "zoh",
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        step_rescale: float = 1.0,
        clip_eigs: bool = False,
        bidirectional: bool = False,
        activation: str = "gelu",
        ssm_lr: float | None = None,
        dt_no_decay: bool = False,
        scan_method: str = "auto",
    ) -> None:
        super().__init__(d_model, layer_idx=layer_idx, l_max=l_max)
        if blocks < 1 or ssm_size % blocks != 0:
            raise ValueError(f"model.mixer.ssm_size={ssm_size} must be a positive multiple of model.mixer.blocks={blocks}")
        block_size = ssm_size // blocks
        if conj_sym and block_size % 2 != 0:
            raise ValueError(f"model.mixer.conj_sym needs an even block size, got ssm_size/blocks = {block_size}")
        for key, value, allowed in (
            ("C_init", C_init, C_INITS),
            ("discretization", discretization, DISCRETIZATIONS),
            ("activation", activation, ACTIVATIONS),
            ("scan_method", scan_method, SCAN_METHODS),
        ):
            if value not in allowed:
                raise ValueError(f"model.mixer.{key}={value!r} is not one of {allowed}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"model.mixer.dt_min={dt_min} and dt_max={dt_max} must satisfy 0 < dt_min <= dt_max")
        H = d_model
        self.ssm_size, self.blocks, self.conj_sym = ssm_size, blocks, conj_sym
        self.C_init, self.discretization, self.activation = C_init, discretization, activation
        self.step_rescale, self.clip_eigs, self.bidirectional = step_rescale, clip_eigs, bidirectional
        self.scan_method = scan_method

        # --- Λ and V: block-diagonal HiPPO-N, conj_sym keeps the Im < 0 half (eigh is ascending)
        Lam, V = hippo_legs_diag(block_size)
        keep = block_size // 2 if conj_sym else block_size
        Lam, V = Lam[:keep], V[:, :keep]  # (keep,), (block_size, keep)
        Lam = Lam.repeat(blocks)  # (P_,)
        V_full = torch.block_diag(*[V] * blocks)  # (ssm_size, P_)
        V_inv = V_full.conj().T  # (P_, ssm_size), V^-1 restricted to the kept modes
        P_ = Lam.shape[0]
        self.P = P_

        # --- B̃ = V^-1 B0, B0 lecun-normal with fan-in = ssm_size (the state size)
        B0 = _lecun_normal((ssm_size, H), fan_in=ssm_size)
        B_t = V_inv @ B0.to(torch.complex128)  # (P_, H)

        # --- C̃ (H, P_) or (H, 2 P_) bidirectional
        n_c = 2 if bidirectional else 1
        if C_init == "complex_normal":
            C_t = torch.view_as_complex(torch.randn(H, n_c * P_, 2, dtype=torch.float64) * math.sqrt(0.5))
        else:
            fan = ssm_size if C_init == "trunc_standard_normal" else ssm_size * H
            parts = [torch.view_as_complex(_lecun_normal((H, ssm_size, 2), fan_in=fan)) @ V_full for _ in range(n_c)]
            C_t = torch.cat(parts, dim=-1)

        fk = {"device": device, "dtype": dtype}

        def param(t: torch.Tensor) -> nn.Parameter:
            return nn.Parameter(t.to(device=device, dtype=dtype or torch.get_default_dtype()))

        self.Lambda_re = set_optim(param(Lam.real), lr=ssm_lr, weight_decay=0.0)
        self.Lambda_im = set_optim(param(Lam.imag), lr=ssm_lr, weight_decay=0.0)
        self.B = set_optim(param(torch.view_as_real(B_t)), lr=ssm_lr, weight_decay=0.0)  # (P_, H, 2)
        self.C = param(torch.view_as_real(C_t))  # (H, n_c P_, 2)
        self.D = param(torch.randn(H, dtype=torch.float64))
        log_dt = torch.rand(P_, 1, dtype=torch.float64) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        self.log_step = param(log_dt)  # (P_, 1)
        if dt_no_decay:
            set_optim(self.log_step, lr=ssm_lr, weight_decay=0.0)
        # GLU projections keep the reference's flax-Dense init (lecun normal, zero bias), so the
        # backbone's GPT-2 re-init skips them (``_no_reinit``).
        for name in {"half_glu1": ["out2"], "half_glu2": ["out2"], "full_glu": ["out1", "out2"]}.get(activation, []):
            lin = nn.Linear(H, H, **fk)
            with torch.no_grad():
                lin.weight.copy_(_lecun_normal((H, H), fan_in=H))
                lin.bias.zero_()
            lin._no_reinit = True
            setattr(self, name, lin)

    # --- shared pieces ---------------------------------------------------------------------
    def discretize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Λ̄ (P_,), B̄ (P_, H))`` complex, from the current parameters (recomputed every call)."""
        real = torch.float64 if self.B.dtype == torch.float64 else torch.float32
        re = self.Lambda_re.to(real)
        if self.clip_eigs:
            re = re.clamp(max=-1e-4)
        Lam = torch.complex(re, self.Lambda_im.to(real))
        B_t = torch.view_as_complex(self.B.to(real).contiguous())
        dt = self.step_rescale * torch.exp(self.log_step[:, 0].to(real))
        if self.discretization == "zoh":
            z = Lam * dt
            return torch.exp(z), (torch.expm1(z) / Lam).unsqueeze(-1) * B_t  # expm1: exact for small |ΛΔ|
        dA, dB = bilinear(dt, Lam.unsqueeze(-1), B_t)
        return dA[:, 0], dB

    def _system(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Λ̄ (P_,) complex, W_in (H, 2 P_) real)``: ``u @ W_in`` is B̄u with (re, im) interleaved."""
        Lam_bar, B_bar = self.discretize()
        return Lam_bar, torch.view_as_real(B_bar).transpose(0, 1).reshape(B_bar.shape[1], 2 * self.P)

    def _readout(self) -> torch.Tensor:
        """(n_c P_ · 2, H) real matrix W with ``Re(C̃ x) = view_as_real(x).flatten(-2) @ W``, times f."""
        real = torch.float64 if self.C.dtype == torch.float64 else torch.float32
        f = 2.0 if self.conj_sym else 1.0
        sign = torch.tensor([f, -f], dtype=real, device=self.C.device)
        return (self.C.to(real) * sign).flatten(-2).T

    def _activate(self, y: torch.Tensor) -> torch.Tensor:
        if self.activation == "gelu":
            return F.gelu(y)
        g = F.gelu(y)
        if self.activation == "half_glu1":
            return g * torch.sigmoid(self.out2(g))
        if self.activation == "half_glu2":
            return y * torch.sigmoid(self.out2(g))
        return self.out1(g) * torch.sigmoid(self.out2(g))

    # --- parallel mode -----------------------------------------------------------------------
    def forward(self, x: torch.Tensor, state: S5State | None = None) -> torch.Tensor:
        """Parallel (scan) mode.

        Args:
            x: (B, L, H) real input u.
            state: optional :class:`S5State`; the scan starts from ``state.x`` and the state is
                moved to the end of ``x`` in place (prefill).

        Returns:
            (B, L, H) in ``x``'s dtype. The SSM part runs in float32/complex64 (float64/complex128
            for a float64 module) with autocast disabled; the activation's Linear layers follow
            the ambient autocast.
        """
        if state is not None and self.bidirectional:
            raise StateError("S5 with model.mixer.bidirectional=true has no recurrent state (it reads the future)")
        Bsz, L, H = x.shape
        with torch.autocast(device_type=x.device.type, enabled=False):
            real = torch.float64 if self.B.dtype == torch.float64 else torch.float32
            u = x.to(real)
            Lam_bar, W_in = self._system()
            # B̄u as one real matmul into interleaved (re, im): (B, L, H) @ (H, 2P_) -> (B, L, P_) complex
            Bu = torch.view_as_complex((u @ W_in).unflatten(-1, (self.P, 2)))
            x0 = None if state is None else state.x.to(Bu.dtype)
            xs = linear_scan(Lam_bar, Bu, x0, method=self.scan_method)  # (B, L, P_)
            W_out = self._readout()  # (n_c 2P_, H)
            y = torch.view_as_real(xs).flatten(-2) @ W_out[: 2 * self.P]
            if self.bidirectional:
                xb = linear_scan(Lam_bar, Bu, reverse=True, method=self.scan_method)
                y = y + torch.view_as_real(xb).flatten(-2) @ W_out[2 * self.P :]
            y = y + self.D.to(real) * u
            if state is not None:
                state.x = xs[:, -1].to(state.x.dtype)
        return self._activate(y.to(x.dtype))

    # --- recurrent mode ----------------------------------------------------------------------
    def allocate_state(self, batch_size: int, *, max_len: int | None = None, device=None, dtype=None) -> S5State:
        """A zero :class:`S5State` (B, P_); ``max_len`` is accepted for the interface (O(1) state).

        The state is complex64, or complex128 when the module or ``dtype`` (the model's real
        dtype) is float64; a bf16/fp16 ``dtype`` does not lower it.
        """
        if self.bidirectional:
            raise StateError("S5 with model.mixer.bidirectional=true has no recurrent mode (it reads the future)")
        cdtype = torch.complex128 if torch.float64 in (dtype, self.B.dtype) else torch.complex64
        device = device or self.B.device
        with torch.no_grad():
            Lam_bar, W_in = self._system()
            W_out = self._readout()[: 2 * self.P]
        return S5State(x=torch.zeros(batch_size, self.P, device=device, dtype=cdtype), Lam_bar=Lam_bar.to(device),
                       W_in=W_in.to(device), W_out=W_out.to(device))

    def step(self, x_t: torch.Tensor, state: S5State) -> tuple[torch.Tensor, S5State]:
        """One step: ``x_t (B, H) -> y_t (B, H)``; ``state.x`` (B, P_) is advanced in place and returned."""
        self._require_state(state, "S5")
        if self.bidirectional:
            raise StateError("S5 with model.mixer.bidirectional=true has no recurrent mode (it reads the future)")
        # One token is a handful of tiny ops, so their count is the cost: no autocast context unless
        # autocast is on, no casts that are no-ops, and fused multiply-adds.
        no_autocast = torch.autocast(device_type=x_t.device.type, enabled=False) \
            if torch.is_autocast_enabled(x_t.device.type) else contextlib.nullcontext()
        with no_autocast:
            if state.Lam_bar is not None:
                Lam_bar, W_in, W_out = state.Lam_bar, state.W_in, state.W_out
            else:
                (Lam_bar, W_in), W_out = self._system(), self._readout()[: 2 * self.P]
            u = x_t if x_t.dtype == W_in.dtype else x_t.to(W_in.dtype)
            Bu = torch.view_as_complex((u @ W_in).unflatten(-1, (self.P, 2)))  # (B, P_)
            xs = torch.addcmul(Bu, Lam_bar, state.x if state.x.dtype == Bu.dtype else state.x.to(Bu.dtype))
            D = self.D if self.D.dtype == u.dtype else self.D.to(u.dtype)
            y = torch.addmm(D * u, torch.view_as_real(xs).flatten(-2), W_out)  # C̃x + Du
            state.x = xs if xs.dtype == state.x.dtype else xs.to(state.x.dtype)
        return self._activate(y if y.dtype == x_t.dtype else y.to(x_t.dtype)), state
