"""H3 (Hungry Hungry Hippos): a shift SSM and a diagonal SSM around a multiplicative gate.

::

    q, k, v = q_proj(u), k_proj(u), v_proj(u)              (B, L, D) each
    k~ = K_shift * k + D_k . k                              shift SSM: learned FIR of d_state taps
    y  = K_diag * (k~ . v) + D . (k~ . v)                   diagonal (S4D-Lin) SSM, per channel
    out = output_linear(q . y)

With ``head_dim`` = hd > 1 the D channels form H = D / hd heads; per head the diagonal SSM
runs on the hd x hd outer product ``k~ v^T`` (hd^2 sequences sharing the head's kernel) and
``q`` contracts the first index away, like linear attention with an SSM-decayed state.

The diagonal SSM is generated from its parameters at every call (kernel length = the input
length, so there is no ``l_max`` cut and the recurrent mode matches for any length); see
:mod:`serengeti.ops.ssm_kernel` for how the kernel is computed cheaply and exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from serengeti.mixers.base import Mixer, linear_channels_first
from serengeti.ops.gated_fftconv import gated_fftconv
from serengeti.ops.ssm_kernel import (
    bilinear, fir_conv, power_tables, shift_kernel, vandermonde_kernel, vandermonde_state,
)
from serengeti.ops.init import set_optim


@dataclass
class H3State:
    """Generation state of one H3 layer; its size does not grow with the sequence.

    Attributes:
        k_hist: (B, D, d_state) the last d_state inputs of the shift SSM (``k`` before the
            shift filter), oldest first; zeros before the sequence starts.
        x: (B, hd, hd, H, d_state/2) complex state of the diagonal SSM, one per (d1, d2)
            entry of the per-head outer product.
        taps_rev: (D, d_state) shift-SSM taps, oldest first; dA, dB, C: (H, d_state/2)
            complex128 discretized diagonal SSM. Computed once by ``allocate_state`` from the
            current parameters, so a step does no parameter math (allocate a new state after
            changing them); ``None`` = compute in every step.
        seqlen: positions consumed so far (a fresh state has no prior response to add).
    """

    k_hist: torch.Tensor
    x: torch.Tensor
    taps_rev: torch.Tensor | None = None
    seqlen: int = 0
    dA: torch.Tensor | None = None
    dB: torch.Tensor | None = None
    C: torch.Tensor | None = None


class H3(Mixer):
    """H3 sequence mixer, docs/mixers.md#h3.

    Args:
        d_model: model width D.
        layer_idx, l_max: from the backbone (``l_max`` is not needed: the kernel is generated
            for whatever length comes in).
        d_state: N, the shift filter length and twice the number of complex diagonal modes.
        head_dim: hd; D must be divisible by it. hd = 1 is the elementwise H3 of the paper.
        ssm_lr: learning rate of A (both parts), B (both SSMs) and log dt, all without weight
            decay (configs set ``min(1e-3, optimizer.lr)``).
        dt_min, dt_max: range of the log-uniform initial step dt.
    """

    def __init__(
        self,
        d_model: int,
        *,
        layer_idx: int | None = None,
        l_max: int | None = None,
        device=None,
        dtype=None,
        d_state: int = 64,
        head_dim: int = 1,
        ssm_lr: float = 1e-3,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
    ) -> None:
        super().__init__(d_model, layer_idx=layer_idx, l_max=l_max)
        if head_dim < 1 or d_model % head_dim != 0:
            raise ValueError(f"model.mixer.head_dim={head_dim} must be >= 1 and divide model.d_model={d_model}")
        if d_state < 2 or d_state % 2 != 0:
            raise ValueError(f"model.mixer.d_state={d_state} must be an even number >= 2 (d_state/2 complex modes)")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"model.mixer.dt_min={dt_min} and dt_max={dt_max} must satisfy 0 < dt_min <= dt_max")
        fk = {"device": device, "dtype": dtype}
        D, N = d_model, d_state
        self.head_dim, self.d_state = head_dim, d_state
        self.H, N2 = D // head_dim, d_state // 2

        self.q_proj = nn.Linear(D, D, **fk)
        self.k_proj = nn.Linear(D, D, **fk)
        self.v_proj = nn.Linear(D, D, **fk)
        self.output_linear = nn.Linear(D, D, **fk)

        # shift SSM on k (D channels): state shifted each step, input through B = e_1
        ssm_k_B = torch.zeros(D, N, **fk)
        ssm_k_B[:, 0] = 1.0
        self.ssm_k_B = set_optim(nn.Parameter(ssm_k_B), lr=ssm_lr, weight_decay=0.0)
        self.ssm_k_C = nn.Parameter(torch.empty(D, N, **fk).uniform_(-1 / math.sqrt(N), 1 / math.sqrt(N)))
        self.ssm_k_D = nn.Parameter(torch.randn(D, **fk))

        # diagonal SSM (H channels), S4D-Lin: A_n = -1/2 + i pi n, stored as log(-Re A) and Im A
        self.log_neg_A_real = set_optim(nn.Parameter(torch.full((self.H, N2), math.log(0.5), **fk)), lr=ssm_lr, weight_decay=0.0)
        A_imag = math.pi * torch.arange(N2, **fk).expand(self.H, N2).clone()
        self.A_imag = set_optim(nn.Parameter(A_imag), lr=ssm_lr, weight_decay=0.0)
        B = torch.zeros(self.H, N2, 2, **fk)
        B[..., 0] = 1.0
        self.B = set_optim(nn.Parameter(B), lr=ssm_lr, weight_decay=0.0)  # complex, as (re, im)
        self.C = nn.Parameter(torch.randn(self.H, N2, 2, **fk) * math.sqrt(0.5))  # complex N(0, 1)
        log_dt = torch.rand(self.H, **fk) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        self.log_dt = set_optim(nn.Parameter(log_dt), lr=ssm_lr, weight_decay=0.0)
        self.D = nn.Parameter(torch.randn(self.H, **fk))

    # --- shared pieces -------------------------------------------------------------------
    def _discretize(self, with_log: bool = True) -> tuple[torch.Tensor, ...]:
        """``(dA, log_dA, dB, C)``, each (H, N2) complex128 (``log_dA`` None unless ``with_log``).

        Always double precision: these are tiny, and powers of dA up to L amplify its rounding
        error L times (see :mod:`serengeti.ops.ssm_kernel`).
        """
        dt = torch.exp(self.log_dt.double())
        A = torch.complex(-torch.exp(self.log_neg_A_real.double()), self.A_imag.double())
        B = torch.view_as_complex(self.B.double())
        C = torch.view_as_complex(self.C.double())
        dA, dB = bilinear(dt, A, B)
        # log(dA) from its modulus and angle: torch.log on complex128 costs 2x as much on CPU
        log_dA = torch.complex(torch.log(dA.abs()), dA.angle()) if with_log else None
        return dA, log_dA, dB, C

    def _real_dtype(self) -> torch.dtype:
        return torch.float64 if self.C.dtype == torch.float64 else torch.float32

    def _contract_q(self, y: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """``out[b, (d2 h), ...] = sum_d1 q[b, (h d1), ...] y[b, d1, d2, h, ...]``.

        y: (B, hd, hd, H, *T), q: (B, D, *T) -> (B, D, *T); channel order (d2 h) as in the reference.
        """
        q = rearrange(q, "b (h d1) ... -> b d1 1 h ...", d1=self.head_dim)
        if self.head_dim == 1:
            return (y * q).flatten(1, 3)
        return rearrange((y * q).sum(1), "b d2 h ... -> b (d2 h) ...")

    def _outer(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(B, D, *T) x (B, D, *T) -> (B, hd, hd, H, *T): per-head outer product k v^T."""
        hd = self.head_dim
        return rearrange(k, "b (h d1) ... -> b d1 1 h ...", d1=hd) * rearrange(v, "b (h d2) ... -> b 1 d2 h ...", d2=hd)

    # --- parallel mode -------------------------------------------------------------------
    def forward(self, x: torch.Tensor, state: H3State | None = None) -> torch.Tensor:
        """Parallel (convolution) mode.

        Args:
            x: (B, L, D).
            state: optional :class:`H3State`. When given, ``x`` continues the sequence the
                state summarises (zeros: a fresh prompt) and the state is advanced to the end
                of ``x`` in place, from the whole chunk at once (prefill without a step loop).

        Returns:
            (B, L, D). The convolutions run in float32 (float64 for a float64 module), also
            under autocast.
        """
        L = x.shape[1]
        # q, k, v by one channels-first matmul: (B, 3D, L), time contiguous for the convolutions
        W = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        b = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
        q, k, v = linear_channels_first(x, W, b).split(self.d_model, dim=1)
        taps = shift_kernel(self.ssm_k_B, self.ssm_k_C)  # (D, N)
        k_s = fir_conv(k, taps, self.ssm_k_D, history=None if state is None else state.k_hist)

        dA, log_dA, dB, C = self._discretize()
        real = self._real_dtype()
        # a prefill also needs the end state, from the same power tables: build them once
        tables = None if state is None else power_tables(log_dA, L)
        K = vandermonde_kernel(C * dB, log_dA, L, dtype=real, tables=tables)  # (H, L)
        fresh = state is None or state.seqlen == 0  # no prior state whose response must be added
        if self.head_dim == 1 and fresh:
            # q . (K * (k~ . v) + D . (k~ . v)) as one fused, gated FFT convolution
            y = gated_fftconv(k_s, K, self.D, pre=v, post=q)  # (B, D, L)
            if state is not None:
                self._advance(state, self._outer(k_s, v), k, log_dA, dB, tables)
            return self.output_linear(y.mT)
        kv = self._outer(k_s, v)  # (B, hd, hd, H, L)
        y = gated_fftconv(kv.flatten(0, 2), K, self.D).view_as(kv)
        if state is not None:
            if not fresh:
                # the prior state's response: y_t += 2 Re sum_n C_n dA_n^(t+1) x0_n
                x0 = state.x.to(torch.complex128)
                y = y + vandermonde_kernel(C * dA * x0, log_dA, L, dtype=real, tables=tables).to(y.dtype)
            self._advance(state, kv, k, log_dA, dB, tables)
        y = self._contract_q(y, q)  # (B, D, L)
        return self.output_linear(y.mT)

    def _advance(self, state: H3State, kv: torch.Tensor, k: torch.Tensor, log_dA: torch.Tensor, dB: torch.Tensor,
                 tables: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Move ``state`` past a chunk: kv (B, hd, hd, H, L) enters the diagonal SSM, k (B, D, L) the shift SSM."""
        L = kv.shape[-1]
        x_end = vandermonde_state(kv.to(self._real_dtype()), log_dA, dB, tables)
        if state.seqlen > 0:
            x_end = x_end + torch.exp(log_dA * L) * state.x.to(torch.complex128)
        state.x = x_end.to(state.x.dtype)
        hist = torch.cat([state.k_hist, k.to(state.k_hist.dtype)], dim=-1)  # (B, D, N + L)
        state.k_hist = hist[..., -self.d_state :]
        state.seqlen += L

    # --- recurrent mode ------------------------------------------------------------------
    def allocate_state(self, batch_size: int, *, max_len: int, device=None, dtype=None) -> H3State:
        """A zero :class:`H3State` for ``batch_size`` sequences.

        ``max_len`` is accepted for the interface; the state is O(1) in the sequence length.
        ``dtype`` is the real dtype of ``k_hist`` (default: the module's); the diagonal state
        is complex128, because a generation runs for thousands of steps and complex64 rounding
        of dA would compound with the step count.
        """
        device = device or self.C.device
        dtype = dtype or self.C.dtype
        hd = self.head_dim
        with torch.no_grad():
            taps_rev = shift_kernel(self.ssm_k_B, self.ssm_k_C).flip(-1).to(device=device, dtype=dtype)
            dA, _, dB, C = self._discretize(with_log=False)
            dA, dB, C = dA.to(device), dB.to(device), C.to(device)
        return H3State(
            k_hist=torch.zeros(batch_size, self.d_model, self.d_state, device=device, dtype=dtype),
            x=torch.zeros(batch_size, hd, hd, self.H, self.d_state // 2, device=device, dtype=torch.complex128),
            taps_rev=taps_rev, dA=dA, dB=dB, C=C,
        )

    def step(self, x_t: torch.Tensor, state: H3State) -> tuple[torch.Tensor, H3State]:
        """One token: ``x_t (B, D) -> y_t (B, D)``, O(D * d_state + D^2) work; advances ``state``."""
        self._require_state(state, type(self).__name__)
        q, k, v = self.q_proj(x_t), self.k_proj(x_t), self.v_proj(x_t)  # (B, D)
        taps_rev = state.taps_rev  # (D, N), taps_rev[:, -1 - j] hits k_{t-j}
        if taps_rev is None:
            taps_rev = shift_kernel(self.ssm_k_B, self.ssm_k_C).flip(-1)
        hist = torch.cat([state.k_hist[..., 1:], k.unsqueeze(-1).to(state.k_hist.dtype)], dim=-1)
        k_s = (hist.to(k.dtype) * taps_rev.to(k.dtype)).sum(-1) + self.ssm_k_D * k
        kv = self._outer(k_s, v)  # (B, hd, hd, H)

        if state.dA is not None:
            dA, dB, C = state.dA, state.dB, state.C
        else:
            dA, _, dB, C = self._discretize(with_log=False)
        xs = dA * state.x + dB * kv.unsqueeze(-1).to(torch.complex128)
        y = (2 * (C * xs).sum(-1).real).to(kv.dtype) + self.D * kv
        state.k_hist, state.x = hist, xs.to(state.x.dtype)
        state.seqlen += 1
        return self.output_linear(self._contract_q(y, q)), state
