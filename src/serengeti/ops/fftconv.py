"""Causal long convolution by FFT, and its O(L^2) reference.

``y[b, h, t] = sum_{s <= t} k[h, t - s] * u[b, h, s] + D[h] * u[b, h, t]``
"""
from __future__ import annotations

import torch


def fast_fft_size(n: int) -> int:
    """Smallest integer >= n whose prime factors are only 2, 3 and 5 (fast for pocketfft/cuFFT)."""
    if n <= 1:
        return 1
    best = 1 << (n - 1).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


def fftconv(u: torch.Tensor, k: torch.Tensor, D: torch.Tensor | None = None) -> torch.Tensor:
    """Causal convolution of ``u`` with per-channel kernels ``k`` via rfft.

    Args:
        u: (B, H, L) input (any float dtype).
        k: (H, L_k) kernels; only the first ``L`` taps matter (longer kernels are truncated,
           so the result stays causal for every L).
        D: optional (H,) skip term added as ``D * u``.

    Returns:
        (B, H, L) in ``u``'s dtype. Computed in float32 (float64 if either input is float64),
        with autocast disabled, so bf16/fp16 training does not lose the FFT's precision.
    """
    L = u.shape[-1]
    k = k[..., :L]
    work = torch.float64 if torch.float64 in (u.dtype, k.dtype) else torch.float32
    with torch.autocast(device_type=u.device.type, enabled=False):
        uf, kf = u.to(work), k.to(work)
        n = fast_fft_size(L + k.shape[-1])
        y = torch.fft.irfft(torch.fft.rfft(uf, n=n) * torch.fft.rfft(kf, n=n), n=n)[..., :L]
        if D is not None:
            y = y + uf * D.to(work).unsqueeze(-1)
    return y.to(u.dtype)


def direct_conv_ref(u: torch.Tensor, k: torch.Tensor, D: torch.Tensor | None = None) -> torch.Tensor:
    """O(L^2) reference for :func:`fftconv` (float64 in tests). Same semantics; ``k`` (..., H, Lk)
    may broadcast against ``u`` (B, ..., H, L) as in :func:`serengeti.ops.gated_fftconv.gated_fftconv`."""
    L = u.shape[-1]
    k = k[..., :L]
    Lk = k.shape[-1]
    # toeplitz[h, t, s] = k[h, t - s] for 0 <= t - s < Lk
    idx = torch.arange(L)
    lag = idx[:, None] - idx[None, :]
    valid = (lag >= 0) & (lag < Lk)
    T = k[..., lag.clamp(0, Lk - 1)] * valid  # (..., H, L, L)
    y = torch.matmul(T, u.unsqueeze(-1)).squeeze(-1)
    if D is not None:
        y = y + u * D.unsqueeze(-1)
    return y
