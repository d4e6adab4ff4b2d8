"""Hyena operator of order N with an implicit long filter (docs/mixers.md#hyena).

::

    (x_0 | x_1 | ... | x_{N-1} | v) = short_filter(in_proj(u))       each (B, D, L)
    for o = 0 .. N-2:   v <- dropout(v * x_{N-1-o});   v <- h_o * v + beta_o * v
    y = out_proj(x_0 * v)

The filters ``h`` (D·(N-1) channels, reference layout ``(d o)``: channel c = d·(N-1) + o) come
from a small MLP with sine activations over positional features of the time index, times an
exponential decay; filters for L < l_max are the first L taps of the l_max-long filter. The MLP
is evaluated only over the L positions a call needs.

Generation (not in the reference): :meth:`Hyena.allocate_state` caches the filters for
``max_len`` positions and keeps, per long convolution, the history of its (gated) inputs, so
each new token costs O(L) — a dot product of a cached filter with the history — instead of a
re-run over the whole prefix.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from serengeti.mixers.gated_conv import GatedConvMixer
from serengeti.ops.conv_history import ConvHistory
from serengeti.ops.gated_fftconv import gated_fftconv
from serengeti.ops.init import set_optim


class Sin(nn.Module):
    """``sin(freq * x)`` with a learnable ``freq: (1, dim)`` initialised to ``w``."""

    def __init__(self, dim: int, w: float, device=None, dtype=None) -> None:
        super().__init__()
        self.freq = nn.Parameter(torch.full((1, dim), float(w), device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.freq * x)


class PositionalEmbedding(nn.Module):
    """Positional features of the filter MLP over ``l_max`` positions.

    ``z[0, i] = [t_i, cos(f_1 w_i), .., cos(f_b w_i), -sin(f_1 w_i), .., -sin(f_b w_i)]`` with
    ``t = linspace(0, 1, l_max)``, ``w_i = 2 pi i / l_max``, ``b = (emb_dim - 1) / 2`` bands and
    ``f = linspace(1e-4, b - 1, b)``.

    Buffers/parameters: ``z: (1, l_max, emb_dim)`` (a parameter tagged with ``lr_pos_emb`` and
    no weight decay, or a frozen buffer when ``lr_pos_emb == 0``); ``t: (1, l_max, 1)`` buffer.
    """

    def __init__(self, emb_dim: int, l_max: int, lr_pos_emb: float, device=None, dtype=None) -> None:
        super().__init__()
        if emb_dim < 3 or emb_dim % 2 == 0:
            raise ValueError(f"model.mixer.emb_dim must be odd and >= 3 (time, cos, sin), got {emb_dim}")
        bands = (emb_dim - 1) // 2
        # float64 then cast, so the features are exact to the working dtype
        t = torch.linspace(0, 1, l_max, dtype=torch.float64)[None, :, None]
        w = 2 * math.pi * torch.arange(l_max, dtype=torch.float64)[None, :, None] / l_max
        f = torch.linspace(1e-4, bands - 1, bands, dtype=torch.float64)[None, None]
        z = torch.cat([t, torch.cos(f * w), -torch.sin(f * w)], dim=-1)
        fk = {"device": device, "dtype": dtype or torch.get_default_dtype()}
        z, t = z.to(**fk), t.to(**fk)
        if lr_pos_emb == 0:
            self.register_buffer("z", z)
        else:
            self.z = set_optim(nn.Parameter(z), lr=lr_pos_emb, weight_decay=0.0)
        self.register_buffer("t", t)


class ExponentialModulation(nn.Module):
    """``h_c(t) <- h_c(t) * (exp(-t |delta_c|) + shift)``, delta frozen.

    ``deltas: (1, 1, channels) = linspace(ln(target)/slow_decay_pct, ln(target)/fast_decay_pct)``
    (defaults: -3.07 .. -15.35), a buffer.
    """

    def __init__(
        self,
        channels: int,
        *,
        fast_decay_pct: float = 0.3,
        slow_decay_pct: float = 1.5,
        target: float = 1e-2,
        modulate: bool = True,
        shift: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if not (0 < target < 1 and fast_decay_pct > 0 and slow_decay_pct > 0):
            raise ValueError(
                "model.mixer.target must be in (0, 1) and model.mixer.fast_decay_pct / slow_decay_pct positive, "
                f"got target={target}, fast_decay_pct={fast_decay_pct}, slow_decay_pct={slow_decay_pct}"
            )
        self.modulate, self.shift = modulate, shift
        max_decay, min_decay = math.log(target) / fast_decay_pct, math.log(target) / slow_decay_pct
        deltas = torch.linspace(min_decay, max_decay, channels, dtype=torch.float64)[None, None]
        self.register_buffer("deltas", deltas.to(device=device, dtype=dtype or torch.get_default_dtype()))

    def forward(self, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """t: (L,), h: (channels, L) -> (channels, L)."""
        if not self.modulate:
            return h
        decay = torch.exp(self.deltas.reshape(-1, 1).abs() * -t)
        return h * (decay + self.shift) if self.shift else h * decay


class HyenaFilter(nn.Module):
    """Implicit long filter: positional features -> MLP with shared Sin -> exponential decay.

    ``implicit_filter`` = Linear(emb_dim, W), Sin, [Linear(W, W), Sin] x num_inner_mlps,
    Linear(W, channels, no bias); the same :class:`Sin` module (one ``freq``) follows every
    hidden Linear. Every MLP parameter (``freq`` included) is tagged ``lr=filter_lr,
    weight_decay=filter_wd``. ``bias: (channels,) ~ N(0, 1)`` is the convolution's skip term
    beta (ordinary optimizer group).
    """

    def __init__(
        self,
        channels: int,
        *,
        l_max: int,
        emb_dim: int = 3,
        filter_order: int = 64,
        num_inner_mlps: int = 2,
        w: float = 1.0,
        filter_lr: float | None = 1e-3,
        filter_wd: float = 0.0,
        lr_pos_emb: float = 1e-5,
        modulation: dict | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if filter_order < 1 or num_inner_mlps < 0:
            raise ValueError(
                f"model.mixer.filter_order must be >= 1 and num_inner_mlps >= 0, got {filter_order}, {num_inner_mlps}"
            )
        fk = {"device": device, "dtype": dtype}
        self.l_max = l_max
        self.bias = nn.Parameter(torch.randn(channels, **fk))
        self.pos_emb = PositionalEmbedding(emb_dim, l_max, lr_pos_emb, **fk)
        act = Sin(filter_order, w, **fk)
        layers: list[nn.Module] = [nn.Linear(emb_dim, filter_order, **fk), act]
        for _ in range(num_inner_mlps):
            layers += [nn.Linear(filter_order, filter_order, **fk), act]
        layers.append(nn.Linear(filter_order, channels, bias=False, **fk))
        self.implicit_filter = nn.Sequential(*layers)
        for p in self.implicit_filter.parameters():
            set_optim(p, lr=filter_lr, weight_decay=filter_wd)
        self.modulation = ExponentialModulation(channels, **(modulation or {}), **fk)

    def filter(self, L: int) -> torch.Tensor:
        """The first L taps of every filter, (channels, L), channels-first for the FFT."""
        if L > self.l_max:
            raise ValueError(f"Hyena filters are defined on l_max={self.l_max} positions (model.l_max); got length {L}")
        h = self.pos_emb.z[0, :L]  # (L, emb_dim)
        for layer in self.implicit_filter[:-1]:
            h = layer(h)  # (L, W)
        # last layer as W_out @ h^T: lands in (channels, L) without a transpose copy
        h = torch.matmul(self.implicit_filter[-1].weight, h.mT)
        return self.modulation(self.pos_emb.t[0, :L, 0], h)


@dataclass
class HyenaState:
    """Generation state of one Hyena layer.

    Attributes:
        conv_buf: (B, K-1, (N+1)D) the short conv's last K-1 projected inputs.
        long_convs: N-1 :class:`~serengeti.ops.conv_history.ConvHistory`, one per long filter:
            its cached filter (D, max_len) and the history of its gated inputs (B, D, max_len),
            float32 (float64 for a float64 model).
    """

    conv_buf: torch.Tensor
    long_convs: list[ConvHistory]

    @property
    def seqlen(self) -> int:
        return self.long_convs[0].seqlen


class Hyena(GatedConvMixer):
    """Hyena operator, ``x: (B, L, D) -> (B, L, D)``, causal, L <= l_max.

    Args:
        d_model: model width D.
        layer_idx: block index (unused, part of the mixer interface).
        l_max: longest sequence (required: the implicit filters are normalised to it).
        order: N >= 2 (N-1 long convolutions, N+1 projected slices).
        filter_order: width W of the filter MLP.
        emb_dim: positional features (odd, >= 3).
        w: initial Sin frequency.
        num_inner_mlps: hidden Linear+Sin layers after the first.
        short_filter_order: taps of the depthwise causal short conv.
        modulate, fast_decay_pct, slow_decay_pct, target, shift: exponential modulation.
        filter_lr, filter_wd: optimizer override of the filter MLP (incl. freq); ``filter_lr``
            None keeps the base lr.
        lr_pos_emb: lr of the positional features (no weight decay; 0 freezes them as a buffer).
        dropout: on each gated product ``v * x_i``.
    """

    def __init__(
        self,
        d_model: int,
        *,
        layer_idx: int | None = None,
        l_max: int | None = None,
        device=None,
        dtype=None,
        order: int = 2,
        filter_order: int = 64,
        emb_dim: int = 3,
        w: float = 1.0,
        num_inner_mlps: int = 2,
        short_filter_order: int = 3,
        modulate: bool = True,
        fast_decay_pct: float = 0.3,
        slow_decay_pct: float = 1.5,
        target: float = 1e-2,
        shift: float = 0.0,
        filter_lr: float | None = 1e-3,
        filter_wd: float = 0.0,
        lr_pos_emb: float = 1e-5,
        dropout: float = 0.0,
    ) -> None:
        if l_max is None or l_max < 1:
            raise ValueError(f"Hyena needs a positive l_max (model.l_max) to build its implicit filters, got {l_max}")
        super().__init__(
            d_model, order=order, short_filter_order=short_filter_order, dropout=dropout,
            layer_idx=layer_idx, l_max=l_max, device=device, dtype=dtype,
        )
        modulation = dict(
            fast_decay_pct=fast_decay_pct, slow_decay_pct=slow_decay_pct, target=target, modulate=modulate, shift=shift
        )
        self.filter_fn = HyenaFilter(
            d_model * (order - 1), l_max=l_max, emb_dim=emb_dim, filter_order=filter_order,
            num_inner_mlps=num_inner_mlps, w=w, filter_lr=filter_lr, filter_wd=filter_wd,
            lr_pos_emb=lr_pos_emb, modulation=modulation, device=device, dtype=dtype,
        )

    @property
    def max_seq_len(self) -> int:
        """``l_max``: the implicit filters are defined (and normalised) on l_max positions."""
        return self.l_max

    def max_seq_len_reason(self) -> str:
        """The implicit filters cannot be evaluated at more positions: their features are normalised to l_max."""
        return (f"its implicit filters are defined on model.l_max={self.l_max} positions, with positional features "
                "normalised to that length (a longer filter is another filter)")

    def filters(self, L: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h, beta)``: filters (N-1, D, L) and skip terms (N-1, D); index o pairs with x_{N-1-o}."""
        n = self.order - 1
        h = rearrange(self.filter_fn.filter(L), "(d o) l -> o d l", o=n)
        beta = rearrange(self.filter_fn.bias, "(d o) -> o d", o=n)
        return h, beta

    def forward(self, x: torch.Tensor, state: HyenaState | None = None) -> torch.Tensor:
        """Parallel mode.

        Args:
            x: (B, L, D), L <= l_max.
            state: optional fresh :class:`HyenaState`; the prompt's gated inputs and short-conv
                buffer are written into it (prefill), so :meth:`step` continues from position L.

        Returns:
            (B, L, D). The long convolutions run in float32 (float64 for float64 inputs), also
            under autocast.
        """
        L = x.shape[1]
        if L > self.l_max:
            raise ValueError(f"Hyena got a sequence of length {L} > l_max={self.l_max} (model.l_max)")
        if state is not None and state.seqlen != 0:
            raise ValueError("Hyena.forward(x, state) prefills an empty state; continue a started one with step()")
        z, (x0, *gates, v) = self.project(x)
        h, beta = self.filters(L)
        # the gates ride inside the FFT convolution (one autograd node, no extra copies) unless
        # the gated input itself is needed: dropout on it, or a prefill that records it
        explicit_gate = state is not None or (self.training and self.dropout.p > 0)
        for o, x_i in enumerate(reversed(gates)):
            post = x0 if o == self.order - 2 else None  # the last convolution is gated by x_0
            if explicit_gate:
                v = self.gate(v, x_i)
                if state is not None:
                    state.long_convs[o].prefill(v)
                v = gated_fftconv(v, h[o], beta[o], post=post)
            else:
                v = gated_fftconv(v, h[o], beta[o], pre=x_i, post=post)
        if state is not None:
            state.conv_buf = self.conv_buffer_after(z)
        return self.out_proj(v.mT)  # v already holds x_0 * (h * ...)

    def allocate_state(self, batch_size: int, *, max_len: int, device=None, dtype=None) -> HyenaState:
        """Empty state for up to ``max_len`` positions (<= l_max).

        The filters are computed here once, from the current parameters (allocate a new
        state after changing them). ``dtype`` sets the short-conv buffer (default: the
        parameters'); histories are kept in float32 (float64 for a float64 model).
        """
        if not 1 <= max_len <= self.l_max:
            raise ValueError(f"Hyena state max_len={max_len} must be in [1, l_max={self.l_max}] (model.l_max)")
        p = self.in_proj.weight
        work = torch.float64 if p.dtype == torch.float64 else torch.float32
        with torch.no_grad():
            h, _ = self.filters(max_len)
        h = h.to(device=device or p.device, dtype=work)
        convs = [ConvHistory.allocate(h[o], (batch_size, self.d_model), max_len) for o in range(self.order - 1)]
        return HyenaState(self.allocate_conv_buffer(batch_size, device=device, dtype=dtype), convs)

    def step(self, x_t: torch.Tensor, state: HyenaState) -> tuple[torch.Tensor, HyenaState]:
        """One token: ``x_t: (B, D) -> (y_t: (B, D), state)``, O(t·D) for position t.

        Equal to the matching position of :meth:`forward` (same math; direct sum instead of FFT).
        """
        self._require_state(state, "Hyena")
        (x0, *gates, v), state.conv_buf = self.project_step(x_t, state.conv_buf)
        beta = rearrange(self.filter_fn.bias, "(d o) -> o d", o=self.order - 1)
        for o, x_i in enumerate(reversed(gates)):
            v = self.gate(v, x_i)
            conv = state.long_convs[o]
            v = (conv.step(v.to(conv.inputs.dtype)) + beta[o] * v).to(x_t.dtype)
        return self.output_step(x0, v), state
