"""Incremental causal long convolution for generation: one new output in O(L).

A causal convolution ``y_t = sum_{s <= t} k[t - s] u_s`` needs, to produce ``y_t`` alone, every
input seen so far and the first ``t + 1`` kernel taps. :class:`ConvHistory` keeps both: the
kernels are stored time-reversed once, so each step is a single dot product of two
contiguous slices::

    kernel_rev[..., M-1-j] = k[..., j]                 (M = max_len)
    y_t = sum_s  inputs[..., s] * kernel_rev[..., M-1-t+s]      s = 0 .. t

Shared by every mixer whose long filter is an explicit or cached kernel (Hyena, LongConv).
The skip term ``D * u_t`` is left to the caller, as in :func:`serengeti.ops.fftconv.fftconv`
(which the parallel mode uses and which the step matches).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ConvHistory:
    """Inputs seen so far and the (time-reversed) kernels of one causal long convolution.

    Attributes:
        kernel_rev: (*K, M) kernels reversed in time; ``*K`` broadcasts against the channel
            dims of ``inputs`` (e.g. kernels (C, H, M) with inputs (B, 1, H, M)).
        inputs: (B, *C, M) the inputs ``u_0 .. u_{seqlen-1}`` in ``[..., :seqlen]``.
        seqlen: number of positions consumed.
    """

    kernel_rev: torch.Tensor
    inputs: torch.Tensor
    seqlen: int = 0

    @classmethod
    def allocate(cls, kernel: torch.Tensor, input_shape: tuple[int, ...], max_len: int, dtype=None) -> "ConvHistory":
        """Empty history for ``max_len`` positions.

        Args:
            kernel: (*K, Lk) kernels (detached here: the state is for inference). Taps beyond
                ``max_len`` are never used; a kernel shorter than ``max_len`` is zero-padded.
            input_shape: (B, *C), the shape of one step's input.
            max_len: the most positions this history will hold.
            dtype: dtype of the stored inputs (default: the kernel's).
        """
        k = kernel.detach()[..., :max_len]
        k = F.pad(k, (0, max_len - k.shape[-1])).flip(-1).contiguous()
        inputs = torch.zeros(*input_shape, max_len, device=k.device, dtype=dtype or k.dtype)
        return cls(kernel_rev=k, inputs=inputs)

    @property
    def max_len(self) -> int:
        return self.inputs.shape[-1]

    def _check_room(self, n: int) -> None:
        if self.seqlen + n > self.max_len:
            raise ValueError(
                f"generation state holds {self.max_len} positions (allocate_state max_len) but "
                f"{self.seqlen + n} were requested; allocate a larger state"
            )

    def prefill(self, u: torch.Tensor) -> None:
        """Record a prompt ``u: (B, *C, L)`` (its outputs come from the parallel mode)."""
        L = u.shape[-1]
        self._check_room(L)
        self.inputs[..., self.seqlen:self.seqlen + L] = u.detach()
        self.seqlen += L

    def step(self, u_t: torch.Tensor) -> torch.Tensor:
        """Append ``u_t: (B, *C)`` and return ``y_t = sum_{s<=t} k[t-s] u_s``, (B, *broadcast(C, K)).

        Costs O(t) per channel. Computed in the stored dtype.
        """
        self._check_room(1)
        t = self.seqlen
        self.inputs[..., t] = u_t
        self.seqlen = t + 1
        past = self.inputs[..., : t + 1]
        taps = self.kernel_rev[..., self.max_len - 1 - t:]
        return (past * taps).sum(-1)
