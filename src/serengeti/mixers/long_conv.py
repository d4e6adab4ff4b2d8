"""Long convolution mixer with explicitly learned kernels (docs/mixers.md#long-convolution).

::

    k   = dropout_k( squash_lam( smooth(kernel) ) )      kernel: (C, D, l_max) parameters
    y_c = k_c * u + D_c . u                              C channels, causal FFT convolution
    y   = GLU( out_proj( dropout( GELU( y_1 | ... | y_C ) ) ) )   Linear(C·D -> 2D)

squash is the soft threshold ``sign(k) relu(|k| - lam)`` (sparsifies the kernel). Fix vs the
reference: the kernel is cut to the input length L before the convolution, so the layer is
causal for every L <= l_max (the reference leaks future inputs when L < l_max). Smoothing acts
along the kernel's own time axis on the full l_max kernel, before the cut, so the kernel of a
short sequence is exactly the prefix of the long one. Longer inputs (L > l_max) see zero taps
beyond l_max.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from serengeti.mixers.base import Mixer
from serengeti.ops.conv_history import ConvHistory
from serengeti.ops.gated_fftconv import gated_fftconv
from serengeti.ops.init import set_optim

SMOOTHING = (None, "ma", "freq")


@dataclass
class LongConvState:
    """Generation state: the input history (B, 1, D, max_len) and the cached kernels (C, D, max_len)."""

    conv: ConvHistory


class LongConv(Mixer):
    """Explicit long convolution, ``x: (B, L, D) -> (B, L, D)``.

    Args:
        d_model: model width D.
        layer_idx: block index (unused, part of the mixer interface).
        l_max: kernel length (required).
        channels: C kernels per model channel (outputs are mixed by ``out_proj``).
        kernel_lam: soft-threshold lambda of the squash.
        kernel_dropout: dropout on the kernel entries (training only).
        kernel_lr: learning rate of ``kernel`` (weight decay 0); None keeps the base lr.
        smoothing: None, ``"ma"`` (moving average of ``ma_window_len`` taps, zero-padded,
            along time) or ``"freq"`` (Gaussian window of ``ma_window_len`` over the kernel's
            rfft bins).
        ma_window_len: odd smoothing window.
        dropout: after the GELU.
    """

    def __init__(
        self,
        d_model: int,
        *,
        layer_idx: int | None = None,
        l_max: int | None = None,
        device=None,
        dtype=None,
        channels: int = 2,
        kernel_lam: float = 1e-3,
        kernel_dropout: float = 0.2,
        kernel_lr: float | None = 1e-3,
        smoothing: str | None = None,
        ma_window_len: int = 7,
        dropout: float = 0.1,
    ) -> None:
        super().__init__(d_model, layer_idx=layer_idx, l_max=l_max)
        if l_max is None or l_max < 1:
            raise ValueError(f"LongConv needs a positive l_max (model.l_max) for its kernel length, got {l_max}")
        if channels < 1:
            raise ValueError(f"model.mixer.channels must be >= 1, got {channels}")
        if smoothing not in SMOOTHING:
            raise ValueError(f"model.mixer.smoothing must be one of {SMOOTHING}, got {smoothing!r}")
        if smoothing is not None and (ma_window_len < 1 or ma_window_len % 2 == 0):
            raise ValueError(f"model.mixer.ma_window_len must be a positive odd number, got {ma_window_len}")
        if kernel_lam < 0:
            raise ValueError(f"model.mixer.kernel_lam must be >= 0, got {kernel_lam}")
        fk = {"device": device, "dtype": dtype}
        self.channels, self.kernel_lam, self.smoothing, self.ma_window_len = channels, kernel_lam, smoothing, ma_window_len
        self.kernel = set_optim(
            nn.Parameter(torch.randn(channels, d_model, l_max, **fk) * 0.002), lr=kernel_lr, weight_decay=0.0
        )
        self.D = nn.Parameter(torch.randn(channels, d_model, **fk))
        self.kernel_dropout = nn.Dropout(kernel_dropout)
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(channels * d_model, 2 * d_model, **fk)

    def kernels(self) -> torch.Tensor:
        """The regularised kernels (C, D, l_max): smoothing, squash, kernel dropout."""
        k = self.kernel
        if self.smoothing == "ma":
            k = F.avg_pool1d(k, self.ma_window_len, stride=1, padding=self.ma_window_len // 2)
        elif self.smoothing == "freq":
            kf = torch.view_as_real(torch.fft.rfft(k))  # (C, D, F, 2)
            j = torch.arange(self.ma_window_len, device=k.device, dtype=k.dtype)
            window = torch.exp(-0.5 * (j - self.ma_window_len // 2) ** 2).expand(kf.shape[1], 1, -1)
            # the same (unnormalised) Gaussian over neighbouring bins, real and imaginary parts alike
            parts = rearrange(kf, "c d f r -> (c r) d f")
            parts = F.conv1d(parts, window.contiguous(), padding="same", groups=kf.shape[1])
            kf = rearrange(parts, "(c r) d f -> c d f r", r=2)
            k = torch.fft.irfft(torch.view_as_complex(kf.contiguous()), n=k.shape[-1])
        k = torch.sign(k) * F.relu(k.abs() - self.kernel_lam)
        return self.kernel_dropout(k)

    def _mix(self, y: torch.Tensor) -> torch.Tensor:
        """(..., C·D) -> (..., D): GELU, dropout, Linear(C·D -> 2D), GLU."""
        return F.glu(self.out_proj(self.dropout(F.gelu(y))), dim=-1)

    def forward(self, x: torch.Tensor, state: LongConvState | None = None) -> torch.Tensor:
        """Parallel mode.

        Args:
            x: (B, L, D), any L (the kernel is cut to L; beyond l_max its taps are zero).
            state: optional fresh :class:`LongConvState`, filled with the prompt (prefill).

        Returns:
            (B, L, D). Convolution in float32 (float64 for float64 inputs), also under autocast.
        """
        if state is not None and state.conv.seqlen != 0:
            raise ValueError("LongConv.forward(x, state) prefills an empty state; continue a started one with step()")
        u = x.mT.unsqueeze(1)  # (B, 1, D, L): one input spectrum shared by the C kernels
        y = gated_fftconv(u, self.kernels(), self.D)  # (B, C, D, L), hand-written backward
        if state is not None:
            state.conv.prefill(u)
        return self._mix(rearrange(y, "b c d l -> b l (c d)"))

    def allocate_state(self, batch_size: int, *, max_len: int, device=None, dtype=None) -> LongConvState:
        """Empty state for up to ``max_len`` positions; the kernels are computed (eval-mode,
        no kernel dropout) and cached here. Histories are float32 (float64 for a float64 model)."""
        if max_len < 1:
            raise ValueError(f"LongConv state max_len must be >= 1, got {max_len}")
        p = self.kernel
        work = torch.float64 if p.dtype == torch.float64 else torch.float32
        with torch.no_grad():
            k = self._eval_kernels()
        k = k.to(device=device or p.device, dtype=work)
        return LongConvState(ConvHistory.allocate(k, (batch_size, 1, self.d_model), max_len))

    def _eval_kernels(self) -> torch.Tensor:
        training = self.kernel_dropout.training
        self.kernel_dropout.eval()
        try:
            return self.kernels()
        finally:
            self.kernel_dropout.train(training)

    def step(self, x_t: torch.Tensor, state: LongConvState) -> tuple[torch.Tensor, LongConvState]:
        """One token: ``x_t: (B, D) -> (y_t: (B, D), state)``, O(t·C·D); equals :meth:`forward`."""
        self._require_state(state, "LongConv")
        conv = state.conv
        u = x_t.to(conv.inputs.dtype).unsqueeze(1)  # (B, 1, D)
        y = conv.step(u) + self.D.to(u.dtype) * u  # (B, C, D)
        return self._mix(rearrange(y.to(x_t.dtype), "b c d -> b (c d)")), state
