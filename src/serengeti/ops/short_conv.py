"""Short causal depthwise convolution (Hyena's / Hyena-S5's local filter) with a step mode."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


class _CausalDepthwiseConv(torch.autograd.Function):
    """``y_t = b + sum_j w[:, j] x_{t-(K-1)+j}`` on (B, C, L) by K shifted multiply-adds.

    On CPU this is several times faster than ``F.conv1d(F.pad(x), groups=C)`` forward and,
    above all, backward (no padded copy, no generic convolution backward).
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        K, L = weight.shape[-1], x.shape[-1]
        w = weight[:, 0].unsqueeze(-1)  # (C, K, 1)
        y = x * w[:, K - 1] if bias is None else torch.addcmul(bias.unsqueeze(-1), x, w[:, K - 1])
        for j in range(K - 1):
            s = K - 1 - j
            if s < L:
                y[..., s:].addcmul_(x[..., : L - s], w[:, j])
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        K, L = weight.shape[-1], x.shape[-1]
        w = weight[:, 0].unsqueeze(-1)
        g_x = g_w = g_b = None
        if ctx.needs_input_grad[0]:
            g_x = g * w[:, K - 1]
            for j in range(K - 1):
                s = K - 1 - j
                if s < L:
                    g_x[..., : L - s].addcmul_(g[..., s:], w[:, j])
        if ctx.needs_input_grad[1]:
            g_w = torch.zeros_like(weight)
            for j in range(K):
                s = K - 1 - j
                if s < L:
                    g_w[:, 0, j] = torch.einsum("bcl,bcl->c", g[..., s:], x[..., : L - s])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            g_b = g.sum((0, 2))
        return g_x, g_w, g_b


def causal_depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Causal depthwise conv: x (B, C, L), weight (C, 1, K), bias (C,) -> (B, C, L).

    Equals ``F.conv1d(F.pad(x, (K-1, 0)), weight, bias, groups=C)`` (the reference form), also in
    its dtype rule: under autocast all three run in the autocast dtype (as ``conv1d`` does),
    otherwise in their promoted dtype; gradients return in each input's own dtype.
    """
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
    else:
        dtype = torch.promote_types(x.dtype, weight.dtype)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return _CausalDepthwiseConv.apply(cast(x), cast(weight), cast(bias))


class ShortConv(nn.Module):
    """Depthwise causal Conv1d over time: ``y_t = sum_j w[j] x_{t-(K-1)+j} + b``.

    Same parameters as ``nn.Conv1d(C, C, K, groups=C, padding=K-1)`` truncated to the first L
    outputs (``weight: (C, 1, K)``, ``bias: (C,)``), so checkpoints map one-to-one.
    """

    def __init__(self, channels: int, kernel_size: int = 3, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"short_filter_order must be >= 1, got {kernel_size}")
        self.kernel_size = kernel_size
        conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, padding=0, bias=bias, device=device, dtype=dtype)
        self.weight, self.bias = conv.weight, conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, L) -> (B, C, L), causal."""
        return causal_depthwise_conv(x, self.weight, self.bias)

    # --- recurrent mode: the buffer is time-major, (B, K-1, C), so every step op runs over contiguous C ---
    def allocate_buffer(self, batch_size: int, *, device=None, dtype=None) -> torch.Tensor:
        """Zeros (B, K-1, C): the step buffer before any input."""
        return torch.zeros(batch_size, self.kernel_size - 1, self.weight.shape[0],
                           device=device or self.weight.device, dtype=dtype or self.weight.dtype)

    def history(self, x: torch.Tensor) -> torch.Tensor:
        """The last K-1 inputs of ``x: (B, C, L)`` as a step buffer (B, K-1, C), zero-padded on the left."""
        return F.pad(x, (self.kernel_size - 1, 0))[..., x.shape[-1]:].transpose(1, 2)

    def step(self, x_t: torch.Tensor, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step. x_t: (B, C), buf: (B, K-1, C) -> (y_t (B, C), new buf (B, K-1, C))."""
        window = torch.cat([buf, x_t.unsqueeze(1)], dim=1)  # (B, K, C), oldest first
        y = (window * self.weight[:, 0].T).sum(1)  # a multiply-add over contiguous C (einsum here costs 2x)
        if self.bias is not None:
            y = y + self.bias
        return y, window[:, 1:]
