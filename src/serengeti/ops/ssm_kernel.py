"""Diagonal state-space kernels (S4D) and the shift SSM, with float64 references.

A diagonal SSM with complex modes ``n`` per channel ``h``, discretized with step ``dt``::

    x_t = dA * x_{t-1} + dB * u_t          x: (..., H, N2) complex
    y_t = 2 Re sum_n C_n x_t[n]            (the conjugate modes are implied by the factor 2)

is, unrolled, the causal convolution ``y = K * u`` with the Vandermonde kernel

    K[h, l] = 2 Re sum_n C'[h, n] dA[h, n]^l,        C' = C * dB.

:func:`vandermonde_kernel` evaluates it without the (H, N2, L) tensor of powers that a naive
``exp(l log dA)`` needs. Write ``l = c j + r`` (chunk size ``c``, ``r < c``)::

    K[h, c j + r] = 2 Re sum_n (C'[h, n] dA[h, n]^(c j)) * dA[h, n]^r
                  = sum_n W[h, j, n] V[h, n, r]          (a real matmul over 2*N2)

so the work is two small power tables, (H, N2, c) and (H, L/c, N2), and one batched matmul.
The tables are built in complex128 and only then rounded: powers of a rounded ``dA`` lose
``l * eps`` relative accuracy, which in complex64 would be 1e-4 at ``l`` of a few thousand;
from float64 tables the float32 kernel is accurate to a few float32 ulps at every length.
The same tables give the state after a sequence, ``sum_s dA^(L-1-s) dB u_s``
(:func:`vandermonde_state`), so prefill never runs the recurrence step by step.

The shift SSM is a causal FIR of N taps (:func:`shift_kernel`); :func:`fir_conv` applies it as
a block-Toeplitz matmul (two (c x c) blocks per chunk of c >= N steps), several times cheaper
on CPU than a length-2L FFT for a 64-tap filter once there are many chunks (training batches);
a short single prompt, where building the Toeplitz blocks would dominate, goes through the FFT.
"""
from __future__ import annotations

import math

import torch

from serengeti.ops.fftconv import fftconv


