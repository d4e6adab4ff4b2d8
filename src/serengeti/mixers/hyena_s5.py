"""Hyena-S5: Hyena with each implicit long filter replaced by one MIMO S5 (docs/mixers.md#hyena-s5).

::

    (x_0 | x_1 | v) = short_filter(in_proj(u))            each (B, D, L), causal conv of 3 taps
    y = out_proj( x_0 ⊙ act(S5( dropout(x_1 ⊙ v) )) )      S5 over all D channels at once

S5's ``D ⊙ u`` term plays Hyena's β skip and its activation (half_glu2 for associative recall,
gelu for WikiText) sits inside the S5. For order N > 2 there are N-1 S5s, applied as Hyena
applies its filters (filter o gated by x_{N-1-o}).

Recurrent mode keeps the short conv's last K-1 projected inputs and each S5's complex state,
so :meth:`HyenaS5.step` reproduces :meth:`HyenaS5.forward` exactly; the reference's step skips
the short conv (and so differs from its parallel mode), which we do not copy.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from serengeti.mixers.gated_conv import GatedConvMixer
from serengeti.mixers.s5 import S5, S5State


@dataclass
class HyenaS5State:
    """Generation state of one Hyena-S5 layer; O(1) in the sequence length.

    Attributes:
        conv_buf: (B, K-1, (N+1)D) the short conv's last K-1 projected inputs.
        ssm: N-1 :class:`~serengeti.mixers.s5.S5State`, each ``x: (B, P_)`` complex.
        seqlen: positions consumed so far.
    """

    conv_buf: torch.Tensor
    ssm: list[S5State] = field(default_factory=list)
    seqlen: int = 0


class HyenaS5(GatedConvMixer):
    """Hyena-S5 operator, ``x: (B, L, D) -> (B, L, D)``, causal, any L.

    Args:
        d_model: model width D (= the S5's H).
        layer_idx, l_max: from the backbone (S5 needs no maximum length).
        order: N >= 2 (N-1 S5 filters); every published config uses 2.
        short_filter_order: taps of the depthwise causal short conv.
        dropout: on each gated product ``x_i ⊙ v`` before its S5.
        **s5: hyperparameters of :class:`~serengeti.mixers.s5.S5` (ssm_size, blocks, conj_sym,
            C_init, discretization, dt_min, dt_max, step_rescale, clip_eigs, activation,
            ssm_lr, dt_no_decay, scan_method); S5 rejects unknown names. ``bidirectional``
            is not allowed (it would read the future).
    """

    kwargs_class = S5  # where ``**s5`` goes: the options a config may set (serengeti.registry)

    def __init__(
        self,
        d_model: int,
        *,
        layer_idx: int | None = None,
        l_max: int | None = None,
        device=None,
        dtype=None,
        order: int = 2,
        short_filter_order: int = 3,
        dropout: float = 0.0,
        **s5,
    ) -> None:
        if s5.get("bidirectional", False):
            raise ValueError("model.mixer.bidirectional must be false for HyenaS5: a language-model mixer must be causal")
        super().__init__(
            d_model, order=order, short_filter_order=short_filter_order, dropout=dropout,
            layer_idx=layer_idx, l_max=l_max, device=device, dtype=dtype,
        )
        self.ssm = nn.ModuleList(
            S5(d_model, layer_idx=layer_idx, l_max=l_max, device=device, dtype=dtype, **s5) for _ in range(order - 1)
        )

    def forward(self, x: torch.Tensor, state: HyenaS5State | None = None) -> torch.Tensor:
        """Parallel mode.

        Args:
            x: (B, L, D).
            state: optional fresh :class:`HyenaS5State`; it is moved to the end of ``x`` in
                place (short-conv buffer and S5 states), so :meth:`step` continues at position L.

        Returns:
            (B, L, D). The S5s run in float32/complex64 also under autocast.
        """
        if state is not None and state.seqlen != 0:
            raise ValueError("HyenaS5.forward(x, state) prefills an empty state; continue a started one with step()")
        z, (x0, *gates, v) = self.project(x)  # (B, D, L) slices
        for o, x_i in enumerate(reversed(gates)):
            v = self.gate(v, x_i)
            v = self.ssm[o](v.mT, state=None if state is None else state.ssm[o]).mT
        if state is not None:
            state.conv_buf = self.conv_buffer_after(z)
            state.seqlen = x.shape[1]
        return self.output(x0, v)

    def allocate_state(self, batch_size: int, *, max_len: int | None = None, device=None, dtype=None) -> HyenaS5State:
        """Zero state; ``max_len`` is accepted for the interface (the state does not grow).

        ``dtype`` sets the short-conv buffer (default: the parameters'); S5 states are complex64
        (complex128 for a float64 model).
        """
        return HyenaS5State(
            conv_buf=self.allocate_conv_buffer(batch_size, device=device, dtype=dtype),
            ssm=[s.allocate_state(batch_size, device=device) for s in self.ssm],
        )

    def step(self, x_t: torch.Tensor, state: HyenaS5State) -> tuple[torch.Tensor, HyenaS5State]:
        """One token: ``x_t: (B, D) -> (y_t: (B, D), state)``, O(D² + D·P_) work; advances ``state``."""
        self._require_state(state, "HyenaS5")
        (x0, *gates, v), state.conv_buf = self.project_step(x_t, state.conv_buf)
        for o, x_i in enumerate(reversed(gates)):
            v, _ = self.ssm[o].step(self.gate(v, x_i), state.ssm[o])
        state.seqlen += 1
        return self.output_step(x0, v), state
