"""Causal multi-head self-attention mixer with a KV cache for generation.

Uses ``flash_attn`` when it is installed and the inputs are fp16/bf16 on CUDA, otherwise
``torch.nn.functional.scaled_dot_product_attention`` (same math). With ``rotary=True`` (set by the
backbone for ``model.positions=rotary``) queries and keys are rotated by their absolute position
(:mod:`serengeti.ops.rotary`); the KV cache holds rotated keys, so a cached key keeps its position.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from serengeti.mixers.base import Mixer
from serengeti.ops.rotary import rotary_angles, rotate

try:  # optional extra: pip install .[flash]
    from flash_attn import flash_attn_qkvpacked_func
except ImportError:  # pragma: no cover - depends on the environment
    flash_attn_qkvpacked_func = None


@dataclass
class KVCache:
    """Keys and values of every position seen so far.

    Attributes:
        k, v: (B, H, max_len, head_dim) preallocated buffers.
        length: number of positions written.
    """

    k: torch.Tensor
    v: torch.Tensor
    length: int = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k, v: (B, H, T, hd)`` after the cached positions; return all keys/values so far."""
        end = self.length + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(
                f"KV cache holds {self.k.shape[2]} positions (allocate_state max_len) but {end} were requested; "
                "allocate a larger state for longer generations"
            )
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(Mixer):
    """Causal multi-head self-attention, ``x: (B, L, D) -> (B, L, D)``.

    Args:
        d_model: model width D.
        num_heads: heads H; must divide D.
        dropout: dropout on attention probabilities (training only).
        bias: bias in ``Wqkv`` and ``out_proj``.
        softmax_scale: defaults to 1/sqrt(head_dim).
        rotary: rotate queries and keys by position (RoPE over the whole head; head_dim must be even).
            The backbone sets it from ``model.positions``; a config does not.
    """

    def __init__(
        self,
        d_model: int,
        *,
        layer_idx: int | None = None,
        l_max: int | None = None,
        num_heads: int = 1,
        dropout: float = 0.0,
        bias: bool = True,
        softmax_scale: float | None = None,
        rotary: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(d_model, layer_idx=layer_idx, l_max=l_max)
        if num_heads <= 0 or d_model % num_heads != 0:
            raise ValueError(
                f"attention num_heads ({num_heads}) must be positive and divide model.d_model ({d_model})"
            )
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.dropout = dropout
        self.softmax_scale = softmax_scale
        self.rotary = rotary
        if rotary:
            rotary_angles(1, self.head_dim)  # refuses an odd head width now, not at the first forward
        self.Wqkv = nn.Linear(d_model, 3 * d_model, bias=bias, device=device, dtype=dtype)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias, device=device, dtype=dtype)

    def _qkv(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """x: (B, L, D) -> q, k, v stacked (3, B, H, L, hd); q and k rotated for positions offset.. with ``rotary``."""
        # layout of Wqkv's output: (three, heads, head_dim), as flash-attn's MHA
        qkv = rearrange(self.Wqkv(x), "b l (three h d) -> three b h l d", three=3, h=self.num_heads)
        if not self.rotary:
            return qkv
        cos, sin = rotary_angles(x.shape[1], self.head_dim, offset=offset, device=x.device, dtype=qkv.dtype)
        return torch.cat((rotate(qkv[:2], cos, sin), qkv[2:]))

    def forward(self, x: torch.Tensor, state: KVCache | None = None) -> torch.Tensor:
        """x: (B, L, D) -> (B, L, D). With ``state``, keys/values are appended to the cache (prefill)."""
        p = self.dropout if self.training else 0.0
        if (
            state is None
            and flash_attn_qkvpacked_func is not None
            and x.is_cuda
            and x.dtype in (torch.float16, torch.bfloat16)
        ):
            qkv = rearrange(self._qkv(x), "three b h l d -> b l three h d")
            y = flash_attn_qkvpacked_func(qkv, dropout_p=p, softmax_scale=self.softmax_scale, causal=True)
            return self.out_proj(rearrange(y, "b l h d -> b l (h d)"))
        q, k, v = self._qkv(x, offset=0 if state is None else state.length)
        if state is None or state.length == 0:
            if state is not None:
                state.append(k, v)
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, scale=self.softmax_scale)
        else:
            # continuing a prompt: query i (absolute position offset+i) sees keys <= offset+i
            offset = state.length
            k, v = state.append(k, v)
            L, S = q.shape[2], k.shape[2]
            mask = torch.arange(S, device=x.device)[None, :] <= (offset + torch.arange(L, device=x.device))[:, None]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=self.softmax_scale)
        return self.out_proj(rearrange(y, "b h l d -> b l (h d)"))

    def allocate_state(self, batch_size: int, *, max_len: int, device=None, dtype=None) -> KVCache:
        """An empty KV cache for ``max_len`` positions."""
        device = device if device is not None else self.Wqkv.weight.device
        dtype = dtype if dtype is not None else self.Wqkv.weight.dtype
        shape = (batch_size, self.num_heads, max_len, self.head_dim)
        return KVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def step(self, x_t: torch.Tensor, state: KVCache) -> tuple[torch.Tensor, KVCache]:
        """x_t: (B, D) -> (B, D), attending to every cached position and itself."""
        self._require_state(state, type(self).__name__)
        q, k, v = self._qkv(x_t.unsqueeze(1), offset=state.length)  # (B, H, 1, hd)
        k, v = state.append(k, v)
        y = F.scaled_dot_product_attention(q, k, v, scale=self.softmax_scale)
        return self.out_proj(rearrange(y, "b h 1 d -> b (h d)")), state
