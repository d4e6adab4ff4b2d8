"""The gated skeleton shared by Hyena and Hyena-S5 (docs/mixers.md, Hyena and Hyena-S5).

::

    x (B, L, D) -- in_proj --> (B, (N+1)D, L) -- short_filter (causal, depthwise, k=3)
                                  |
            split into D-channel slices:  x_0 | x_1 | ... | x_{N-1} | v
                                  |
        v <- long_filter_o( dropout(v * x_{N-1-o}) )      o = 0 .. N-2   (subclass: the long filter)
                                  |
    y = out_proj( x_0 * v )  (B, L, D)

Subclasses own the long filter and call :meth:`project` / :meth:`project_step`, :meth:`gate`
and :meth:`output` / :meth:`output_step`; the parameters ``in_proj``, ``short_filter`` and
``out_proj`` live on the mixer itself, so checkpoint keys and init rules (GPT-2 rescale of
``out_proj``) see the same names for every subclass.
"""
from __future__ import annotations

import torch
from torch import nn

from serengeti.mixers.base import Mixer, linear_channels_first
from serengeti.ops.short_conv import ShortConv


class GatedConvMixer(Mixer):
    """in_proj -> short causal conv -> (N+1) slices ... x_0 * v -> out_proj.

    Args:
        d_model: model width D.
        order: N >= 2; the projection has (N+1)·D channels.
        short_filter_order: taps of the depthwise causal conv (3 in every reference config).
        dropout: dropout applied to each gated product ``v * x_i`` (training only).
    """

    def __init__(
        self,
        d_model: int,
        *,
        order: int,
        short_filter_order: int = 3,
        dropout: float = 0.0,
        layer_idx: int | None = None,
        l_max: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(d_model, layer_idx=layer_idx, l_max=l_max)
        if order < 2:
            raise ValueError(f"model.mixer.order must be >= 2, got {order}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"model.mixer.dropout must be in [0, 1), got {dropout}")
        fk = {"device": device, "dtype": dtype}
        self.order = order
        self.in_proj = nn.Linear(d_model, (order + 1) * d_model, **fk)
        self.short_filter = ShortConv((order + 1) * d_model, short_filter_order, **fk)
        self.out_proj = nn.Linear(d_model, d_model, **fk)
        self.dropout = nn.Dropout(dropout)

    # --- parallel mode -------------------------------------------------------------------
    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Project and short-convolve.

        Args:
            x: (B, L, D).

        Returns:
            ``(z, slices)``: z (B, (N+1)D, L) the projection before the short conv (what a
            prefill keeps for the short-conv buffer), and the N+1 slices
            ``[x_0, ..., x_{N-1}, v]``, each (B, D, L), channels-first so the FFT runs over
            contiguous time.
        """
        z = linear_channels_first(x, self.in_proj.weight, self.in_proj.bias)  # (B, (N+1)D, L)
        zc = self.short_filter(z)
        return z, list(zc.split(self.d_model, dim=1))

    def gate(self, v: torch.Tensor, x_i: torch.Tensor) -> torch.Tensor:
        """``dropout(v * x_i)``, the input of the next long filter. Any matching shapes."""
        return self.dropout(v * x_i)

    def output(self, x0: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``out_proj(x_0 * v)``: (B, D, L) twice -> (B, L, D)."""
        return self.out_proj((x0 * v).mT)

    # --- recurrent mode ------------------------------------------------------------------
    def allocate_conv_buffer(self, batch_size: int, *, device=None, dtype=None) -> torch.Tensor:
        """Zeros (B, K-1, (N+1)D): the short conv's last K-1 projected inputs."""
        return self.short_filter.allocate_buffer(batch_size, device=device, dtype=dtype)

    def conv_buffer_after(self, z: torch.Tensor) -> torch.Tensor:
        """Short-conv buffer at the end of a prompt, from ``z: (B, (N+1)D, L)`` of :meth:`project`."""
        return self.short_filter.history(z).detach()

    def project_step(self, x_t: torch.Tensor, conv_buf: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One position of :meth:`project`.

        Args:
            x_t: (B, D).
            conv_buf: (B, K-1, (N+1)D) from :meth:`allocate_conv_buffer` / :meth:`conv_buffer_after`.

        Returns:
            ``(slices, conv_buf)``: N+1 tensors (B, D) and the updated buffer.
        """
        zc, conv_buf = self.short_filter.step(self.in_proj(x_t), conv_buf)
        return list(zc.split(self.d_model, dim=-1)), conv_buf

    def output_step(self, x0_t: torch.Tensor, v_t: torch.Tensor) -> torch.Tensor:
        """``out_proj(x_0 * v)`` for one position: (B, D) twice -> (B, D)."""
        return self.out_proj(x0_t * v_t)