def bilinear(dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear (Tustin) discretization of ``x' = A x + B u`` with step ``dt``.

    Args:
        dt: (H,) positive steps.
        A: (H, N2) complex continuous-time eigenvalues.
        B: (H, N2) complex input vector.

    Returns:
        ``dA = (1 + dt A / 2) / (1 - dt A / 2)`` and ``dB = dt B / (1 - dt A / 2)``, both (H, N2),
        in the complex dtype of ``A`` (promoted with ``dt``).
    """
    dtA = dt.unsqueeze(-1) * A
    denom = 1 - dtA / 2
    return (1 + dtA / 2) / denom, dt.unsqueeze(-1) * B / denom


def _powers(log_dA: torch.Tensor, n: int, stride: int = 1) -> torch.Tensor:
    """``dA^(stride * i)`` for ``i < n`` as (H, N2, n), from ``log_dA`` (H, N2) complex; no autograd.

    Built by doubling: the table for ``[0, 2m)`` is the one for ``[0, m)`` times
    ``dA^(stride * m)``, whose successive values come by squaring: one exponential of (H, N2)
    and about 2 log2(n) multiplies (complex128: a relative error of ~log2(n) ulps).
    """
    p = torch.empty(*log_dA.shape, n, dtype=log_dA.dtype, device=log_dA.device)
    p[..., 0] = 1
    z = torch.exp(log_dA * stride)  # dA^(stride m) for m = 1, 2, 4, ... by squaring: one complex exp
    m = 1
    while m < n:  # (complex exp/log cost ~60 ns per element on CPU, a multiply ~1.5 ns)
        k = min(m, n - m)
        torch.mul(p[..., :k], z.unsqueeze(-1), out=p[..., m : m + k])  # filled in place: no cat of complex128
        z = z * z
        m *= 2
    return p


def _chunk_size(L: int) -> int:
    """Power of two near sqrt(L): balances the two power tables (c and L/c columns)."""
    return 1 << max(0, math.ceil(math.log2(max(L, 1)) / 2))


def _real_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 for double-precision ``t``, else float32."""
    return torch.float64 if t.dtype in (torch.float64, torch.complex128) else torch.float32


@torch.compiler.disable  # complex128 tables filled in place: eager under torch.compile (serengeti/training/compiling.py)
def power_tables(log_dA: torch.Tensor, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked power tables for length ``L``: ``V = dA^r`` (H, N2, c) and ``P = dA^(c j)`` (H, N2, m).

    ``c`` = :func:`_chunk_size` (L), ``m`` = ceil(L / c); complex128, no autograd. Build them once to
    share between :func:`vandermonde_kernel` and :func:`vandermonde_state` of the same length (prefill).
    """
    c = _chunk_size(L)
    la = log_dA.detach().to(torch.complex128)
    return _powers(la, c), _powers(la, -(-L // c), stride=c)


class _VandermondeKernel(torch.autograd.Function):
    """``K = 2 Re sum_n coef_n z_n^l`` with a hand-written backward over the same power tables.

    Autograd through the complex128 tables would keep and revisit every doubling step; the
    gradients are two more "transposed Vandermonde" sums, done with the chunked tables::

        S0 = sum_l g_l z^l,   S1 = sum_l l g_l z^l       (l = c j + r:  sum_j P_j sum_r (.) V_r)
        grad coef = 2 conj(S0),   grad log z = 2 conj(coef S1)   (summed over coef's batch dims)
    """

    @staticmethod
    def forward(ctx, coef, log_dA, L, out_dtype, tables):
        c = _chunk_size(L)
        m = -(-L // c)
        V, P = tables if tables is not None else power_tables(log_dA, L)  # dA^r (H, N2, c), dA^(c j) (H, N2, m)
        coef128 = coef.to(torch.complex128)
        W = coef128.unsqueeze(-1) * P  # (..., H, N2, m)
        # 2 Re(W V) = [2 Re W, -2 Im W] @ [Re V; Im V]
        W = torch.cat([W.real, -W.imag], dim=-2).transpose(-1, -2).mul(2).to(out_dtype)  # (..., H, m, 2 N2)
        Vr = torch.cat([V.real, V.imag], dim=-2).to(out_dtype)  # (H, 2 N2, c)
        K = torch.matmul(W, Vr)  # (..., H, m, c)
        ctx.save_for_backward(coef128, V, P)
        ctx.meta = (L, c, m, coef.dtype, log_dA.dtype)
        return K.flatten(-2)[..., :L]

    @staticmethod
    def backward(ctx, g):
        coef, V, P = ctx.saved_tensors
        L, c, m, coef_dt, la_dt = ctx.meta
        need_coef, need_la = ctx.needs_input_grad[:2]
        H, N2 = V.shape[:2]
        with torch.autocast(device_type=g.device.type, enabled=False):
            G = torch.nn.functional.pad(g, (0, m * c - L)).unflatten(-1, (m, c))  # (..., H, m, c)
            Vt = torch.cat([V.real, V.imag], dim=-2).to(g.dtype).mT  # (H, c, 2 N2)
            Pt = P.mT  # (H, m, N2)

            def chunk_sums(Gx: torch.Tensor) -> torch.Tensor:
                """sum_r Gx[..., j, r] dA^r -> (..., H, m, N2) complex128."""
                T = torch.matmul(Gx, Vt)
                return torch.complex(T[..., :N2], T[..., N2:]).to(torch.complex128)

            T = chunk_sums(G)
            grad_coef = grad_la = None
            if need_coef:
                grad_coef = (2 * (T * Pt).sum(-2).conj()).to(coef_dt)
            if need_la:
                r = torch.arange(c, device=g.device, dtype=g.dtype)
                jc = (torch.arange(m, device=g.device, dtype=torch.float64) * c).unsqueeze(-1)  # (m, 1)
                S1 = ((chunk_sums(G * r) + jc * T) * Pt).sum(-2)  # sum_l l g_l dA^l, (..., H, N2)
                grad_la = (2 * (coef * S1).conj()).reshape(-1, H, N2).sum(0).to(la_dt)
        return grad_coef, grad_la, None, None, None


def vandermonde_kernel(coef: torch.Tensor, log_dA: torch.Tensor, L: int, *, dtype: torch.dtype | None = None,
                       tables: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``K[..., h, l] = 2 Re sum_n coef[..., h, n] * exp(l * log_dA[h, n])`` for ``l < L``.

    Args:
        coef: (..., H, N2) complex, e.g. ``C * dB`` (the SSM kernel) or a per-batch
            ``C * dA * x0`` (the response to an initial state ``x0``).
        log_dA: (H, N2) complex, ``log(dA)``.
        L: kernel length (>= 1).
        dtype: real dtype of the result and of the matmul (default: float64 for complex128
            ``coef``, else float32). Pass complex128 inputs with ``dtype=torch.float32`` to keep
            the discretization exact and the bulk of the work in float32.
        tables: optional :func:`power_tables` ``(log_dA, L)``, when the caller reuses them.

    Returns:
        (..., H, L) in ``dtype``. The power tables are always built in complex128 (see the
        module docstring); autocast is disabled. Differentiable in ``coef`` and ``log_dA``
        (hand-written backward, same tables and matmul precision as the forward).
    """
    out_dtype = dtype or _real_dtype(coef)
    with torch.autocast(device_type=coef.device.type, enabled=False):
        return _VandermondeKernel.apply(coef, log_dA, L, out_dtype, tables)


def vandermonde_state(u: torch.Tensor, log_dA: torch.Tensor, dB: torch.Tensor,
                      tables: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The diagonal SSM state after a sequence from a zero state: ``sum_s dA^(L-1-s) dB u_s``.

    Args:
        u: (..., H, L) real input.
        log_dA: (H, N2) complex, ``log(dA)``.
        dB: (H, N2) complex discretized input vector.
        tables: optional :func:`power_tables` ``(log_dA, L)``.

    Returns:
        (..., H, N2) complex128 (to be rounded by the caller to its state dtype). The matmul runs
        in ``u``'s precision (float32 unless ``u`` is float64), with the same chunked power
        tables as :func:`vandermonde_kernel`, never (H, N2, L) at once. Differentiable in ``u``
        and ``dB``, not in ``log_dA`` (it is for recurrent states, which carry no gradient).
    """
    real = _real_dtype(u)
    L = u.shape[-1]
    c = _chunk_size(L)
    m = -(-L // c)
    with torch.autocast(device_type=u.device.type, enabled=False):
        V, P = tables if tables is not None else power_tables(log_dA, L)  # (H, N2, c), (H, N2, m)
        # reversed time s' = L-1-s = c j + r, zero-padded to m*c steps
        ur = torch.nn.functional.pad(u.flip(-1).to(real), (0, m * c - L))
        ur = ur.unflatten(-1, (m, c))  # (..., H, m, c)
        Vr = torch.cat([V.real, V.imag], dim=-2).to(real).transpose(-1, -2)  # (H, c, 2 N2)
        S = torch.matmul(ur, Vr)  # (..., H, m, 2 N2): sum_r dA^r u_rev[c j + r]
        N2 = log_dA.shape[-1]
        S = torch.complex(S[..., :N2], S[..., N2:]).to(torch.complex128)
        x = (S * P.transpose(-1, -2)).sum(-2)  # (..., H, N2)
    return x * dB.to(torch.complex128)


def vandermonde_kernel_ref(coef: torch.Tensor, dA: torch.Tensor, L: int) -> torch.Tensor:
    """Reference for :func:`vandermonde_kernel` in complex128, the naive way.

    Args:
        coef: (..., H, N2) complex. dA: (H, N2) complex (not its log). L: length.

    Returns:
        (..., H, L) float64, ``2 Re sum_n coef * dA^l`` with the full (H, N2, L) power tensor.
    """
    coef, dA = coef.to(torch.complex128), dA.to(torch.complex128)
    l = torch.arange(L, dtype=torch.float64, device=dA.device)
    powers = torch.exp(torch.log(dA).unsqueeze(-1) * l)  # (H, N2, L)
    return 2 * torch.einsum("...hn,hnl->...hl", coef, powers).real


def shift_kernel(B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Taps of the shift SSM (state shifted by one each step, input enters through ``B``).

    With state ``s_t = shift(s_{t-1}) + B u_t`` and output ``sum_n C_n s_t[n]``, the impulse
    response is the correlation ``k[h, j] = sum_n B[h, n] C[h, n + j]`` (``C`` zero past N):
    a causal FIR of length N. With ``B = e_1`` the taps are ``C`` itself.

    Args:
        B, C: (H, N) real.

    Returns:
        (H, N) taps, ``k[:, j]`` multiplies ``u_{t-j}``.
    """
    N = C.shape[-1]
    # the correlation by FFT (size 2N: no wrap-around); the (H, N, N) window tensor of the direct
    # sum costs ~6x more at N 64
    work = torch.float64 if torch.float64 in (B.dtype, C.dtype) else torch.float32
    Bf, Cf = (torch.fft.rfft(t.to(work), n=2 * N) for t in (B, C))
    return torch.fft.irfft(Bf.conj() * Cf, n=2 * N)[..., :N].to(torch.promote_types(B.dtype, C.dtype))


FIR_FFT_MAX_ROWS = 32  # measured crossover (H 256, N 64, one thread): FFT ~2x faster at B 1, L 1K and B 8, L 128


def fir_conv(
    u: torch.Tensor, taps: torch.Tensor, D: torch.Tensor | None = None, history: torch.Tensor | None = None
) -> torch.Tensor:
    """Causal short convolution ``y[b, h, t] = sum_{j<N} taps[h, j] u[b, h, t - j] (+ D[h] u[b, h, t])``.

    Args:
        u: (B, H, L) input.
        taps: (H, N) filter, ``taps[:, j]`` multiplies ``u_{t-j}``.
        D: optional (H,) skip term.
        history: optional (B, H, N) inputs that precede ``u`` (oldest first), used for
            ``t - j < 0``; zeros when omitted.

    Returns:
        (B, H, L) in ``u``'s dtype; computed in float32 (float64 if ``u`` or ``taps`` is),
        with autocast disabled. Equals :func:`serengeti.ops.fftconv.direct_conv_ref`.

    The sequence is cut into chunks of c >= N steps; chunk j's output is its own inputs times a
    lower-triangular Toeplitz block plus chunk j-1's inputs times an upper-triangular one::

        y_j = T0 u_j + T1 u_{j-1},   T0[t, s] = taps[t - s],  T1[t, s] = taps[t - s + c]

    ``[T1 | T0]`` is one (c, 2c) Toeplitz matrix, built as a strided window over the zero-padded
    taps (its backward is a cheap overlap-add, not a scatter), and ``[u_{j-1} | u_j]`` is a
    strided window over one padded copy of the input. The product is one bmm batched over the
    H channels, (H, B·m, 2c) x (H, 2c, c): broadcasting the (H, c, 2c) matrix over the batch
    instead would materialise it B times (10x slower at B 32, L 130, N 64). When there are at
    most ``FIR_FFT_MAX_ROWS`` chunk rows (B·m), an FFT convolution is cheaper and is used instead.
    """
    Bsz, H, L = u.shape
    N = taps.shape[-1]
    c = max(N, 64)
    m = -(-L // c)
    work = torch.float64 if torch.float64 in (u.dtype, taps.dtype) else torch.float32
    if Bsz * m <= FIR_FFT_MAX_ROWS:
        # Few chunk rows (a prompt prefill, B 1): building the (H, c, 2c) Toeplitz matrix would cost
        # more than the whole product, so convolve [history | u] by FFT instead.
        x = u if history is None else torch.cat([history.to(u.dtype), u], dim=-1)
        return fftconv(x, taps, D)[..., x.shape[-1] - L:]
    with torch.autocast(device_type=u.device.type, enabled=False):
        uw, tw = u.to(work), taps.to(work)
        if history is None:
            first = uw.new_zeros(Bsz, H, c)
        else:
            first = torch.nn.functional.pad(history.to(work), (c - N, 0))
        # [first chunk | u | zeros]: (B, H, (m + 1) c); chunk j of u is window j + 1
        U = torch.cat([first, uw, uw.new_zeros(Bsz, H, m * c - L)], dim=-1)
        W = U.unfold(-1, 2 * c, c)  # (B, H, m, 2c): window j = [u_{j-1} | u_j]
        W = W.permute(1, 0, 2, 3).reshape(H, Bsz * m, 2 * c)
        # M[h, t, s'] = taps[h, t + c - s'] (zero outside [0, N)); row t reversed is e[t : t + 2c]
        e = torch.nn.functional.pad(tw, (c - 1, 2 * c - N))  # (H, 3c - 1)
        M = e.unfold(-1, 2 * c, 1).flip(-1)  # (H, c, 2c) = [T1 | T0]
        y = torch.bmm(W, M.mT)  # (H, B m, c)
        y = y.unflatten(1, (Bsz, m)).permute(1, 0, 2, 3).flatten(-2)[..., :L]  # (B, H, L)
        if D is not None:
            y = torch.addcmul(y, uw, D.to(work).unsqueeze(-1))
    return y.to(u.dtype)
