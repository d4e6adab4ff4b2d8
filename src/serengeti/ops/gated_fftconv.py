"""Gated causal FFT convolution with a hand-written backward (the Hyena / H3 inner loop).

``out = post ⊙ (k ∗ w + D ⊙ w)``  with  ``w = pre ⊙ u``   (each gate optional)

Same math as ``post * fftconv(pre * u, k, D)`` (:mod:`serengeti.ops.fftconv`); written as one
autograd function because autograd's own backward of ``rfft``/``irfft`` is wasteful on CPU: the
gradient of ``rfft`` goes through a full complex FFT of the padded signal, and every padding,
slice and gate keeps its own copy. Here the backward is three real FFTs, reusing the forward
spectra::

    g_y = post ⊙ g                         G = rfft(g_y, n)
    g_w = irfft(G · conj(K))[:L] + D ⊙ g_y     (cross-correlation with k)
    g_k = irfft(sum_b G_b · conj(W_b))[:Lk]    (cross-correlation with w)
    g_D = sum_{b,t} g_y ⊙ w,   g_u = pre ⊙ g_w,   g_pre = u ⊙ g_w,   g_post = y ⊙ g

With n >= L + Lk the circular correlations equal the linear ones on the first L (Lk) outputs.

The kernels may broadcast against the input, e.g. one input spectrum shared by C kernels (LongConv:
u (B, 1, H, L), k (C, H, Lk) -> (B, C, H, L)). The backward then sums each product over the
broadcast dimensions in the frequency domain, before its inverse transform (one inverse FFT per
input row, not one per output row).
"""
from __future__ import annotations

import torch

from serengeti.ops.fftconv import direct_conv_ref, fast_fft_size


def _work_dtype(*ts: torch.Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


class _GatedFFTConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, k, D, pre, post):
        work = _work_dtype(u, k, D, pre, post)
        L, Lk_full = u.shape[-1], k.shape[-1]
        cast = lambda t: None if t is None else t.to(work)  # noqa: E731
        u_, k_, D_, pre_, post_ = (cast(t) for t in (u, k[..., :L], D, pre, post))
        Lk = k_.shape[-1]
        n = fast_fft_size(L + Lk)
        w = u_ * pre_ if pre_ is not None else u_
        W = torch.fft.rfft(w, n=n)
        K = torch.fft.rfft(k_, n=n)
        y = torch.fft.irfft(W * K, n=n)[..., :L]
        y = torch.addcmul(y, w, D_.unsqueeze(-1)) if D_ is not None else y.contiguous()
        out = y * post_ if post_ is not None else y
        ctx.save_for_backward(u_, pre_, post_, w, y if post_ is not None else None, W, K, D_)
        ctx.meta = (n, L, Lk, Lk_full, u.dtype, k.dtype,
                    None if D is None else D.dtype, None if pre is None else pre.dtype, None if post is None else post.dtype)
        return out.to(u.dtype)

    @staticmethod
    def backward(ctx, g):
        u_, pre_, post_, w, y, W, K, D_ = ctx.saved_tensors
        n, L, Lk, Lk_full, u_dt, k_dt, D_dt, pre_dt, post_dt = ctx.meta
        need_u, need_k, need_D, need_pre, need_post = ctx.needs_input_grad
        g = g.to(w.dtype)
        g_u = g_k = g_D = g_pre = g_post = None
        if need_post:
            g_post = (g * y).to(post_dt)
        g_y = g * post_ if post_ is not None else g
        G = torch.fft.rfft(g_y, n=n)
        if need_k:
            g_k = torch.fft.irfft((G * W.conj()).sum_to_size(K.shape), n=n)[..., :Lk]
            if Lk_full > Lk:  # taps beyond L never touched the output
                g_k = torch.nn.functional.pad(g_k, (0, Lk_full - Lk))
            g_k = g_k.to(k_dt)
        if need_D:
            g_D = torch.einsum("b...l,b...l->...", g_y, w).sum_to_size(D_.shape).to(D_dt)
        if need_u or need_pre:
            g_w = torch.fft.irfft((G * K.conj()).sum_to_size(W.shape), n=n)[..., :L]
            if D_ is not None and g_y.shape == w.shape:
                g_w = torch.addcmul(g_w, g_y, D_.unsqueeze(-1))
            elif D_ is not None:  # broadcast kernels: sum the skip's gradient over them too
                g_w = g_w + (g_y * D_.unsqueeze(-1)).sum_to_size(w.shape)
            if need_u:
                g_u = (g_w * pre_ if pre_ is not None else g_w).to(u_dt)
            if need_pre:
                g_pre = (g_w * u_).to(pre_dt)
        return g_u, g_k, g_D, g_pre, g_post


def gated_fftconv(
    u: torch.Tensor,
    k: torch.Tensor,
    D: torch.Tensor | None = None,
    pre: torch.Tensor | None = None,
    post: torch.Tensor | None = None,
) -> torch.Tensor:
    """``post ⊙ (k ∗ (pre ⊙ u) + D ⊙ (pre ⊙ u))``, causal over the last axis.

    Args:
        u: (B, *C, H, L) input.
        k: (*K, H, Lk) kernels, ``*K`` broadcastable against ``*C`` (usually k is (H, Lk)); taps
            beyond L are ignored (causal for every L).
        D: optional skip term of k's shape without the taps, (*K, H).
        pre: optional gate of u's shape, applied before the convolution.
        post: optional gate of the output's shape, applied after it.

    Returns:
        (B, *broadcast(C, K), H, L), e.g. (B, H, L), in ``u``'s dtype; computed in float32 (float64
        if any input is float64) with autocast disabled. Gradients flow to every input (in its own dtype).
    """
    H, L = u.shape[-2:]
    if u.ndim < 3 or k.ndim < 2 or k.ndim > u.ndim - 1 or k.shape[-2] != H:
        raise ValueError(f"gated_fftconv: k must be (..., H={H}, Lk) for u (B, ..., H, L) = {tuple(u.shape)}, "
                         f"got {tuple(k.shape)}")
    try:
        out_shape = (u.shape[0], *torch.broadcast_shapes(u.shape[1:-1], k.shape[:-1]), L)
    except RuntimeError:
        raise ValueError(f"gated_fftconv: k {tuple(k.shape)} does not broadcast against u {tuple(u.shape)}") from None
    for name, t, shape in (("pre", pre, u.shape), ("post", post, out_shape)):
        if t is not None and t.shape != shape:
            raise ValueError(f"gated_fftconv: {name} must be {tuple(shape)}, got {tuple(t.shape)}")
    if D is not None and D.shape != k.shape[:-1]:
        raise ValueError(f"gated_fftconv: D must be {tuple(k.shape[:-1])} (k without its taps), got {tuple(D.shape)}")
    with torch.autocast(device_type=u.device.type, enabled=False):
        return _GatedFFTConv.apply(u, k, D, pre, post)


def gated_fftconv_ref(u, k, D=None, pre=None, post=None) -> torch.Tensor:
    """O(L^2) reference for :func:`gated_fftconv` (float64 in tests), via :func:`direct_conv_ref`."""
    w = u * pre if pre is not None else u
    y = direct_conv_ref(w, k, D)
    return y * post if post is not None else y
