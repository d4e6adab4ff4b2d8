"""Short causal depthwise convolution (Hyena's / Hyena-S5's local filter) with a step mode."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


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
        return F.conv1d(F.pad(x, (self.kernel_size - 1, 0)), self.weight, self.bias, groups=x.shape[1])

    def history(self, x: torch.Tensor) -> torch.Tensor:
        """The last K-1 inputs of ``x: (B, C, L)`` as a step buffer (B, C, K-1), zero-padded on the left."""
        return F.pad(x, (self.kernel_size - 1, 0))[..., x.shape[-1]:]

    def step(self, x_t: torch.Tensor, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step. x_t: (B, C), buf: (B, C, K-1) -> (y_t (B, C), new buf)."""
        window = torch.cat([buf, x_t.unsqueeze(-1)], dim=-1)  # (B, C, K)
        y = torch.einsum("bck,ck->bc", window, self.weight[:, 0])
        if self.bias is not None:
            y = y + self.bias
        return y, window[..., 1:]
