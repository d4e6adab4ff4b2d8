"""The sequence-mixer interface every mixer implements.

A mixer maps ``x: (B, L, D) -> (B, L, D)`` and is causal: output position ``t`` depends
only on inputs ``<= t``. It is built by the backbone from a factory (a
``functools.partial`` made by Hydra from ``configs/model/mixer/<name>.yaml``)::

    mixer = factory(d_model, layer_idx=i, l_max=l_max, device=..., dtype=...)

Mixers that can run recurrently (for generation) also implement

* ``allocate_state(batch_size, *, max_len, device=None, dtype=None) -> state``: a small
  object holding named tensors (KV cache, SSM state, input history ...);
* ``forward(x, state=state)``: consumes a whole prompt *and* leaves ``state`` at its end
  (prefill without re-running step by step);
* ``step(x_t, state) -> (y_t, state)``: one token, ``x_t: (B, D) -> y_t: (B, D)``, giving
  the same numbers as ``forward`` on the full sequence.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


def linear_channels_first(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``Linear`` applied to ``x: (B, L, C_in)`` but written channels-first: ``(B, C_out, L)``.

    ``W @ x^T`` lands in the layout the FFT convolutions want (time contiguous) without a
    transpose copy of the (usually wider) output.
    """
    if bias is None:
        return torch.matmul(weight, x.mT)
    return torch.baddbmm(bias.unsqueeze(-1), weight.expand(x.shape[0], -1, -1), x.mT)


class StateError(RuntimeError):
    """Raised when ``step`` is called without a state from ``allocate_state``."""


class Mixer(nn.Module):
    """Base class: stores ``d_model``, ``layer_idx`` and ``l_max``; documents the interface.

    Subclasses implement ``forward``; recurrent ones override ``allocate_state`` and ``step``.
    """

    def __init__(self, d_model: int, *, layer_idx: int | None = None, l_max: int | None = None) -> None:
        super().__init__()
        if d_model <= 0:
            raise ValueError(f"model.d_model must be positive, got {d_model}")
        self.d_model = d_model
        self.layer_idx = layer_idx
        self.l_max = l_max

    @property
    def max_seq_len(self) -> int | None:
        """Longest sequence the mixer accepts; ``None`` (the default) = any length, because no
        parameter is sized by ``l_max``. Mixers whose filters are defined on ``l_max`` positions
        (Hyena) return ``l_max``."""
        return None

    def max_seq_len_reason(self) -> str:
        """Why :attr:`max_seq_len` bounds this mixer, naming the config key (shown when a longer input is refused)."""
        return f"its parameters are sized by model.l_max={self.l_max}"

    def forward(self, x: torch.Tensor, state: Any | None = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError(f"{type(self).__name__}.forward is abstract")

    def allocate_state(self, batch_size: int, *, max_len: int, device=None, dtype=None) -> Any:
        raise StateError(f"{type(self).__name__} has no recurrent mode (no allocate_state/step)")

    def step(self, x_t: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        raise StateError(f"{type(self).__name__} has no recurrent mode (no allocate_state/step)")

    @staticmethod
    def _require_state(state: Any, name: str) -> None:
        if state is None:
            raise StateError(f"{name}.step needs a state: call allocate_state(batch_size, max_len=...) first")
